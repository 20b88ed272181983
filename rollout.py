"""Evaluate a policy: multi-turn search rollouts and EM / F1 on a question set.

    python rollout.py --model DIR --data FILE --corpus FILE          # embedded BM25
    python rollout.py --model DIR --data FILE --retriever-url URL    # Search-R1's server

The command line of ``tspo_jax/rollout.py`` (the turn loop, the KV-cache policy, packing,
summaries and evaluation, which train.py uses too). A folder that train.py exported carries
the rollout settings of its run (``tspo_rollout.json``): they are this command's defaults.
"""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tspo_jax import cli, data, retrieval
from tspo_jax.cli import option
from tspo_jax.rollout import (
    RetrieverConfig,
    RolloutConfig,
    connect,
    evaluate,
    load_policy,
    load_settings,
    read_template_file,
    rollout_mesh,
    to_json,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluate a policy on a question set with retrieval (greedy by default). A folder that
    train.py exported carries the rollout settings of the run (tspo_rollout.json): they are the
    defaults, each still overridable on the command line."""

    model: str = option("", "Hugging Face checkpoint folder of the policy")
    data: str = option("", "questions: Search-R1 parquet, or JSONL with question/golden_answers")
    retriever: RetrieverConfig = RetrieverConfig()
    out: str = option("", "write trajectories here as JSONL (empty: not written)")
    limit: int = option(0, "evaluate the first N questions only (0: all)")
    batch_size: int = option(64, "questions per rollout batch")
    dtype: str = option("float32", "parameter and compute dtype", choices=("float32", "bfloat16"))
    seed: int = option(0, "sampling seed (when not greedy)")
    agent: RolloutConfig = RolloutConfig(greedy=True)

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model is required")
        if not self.data:
            raise ValueError("--data is required")
        if not (self.retriever.corpus or self.retriever.retriever_url):
            raise ValueError("give exactly one of --corpus and --retriever-url")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


def main(argv=None):
    settings = lambda given: load_settings(given["model"]) if given.get("model") else {}
    cfg = cli.parse(EvalConfig, argv, defaults=settings)
    cfg = dataclasses.replace(cfg, agent=read_template_file(cfg.agent))
    print("tspo_jax evaluation\n" + cli.describe(cfg), file=sys.stderr)
    server = connect(cfg.retriever)  # before the model loads: down, a wrong path, ...
    mesh = rollout_mesh()  # the rows of each batch split over this host's devices
    model_config, params, tokenizer = load_policy(
        cfg.model, getattr(jnp, cfg.dtype), sharding=NamedSharding(mesh, P())
    )
    retriever = server or retrieval.BM25Retriever(cfg.retriever.corpus)
    examples = data.load_examples(cfg.data)
    if cfg.limit:
        examples = examples[: cfg.limit]
    summary, trajectories = evaluate(
        params,
        model_config,
        tokenizer,
        retriever,
        examples,
        cfg=cfg.agent,
        batch_size=cfg.batch_size,
        key=jax.random.key(cfg.seed),
        mesh=mesh,
    )
    if cfg.out:
        with open(cfg.out, "w") as f:
            for t in trajectories:
                f.write(json.dumps(to_json(t)) + "\n")
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    cli.run(main)
