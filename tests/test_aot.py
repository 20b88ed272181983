"""train.py's programs compiled by the TPU compiler for a TPU topology on this CPU host
(tspo_jax/aot.py, train.py --plan-only --plan-target): tiny configs only, compiled in seconds.
libtpu comes with tests/requirements.txt (jax[tpu])."""

import dataclasses
import json
import math
import re
import sys

import jax
import jax.numpy as jnp
import pytest

import train
from tspo_jax import aot, cli, learner, plan, qwen, sampling

TINY = qwen.QwenConfig(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=1024,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    tie_word_embeddings=True,
    eos_token_ids=(1,),
    dtype="bfloat16",
)


@pytest.fixture(scope="module")
def v5e_4():
    return aot.target_devices("v5e-4")


@pytest.fixture(scope="module")
def tiny_programs(v5e_4):
    """Every program of the tiny run, compiled once for 4 TPU v5e chips (shared)."""
    return aot.update_programs(tiny_run(), v5e_4) + aot.rollout_programs(tiny_run(), v5e_4)


def tiny_run(**changes) -> aot.RunShape:
    optimizer, _ = learner.make_optimizer(
        lr=1e-6, warmup_steps=0, total_steps=10, schedule="constant", weight_decay=0.01,
        grad_clip=1.0, b1=0.9, b2=0.999,
    )  # fmt: skip
    run = aot.RunShape(
        config=TINY,
        data=1,
        fsdp=4,
        prompts_per_step=16,
        mini_batch=8,
        micro_batch=4,
        group_size=5,
        max_context=512,
        max_obs_tokens=100,
        max_new_tokens=64,
        wave=20,
        optimizer=optimizer,
        settings=learner.LossSettings(kl_coef=0.001, norm_length=512),
        options=qwen.ForwardOptions(
            remat="full", attention_bytes=1 << 20, logits_bytes=1 << 20, mlp_bytes=1 << 20
        ),
        sampling=sampling.SamplingParams(top_p=0.9),
    )
    return dataclasses.replace(run, **changes)


def test_every_program_compiles_for_a_tpu_topology_with_the_plain_code(v5e_4, tiny_programs):
    """update, log-probs, gather, prefill, append, grow and decode compile for 4 TPU v5e chips
    (nothing runs), each with its sizes; the decoding loop takes the plain top-p (a sort over
    the vocabulary), where the same program compiled for XLA:CPU takes the sort-free one."""
    run = tiny_run()
    names = [p.name for p in tiny_programs]
    assert names == ["logprobs", "ref logprobs", "update", *aot.ROLLOUT_PROGRAMS]
    for p in tiny_programs:
        assert p.arguments > 0 and p.peak >= p.arguments + p.temporaries, p
    by_name = {p.name: p for p in tiny_programs}
    # The update donates the train state: its outputs (but the metrics) reuse its buffers.
    assert 0.99 * by_name["update"].outputs < by_name["update"].alias < by_name["update"].outputs
    # The decoding loop holds the sampling copy and the cache as arguments.
    weights = plan.param_count(TINY) * 2
    cache = plan.kv_cache_bytes(TINY, rows=run.wave // 4, slots=512) // 2  # one copy
    assert by_name["decode"].arguments >= weights + cache
    tpu = aot.lower_decode(run, v5e_4).compile().as_text()
    cpu = aot.lower_decode(run, jax.devices()[:4]).compile().as_text()
    assert re.search(r"\bsort\(", tpu) and not re.search(r"\bsort\(", cpu)


def test_the_formula_errs_on_the_safe_side_of_the_tpu_compiler(v5e_4, tiny_programs):
    """plan.update_temporaries and plan.decode_temporaries against the TPU compiler's
    temporaries on tiny shapes: never under, the update's over by at most its stated error for
    such shapes (tests/test_plan.py checks it at Qwen2.5's shapes against recorded
    compilations)."""
    longer = dict(
        max_context=1024, micro_batch=8, mini_batch=8,
        options=tiny_run().options._replace(remat="offload"),
    )  # fmt: skip
    (other,) = aot.update_programs(tiny_run(**longer), v5e_4, ("update",))
    for update in [p for p in tiny_programs if p.name == "update"] + [other]:
        ratio = update.estimate / update.temporaries
        assert 1 <= ratio <= 1 + plan.UPDATE_ERROR_TINY, update
    for append in [p for p in tiny_programs if p.name in ("prefill", "append")]:
        assert append.estimate >= append.temporaries, append


def test_plan_target_answers_in_the_promised_format(tmp_path, capsys, monkeypatch):
    """--plan-only --plan-target v5e-8 on a tiny config.json: the compiler's table, then the
    two lines that scripts read; a micro-batch that does not fit: one error line naming the
    largest that does."""
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "vocab_size": 4096,
                "hidden_size": 256,
                "intermediate_size": 1024,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 128,
                "tie_word_embeddings": True,
                "eos_token_id": 1,
                "rope_theta": 1e6,
            }
        )
    )
    argv = [
        *("--model", str(model), "--plan-only", "--plan-target", "v5e-8"),
        *("--compute-dtype", "bfloat16", "--mesh-fsdp", "8", "--prompts-per-step", "16"),
        *("--mini-batch", "16", "--micro-batch", "8", "--max-context", "512"),
        *("--max-new-tokens", "64", "--max-obs-tokens", "100", "--rollout-batch", "40"),
    ]
    result = train.main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    compiled = result["compiled"]
    gib = lambda b: f"{b / plan.GiB:.1f}"
    hbm = aot.TARGETS["v5e-8"].hbm_gib  # 15.75: what the compiler lets a program use
    assert out[-2] == (
        f"compiled for v5e-8: update {gib(compiled.update_peak)} GiB, rollout "
        f"{gib(compiled.rollout_peak)} GiB of {hbm:.1f} GiB per chip"
    )
    peak = max(compiled.update_peak, compiled.rollout_peak)
    assert out[-1] == (
        f"plan: fits, peak {gib(peak)} GiB of {hbm:.1f} GiB per device, rollout-batch 40, "
        "micro-batch 8"
    )
    # A paged cache (auto on TPU) at 256 live tokens a row (--max-context / 2): the step's
    # HBM traffic plus what the kernel reads, 5 rows x 2 blocks of 128 tokens x 2 layers x 2 KV
    # heads x 128 x 2 (keys, values) x 2 bytes, which the compiler cannot see.
    step, minimum = compiled.step, compiled.step_minimum
    assert compiled.kernel_reads == 5 * 256 * 2 * 2 * 128 * 2 * 2
    assert minimum == compiled.weights + compiled.kernel_reads  # live tokens in whole blocks
    accessed = step.hbm_bytes + compiled.kernel_reads
    rate = 5 * aot.BANDWIDTH["TPU v5 lite"] / accessed  # 40 rows over 8 chips
    assert out[-3] == (
        f"rollout estimate: 5 rows per chip, decode step {accessed / plan.GiB:.2f} GiB "
        f"accessed of minimum "
        f"{minimum / plan.GiB:.2f} GiB, {rate:.0f} tokens/s per chip (compiler estimate)"
    )
    assert "cannot see inside a Pallas kernel" in "\n".join(out)
    # The smallest micro-batch far over the chip's HBM (a [T, T] mask per row at T = 65,536),
    # which the compiler refuses: one error line, nothing more compiled.
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, [*argv, "--max-context", "65536"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("train.py: error: plan: the update at --micro-batch 8 needs ")
    assert "(TPU compiler); none fits; try --remat offload" in err[0]


def test_largest_fitting_finds_the_boundary_in_few_compilations():
    """aot.largest_fitting on a made-up affine peak (no compiler): the largest size under the
    limit, found in a few 'compilations' from a formula that is over by 30%; none fits: the
    smallest compiled; sizes the formula puts far over are never compiled."""
    sizes = list(range(40, 2601, 40))
    compiled = []

    def compile_at(size):
        compiled.append(size)
        peak = 7 * 2**30 + size * 0.05 * 2**30
        return [aot.Program("x", 0, 0, 0, int(peak), 0, 0.0, 0, None)]

    estimate = lambda size: 1.3 * (7 * 2**30 + size * 0.05 * 2**30)
    limit = 0.9 * 15.75 * 2**30  # 14.175 GiB: the largest fitting size is 120 (13.0 GiB)
    best, programs = aot.largest_fitting(sizes, compile_at, limit, estimate)
    assert best == 120 and programs[0].peak <= limit and len(compiled) <= 3, compiled
    assert 160 in compiled  # the one just over, which proves 120 the largest
    compiled.clear()
    best, _ = aot.largest_fitting(sizes, compile_at, 5 * 2**30, estimate)
    assert best == 40 and compiled == [40]  # none fits; the rest is over 1.5x by the formula


def test_hbm_traffic_counts_what_crosses_hbm_where_the_cost_model_counts_more(v5e_4):
    """aot.hbm_traffic against bytes counted by hand, on one TPU v5e chip: a decoding matmul
    reads its weight once (the cost model counts it about 5 times: prefetched into VMEM, then
    read there), a lookup of a few embedding rows reads those rows, and an in-place update of
    one row of a donated array moves that row."""
    mesh = jax.sharding.Mesh(v5e_4[:1], ("x",))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=whole)

    def traffic(f, *args, donate=()):
        compiled = jax.jit(f, donate_argnums=donate).lower(*args).compile()
        return aot.hbm_traffic(compiled.as_text()), compiled.cost_analysis()["bytes accessed"]

    M, D, F, V = 8, 2048, 8192, 65536
    weight = D * F * 2
    hbm, cost = traffic(lambda x, w: x @ w, spec((M, D)), spec((D, F)))
    assert weight <= hbm <= weight + 4 * (M * D + M * F), (hbm, weight)
    assert cost > 3 * weight
    hbm, _ = traffic(lambda t, i: t[i], spec((V, D)), spec((M,), jnp.int32))
    assert hbm <= 4 * M * D * 2 + 64  # the table is V * D * 2 bytes
    update = lambda a, row, i: jax.lax.dynamic_update_slice(a, row, (i, 0))
    hbm, _ = traffic(update, spec((256, 4096)), spec((1, 4096)), spec((), jnp.int32), donate=0)
    assert hbm <= 4 * 4096 * 2 + 64  # the array is 256 * 4096 * 2 bytes


def test_hbm_traffic_charges_a_loop_its_body_times_its_trips_never_its_carried_tuple(v5e_4):
    """A fori_loop of 7 trips, compiled for one TPU v5e chip, carrying a 2 MiB table and a
    2 MiB donated buffer (4 MiB of carried tuple, in and out): each trip reads row i of the
    table (4,096 bf16: 8,192 bytes) and writes it, doubled, into row i of the buffer (8,192
    bytes): 7 x 16,384 = 114,688 bytes, plus the loop counter and the row index (a few
    4-byte scalars a trip, under 64 bytes). The trip count is not in the TPU compiler's text;
    the loop's counter shows it (0 to 7 by 1). With the trip count a traced argument, nobody
    knows it: trip_counts says None, and one trip is charged."""
    mesh = jax.sharding.Mesh(v5e_4[:1], ("x",))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=whole)
    R, D, trips = 256, 4096, 7
    row = D * 2

    def copy_rows(table_RD, buf_RD, n):
        def body(i, buf_RD):
            row_1D = jax.lax.dynamic_slice(table_RD, (i, 0), (1, D))
            return jax.lax.dynamic_update_slice(buf_RD, row_1D * 2, (i, 0))

        return jax.lax.fori_loop(0, n, body, buf_RD)

    def compiled(n):
        args = (spec((R, D)), spec((R, D)))
        if n is None:  # the trip count a traced argument
            lowered = jax.jit(copy_rows, donate_argnums=1).lower(*args, spec((), jnp.int32))
        else:
            lowered = jax.jit(lambda t, b: copy_rows(t, b, n), donate_argnums=1).lower(*args)
        text = lowered.compile().as_text()
        assert len(re.findall(r" while\(", text)) == 1 and "known_trip_count" not in text
        return aot.hbm_traffic(text), list(aot.trip_counts(text).values())

    hbm, counts = compiled(trips)
    assert counts == [trips]
    assert trips * 2 * row <= hbm <= trips * (2 * row + 64), hbm  # 114,688 bytes and scalars
    hbm, counts = compiled(None)
    assert counts == [None]
    assert 2 * row <= hbm <= 2 * row + 128, hbm  # one trip: 16,384 bytes and scalars


def test_trip_counts_reads_a_trip_count_the_compiler_states():
    """XLA:CPU writes known_trip_count into a while's backend_config (inside a call), which
    trip_counts takes as it is (the TPU compiler writes none; the loop's counter says the same
    there). Counted by hand from that program: 5 trips of sin on f32[4] (16 bytes in, 16 out)
    and the counter's add (4 + 4 in, 4 out); 6 tests (4 + 4 in, 1 out); before the loop, x
    and the counter copied into the carried tuple (16 + 16, 4 + 4)."""
    text = (
        jax.jit(lambda x: jax.lax.fori_loop(0, 5, lambda i, x: jnp.sin(x), x))
        .lower(jnp.zeros((4,)))
        .compile()
        .as_text()
    )
    assert '"known_trip_count":{"n":"5"}' in text
    assert list(aot.trip_counts(text).values()) == [5]
    assert aot.hbm_traffic(text) == 5 * (32 + 12) + 6 * 9 + 40


def test_decode_step_least_counts_an_untied_embedding_by_its_rows(v5e_4):
    """aot.decode_step's least against the config's arithmetic, on 4 TPU v5e chips at 5 rows
    a chip: the weights (tied: 6,033,920 bytes) and one copy of the cache (2,621,440), except
    that an untied model's step reads only its tokens' rows of the input embedding: 5 rows x
    256 x 2 = 2,560 bytes, where the table is 4,096 x 256 x 2 = 2 MiB. A tied model reads its
    table whole as the LM head. The compiler agrees: the untied step moves the tied one's bytes
    (its LM head the size of the tied table) and those 2,560 more; both move at least their
    least."""
    untied = dataclasses.replace(TINY, tie_word_embeddings=False)
    rows = tiny_run().wave // 4
    D = TINY.hidden_size
    table, looked_up = TINY.vocab_size * D * 2, rows * D * 2
    steps = {}
    for config, embedding in ((TINY, table), (untied, looked_up)):
        weights = plan.param_count(config) * 2  # bfloat16, whole on every chip
        cache = plan.kv_cache_bytes(config, rows=rows, slots=512) // 2  # one copy
        step, minimum, _ = aot.decode_step(tiny_run(config=config), v5e_4)
        assert minimum == weights - table + embedding + cache, config
        assert minimum <= step.hbm_bytes, (step.hbm_bytes, minimum)
        steps[config.tie_word_embeddings] = step.hbm_bytes, minimum
    assert steps[True][1] == 6_033_920 + 2_621_440 and looked_up == 2_560
    assert steps[False][1] - steps[True][1] == looked_up
    assert steps[False][0] - steps[True][0] == looked_up


def test_kernel_reads_are_what_an_attention_over_the_live_tokens_reads(v5e_4):
    """aot.kernel_reads, the Pallas paged-attention kernel's reads that the compiler cannot
    see (hbm_traffic leaves the kernel's custom call out: a kernel over a pool of 4 MiB moves
    next to nothing by it), against the TPU compiler's HBM traffic of a plain-JAX attention
    (qwen.attend) of the same rows over a dense cache of exactly their live tokens: equal to
    within what else that program moves (queries, mask, output: under 5%). Whole blocks of
    128 tokens (2 pages of 64): 200 live tokens read 256 tokens' pages."""
    config = dataclasses.replace(TINY, head_dim=128, num_layers=1)
    N, X, H, rows = config.num_heads, config.num_kv_heads, config.head_dim, 8
    device = jax.sharding.SingleDeviceSharding(v5e_4[0])
    array = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=device)
    for live in (256, 2048):
        reads = aot.kernel_reads(config, rows=rows, live=live, page=64, width=64)
        assert reads == rows * live * X * H * 2 * 2  # keys and values, bfloat16
        q, kv = array((rows, 1, N, H), jnp.bfloat16), array((rows, X, live, H), jnp.bfloat16)
        attend = jax.jit(qwen.attend).lower(q, kv, kv, array((rows, 1, live), jnp.bool_))
        traffic = aot.hbm_traffic(attend.compile().as_text())
        assert reads <= traffic <= 1.05 * reads, (live, traffic, reads)
    per_token = plan.kv_bytes_per_token(config)
    assert aot.kernel_reads(config, rows=1, live=200, page=64, width=64) == 256 * per_token
    pool, table = array((X, 128, 64, H), jnp.bfloat16), array((rows, 64), jnp.int32)
    kernel = jax.jit(qwen._kernel_attention).lower(
        q, pool, pool, table, array((rows, 1), jnp.int32)
    )
    assert aot.hbm_traffic(kernel.compile().as_text()) < 0.02 * math.prod(pool.shape) * 2


def test_a_paged_decoding_loop_holds_its_pools_once_in_the_kernels_layout(v5e_4):
    """The decoding loop over a paged cache (head_dim 128: the Pallas kernel), compiled for 4
    TPU v5e chips at two pool sizes: one layout of the pools throughout (the kernel's: the loop
    carries them so, and each new token's scatter writes them in place, where a scatter with a
    window over the heads made the compiler carry another layout and convert whole pools at
    every step), temporaries that do not grow with the pools (no copy of one), and the pools
    donated (aliased)."""
    config = dataclasses.replace(TINY, head_dim=128)
    temporaries = []
    for live in (256, 448):
        run = tiny_run(config=config, page=64, live_tokens=live)
        compiled = aot.lower_decode(run, v5e_4).compile()
        pages = run.pool_pages(4)  # per chip
        pool = f"bf16[{config.num_kv_heads},{pages},64,128]"
        # (staged into VMEM, S(1), at these tiny sizes, where a whole pool fits there)
        layouts = set(re.findall(re.escape(pool) + r"\{([0-9,]+):", compiled.as_text()))
        assert layouts == {"3,2,1,0"}, layouts
        memory = compiled.memory_analysis()
        pool_bytes = config.num_kv_heads * pages * 64 * 128 * 2
        assert memory.alias_size_in_bytes >= 2 * config.num_layers * pool_bytes
        temporaries.append((memory.temp_size_in_bytes, pool_bytes))
    (temps_a, pool_a), (temps_b, pool_b) = temporaries
    assert abs(temps_b - temps_a) < 0.1 * 4 * (pool_b - pool_a), temporaries  # 4 pools
