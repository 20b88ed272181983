"""The memory plan (tspo_jax/plan.py, train.py --plan-only): its estimates against XLA's
memory_analysis of the compiled programs, its byte counts by hand, and the README's table."""

import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import train
from tspo_jax import aot, cli, hf_io, plan, qwen, rollout, runtime, sampling

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_DATA = "tpu_update_temporaries.jsonl"  # the TPU compiler's numbers (tspo_jax/plan.py)
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


def test_update_formula_is_the_safe_side_of_the_tpu_compiler():
    """plan.update_temporaries against the TPU compiler's temporaries of the compiled update
    (tests/data/tpu_update_temporaries.jsonl: the shapes its weights were fitted to, each
    compiled for its topology by train.py's own programs): never under, over by at most
    UPDATE_ERROR."""
    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / TPU_DATA).open()]
    assert len(rows) >= 10
    for r in rows:
        config = hf_io.read_config(str(ROOT / "tests" / "data" / r["model"]), jnp.bfloat16)
        config = dataclasses.replace(config, num_layers=r["layers"])
        options = qwen.ForwardOptions(
            remat=r["remat"],
            attention_bytes=r["attention_mb"] << 20,
            logits_bytes=r["logits_mb"] << 20,
            mlp_bytes=r["mlp_mb"] << 20,
        )
        estimate = plan.update_temporaries(
            config,
            rows=r["micro"] * 5 // r["fsdp"],
            length=r["T"],
            param_shard=plan.param_shard_size(config, 1, r["fsdp"]),
            options=options,
        )
        assert 1 <= estimate / r["temps"] <= 1 + plan.UPDATE_ERROR, (r, estimate / r["temps"])


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
    2 (K, V) x 2 heads x 128 x 2 bytes per slot, counted twice (plan.kv_cache_bytes)."""
    config = hf_io.read_config(str(QWEN_3B), jnp.bfloat16)
    assert plan.param_count(config) == 3_085_938_688
    whole = 36 * (2 * 2048 + 16 * 128 + 2 * 2 * 128) + 2048
    assert plan.param_shard_size(config, 1, 8) == (3_085_938_688 - whole) // 8 + whole
    assert plan.param_shard_size(config, 8, 1) == 3_085_938_688  # data parallel: whole copies
    per_slot = 36 * 2 * 2 * 128 * 2
    assert plan.kv_cache_bytes(config, rows=10, slots=4096) == 2 * 10 * per_slot * 4096


def formula_plan(model, target: str, *extra) -> plan.Plan:
    """train.py's quick estimate (plan.py, no compiler) for a slice that --plan-target names,
    at the README's flags."""
    t = aot.TARGETS[target]
    argv = [
        *("--model", str(model), "--plan-only", "--compute-dtype", "bfloat16"),
        *("--plan-devices", str(t.devices), "--device-memory-gb", str(t.hbm_gib)),
        *("--mesh-fsdp", str(t.devices), "--remat", "offload", "--kv-cache", "dense", *extra),
    ]
    return runtime.memory_plan(train.parse_config(argv), check=False)


# The README's tables: `python train.py --model tests/data/qwen2.5-{3b,7b} --plan-only
# --plan-target SLICE --compute-dtype bfloat16 --mesh-fsdp CHIPS --remat offload --micro-batch M`
# (the train state in host memory during rollouts: --offload-state is on for a TPU target), as
# the TPU compiler answered: (model, slice, --kv-cache, micro-batch, wave, compiler's update
# peak, compiler's rollout peak per chip in GiB), the micro-batch and wave the largest that fit;
# the dense cache's on 2026-12-03, the paged cache's (the default on TPU) on 2026-12-07.
README_ROWS = [
    (QWEN_3B, "v4-8", "dense", 16, 300, 27.78, 26.94),
    (QWEN_3B, "v5e-8", "dense", 16, 240, 14.86, 13.54),
    (QWEN_3B, "v6e-8", "dense", 64, 600, 24.35, 26.94),
    (QWEN_3B, "v5p-8", "dense", 128, 1140, 67.24, 86.11),
    (QWEN_7B, "v6e-8", "dense", 16, 240, 28.71, 28.05),
    (QWEN_7B, "v5p-8", "dense", 32, 640, 74.58, 84.99),
    (QWEN_3B, "v4-8", "paged", 16, 980, 27.78, 27.58),
    (QWEN_3B, "v5e-8", "paged", 16, 720, 14.86, 13.98),
    (QWEN_3B, "v6e-8", "paged", 64, 1960, 24.35, 27.69),
    (QWEN_3B, "v5p-8", "paged", 128, 2560, 67.24, 61.69),
    (QWEN_7B, "v6e-8", "paged", 16, 760, 28.71, 27.88),
    (QWEN_7B, "v5p-8", "paged", 32, 2020, 74.58, 85.55),
]


@pytest.mark.parametrize("model, target, cache, micro, wave, update, rollout", README_ROWS)
def test_the_quick_estimate_is_the_safe_side_of_the_readme_rows(
    model, target, cache, micro, wave, update, rollout
):
    """The formula alone at each README row's setting: each phase's peak at or above the TPU
    compiler's, the update's by at most UPDATE_ERROR, so that a run it passes does not fail for
    memory on the chips; and by itself it picks no larger wave than the compiler did."""
    flags = ("--kv-cache", cache, "--micro-batch", str(micro))
    memory = formula_plan(model, target, *flags, "--rollout-batch", str(wave))
    gib = plan.GiB
    assert update * gib <= memory.update_peak <= (1 + plan.UPDATE_ERROR) * update * gib
    assert rollout * gib <= memory.rollout_peak <= (1 + plan.UPDATE_ERROR) * rollout * gib
    assert 0 < formula_plan(model, target, *flags).rollout_batch <= wave


@pytest.mark.parametrize(
    "model, devices, gib, extra, needle",
    [
        (QWEN_7B, 8, 16, (), "the train state and the sampling weights"),
        (QWEN_7B, 4, 32, (), "the train state and the sampling weights"),
        (QWEN_3B, 4, 32, ("--micro-batch", "256"), "the largest that fits is 8"),
        (
            QWEN_3B,
            4,
            32,
            ("--micro-batch", "8", "--rollout-batch", "400", "--kv-cache", "dense"),
            "--rollout-batch",
        ),
        (QWEN_3B, 4, 32, ("--micro-batch", "8", "--rollout-batch", "2000"), "--rollout-batch"),
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
    sizes = lambda *extra: runtime.memory_plan(train.parse_config([*common, *extra]))
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


def test_offload_and_rollout_slots_free_room_for_larger_waves():
    """3B on a v5e-8 (formula only). --offload-state on: during the waves the chips hold no
    params, optimizer state or reference, but the gather still holds them beside the sampling
    copy; --rollout-slots 2048: a row's cache is half of --max-context 4096's. Each makes the
    default wave (the largest that fits) larger."""
    flags = ("--micro-batch", "16", "--rollout-batch", "120")
    off = formula_plan(QWEN_3B, "v5e-8", *flags, "--offload-state", "off")
    on = formula_plan(QWEN_3B, "v5e-8", *flags, "--offload-state", "on")
    half = formula_plan(
        QWEN_3B, "v5e-8", *flags, "--offload-state", "on", "--rollout-slots", "2048"
    )
    per_slot = 36 * 2 * 2 * 128 * 2  # layers x (K, V) x heads x head dim x bfloat16
    assert off.kv_cache == on.kv_cache == 2 * 15 * per_slot * 4096  # 15 rows a chip, 2 copies
    assert half.kv_cache == 2 * 15 * per_slot * 2048
    rollout = lambda p: p.sampling_weights + p.kv_cache + p.decode
    assert off.rollout_peak == off.fixed + rollout(off)
    assert on.fixed > 0 and on.rollout_peak == max(rollout(on), on.fixed + on.sampling_weights)
    assert on.rollout_peak < off.rollout_peak and half.rollout_peak < on.rollout_peak
    waves = default_waves(
        ("--offload-state", "off"),
        ("--offload-state", "on"),
        ("--offload-state", "on", "--rollout-slots", "2048"),
    )
    assert waves[0] < waves[1] < waves[2], waves


def default_waves(*settings) -> list[int]:
    """The default wave (the largest that fits, formula only) of 3B on a v5e-8 at micro-batch
    16, at each of ``settings`` (extra flags)."""
    flags = ("--micro-batch", "16")
    return [formula_plan(QWEN_3B, "v5e-8", *flags, *more).rollout_batch for more in settings]


def test_a_paged_pool_holds_each_rows_live_tokens_and_a_page():
    """3B on a v5e-8 (formula only), --kv-cache paged: a pool per chip of ceil(live / 64) + 1
    pages per row (its live tokens, --live-tokens, default --max-context / 2, and the page a
    decoding call may add), 64 tokens x 36,864 bytes a page, counted once; at least one whole
    row's context. The default wave is then larger than the dense cache's, and larger again at
    fewer live tokens."""
    flags = ("--micro-batch", "16", "--rollout-batch", "120")
    paged = formula_plan(QWEN_3B, "v5e-8", *flags, "--kv-cache", "paged")
    assert plan.kv_bytes_per_token(hf_io.read_config(str(QWEN_3B), jnp.bfloat16)) == 36_864
    assert (paged.page, paged.live) == (64, 2048)
    assert paged.pages == 15 * (2048 // 64 + 1)  # 15 rows a chip
    assert paged.kv_cache == paged.pages * 64 * 36_864
    one_row = plan.pool_pages(rows=1, live=100, page=64, max_context=4096)
    assert one_row == 4096 // 64 + 1  # a row that reaches the whole context still fits
    waves = default_waves(
        ("--kv-cache", "dense"),
        ("--kv-cache", "paged"),
        ("--kv-cache", "paged", "--live-tokens", "1024"),
    )
    assert waves[0] < waves[1] < waves[2], waves
