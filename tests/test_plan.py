"""The memory plan (tspo_jax/plan.py, train.py --plan-only): its estimates against XLA's
memory_analysis of the compiled programs, its byte counts by hand, and the README's table."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rollout
import train
from tspo_jax import cli, hf_io, learner, plan, qwen, sampling

ROOT = train.Path(__file__).resolve().parents[1]
QWEN_3B, QWEN_7B = ROOT / "tests" / "data" / "qwen2.5-3b", ROOT / "tests" / "data" / "qwen2.5-7b"
SMALL = qwen.QwenConfig(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    tie_word_embeddings=True,
)


def test_update_temporaries_match_xla():
    """The compiled update of 2 micro-batches of 8 prompts x 4 x 1024 tokens on a 1 x 8 fsdp
    mesh (remat, attention in blocks, log-prob chunks): XLA's temporaries within 25%."""
    mesh = learner.make_mesh(1, 8)
    optimizer, _ = learner.make_optimizer(
        lr=1e-6, warmup_steps=0, total_steps=10, schedule="constant", weight_decay=0.01,
        grad_clip=1.0, b1=0.9, b2=0.999,
    )  # fmt: skip
    options = learner.forward_options(
        mesh, remat="full", attention_bytes=2 << 20, logits_bytes=16 << 20
    )
    compiled = learner.update.lower(
        learner.abstract_state(SMALL, mesh, optimizer),
        learner.abstract_batch(mesh, 2, 8, 4, 1024, ref=True),
        config=SMALL,
        mesh=mesh,
        optimizer=optimizer,
        settings=learner.LossSettings(kl_coef=0.001),
        options=options,
    ).compile()
    xla = compiled.memory_analysis().temp_size_in_bytes
    estimate = plan.update_temporaries(
        SMALL,
        rows=8 * 4 // 8,
        length=1024,
        param_shard=plan.param_shard_size(SMALL, 1, 8),
        remat="full",
        attention_bytes=2 << 20,
        logits_bytes=16 << 20,
    )
    assert 0.75 < estimate / xla < 1.25, (estimate, xla)


def test_decode_temporaries_match_xla():
    """Appending a 512-token chunk to a wave of 64 rows (8 a device) with 2048 cache slots:
    XLA's temporaries within 25% (the append is the larger of append and decoding)."""
    mesh = rollout.rollout_mesh(jax.devices())
    options = qwen.ForwardOptions(
        batch_sharding=NamedSharding(mesh, P("rows")), attention_bytes=8 << 20
    )
    whole = NamedSharding(mesh, P())
    spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    params = jax.eval_shape(lambda: qwen.init_params(SMALL, jax.random.key(0)))
    params = jax.tree.map(lambda x: spec(x, whole), params)
    state = jax.eval_shape(lambda: sampling.init_cache(SMALL, 64, 2048))
    state = jax.tree.map(lambda x: spec(x, options.batch_sharding), state)
    tokens = jax.ShapeDtypeStruct((64, 512), jnp.int32, sharding=options.batch_sharding)
    n = jax.ShapeDtypeStruct((64,), jnp.int32, sharding=options.batch_sharding)
    compiled = sampling._append_jit.lower(params, SMALL, state, tokens, n, options).compile()
    xla = compiled.memory_analysis().temp_size_in_bytes
    estimate = plan.decode_temporaries(
        SMALL, rows=8, slots=2048, chunk=512, attention_bytes=8 << 20
    )
    assert 0.75 < estimate / xla < 1.25, (estimate, xla)


def test_params_and_cache_by_hand():
    """Qwen2.5-3B over 8 fsdp devices: every weight matrix splits 8 ways along D, the biases
    and norm scales (36 x 6,656 + 2,048 numbers) stay whole; the KV cache holds 36 layers x
    2 (K, V) x 2 heads x 128 x 2 bytes per slot."""
    config = hf_io.read_config(str(QWEN_3B), jnp.bfloat16)
    assert plan.param_count(config) == 3_085_938_688
    whole = 36 * (2 * 2048 + 16 * 128 + 2 * 2 * 128) + 2048
    assert plan.param_shard_size(config, 1, 8) == (3_085_938_688 - whole) // 8 + whole
    assert plan.param_shard_size(config, 8, 1) == 3_085_938_688  # data parallel: whole copies
    per_slot = 36 * 2 * 2 * 128 * 2
    assert plan.kv_cache_bytes(config, rows=10, slots=4096) == 10 * per_slot * 4096 * 3 // 2


def plan_only(model, devices, gib, micro, *extra):
    argv = [
        *("--model", str(model), "--plan-only", "--compute-dtype", "bfloat16"),
        *("--plan-devices", str(devices), "--device-memory-gb", str(gib)),
        *("--mesh-fsdp", str(devices), "--micro-batch", str(micro), *extra),
    ]
    return train.main(argv)["plan"]


# The README's table: (model, slice, chips, GiB per chip, micro-batch) -> rollout-batch.
README_TABLE = [
    (QWEN_3B, "v4-8", 4, 32, 8, 200),
    (QWEN_3B, "v5e-8", 8, 16, 8, 80),
    (QWEN_3B, "v6e-8", 8, 32, 16, 560),
    (QWEN_3B, "v5p-8", 4, 95, 32, 1120),
    (QWEN_7B, "v6e-8", 8, 32, 8, 40),
    (QWEN_7B, "v5p-8", 4, 95, 16, 480),
]


@pytest.mark.parametrize("model, name, devices, gib, micro, wave", README_TABLE)
def test_plan_only_for_the_readme_slices(model, name, devices, gib, micro, wave, capsys):
    memory = plan_only(model, devices, gib, micro)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert memory.rollout_batch == wave and memory.micro_batch == micro
    assert memory.peak <= gib * plan.GiB and plan.check(memory) is None
    # The default wave is the largest that leaves the margin: one more unit would not.
    unit = np.lcm(5, devices)
    bigger = plan_only(model, devices, gib, micro, "--rollout-batch", str(wave + unit))
    assert bigger.rollout_peak > plan.WAVE_MARGIN * gib * plan.GiB
    assert last == (
        f"plan: fits, peak {memory.peak / plan.GiB:.1f} GiB of {gib:.1f} GiB per device, "
        f"rollout-batch {wave}, micro-batch {micro}"
    )


@pytest.mark.parametrize(
    "model, devices, gib, extra, needle",
    [
        (QWEN_7B, 8, 16, (), "the train state and the sampling weights"),
        (QWEN_7B, 4, 32, (), "the train state and the sampling weights"),
        (QWEN_3B, 4, 32, ("--micro-batch", "256"), "the largest that fits is 8"),
        (QWEN_3B, 4, 32, ("--micro-batch", "8", "--rollout-batch", "400"), "--rollout-batch"),
    ],
)
def test_a_slice_that_cannot_fit_exits_with_one_line(
    model, devices, gib, extra, needle, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # the program name cli.run prints
    argv = [
        *("--model", str(model), "--plan-only", "--compute-dtype", "bfloat16"),
        *("--plan-devices", str(devices), "--device-memory-gb", str(gib)),
        *("--mesh-fsdp", str(devices), *extra),
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: plan: ") and needle in err[0]
    assert f"over the {gib:.1f} GiB of one device" in err[0]


def test_a_run_too_big_for_its_devices_is_refused_before_step_one(
    small_world, small_policy, tmp_path, capsys, monkeypatch
):
    """A --device-memory-gb that the train state fits but the rollout wave, or then the update,
    does not: refused in one line, before any weight is loaded or anything is written."""
    monkeypatch.setattr(sys, "argv", ["train.py"])  # the program name cli.run prints
    common = [
        *("--model", str(small_policy), "--data", str(small_world.train)),
        *("--corpus", str(small_world.corpus), "--prompts-per-step", "8", "--mini-batch", "8"),
        *("--group-size", "4", "--max-context", "384", "--compile-cache", "off"),
    ]
    sizes = lambda *extra: train.memory_plan(train.parse_config([*common, *extra]))
    wave32, wave8 = sizes("--rollout-batch", "32"), sizes("--rollout-batch", "8")
    assert wave8.rollout_peak < wave32.rollout_peak < wave8.update_peak  # what the cases need
    for capacity, extra, needle in (
        (wave8.fixed + wave8.sampling_weights, ("--rollout-batch", "32"), "wave of 32 rows"),
        (wave8.rollout_peak, ("--rollout-batch", "8"), "the update at --micro-batch 8"),
    ):
        out = tmp_path / needle.split()[-1]
        gib = f"{1.01 * capacity / plan.GiB:.9f}"
        argv = [*common, "--out-dir", str(out), "--device-memory-gb", gib, *extra]
        with pytest.raises(SystemExit) as exit_info:
            cli.run(train.main, argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "train.py: error: plan: " in err and needle in err and "Traceback" not in err
        assert not out.exists()


def test_bfloat16_master_weights_are_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--model", "x", "--param-dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert "--param-dtype bfloat16" in err and "rounds to nothing" in err
