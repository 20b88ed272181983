"""The sharded update (tspo_jax/learner.py): log-probs, gradients on every mesh shape, exact
gradient accumulation, and the skip of a non-finite update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tspo_jax import learner, qwen, tspo

CONFIG = qwen.QwenConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_word_embeddings=False,
)
SETTINGS = learner.LossSettings(clip_low=0.2, clip_high=0.28, kl_coef=0.05)
M, B, G, T = 2, 8, 2, 24


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    length = rng.integers(6, T + 1, size=(M, B, G))
    mask = np.arange(T) < length[..., None]
    loss_mask = mask & (np.arange(T) >= 4) & (rng.random((M, B, G, T)) < 0.8)
    loss_mask[0, 3] = False  # a prompt whose whole group has nothing to train on
    return learner.UpdateBatch(
        tokens_MBGT=jnp.asarray(rng.integers(0, CONFIG.vocab_size, (M, B, G, T)), jnp.int32),
        mask_MBGT=jnp.asarray(mask),
        loss_mask_MBGT=jnp.asarray(loss_mask),
        adv_MBGT=jnp.asarray(rng.normal(size=(M, B, G, T)), jnp.float32),
        old_logp_MBGT=jnp.asarray(-rng.random((M, B, G, T)) * 5, jnp.float32),
        ref_logp_MBGT=jnp.asarray(-rng.random((M, B, G, T)) * 5, jnp.float32),
    )


@pytest.fixture(scope="module")
def params():
    return qwen.init_params(CONFIG, jax.random.key(0))


def test_logprobs_of_groups_align_with_logits(params):
    batch = make_batch()
    tokens, mask = batch.tokens_MBGT[0], batch.mask_MBGT[0]
    options = qwen.ForwardOptions(logits_bytes=7 * 2 * CONFIG.vocab_size * 4)  # 7 positions
    logp = qwen.token_logprobs(params, CONFIG, tokens, mask, options)  # [B, G, T]
    logits = qwen.logits(params, CONFIG, tokens.reshape(B * G, T), mask.reshape(B * G, T))
    full = jax.nn.log_softmax(logits, axis=-1).reshape(B, G, T, -1)
    # logp[t] scores token t from the logits at t - 1.
    expected = jnp.take_along_axis(full[:, :, :-1], tokens[:, :, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(logp[:, :, 1:][mask[:, :, 1:]], expected[mask[:, :, 1:]], atol=1e-5)
    assert (logp[:, :, 0] == 0).all() and (logp[~mask] == 0).all()
    # batch_logprobs is the same over micro-batches.
    both = learner.batch_logprobs(
        params, batch.tokens_MBGT, batch.mask_MBGT, config=CONFIG, options=options
    )
    np.testing.assert_allclose(both[0], logp, atol=1e-6)


def options(mesh, remat="full"):
    """The update's options with every memory bound small enough to bite at these shapes:
    remat, attention in blocks of queries, log-probs in chunks of rows x positions."""
    return learner.forward_options(mesh, remat=remat, attention_bytes=2048, logits_bytes=8192)


def _grads(params, mesh, micro, settings=SETTINGS):
    sharded = learner.train_params(params, CONFIG, mesh)
    micro = jax.device_put(micro, learner.batch_sharding(mesh, 3))
    f = jax.jit(jax.value_and_grad(learner.loss_fn, has_aux=True), static_argnums=(1, 2, 3, 4))
    (loss, metrics), grads = f(sharded, CONFIG, mesh, settings, options(mesh), micro)
    return loss, metrics, grads, sharded


def test_loss_and_gradients_same_on_every_mesh_shape(params):
    batch = make_batch(1)
    micro = jax.tree.map(lambda x: x[0], batch)
    results = {}
    for shape in ((8, 1), (4, 2), (2, 4), (1, 8)):
        mesh = learner.make_mesh(*shape)
        loss, metrics, grads, sharded = _grads(params, mesh, micro)
        results[shape] = (loss, metrics, grads)
        if shape[1] > 1:  # ZeRO-3: every weight matrix is split over fsdp (on its D axis)
            for path, x in jax.tree_util.tree_leaves_with_path(sharded):
                matrix = x.ndim >= 2 + ("layers" in jax.tree_util.keystr(path))  # [L, ...]
                if matrix and CONFIG.hidden_size in x.shape:
                    assert "fsdp" in tuple(x.sharding.spec), (path, x.sharding)
    loss1, metrics1, grads1 = results[(8, 1)]
    assert float(loss1) != 0 and float(optax.tree.norm(grads1)) > 0
    for shape, (loss, metrics, grads) in results.items():
        np.testing.assert_allclose(loss, loss1, rtol=1e-5, err_msg=str(shape))
        for k in metrics1:
            np.testing.assert_allclose(metrics[k], metrics1[k], rtol=1e-5, err_msg=k)
        for (path, g), g1 in zip(
            jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads1), strict=True
        ):
            np.testing.assert_allclose(g, g1, rtol=1e-4, atol=1e-7, err_msg=str((shape, path)))


@pytest.mark.parametrize(
    "loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_update_accumulates_micro_batches_exactly(params, loss_agg):
    """The scanned accumulation of M = 2 micro-batches of 8 prompts, on a 2 x 4 mesh, equals
    an unrolled Python loop over the micro-batches (each gradient weighted by its loss
    denominator), and (compiled for one aggregation only) the update of M = 1 micro-batch of
    all 16 prompts."""
    mesh = learner.make_mesh(2, 4)
    settings = dataclasses.replace(SETTINGS, loss_agg=loss_agg, norm_length=T)
    sgd = optax.sgd(1.0)  # new params = params - gradient: the update shows the gradient
    batch = make_batch(2)
    whole = jax.tree.map(lambda x: x.reshape(1, M * B, *x.shape[2:]), batch)
    runs = {"micro": batch}
    if loss_agg == "seq-mean-token-mean":  # one aggregation pays the second compile
        runs["whole"] = whole
    new = {}
    for name, b in runs.items():
        start = learner.train_params(params, CONFIG, mesh)
        state = learner.TrainState(start, sgd.init(start), jnp.zeros((), jnp.int32))
        b = jax.device_put(b, learner.batch_sharding(mesh, 4, micro=True))
        state, metrics = learner.update(
            state, b, config=CONFIG, mesh=mesh, optimizer=sgd, settings=settings,
            options=options(mesh),
        )  # fmt: skip
        new[name] = (state, metrics)
    s1, m1 = new["micro"]
    # The reference: today's unrolled accumulation, written out.
    grad_sum, den, loss_sum, per_micro = None, 0.0, 0.0, []
    stacked = qwen.stack_layers(params)
    for m in range(M):
        micro = jax.tree.map(lambda x, m=m: x[m], batch)
        loss, metrics, grads, _ = _grads(params, mesh, micro, settings)
        w = float(metrics["loss_denominator"])
        scaled = jax.tree.map(lambda g, w=w: w * np.asarray(g, np.float64), grads)
        grad_sum = scaled if grad_sum is None else jax.tree.map(np.add, grad_sum, scaled)
        den, loss_sum = den + w, loss_sum + w * float(loss)
        per_micro.append(metrics)
    np.testing.assert_allclose(m1["loss"], loss_sum / den, rtol=1e-5)
    # Metrics: ratio_max the max over the micro-batches, every other a token mean over them.
    ratio_max = [float(m["ratio_max"]) for m in per_micro]
    assert ratio_max[0] != ratio_max[1]
    np.testing.assert_allclose(m1["ratio_max"], max(ratio_max), rtol=1e-5)
    tokens = np.array([float(m["num_loss_tokens"]) for m in per_micro])
    for k in ("clip_frac", "ratio_mean", "pg_loss", "ref_kl"):
        mean = np.dot(tokens, [float(m[k]) for m in per_micro]) / tokens.sum()
        np.testing.assert_allclose(m1[k], mean, rtol=1e-5, atol=1e-7, err_msg=k)
    assert int(s1.step) == 1 and float(m1["skipped"]) == 0
    for p0, g, a in zip(
        jax.tree.leaves(stacked), jax.tree.leaves(grad_sum), jax.tree.leaves(s1.params), strict=True
    ):
        np.testing.assert_allclose(a, np.asarray(p0) - g / den, rtol=1e-5, atol=1e-6)
        assert not np.allclose(a, p0)
    if "whole" in new:
        s2, m2 = new["whole"]
        np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
        np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
        assert int(s2.step) == 1
        for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_non_finite_update_is_skipped(params):
    mesh = learner.make_mesh(-1, 1)
    opt = optax.adamw(1e-3)
    batch = make_batch(3)
    batch = batch._replace(adv_MBGT=batch.adv_MBGT.at[0, 0, 0, 5].set(jnp.nan))
    batch = batch._replace(loss_mask_MBGT=batch.loss_mask_MBGT.at[0, 0, 0, 5].set(True))
    start = learner.train_params(params, CONFIG, mesh)
    state = learner.init_state(start, CONFIG, mesh, opt)
    fresh = jax.tree.map(np.asarray, (start, opt.init(start)))
    state, metrics = learner.update(
        state, batch, config=CONFIG, mesh=mesh, optimizer=opt, settings=SETTINGS,
        options=options(mesh),
    )  # fmt: skip
    assert float(metrics["skipped"]) == 1 and int(state.step) == 0
    for a, p in zip(jax.tree.leaves(state.params), jax.tree.leaves(fresh[0]), strict=True):
        np.testing.assert_array_equal(a, p)
    fresh = jax.tree.leaves(fresh[1])
    for a, p in zip(jax.tree.leaves(state.opt_state), fresh, strict=True):
        np.testing.assert_array_equal(a, p)  # moments and Adam's step count untouched


def test_sharding_rules_leave_indivisible_dimensions_replicated():
    mesh = learner.make_mesh(2, 4)
    rules = dataclasses.replace(learner.ShardingRules(), kv_heads="fsdp")
    spec = rules.spec(jax.sharding.PartitionSpec("embed", "kv_heads", None), (32, 2, 8), mesh)
    assert tuple(spec) == ("fsdp", None, None)  # 2 KV heads do not split over 4 devices
    with pytest.raises(ValueError, match="their product must be 8"):
        learner.make_mesh(3, 4)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """Enough of a device for mesh_utils: two slices of 4 (a multi-slice TPU job)."""

    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "fake"


def test_mesh_spans_slices_with_the_data_axis_only():
    devices = [FakeDevice(i, i // 4) for i in (5, 1, 6, 2, 0, 4, 3, 7)]
    grid = learner.device_grid(2, 4, dcn_data=2, devices=devices)
    assert grid.shape == (2, 4)
    # Each row of the data axis is one slice: fsdp's all-gathers never cross slices.
    assert [{d.slice_index for d in row} for row in grid] == [{0}, {1}]
    assert sorted(d.id for d in grid.ravel()) == list(range(8))
    with pytest.raises(ValueError, match="the devices are in 2 slices"):
        learner.device_grid(4, 2, dcn_data=4, devices=devices)
    with pytest.raises(ValueError, match="must divide --mesh-data 1"):
        learner.device_grid(1, 8, dcn_data=2, devices=devices)
    # On the 8 local CPU devices of the tests: the topology order is a plain reshape.
    mesh = learner.make_mesh(2, 4)
    assert mesh.devices.shape == (2, 4) and mesh.axis_names == learner.BATCH_AXES


def test_mesh_fsdp_that_does_not_divide_the_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="--mesh-fsdp 3 must divide the 8 device"):
        learner.make_mesh(-1, 3)
    with pytest.raises(ValueError, match="--mesh-fsdp 8 must divide the 1 device"):
        learner.make_mesh(-1, 8, devices=jax.devices()[:1])
    assert dict(learner.make_mesh(-1, 4).shape) == {"data": 2, "fsdp": 4}


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_zero_warmup_is_full_lr_from_the_first_update(schedule):
    """--warmup-steps 0: the first update (optimizer step 0) runs at the peak lr and moves
    every parameter (Adam's first step moves each by lr, whatever its gradient's size)."""
    kw = dict(lr=1e-2, total_steps=10, schedule=schedule, weight_decay=0.0, grad_clip=1e9)
    opt, lr_fn = learner.make_optimizer(warmup_steps=0, b1=0.9, b2=0.999, **kw)
    assert float(lr_fn(0)) == pytest.approx(1e-2)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    updates, _ = opt.update({"w": jnp.array([0.5, -3.0, 1e-3])}, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], [-1e-2, 1e-2, -1e-2], rtol=1e-3)
    # With a warm-up, the first update is at lr 0 and the peak is reached after it.
    _, warm = learner.make_optimizer(warmup_steps=4, b1=0.9, b2=0.999, **kw)
    assert float(warm(0)) == 0.0 and float(warm(4)) == pytest.approx(1e-2)
    if schedule == "cosine":
        assert float(lr_fn(10)) == pytest.approx(0.0, abs=1e-9)


def test_loss_fn_passes_dual_clip_and_tis_to_the_loss(params):
    """LossSettings' clip_ratio_c and tis_cap reach tspo.policy_loss, with the sampler's
    log-probs from UpdateBatch: the sharded loss equals the loss computed directly."""
    batch = make_batch(4)
    rng = np.random.default_rng(4)
    noise = rng.normal(0, 1.0, batch.old_logp_MBGT.shape).astype(np.float32)
    batch = batch._replace(sampler_logp_MBGT=batch.old_logp_MBGT + noise)
    micro = jax.tree.map(lambda x: x[0], batch)
    settings = dataclasses.replace(SETTINGS, clip_ratio_c=2.0, tis_cap=1.5)
    mesh = learner.make_mesh(4, 2)
    sharded = learner.train_params(params, CONFIG, mesh)
    loss, metrics = jax.jit(learner.loss_fn, static_argnums=(1, 2, 3, 4))(
        sharded,
        CONFIG,
        mesh,
        settings,
        options(mesh),
        jax.device_put(micro, learner.batch_sharding(mesh, 3)),
    )
    logp = qwen.token_logprobs(params, CONFIG, micro.tokens_MBGT, micro.mask_MBGT)
    args = (logp, micro.old_logp_MBGT, micro.adv_MBGT, micro.loss_mask_MBGT, micro.ref_logp_MBGT)
    kw = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05)
    expected, _ = tspo.policy_loss(
        *args, micro.sampler_logp_MBGT, clip_ratio_c=2.0, tis_cap=1.5, **kw
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert 0 < float(metrics["tis_truncated_frac"]) < 1
    plain, _ = tspo.policy_loss(*args, **kw)
    assert abs(float(plain) - float(expected)) > 1e-4
