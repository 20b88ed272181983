"""The sharded update of train.py: mesh, sharding rules, log-probs, and the Eq. L step.

The mesh has two axes: ``data`` and ``fsdp``. The batch (prompts) is split over both; the
parameters and the optimizer state are split over ``fsdp`` (ZeRO-3 style), each tensor along
the logical axis that ``ShardingRules`` maps there, and XLA gathers them where a matmul needs
them. The forward pass is ordinary jit-partitioned code; the loss (Eq. L of TSPO.md) runs under
``jax.shard_map`` over the batch axes, where ``tspo.policy_loss`` sums its numerators and
denominators across devices, so the loss and its gradient are the same on any mesh shape.

Shape letters (the project's one key, README "Shape letters"): M micro-batches, B prompts, G
samples per prompt, T tokens.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tspo_jax import qwen, tspo

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name (``qwen.logical_axes``) -> mesh axis, or None for replicated."""

    layers: str | None = None
    vocab: str | None = None
    embed: str | None = "fsdp"
    q_heads: str | None = None
    kv_heads: str | None = None
    head_dim: str | None = None
    mlp: str | None = None

    def spec(self, logical: P, shape, mesh: Mesh) -> P:
        """The PartitionSpec of one tensor; a dimension that the mesh axis does not divide
        stays replicated (e.g. a bias of 2 KV heads on 4 devices)."""
        axes = []
        for name, size in zip(logical, shape, strict=True):
            axis = None if name is None else getattr(self, name)
            axes.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
        return P(*axes)


def make_mesh(data: int, fsdp: int, *, dcn_data: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over ``devices`` (all devices by default); data = -1 takes the rest.

    The device order follows the physical topology (``device_grid``). Axis types are Auto
    (sharding by propagation, as the rest of the code expects).
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(device_grid(data, fsdp, dcn_data=dcn_data, devices=devices), BATCH_AXES)


def mesh_shape(data: int, fsdp: int, devices: int) -> tuple[int, int]:
    """(data, fsdp) of a mesh over ``devices`` devices, data = -1 taking the rest; a clear
    error when they do not multiply to the device count."""
    if data == -1:
        if fsdp < 1 or devices % fsdp:
            raise ValueError(f"--mesh-fsdp {fsdp} must divide the {devices} device(s) evenly")
        data = devices // fsdp
    if data < 1 or fsdp < 1 or data * fsdp != devices:
        raise ValueError(
            f"mesh {data} x {fsdp} (--mesh-data x --mesh-fsdp) does not fit the "
            f"{devices} device(s): their product must be {devices}"
        )
    return data, fsdp


def device_grid(data: int, fsdp: int, *, dcn_data: int = 1, devices) -> np.ndarray:
    """The [data, fsdp] array of devices behind make_mesh. On one slice (or one host's GPUs)
    ``mesh_utils.create_device_mesh`` orders them by the physical topology, so that fsdp's
    all-gathers run between neighbours. With dcn_data > 1 (several TPU slices, or several GPU
    hosts), the data axis is split across them and fsdp stays within one
    (``create_hybrid_device_mesh``): only the gradient all-reduce crosses the slower network.
    """
    data, fsdp = mesh_shape(data, fsdp, len(devices))
    if dcn_data < 1 or data % dcn_data:
        raise ValueError(f"--mesh-dcn-data {dcn_data} must divide --mesh-data {data}")
    if dcn_data == 1:
        return mesh_utils.create_device_mesh((data, fsdp), devices, allow_split_physical_axes=True)
    granules = {getattr(d, "slice_index", d.process_index) for d in devices}
    if len(granules) != dcn_data:
        raise ValueError(
            f"--mesh-dcn-data {dcn_data}: the devices are in {len(granules)} slices (or hosts)"
        )
    return mesh_utils.create_hybrid_device_mesh(
        (data // dcn_data, fsdp),
        (dcn_data, 1),
        devices,
        process_is_granule=not hasattr(devices[0], "slice_index"),
    )


def slice_count(devices=None) -> int:
    """Number of TPU slices among ``devices`` (1 on GPUs, CPUs and single-slice TPUs)."""
    devices = jax.devices() if devices is None else devices
    return len({getattr(d, "slice_index", 0) for d in devices})


def forward_options(
    mesh: Mesh, *, remat: str, attention_bytes: int, logits_bytes: int, mlp_bytes: int = 0
):
    """The update's qwen.ForwardOptions: activations split over the batch axes of ``mesh``."""
    return qwen.ForwardOptions(
        remat=remat,
        batch_sharding=NamedSharding(mesh, P(BATCH_AXES)),
        attention_bytes=attention_bytes,
        logits_bytes=logits_bytes,
        mlp_bytes=mlp_bytes,
    )


def param_shardings(config: qwen.QwenConfig, mesh: Mesh, rules=ShardingRules(), *, stacked=True):
    """NamedShardings shaped like the params of ``config``: stacked layers (the train state's
    layout, qwen.stack_layers) or, with stacked=False, a list of layers (as loaded)."""
    shapes = qwen.abstract_params(config, stacked=stacked)
    return jax.tree.map(
        lambda logical, x: NamedSharding(mesh, rules.spec(logical, x.shape, mesh)),
        qwen.logical_axes(config, stacked=stacked),
        shapes,
        is_leaf=lambda x: isinstance(x, P),
    )


def train_params(params, config: qwen.QwenConfig, mesh: Mesh):
    """Loaded params (a list of layers, any layout) -> the train state's: stacked layers,
    sharded by param_shardings."""
    return jax.jit(qwen.stack_layers, out_shardings=param_shardings(config, mesh))(params)


def batch_sharding(mesh: Mesh, ndim: int, *, micro: bool = False) -> NamedSharding:
    """Prompts split over the batch axes; with ``micro``, after a leading micro-batch axis."""
    lead = (None,) if micro else ()
    return NamedSharding(mesh, P(*lead, BATCH_AXES, *(None,) * (ndim - 1 - len(lead))))


@functools.cache
def make_optimizer(*, lr, warmup_steps, total_steps, schedule, weight_decay, grad_clip, b1, b2):
    """AdamW with global-norm clipping, linear warm-up, then a constant or cosine learning rate.

    Made once per set of arguments (cached): ``update`` takes the optimizer as a static
    argument, and optax's transformations compare by identity, so a second run in the same
    process with the same settings reuses the first one's compiled update."""
    if warmup_steps == 0:  # full lr from the first update
        lr_fn = (
            optax.cosine_decay_schedule(lr, max(total_steps, 1))
            if schedule == "cosine"
            else optax.constant_schedule(lr)
        )
    elif schedule == "cosine":
        lr_fn = optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.0
        )
    else:
        lr_fn = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
            [warmup_steps],
        )
    opt = optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(lr_fn, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay),
    )
    return opt, lr_fn


def sampling_copy(params, *, dtype, mesh: Mesh):
    """The policy as the sampler reads it: ``dtype``, one array per layer (qwen.unstack_layers),
    and whole on every device of ``mesh`` (the train state's), gathered device to device.

    One gather per layer (``gather_layer``) and one for the rest (``gather_whole``), so that a
    device holds the copy it builds plus one layer in flight: one program for all of it
    gathers the stacked layers whole first and slices them after (XLA combines the per-layer
    gathers), twice the copy at its peak (the TPU compiler's memory_analysis)."""
    L = jax.tree.leaves(params["layers"])[0].shape[0]
    rest = gather_whole({k: v for k, v in params.items() if k != "layers"}, dtype, mesh)
    layers = [gather_layer(params["layers"], i, dtype, mesh) for i in range(L)]
    return {**rest, "layers": layers}


def _whole(x, dtype, mesh: Mesh):
    return jax.lax.with_sharding_constraint(x.astype(dtype), NamedSharding(mesh, P()))


@functools.partial(jax.jit, static_argnums=(1, 2))
def gather_whole(tree, dtype, mesh: Mesh):
    """``tree`` cast to ``dtype`` and whole on every device of ``mesh``."""
    return jax.tree.map(lambda x: _whole(x, dtype, mesh), tree)


@functools.partial(jax.jit, static_argnums=(2, 3))
def gather_layer(stacked, index, dtype, mesh: Mesh):
    """Layer ``index`` of stacked layers, cast to ``dtype`` and whole on every device of
    ``mesh``."""
    return jax.tree.map(
        lambda x: _whole(jax.lax.dynamic_index_in_dim(x, index, keepdims=False), dtype, mesh),
        stacked,
    )


def to_memory(tree, kind: str):
    """``tree`` (None: None) with every array in memory ``kind`` of its own devices, its
    sharding otherwise unchanged: "pinned_host" (host memory that the chips reach by DMA) or
    "device". One jax.device_put of the whole tree, shard by shard, device to host or back;
    arrays already there are not copied. The caller drops its references to the old arrays,
    which frees them."""
    if tree is None:
        return None
    target = jax.tree.map(lambda x: x.sharding.with_memory_kind(kind), tree)
    return jax.device_put(tree, target)


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    step: jax.Array  # int32: optimizer updates applied


def state_shardings(config: qwen.QwenConfig, mesh: Mesh, optimizer, opt_state) -> TrainState:
    """The layout of a TrainState: params by ``param_shardings``, each optimizer moment like
    its parameter, scalars (step counts) replicated. ``opt_state`` may be abstract."""
    params = param_shardings(config, mesh)
    replicated = NamedSharding(mesh, P())
    moments = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        opt_state,
        params,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(params, moments, replicated)


def init_state(params, config: qwen.QwenConfig, mesh: Mesh, optimizer) -> TrainState:
    """Step 0: ``optimizer.init(params)``, laid out by ``state_shardings`` (params stacked and
    placed by ``train_params``)."""
    opt_state_like = jax.eval_shape(optimizer.init, params)
    layout = state_shardings(config, mesh, optimizer, opt_state_like)
    opt_state = jax.jit(optimizer.init, out_shardings=layout.opt_state)(params)
    return TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), layout.step))


class UpdateBatch(NamedTuple):
    """One optimizer update's data, split into M micro-batches of B prompts x G samples."""

    tokens_MBGT: jax.Array  # int32
    mask_MBGT: jax.Array  # bool, real tokens
    loss_mask_MBGT: jax.Array  # bool, sampled tokens
    adv_MBGT: jax.Array  # float32 token advantages
    old_logp_MBGT: jax.Array  # float32 log-probs under the policy that sampled
    ref_logp_MBGT: jax.Array | None  # float32 log-probs under the reference, or None
    sampler_logp_MBGT: jax.Array | None = None  # float32 sampler's log-probs (for tis_cap), or None


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("kl_coef", "clip_low", "clip_high", "clip_ratio_c", "tis_cap"),
    meta_fields=("loss_agg", "norm_length"),
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSettings:
    """The options of tspo.policy_loss. A pytree: the floats are traced through the update (one
    compilation for any value), the string and the int are static; a float that is None (off)
    is static too. ``kl_coef`` has no default here: the run's is Config's (tspo_jax/config.py;
    Search-R1's 0.001); the others are policy_loss's own."""

    kl_coef: float | None  # weight of the k3 KL to the reference (None: no reference term)
    clip_low: float = 0.2
    clip_high: float = 0.2
    loss_agg: str = "token-mean"
    norm_length: int | None = None
    clip_ratio_c: float | None = None  # dual-clip bound (None: off)
    tis_cap: float | None = None  # truncated importance sampling cap (None: off)


@functools.partial(jax.jit, static_argnames=("config", "options"))
def batch_logprobs(params, tokens_MBGT, mask_MBGT, *, config, options):
    """qwen.token_logprobs over micro-batches (old-policy and reference log-probs)."""
    return jax.lax.map(
        lambda xs: qwen.token_logprobs(params, config, *xs, options), (tokens_MBGT, mask_MBGT)
    )


def loss_fn(params, config, mesh: Mesh, settings: LossSettings, options, micro):
    """Eq. L on one micro-batch: log-probs by the jit-partitioned forward, then the loss under
    shard_map over the batch axes. ``micro`` holds one micro-batch of UpdateBatch's fields."""
    tokens, mask, loss_mask, adv, old_logp, ref_logp, sampler_logp = micro
    logp_BGT = qwen.token_logprobs(params, config, tokens, mask, options)
    spec = P(BATCH_AXES)
    optional = (ref_logp, sampler_logp)  # either may be None (no reference, no TIS)

    def local_loss(logp, old, adv, loss_mask, *given):
        given = list(given)  # the optional arrays that are not None, in order
        ref, sampler = (None if x is None else given.pop(0) for x in optional)
        return tspo.policy_loss(
            logp,
            old,
            adv,
            loss_mask,
            ref,
            sampler,
            axis_name=BATCH_AXES,
            **dataclasses.asdict(settings),
        )

    args = (logp_BGT, old_logp, adv, loss_mask, *(x for x in optional if x is not None))
    return jax.shard_map(local_loss, mesh=mesh, in_specs=(spec,) * len(args), out_specs=(P(), P()))(
        *args
    )


def is_max(name: str) -> bool:
    """A ``*_max`` metric is a max over everything it is logged over; every other, a mean."""
    return name.endswith("_max")


def accumulate(total: dict, metrics: dict, tokens) -> dict:
    """``total`` with one micro-batch's ``metrics`` added: a ``*_max`` by max, every other
    weighted by the micro-batch's loss tokens (a token mean once divided by their sum)."""
    add = lambda k, a: jnp.maximum(a, metrics[k]) if is_max(k) else a + tokens * metrics[k]
    return {k: add(k, a) for k, a in total.items()}


def update_step(
    state: TrainState, batch: UpdateBatch, *, config, mesh, optimizer, settings, options
):
    """One optimizer update over M micro-batches with exact gradient accumulation.

    The micro-batches run in a lax.scan: the program holds one copy of the forward and backward
    pass whatever M is, so compile time does not grow with the number of micro-batches (an
    unrolled loop, measured on XLA:CPU, compiled slower, held 2.5x the temporaries, and ran no
    faster). Each micro-batch's gradient is weighted by its loss_denominator (see
    tspo.policy_loss), so the sum over micro-batches is the gradient of the loss over the whole
    update batch; the metrics are token means over it, a ``*_max`` the max over its micro-batches
    (``accumulate``). A non-finite loss or gradient skips the update (``metrics["skipped"]`` = 1).
    The gradient sums are float32 and laid out like the params (sharded over fsdp).
    """
    layout = state_shardings(config, mesh, optimizer, state.opt_state)

    def micro_step(acc, micro):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, config, mesh, settings, options, micro
        )
        w, tokens = metrics.pop("loss_denominator"), metrics["num_loss_tokens"]
        grad_sum, loss_sum, den, weighted, n_tokens = acc
        grad_sum = jax.tree.map(lambda a, g: a + w * g.astype(jnp.float32), grad_sum, grads)
        grad_sum = jax.lax.with_sharding_constraint(grad_sum, layout.params)
        weighted = accumulate(weighted, metrics, tokens)
        return (grad_sum, loss_sum + w * loss, den + w, weighted, n_tokens + tokens), None

    first = jax.tree.map(lambda x: x[0], batch)
    _, metrics_like = jax.eval_shape(
        lambda: loss_fn(state.params, config, mesh, settings, options, first)
    )
    metrics_like.pop("loss_denominator")
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
    init = (
        jax.lax.with_sharding_constraint(jax.tree.map(zeros, state.params), layout.params),
        jnp.float32(0),
        jnp.float32(0),
        {k: jnp.float32(-jnp.inf) if is_max(k) else zeros(m) for k, m in metrics_like.items()},
        jnp.float32(0),
    )
    grad_sum, loss_sum, den, weighted, n_tokens = jax.lax.scan(micro_step, init, batch)[0]
    grads = jax.tree.map(lambda g: g / jnp.maximum(den, 1.0), grad_sum)
    metrics = {k: m if is_max(k) else m / jnp.maximum(n_tokens, 1.0) for k, m in weighted.items()}
    metrics.update(loss=loss_sum / jnp.maximum(den, 1.0), num_loss_tokens=n_tokens)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])

    def apply(params, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # A cond, not a select between new and old values: with the state donated, XLA updates
    # the buffers in place under a cond, where a select made it copy the optimizer state.
    params, opt_state = jax.lax.cond(ok, apply, lambda p, s: (p, s), state.params, state.opt_state)
    # Keep the layout of state_shardings (left to itself, XLA may shard a norm scale
    # differently on the way out, and the next call would not match the compiled update).
    params = jax.lax.with_sharding_constraint(params, layout.params)
    opt_state = jax.lax.with_sharding_constraint(opt_state, layout.opt_state)
    metrics.update(grad_norm=grad_norm, skipped=1.0 - ok.astype(jnp.float32))
    return TrainState(params, opt_state, state.step + ok.astype(jnp.int32)), metrics


_STATIC = ("config", "mesh", "optimizer", "options")
# The train state is donated: the new params and optimizer state reuse its buffers, so an
# update holds one copy of them (without donation, the new state of the 0.5B shape needs 5.5
# GiB of buffers of its own).
update = jax.jit(update_step, static_argnames=_STATIC, donate_argnames=("state",))


def abstract_state(config: qwen.QwenConfig, mesh: Mesh, optimizer, dtype=jnp.float32):
    """A TrainState of ShapeDtypeStructs laid out by state_shardings (no weights needed)."""
    shapes = qwen.abstract_params(config, dtype, stacked=True)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    layout = state_shardings(config, mesh, optimizer, opt_shapes)
    state = TrainState(shapes, opt_shapes, jax.ShapeDtypeStruct((), jnp.int32))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, layout
    )


def abstract_batch(mesh: Mesh, micro_batches: int, prompts: int, group: int, length: int, *, ref):
    """An UpdateBatch of ShapeDtypeStructs: M micro-batches of ``prompts`` x ``group`` rows."""
    shape = (micro_batches, prompts, group, length)
    sharding = batch_sharding(mesh, 4, micro=True)
    spec = lambda dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    f32 = spec(jnp.float32)
    return UpdateBatch(spec(jnp.int32), spec(bool), spec(bool), f32, f32, f32 if ref else None)


# Metrics of a step's updates.


@jax.jit
def logprob_gap(learner_logp, sampler_logp, loss_mask) -> dict:
    """|sampler - learner| log-prob of the sampled tokens, mean and max over loss tokens: what
    sampling (its dtype, its kernels) and the learner's recomputation disagree by."""
    gap = jnp.where(loss_mask, jnp.abs(sampler_logp - learner_logp), 0.0)
    return {"logp_gap_mean": gap.sum() / jnp.maximum(loss_mask.sum(), 1), "logp_gap_max": gap.max()}


def over_updates(update_metrics: list[dict]) -> dict:
    """A step's update metrics as one number each: a ``*_max`` the max over the updates (each
    a max over micro-batches and devices already), every other the mean over the updates."""
    pick = lambda k, values: max(values) if is_max(k) else np.mean(values)
    return {k: float(pick(k, [m[k] for m in update_metrics])) for k in update_metrics[0]}


def skipped_in_a_row(before: int, update_metrics: list[dict]) -> int:
    """Non-finite (skipped) updates in a row at the end of a step's updates, counting on from
    the ``before`` that ended the previous step."""
    for m in update_metrics:
        before = before + 1 if m["skipped"] else 0
    return before
