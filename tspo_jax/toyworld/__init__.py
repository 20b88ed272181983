"""The embedded default: a toy world in which TSPO can be seen working end to end, on one CPU,
with no downloads. Not part of the reference implementation: nothing in tspo_jax/ proper,
train.py or rollout.py imports it, except tspo_jax/runtime.py's ``embedded_default``.

    world.py           entities, facts as Search-R1 passages, multi-hop questions
    tokenizer.py       a byte-level BPE in which a name is always its syllables
    demonstrations.py  scripted trajectories in the rollout's exact text, some answering early
    files.py           ``build``: the world on disk (corpus, questions, demos, tokenizer), cached
    policy.py          ``warm_start``: a tiny Qwen2 after SFT on the demonstrations, cached
"""

from tspo_jax.toyworld.files import ToyWorldPaths, build
from tspo_jax.toyworld.policy import WarmStartConfig, warm_start
from tspo_jax.toyworld.world import WORLDS, ToyWorldConfig

__all__ = ["WORLDS", "ToyWorldConfig", "ToyWorldPaths", "WarmStartConfig", "build", "warm_start"]
