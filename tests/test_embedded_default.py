"""The embedded default, `python train.py` with no --model: it builds the toy world and a
warm-started policy (cached), trains on them with TOYWORLD_PRESET under the options given, and
evaluates on the held-out questions.

Shrunk for CI (about a minute): a small world and a briefly warm-started tiny policy, built
through `runtime.embedded_default` exactly as the full-size default is, then a run of two steps.
"""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

import rollout as rollout_cli
import train
from tspo_jax import data, hf_io, protocol, qwen, retrieval, rollout, runtime, toyworld
from tspo_jax.toyworld.demonstrations import load_demonstrations
from tspo_jax.toyworld.world import QUESTION_RELATIONS

TINY_WORLD = toyworld.ToyWorldConfig(
    countries=4,
    cities=12,
    people=60,
    works=60,
    companies=16,
    demo_worlds=4,
    demo_scale=1.0,
    train_questions=40,
    demo_questions=480,
    heldout_questions=24,
)
TINY_POLICY = toyworld.WarmStartConfig(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=128,
    epochs=4,
    batch_size=8,
    lr=3e-3,
)
SHORT = {"steps": 2, "eval_every": 1, "eval_size": 8, "eval_batch": 8, "checkpoint_every": 2}
SHORT |= {"prompts_per_step": 8, "mini_batch": 8}
ARGS = [a for name, v in SHORT.items() for a in ("--" + name.replace("_", "-"), str(v))]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """(train.main's result, cache folder, run folder) of a shortened default run."""
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("run") / "toy"
    embedded = functools.partial(
        runtime.embedded_default, world_cfg=TINY_WORLD, policy_cfg=TINY_POLICY
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TSPO_JAX_CACHE", str(cache))
        mp.setattr(runtime, "embedded_default", embedded)
        result = train.main(["--out-dir", str(out), *ARGS])
    return result, cache, out


def test_default_run_goes_end_to_end(default_run):
    result, cache, out = default_run
    cfg = result["config"]
    # The preset filled every option not given; the world and policy came from the cache.
    assert cfg.model == str(cache / "toyworld-policy")
    assert cfg.data == str(cache / "toyworld" / "train.jsonl")
    assert cfg.eval_data == str(cache / "toyworld" / "heldout.jsonl")
    assert cfg.retriever.corpus == str(cache / "toyworld" / "corpus.jsonl")
    flat = {**dataclasses.asdict(cfg), **dataclasses.asdict(cfg.agent)}
    for name, value in train.TOYWORLD_PRESET.items():
        assert flat[name] == SHORT.get(name, value) or name == "out_dir", name
    # The demonstrations were written in the run's prompt template.
    demos = load_demonstrations(cache / "toyworld" / "demos.jsonl")
    prompt = protocol.build_prompt(demos[0].question, template=cfg.agent.template)
    assert demos[0].segments[0] == (prompt, False)
    # Metrics: the warm start's evaluation at step 0, then one row a step with an evaluation.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0 <= r["eval_em"] <= 1 and r["eval_answer_rate"] > 0.5
    for r in rows[1:]:
        assert np.isfinite(r["loss"]) and 0 <= r["zero_adv_group_frac"] <= 1
        assert r["turns"] >= 1 and 0 <= r["reward"] <= 1
    assert (out / "metrics.png").stat().st_size > 0
    # A checkpoint and a Hugging Face export of the trained policy.
    assert (out / "checkpoints" / "2").is_dir()
    _, exported = hf_io.load_hf(str(out / "hf" / "step_2"))
    _, initial = hf_io.load_hf(cfg.model)
    assert not np.allclose(exported["embed_VD"], initial["embed_VD"])  # it trained


def test_world_and_policy_are_built_once(default_run):
    result, cache, out = default_run
    stamps = [cache / "toyworld" / "world.json", cache / "toyworld-policy" / "warm_start.json"]
    before = [p.stat().st_mtime_ns for p in stamps]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TSPO_JAX_CACHE", str(cache))
        again = runtime.embedded_default(
            train.parse_config(["--out-dir", str(out)]), TINY_WORLD, TINY_POLICY
        )
    assert again.model == result["config"].model
    assert [p.stat().st_mtime_ns for p in stamps] == before  # nothing rebuilt


def test_a_warm_start_seed_gets_a_warm_start_and_folder_of_its_own(default_run):
    """--warm-start-seed 1: another initialization and order of the demonstrations, cached
    beside the default's, on the same world; the default's folders are left as they were."""
    _, cache, out = default_run
    default = cache / "toyworld-policy"
    before = (default / "warm_start.json").stat().st_mtime_ns
    quick = dataclasses.replace(TINY_POLICY, epochs=1)  # a warm start of its own, a short one
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TSPO_JAX_CACHE", str(cache))
        cfg = train.parse_config(["--out-dir", str(out), "--warm-start-seed", "1"])
        cfg = runtime.embedded_default(cfg, TINY_WORLD, quick)
    assert cfg.model == str(cache / "toyworld-policy-seed1")
    assert cfg.data == str(cache / "toyworld" / "train.jsonl")
    info = json.loads((cache / "toyworld-policy-seed1" / "warm_start.json").read_text())
    assert info["config"] == dataclasses.asdict(quick) | {"seed": 1}
    assert (default / "warm_start.json").stat().st_mtime_ns == before
    _, seed0 = hf_io.load_hf(str(default))
    _, seed1 = hf_io.load_hf(cfg.model)
    assert not np.allclose(seed0["embed_VD"], seed1["embed_VD"])


def test_warm_start_loads_and_follows_the_tag_protocol(default_run):
    result, cache, _ = default_run
    cfg = result["config"]
    info = json.loads((cache / "toyworld-policy" / "warm_start.json").read_text())
    assert info["config"] == dataclasses.asdict(TINY_POLICY)
    model_config, params = hf_io.load_hf(cfg.model)
    assert model_config.tie_word_embeddings and model_config.num_layers == 2
    assert params["embed_VD"].shape == (model_config.vocab_size, 64)
    _, _, tokenizer = rollout.load_policy(cfg.model)
    assert model_config.vocab_size == len(tokenizer)
    examples = data.load_examples(cfg.eval_data)
    greedy = functools.partial(
        rollout.evaluate,
        model_config=model_config,
        tokenizer=tokenizer,
        retriever=retrieval.BM25Retriever(cfg.retriever.corpus),
        examples=examples,
        cfg=dataclasses.replace(cfg.agent, greedy=True),
        batch_size=len(examples),
        progress=False,
    )
    summary, trajectories = greedy(params)
    # Most trajectories search first, with a query "<name> <relation>", then answer.
    assert summary["invalid_rate"] <= 0.1 and summary["answer_rate"] >= 0.9
    first = [t.turns[0].action for t in trajectories]
    assert np.mean([a.kind == "search" for a in first]) >= 0.75
    relations = set(QUESTION_RELATIONS)
    queries = [a.content.split() for a in first if a.kind == "search"]
    assert np.mean([len(q) == 2 and q[1] in relations for q in queries]) >= 0.8
    # A random policy of the same shape does none of this.
    summary, _ = greedy(qwen.init_params(model_config, jax.random.key(0)))
    assert summary["answer_rate"] < 0.5


def test_rollout_cli_on_the_export_reproduces_the_runs_evaluation(default_run, tmp_path):
    """python rollout.py --model runs/.../hf/step_2 with only the data and corpus reports what
    train.py's own evaluation of step 2 did: the export carries the run's template, budgets
    and batch size (TOYWORLD_PRESET's, not Search-R1's defaults), and greedy is the default."""
    result, _, out = default_run
    cfg = result["config"]
    summary = rollout_cli.main(
        [
            *("--model", str(out / "hf" / "step_2"), "--data", cfg.eval_data),
            *("--corpus", cfg.retriever.corpus, "--limit", str(cfg.eval_size)),
        ]
    )
    last = result["history"][-1]
    assert last["step"] == 2
    assert summary == {k.removeprefix("eval_"): v for k, v in last.items() if k.startswith("eval_")}
    assert summary["searches"] > 0 and summary["answer_rate"] > 0.5  # a policy that searches
