"""Qwen2 / Qwen2.5 decoder in Flax NNX, exposed as pure functions over a plain dict of arrays.

The architecture (the same as transformers' ``Qwen2ForCausalLM``): token embedding, then per
layer ``x + attn(rms_norm(x))`` and ``x + mlp(rms_norm(x))``, a final RMSNorm and a tied or
untied LM head. Attention is grouped-query (X key/value heads shared by R = N / X query heads
each) with biases on q, k and v and none on the output projection, and rotate-half RoPE. The MLP
is SwiGLU: ``down(silu(gate(x)) * up(x))``.

The NNX modules below define the parameters (shapes, initializers and logical axis names) and
the forward pass. The public surface is pure functions over the plain pytree
``params = nnx.to_pure_dict(nnx.state(model))`` (with the layers as a list), so jit, optax, orbax
and NamedSharding apply to it directly: ``logits``, ``hidden_states``, ``token_logprobs`` and
``forward`` (the decoder with an optional KV cache, used by ``tspo_jax/sampling.py``).
Files, decoding and ``forward`` hold one array per layer (a Python loop over the layers: decoding
ran about 1.6x faster so on XLA:CPU); the update stacks them (``stack_layers``) and runs the
layers under one ``lax.scan`` (``hidden_states``), so that its program holds one layer.

params (float32 or bfloat16; ``config.dtype`` is the compute dtype, weights are cast to it).
Projections keep transformers' [out, in] layout with the head axes split out (q_NHD is
q_proj.weight reshaped), so loading is a reshape, and ``dense`` can read them weight-stationary
when decoding:
    embed_VD                token embedding (also the LM head when tie_word_embeddings)
    layers[l].attn_norm.scale_D, layers[l].mlp_norm.scale_D
    layers[l].attn.{q_NHD, q_bias_NH, k_XHD, k_bias_XH, v_XHD, v_bias_XH, o_DNH}
    layers[l].mlp.{gate_FD, up_FD, down_DF}
    final_norm.scale_D
    lm_head_VD              only when the head is untied

Positions come from the mask: position = cumsum(mask) - 1 per row, so left padding and masked
holes inside a sequence work, and masked keys are never attended to.

Shape letters (the project's one key, README "Shape letters"): B batch rows, T tokens (queries;
the rows of ``dense``), S key slots (the sequence itself, or the KV cache), C tokens appended to
a cache, L layers, D model dim, N query heads, X key/value heads, R = N / X query heads per
key/value head, Q = R * T query rows per key/value head, H head dim, F MLP hidden dim (or any
output dim of ``dense``), V vocabulary, J blocks (of t queries in ``attend``, of c positions in
``token_logprobs``), P pages of a paged cache's pool, I a row's page-table entries, p a page's
tokens.
"""

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec

Params = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Per-layer rematerialization (jax.checkpoint policies): what a layer keeps for its backward pass.
REMAT_POLICIES = {
    "none": None,  # no remat: every intermediate is kept (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # only the layer's input; recompute the rest
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # also weight matmul outputs
    # Only the layer's input, kept in host memory until the backward pass needs it (TPU / GPU).
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=["layer_input"],
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


class ForwardOptions(NamedTuple):
    """How the forward pass runs (memory and layout), never what it computes. Hashable, so
    it is a static argument under jit. The defaults are the plain computation."""

    remat: str = "none"  # per-layer rematerialization, a key of REMAT_POLICIES
    batch_sharding: NamedSharding | None = None  # rows over a mesh: activations constrained to it
    attention_bytes: int = 0  # bound on one block of float32 scores per device (0: no blocks)
    mlp_bytes: int = 0  # bound on one chunk of MLP activations [rows, chunk, F] per device
    logits_bytes: int = 256 << 20  # bound on one chunk of float32 logits per device (log-probs)

    def local_rows(self, rows: int) -> int:
        """Rows of a [rows, ...] batch that one device holds under ``batch_sharding``."""
        if self.batch_sharding is None:
            return rows
        return self.batch_sharding.shard_shape((rows,))[0]

    def constrain(self, x, axis: int = 0):
        """x with its row axis (``axis``) split as ``batch_sharding`` says, every other axis
        whole (no-op without a batch_sharding)."""
        if self.batch_sharding is None:
            return x
        spec = self.batch_sharding.spec
        rows = PartitionSpec(*(None,) * axis, spec[0] if spec else None)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.batch_sharding.mesh, rows))

    def whole(self, x):
        """x copied whole onto every device of the mesh."""
        if self.batch_sharding is None:
            return x
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.batch_sharding.mesh, PartitionSpec())
        )


PLAIN = ForwardOptions()  # the plain computation: no remat, no sharding constraints, no blocks


def block_size(positions: int, bytes_per_position: int, max_bytes: int) -> int:
    """Positions per block so that a block stays under max_bytes: all of them when they fit
    (or max_bytes is 0), else the largest power of two that divides ``positions`` and fits (at
    least 1)."""
    if not max_bytes or positions * bytes_per_position <= max_bytes:
        return positions
    block = 1
    while positions % (2 * block) == 0 and 2 * block * bytes_per_position <= max_bytes:
        block *= 2
    return block


def query_block(rows: int, heads: int, queries: int, keys: int, max_bytes: int) -> int:
    """Queries per attention block: one block's float32 scores [rows, heads, block, keys] stay
    under max_bytes."""
    return block_size(queries, rows * heads * keys * 4, max_bytes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QwenConfig:
    """Shape and numerics of a Qwen2 / Qwen2.5 checkpoint (its config.json, plus ``dtype``)."""

    vocab_size: int  # V, rows of the embedding (151936 for Qwen2.5; the tokenizer has 151665)
    hidden_size: int  # D, model width
    intermediate_size: int  # F, SwiGLU hidden width
    num_layers: int  # L, decoder layers (num_hidden_layers in config.json)
    num_heads: int  # N, query heads (num_attention_heads)
    num_kv_heads: int  # X, key/value heads (num_key_value_heads); N must be a multiple
    head_dim: int  # H, per-head width (hidden_size // num_heads unless config.json says)
    rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm
    rope_theta: float = 1_000_000.0  # RoPE base (top-level or in rope_parameters)
    tie_word_embeddings: bool = False  # LM head is the embedding table (0.5B, 1.5B, 3B)
    max_position_embeddings: int = 32768  # longest position the checkpoint was trained for
    bos_token_id: int | None = None  # beginning-of-sequence id (Qwen does not prepend it)
    eos_token_ids: tuple[int, ...] = ()  # ids that end a generation (config + generation config)
    dtype: str = "float32"  # compute dtype of activations and KV cache: float32 or bfloat16

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"QwenConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.head_dim <= 0:
            raise ValueError("QwenConfig: num_heads, num_kv_heads and head_dim must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"QwenConfig: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"QwenConfig: rotate-half RoPE needs an even head_dim, got {self.head_dim}"
            )
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ValueError("QwenConfig: rms_norm_eps and rope_theta must be positive")
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"QwenConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )
        if not isinstance(self.eos_token_ids, tuple):
            raise TypeError("QwenConfig.eos_token_ids must be a tuple of ints")

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, dtype: str = "float32") -> "QwenConfig":
        """Reads a transformers Qwen2 config.json dict (4.x files and 5.x ``rope_parameters``)."""
        if d.get("model_type") != "qwen2":
            raise ValueError(
                f"config.json: model_type is {d.get('model_type')!r}, expected 'qwen2' "
                "(Qwen2 / Qwen2.5 checkpoints)"
            )
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ValueError(f"config.json: missing required field(s) {missing}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {d['hidden_act']!r} is not supported (silu)")
        if d.get("use_sliding_window", False):
            raise ValueError("config.json: use_sliding_window=true is not supported")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported (default)")
        theta = d.get("rope_theta")
        if theta is None:
            theta = rope.get("rope_theta")
        if theta is None:
            raise ValueError("config.json: missing rope_theta (top level or in rope_parameters)")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(int(i) for i in eos_ids),
            dtype=dtype,
        )

    def to_hf_dict(self, *, torch_dtype: str = "float32") -> dict[str, Any]:
        """config.json for transformers and vLLM; ``torch_dtype`` names the dtype of the file."""
        eos = list(self.eos_token_ids)
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_layers,
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
        }


# ---------------------------------------------------------------------------------------------
# Modules. Each nnx.Param carries ``axes``: one logical axis name per dimension.


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, *, init="normal"):
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), axes=PartitionSpec(*axes))


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale, with the statistics in float32 (as transformers)."""
    x32_BTD = x_BTD.astype(jnp.float32)
    x32_BTD = x32_BTD * jax.lax.rsqrt(jnp.mean(x32_BTD**2, axis=-1, keepdims=True) + eps)
    return scale_D.astype(x_BTD.dtype) * x32_BTD.astype(x_BTD.dtype)


def rope_tables(pos_BT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H] in float32 for rotate-half RoPE at integer positions pos_BT."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle_BTh = pos_BT.astype(jnp.float32)[..., None] * inv_freq
    angle_BTH = jnp.concatenate([angle_BTh, angle_BTh], axis=-1)
    return jnp.cos(angle_BTH), jnp.sin(angle_BTH)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], in x's dtype with cos and
    sin rounded to it, as transformers does (the angles are float32: rope_tables)."""
    cos_BT1H, sin_BT1H = (t.astype(x_BTNH.dtype)[:, :, None] for t in (cos_BTH, sin_BTH))
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    return x_BTNH * cos_BT1H + jnp.concatenate([-x2, x1], axis=-1) * sin_BT1H


# ---------------------------------------------------------------------------------------------
# XLA:CPU workarounds, and the one switch that picks them.
#
# A few computations have a second version that exists only because XLA:CPU runs it several
# times faster: here the weight-stationary matmuls of decoding, in sampling.py argmax, top-p and
# sampling without sorts. The plain version comes first, and is what a TPU or GPU runs;
# ``plain_or_cpu`` takes the CPU version where the program is compiled for XLA:CPU. It decides
# when the program is lowered (jax.lax.platform_dependent), not by the host's default backend, so
# a program compiled for a TPU topology on a CPU host (train.py --plan-target) is the TPU's.
# CPU_WORKAROUNDS = False runs the plain versions on XLA:CPU too (tests compare the two).
CPU_WORKAROUNDS = True


def plain_or_cpu(plain, cpu, *args):
    """plain(*args), or cpu(*args) in a program compiled for XLA:CPU."""
    if not CPU_WORKAROUNDS:
        return plain(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=plain)


# Decoding matmuls: up to WEIGHT_STATIONARY_MAX_TOKENS tokens, XLA:CPU computes w [F, D] @ x.T
# [D, T] and transposes the small [F, T] result, streaming the weights at close to memory
# bandwidth, where x @ w.T with few rows T reaches about 2/3 of it (decoding is memory bound).
# (Decoding also runs the layers as a Python loop over one weight array per layer rather than
# hidden_states' scan over stacked weights: 1.6x faster on XLA:CPU; a scan serves elsewhere.)
WEIGHT_STATIONARY_MAX_TOKENS = 64
_CONTRACT_LAST = (((1,), (1,)), ((), ()))


def dense(x_TD: jax.Array, w_FD: jax.Array, preferred_element_type=None) -> jax.Array:
    """x @ w.T over the last axis of both ("...D,F...D->...F..."): w is [out..., in], the
    transformers layout, and x may have any leading axes. On XLA:CPU, few tokens (decoding)
    take the weight-stationary form (``weight_stationary``)."""
    lead, out = x_TD.shape[:-1], w_FD.shape[:-1]
    D = x_TD.shape[-1]
    assert w_FD.shape[-1] == D, (x_TD.shape, w_FD.shape)
    x2_TD, w2_FD = x_TD.reshape(-1, D), w_FD.reshape(-1, D)
    matmul = functools.partial(
        jax.lax.dot_general,
        dimension_numbers=_CONTRACT_LAST,
        preferred_element_type=preferred_element_type,
    )
    if x2_TD.shape[0] <= WEIGHT_STATIONARY_MAX_TOKENS:
        cpu = functools.partial(weight_stationary, preferred_element_type=preferred_element_type)
        y_TF = plain_or_cpu(matmul, cpu, x2_TD, w2_FD)
    else:
        y_TF = matmul(x2_TD, w2_FD)
    return y_TF.reshape(*lead, *out)


def weight_stationary(x_TD, w_FD, preferred_element_type=None):
    """XLA:CPU's faster x @ w.T for few rows: (w @ x.T).T, the optimization barrier keeping XLA
    from folding the transpose back into the dot."""
    y_FT = jax.lax.dot_general(
        w_FD, x_TD, _CONTRACT_LAST, preferred_element_type=preferred_element_type
    )
    return jax.lax.optimization_barrier(y_FT).T


# ---------------------------------------------------------------------------------------------
# Attention, the cache, the layers


def attend(
    q_BTNH, k_BXSH, v_BXSH, mask_BTS, *, q_block: int = 0, options=PLAIN, new=None
) -> jax.Array:
    """Grouped-query softmax attention (no repeat of K/V); the softmax is in float32.

    Query head n uses key/value head n // R, as transformers' repeat_kv. The R query heads and
    T positions that share a key/value head form one matrix of Q = R * T rows, so each score
    and value product is a single batched matmul over (B, X) (twice as fast on XLA:CPU as
    keeping R and T apart). A query with no attendable key (a left-padding token) gets a
    uniform average instead of NaN.

    q_block (a divisor of T; 0: all at once): queries run in blocks of q_block under a
    rematerialized loop, so neither the forward nor the backward pass holds more than one
    block's [B, N, q_block, S] scores (long contexts in the update, long appends). ``options``
    (ForwardOptions) keep the rows of the stacked blocks split as the rows of the batch.

    new = (k_BKCH, v_BKCH): C more keys and values (the tokens being appended to a KV cache),
    which query t attends causally (key c <= t; T = C) beside the slots of the cache that
    mask_BTS allows. One softmax runs over both, so the cache is only read here: the new
    tokens are written into it after attention (``write_cache``), in place. (Writing first and
    attending over the written cache makes the TPU compiler stage each layer's whole cache
    through on-chip memory and write all of it back to HBM at every decoding step.)
    """
    B, T, N, H = q_BTNH.shape
    if not q_block or q_block >= T:
        return _attend_block(q_BTNH, k_BXSH, v_BXSH, mask_BTS, jnp.int32(0), new)
    assert T % q_block == 0, (T, q_block)
    J, S = T // q_block, k_BXSH.shape[2]
    rows = options.constrain
    q_JBtNH = rows(q_BTNH.reshape(B, J, q_block, N, H).swapaxes(0, 1), 1)
    mask_JBtS = rows(mask_BTS.reshape(B, J, q_block, S).swapaxes(0, 1), 1)
    first_J = jnp.arange(J, dtype=jnp.int32) * q_block  # the block's first query position
    block = jax.checkpoint(lambda q, m, first, k, v, new: _attend_block(q, k, v, m, first, new))
    out_JBtNH = jax.lax.map(
        lambda qmf: block(*qmf, k_BXSH, v_BXSH, new), (q_JBtNH, mask_JBtS, first_J)
    )
    return rows(out_JBtNH, 1).swapaxes(0, 1).reshape(B, T, N, H)


def _attend_block(q_BTNH, k_BXSH, v_BXSH, mask_BTS, first, new=None) -> jax.Array:
    """attend() for one block of T queries; ``first``: the position of its first query among
    the new tokens (for their causal mask)."""
    B, T, N, H = q_BTNH.shape
    X = k_BXSH.shape[1]
    R = N // X
    q_BXQH = q_BTNH.reshape(B, T, X, R, H).transpose(0, 2, 3, 1, 4).reshape(B, X, R * T, H)

    def scores(k_BXSH, mask_BTS):  # [B, X, R, T, S], masked
        s_BXQS = jnp.einsum("BXQH,BXSH->BXQS", q_BXQH, k_BXSH, preferred_element_type=jnp.float32)
        s_BXRTS = s_BXQS.reshape(B, X, R, T, -1) / math.sqrt(H)
        return jnp.where(mask_BTS[:, None, None], s_BXRTS, jnp.finfo(jnp.float32).min)

    def mix(weight_BXRTS, v_BXSH):  # the values' weighted sum
        weight_BXQS = weight_BXRTS.reshape(B, X, R * T, -1).astype(v_BXSH.dtype)
        return jnp.einsum("BXQS,BXSH->BXQH", weight_BXQS, v_BXSH)

    scores_BXRTS = scores(k_BXSH, mask_BTS)
    if new is None:
        out_BXQH = mix(jax.nn.softmax(scores_BXRTS, axis=-1), v_BXSH)
    else:  # the appended tokens' own keys, after the cache's slots, under one softmax
        k_BXCH, v_BXCH = new
        C = k_BXCH.shape[2]
        causal_TC = first + jnp.arange(T)[:, None] >= jnp.arange(C)[None, :]
        own_BXRTC = scores(k_BXCH, jnp.broadcast_to(causal_TC, (B, T, C)))
        # The two parts are never joined: a [.., S + C] array would copy the scores, which at
        # hundreds of rows a chip is HBM traffic of its own.
        max_BXRT1 = jnp.maximum(
            jnp.max(scores_BXRTS, axis=-1, keepdims=True),
            jnp.max(own_BXRTC, axis=-1, keepdims=True),
        )
        weight_BXRTS = jnp.exp(scores_BXRTS - max_BXRT1)
        weight_BXRTC = jnp.exp(own_BXRTC - max_BXRT1)
        total_BXRT1 = jnp.sum(weight_BXRTS, axis=-1, keepdims=True)
        total_BXRT1 = total_BXRT1 + jnp.sum(weight_BXRTC, axis=-1, keepdims=True)
        out_BXQH = mix(weight_BXRTS / total_BXRT1, v_BXSH) + mix(weight_BXRTC / total_BXRT1, v_BXCH)
    return out_BXQH.reshape(B, X, R, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def write_cache(cache_BXSH, new_BXTH, slots_BT) -> jax.Array:
    """cache[b, :, slots[b, t]] = new[b, :, t]; a slot >= S writes nothing (padding).

    One scatter per row (vmapped, so the row axis stays a batch axis that a sharded cache
    keeps split), in place when the cache is donated.
    """
    write = lambda c_XSH, n_XTH, s_T: c_XSH.at[:, s_T].set(n_XTH.astype(c_XSH.dtype), mode="drop")
    return jax.vmap(write)(cache_BXSH, new_BXTH, slots_BT)


def _attend_then_write(q_BTNH, k_BXTH, v_BXTH, k_BXSH, v_BXSH, mask_BTS, slots_BT, *, options):
    """Attention of T new tokens over a cache and each other, then their keys and values
    written into the cache (``attend``'s ``new``): the cache is only read before it is written,
    in place. What TPU and GPU run."""
    B, T, N, _ = q_BTNH.shape
    S = k_BXSH.shape[2] + T
    q_block = query_block(options.local_rows(B), N, T, S, options.attention_bytes)
    new = (k_BXTH, v_BXTH)
    out_BTNH = attend(q_BTNH, k_BXSH, v_BXSH, mask_BTS, q_block=q_block, options=options, new=new)
    return out_BTNH, write_cache(k_BXSH, k_BXTH, slots_BT), write_cache(v_BXSH, v_BXTH, slots_BT)


def _write_then_attend(q_BTNH, k_BXTH, v_BXTH, k_BXSH, v_BXSH, mask_BTS, slots_BT, *, options):
    """The same numbers with the new tokens written first and attended in the cache (a slot
    of the cache at most the query's own: slots are positions). XLA:CPU decodes about twice as
    fast so (a tiny model's 40 rows: 1,440-1,750 tokens/s against 790-810 with the write after
    the read, which makes it copy the cache); the TPU compiler, given this order, stages each
    layer's cache through its on-chip memory and writes all of it back at every step."""
    k_BXSH, v_BXSH = write_cache(k_BXSH, k_BXTH, slots_BT), write_cache(v_BXSH, v_BXTH, slots_BT)
    B, T, N, _ = q_BTNH.shape
    S = k_BXSH.shape[2]
    mask_BTS = mask_BTS | (jnp.arange(S) <= slots_BT[:, :, None])
    q_block = query_block(options.local_rows(B), N, T, S, options.attention_bytes)
    out_BTNH = attend(q_BTNH, k_BXSH, v_BXSH, mask_BTS, q_block=q_block, options=options)
    return out_BTNH, k_BXSH, v_BXSH


class Pages(NamedTuple):
    """Where the rows of a paged cache are (``sampling.PageTable`` keeps the table): row b's
    token at position s is at offset s % p of page table_BI[b, s // p] of its device's pool,
    each layer's [X, P, p, H] keys and values."""

    table_BI: jax.Array  # int32 page ids in the pool of the row's own device
    start_B: jax.Array  # int32 tokens the row holds before this call: its first new position
    n_B: jax.Array  # int32 new tokens the row writes (the rest of its T are padding)


# A decoding step's attention over pages: on TPU, JAX's Pallas kernel reads only each row's
# live pages, pages_per_block of them per step of its loop (KERNEL_BLOCK_TOKENS a block); other
# platforms gather the row's pages into a [B, X, S, H] cache and attend as a dense cache does.
# The compiler cannot see inside the kernel: aot.kernel_reads counts what it reads.
KERNEL_BLOCK_TOKENS = 128


def kernel_fits(head_dim: int) -> bool:
    """The kernel's blocks take whole 128-lane heads (Qwen2.5's head_dim is 128)."""
    return head_dim % 128 == 0


def pages_per_block(page: int, pages: int) -> int:
    """Pages the kernel reads per block: KERNEL_BLOCK_TOKENS' worth, dividing a row's ``pages``."""
    block = max(1, min(pages, KERNEL_BLOCK_TOKENS // page))
    while pages % block:
        block -= 1
    return block


def paged_attention(q_BTNH, k_BXTH, v_BXTH, k_XPpH, v_XPpH, where: Pages, *, options):
    """``_write_then_attend`` over a paged cache: the T new tokens' keys and values are written
    at their positions' pages, then every query attends its row's positions up to its own.
    Runs per device (shard_map over the rows, each device's pool holding its rows' pages)."""

    def local(q_BTNH, k_BXTH, v_BXTH, k_XPpH, v_XPpH, table_BI, start_B, n_B):
        T, H = q_BTNH.shape[1], q_BTNH.shape[3]
        X, P, p = k_XPpH.shape[:3]
        pos_BT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)
        page_BT = jnp.take_along_axis(table_BI, jnp.minimum(pos_BT // p, table_BI.shape[1] - 1), 1)
        write_BT = (jnp.arange(T) < n_B[:, None]) & (page_BT >= 0)  # padding writes nowhere
        page_BT = jnp.where(write_BT, page_BT, P)
        table_BI = jnp.maximum(table_BI, 0)  # a row's pages past its own (-1) are never read
        # One H-vector per (row, token, head): a scatter whose window is the minor axis, so
        # that the TPU compiler keeps the pools in the kernel's layout (a [H, ...] window over
        # X makes it carry them in another and convert the whole pool at every step).
        x_11X = jnp.arange(X)[None, None]
        write = lambda pool, new_BXTH: pool.at[
            x_11X, page_BT[..., None], (pos_BT % p)[..., None]
        ].set(new_BXTH.transpose(0, 2, 1, 3).astype(pool.dtype), mode="drop")
        k_XPpH, v_XPpH = write(k_XPpH, k_BXTH), write(v_XPpH, v_BXTH)
        plain = functools.partial(_gathered_attention, options=options)
        args = (q_BTNH, k_XPpH, v_XPpH, table_BI, jnp.where(n_B[:, None] > 0, pos_BT, -1))
        if T == 1 and kernel_fits(H):
            out_BTNH = jax.lax.platform_dependent(*args, tpu=_kernel_attention, default=plain)
        else:
            out_BTNH = plain(*args)
        return out_BTNH, k_XPpH, v_XPpH

    args = (q_BTNH, k_BXTH, v_BXTH, k_XPpH, v_XPpH, *where)
    if options.batch_sharding is None:
        return local(*args)
    split = options.batch_sharding.spec[0]  # the mesh axes of the rows, and of the pools' pages
    rows, pools = PartitionSpec(split), PartitionSpec(None, split)
    rows_map = jax.shard_map(
        local,
        mesh=options.batch_sharding.mesh,
        in_specs=(rows, rows, rows, pools, pools, rows, rows, rows),
        check_vma=False,  # the Pallas kernel states no varying axes
        out_specs=(rows, pools, pools),
    )
    return rows_map(*args)


def _gathered_attention(q_BTNH, k_XPpH, v_XPpH, table_BI, pos_BT, *, options):
    """Each row's pages gathered into a [B, X, S = I p, H] cache, attended like a dense one
    (slots are positions): with S the dense cache's slots, the same numbers bit for bit."""
    B, T, N, _ = q_BTNH.shape
    gather = lambda pool: (
        pool[:, table_BI].transpose(1, 0, 2, 3, 4).reshape(B, pool.shape[0], -1, pool.shape[-1])
    )
    k_BXSH, v_BXSH = gather(k_XPpH), gather(v_XPpH)
    S = k_BXSH.shape[2]
    mask_BTS = jnp.arange(S) <= pos_BT[:, :, None]
    q_block = query_block(B, N, T, S, options.attention_bytes)
    local = options._replace(batch_sharding=None)
    return attend(q_BTNH, k_BXSH, v_BXSH, mask_BTS, q_block=q_block, options=local)


def _kernel_attention(q_BTNH, k_XPpH, v_XPpH, table_BI, pos_BT):
    """One query per row, by JAX's Pallas paged-attention kernel for TPU (it reads the first
    ceil(length / block) blocks of a row's pages, and skips rows of length 0)."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as kernel

    H = q_BTNH.shape[-1]
    q_BNH = (q_BTNH[:, 0] / math.sqrt(H)).astype(k_XPpH.dtype)  # the kernel does not scale
    block = pages_per_block(k_XPpH.shape[2], table_BI.shape[1])
    length_B = jnp.minimum(pos_BT[:, 0] + 1, table_BI.shape[1] * k_XPpH.shape[2])  # 0: skipped
    out_BNH = kernel(q_BNH, k_XPpH, v_XPpH, length_B, table_BI, pages_per_compute_block=block)
    return out_BNH[:, None].astype(q_BTNH.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, config: QwenConfig, *, param_dtype):
        self.eps = config.rms_norm_eps
        self.scale_D = _param(None, (config.hidden_size,), (None,), param_dtype, init="ones")

    def __call__(self, x_BTD):
        return rms_norm(x_BTD, self.scale_D[...], self.eps)


class Attention(nnx.Module):
    def __init__(self, config: QwenConfig, *, rngs: nnx.Rngs, param_dtype):
        D, N, X, H = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_NHD = _param(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), param_dtype)
        self.q_bias_NH = _param(rngs, (N, H), ("q_heads", "head_dim"), param_dtype, init="zeros")
        self.k_XHD = _param(rngs, (X, H, D), ("kv_heads", "head_dim", "embed"), param_dtype)
        self.k_bias_XH = _param(rngs, (X, H), ("kv_heads", "head_dim"), param_dtype, init="zeros")
        self.v_XHD = _param(rngs, (X, H, D), ("kv_heads", "head_dim", "embed"), param_dtype)
        self.v_bias_XH = _param(rngs, (X, H), ("kv_heads", "head_dim"), param_dtype, init="zeros")
        self.o_DNH = _param(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), param_dtype)

    def __call__(
        self,
        x_BTD,
        cos_BTH,
        sin_BTH,
        mask_BTS,
        k_BXSH=None,
        v_BXSH=None,
        slots_BT=None,
        options=PLAIN,
    ):
        """Self-attention of the T new tokens. Queries run in blocks under
        options.attention_bytes.

        Without a cache the keys are the T tokens themselves (S = T, under mask_BTS). With one,
        the tokens attend the cache's slots that mask_BTS allows and each other causally, and
        are then written at slots_BT (``write_cache``). Returns the output and the keys/values
        (the updated cache, or the tokens' own k/v).
        """
        dt = x_BTD.dtype
        q_BTNH = dense(x_BTD, self.q_NHD[...].astype(dt))  # "BTD,NHD->BTNH"
        k_BTXH = dense(x_BTD, self.k_XHD[...].astype(dt))  # "BTD,XHD->BTXH"
        v_BTXH = dense(x_BTD, self.v_XHD[...].astype(dt))
        q_BTNH = apply_rope(q_BTNH + self.q_bias_NH[...].astype(dt), cos_BTH, sin_BTH)
        k_BTXH = apply_rope(k_BTXH + self.k_bias_XH[...].astype(dt), cos_BTH, sin_BTH)
        v_BTXH = v_BTXH + self.v_bias_XH[...].astype(dt)
        k_BXTH, v_BXTH = k_BTXH.transpose(0, 2, 1, 3), v_BTXH.transpose(0, 2, 1, 3)
        B, T, N, H = q_BTNH.shape
        rows = options.local_rows(B)
        if k_BXSH is None:
            q_block = query_block(rows, N, T, T, options.attention_bytes)
            out_BTNH = attend(q_BTNH, k_BXTH, v_BXTH, mask_BTS, q_block=q_block, options=options)
            k_BXSH, v_BXSH = k_BXTH, v_BXTH
        elif isinstance(slots_BT, Pages):  # k_BXSH, v_BXSH: this layer's [X, P, p, H] pools
            out_BTNH, k_BXSH, v_BXSH = paged_attention(
                q_BTNH, k_BXTH, v_BXTH, k_BXSH, v_BXSH, slots_BT, options=options
            )
        else:
            new = (q_BTNH, k_BXTH, v_BXTH, k_BXSH.astype(dt), v_BXSH.astype(dt), mask_BTS, slots_BT)
            out_BTNH, k_BXSH, v_BXSH = plain_or_cpu(
                functools.partial(_attend_then_write, options=options),
                functools.partial(_write_then_attend, options=options),
                *new,
            )
        o_DNH = self.o_DNH[...].astype(dt)
        y_BTD = dense(out_BTNH.reshape(B, T, N * H), o_DNH.reshape(-1, N * H))  # "BTNH,DNH->BTD"
        return y_BTD, k_BXSH, v_BXSH


class MLP(nnx.Module):
    def __init__(self, config: QwenConfig, *, rngs: nnx.Rngs, param_dtype):
        D, F = config.hidden_size, config.intermediate_size
        self.gate_FD = _param(rngs, (F, D), ("mlp", "embed"), param_dtype)
        self.up_FD = _param(rngs, (F, D), ("mlp", "embed"), param_dtype)
        self.down_DF = _param(rngs, (D, F), ("embed", "mlp"), param_dtype)

    def __call__(self, x_BTD, options=PLAIN):
        """SwiGLU. Positions run in chunks under options.mlp_bytes (each chunk's [rows, chunk,
        F] activations), in a rematerialized loop: neither pass holds more than one chunk's."""
        dt = x_BTD.dtype
        gate_FD, up_FD = self.gate_FD[...].astype(dt), self.up_FD[...].astype(dt)
        down_DF = self.down_DF[...].astype(dt)

        def swiglu(x_BtD):
            return dense(jax.nn.silu(dense(x_BtD, gate_FD)) * dense(x_BtD, up_FD), down_DF)

        B, T, _ = x_BTD.shape
        per_position = options.local_rows(B) * gate_FD.shape[0] * dt.itemsize
        chunk = block_size(T, per_position, options.mlp_bytes)
        if chunk >= T:
            return swiglu(x_BTD)
        J = T // chunk
        x_JBcD = options.constrain(x_BTD.reshape(B, J, chunk, -1).swapaxes(0, 1), 1)
        y_JBcD = jax.lax.map(jax.checkpoint(swiglu), x_JBcD)
        return options.constrain(y_JBcD, 1).swapaxes(0, 1).reshape(B, T, -1)


class DecoderLayer(nnx.Module):
    def __init__(self, config: QwenConfig, *, rngs: nnx.Rngs, param_dtype):
        self.attn_norm = RMSNorm(config, param_dtype=param_dtype)
        self.attn = Attention(config, rngs=rngs, param_dtype=param_dtype)
        self.mlp_norm = RMSNorm(config, param_dtype=param_dtype)
        self.mlp = MLP(config, rngs=rngs, param_dtype=param_dtype)

    def __call__(
        self,
        x_BTD,
        cos_BTH,
        sin_BTH,
        mask_BTS,
        k_BXSH=None,
        v_BXSH=None,
        slots_BT=None,
        options=PLAIN,
    ):
        y_BTD, k_BXSH, v_BXSH = self.attn(
            self.attn_norm(x_BTD), cos_BTH, sin_BTH, mask_BTS, k_BXSH, v_BXSH, slots_BT, options
        )
        x_BTD = x_BTD + y_BTD
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD), options)
        return x_BTD, k_BXSH, v_BXSH


class Qwen2(nnx.Module):
    """Qwen2ForCausalLM. ``__call__`` returns the final-normed hidden states (and the cache);
    it runs the layers one by one (what decoding wants: see ``hidden_states`` for the scan)."""

    def __init__(self, config: QwenConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        V, D = config.vocab_size, config.hidden_size
        self.config = config
        self.embed_VD = _param(rngs, (V, D), ("vocab", "embed"), param_dtype)
        self.layers = nnx.List(
            [
                DecoderLayer(config, rngs=rngs, param_dtype=param_dtype)
                for _ in range(config.num_layers)
            ]
        )
        self.final_norm = RMSNorm(config, param_dtype=param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head_VD = _param(rngs, (V, D), ("vocab", "embed"), param_dtype)

    def head_VD(self) -> jax.Array:
        return self.embed_VD[...] if self.config.tie_word_embeddings else self.lm_head_VD[...]

    def __call__(
        self,
        tokens_BT,
        pos_BT,
        mask_BTS,
        k_LBXSH=None,
        v_LBXSH=None,
        slots_BT=None,
        options: ForwardOptions = PLAIN,
    ):
        cfg = self.config
        x_BTD = options.constrain(self.embed_VD[...].astype(cfg.compute_dtype)[tokens_BT])
        cos_BTH, sin_BTH = rope_tables(pos_BT, cfg.head_dim, cfg.rope_theta)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            cache = (None, None) if k_LBXSH is None else (k_LBXSH[i], v_LBXSH[i])
            x_BTD, k_BXSH, v_BXSH = layer(
                x_BTD, cos_BTH, sin_BTH, mask_BTS, *cache, slots_BT, options
            )
            x_BTD = options.constrain(x_BTD)
            new_k.append(k_BXSH)
            new_v.append(v_BXSH)
        return self.final_norm(x_BTD), tuple(new_k), tuple(new_v)


# ---------------------------------------------------------------------------------------------
# Pure functions over the params dict.


def _to_nnx_state(params: Params) -> dict:
    return {**params, "layers": dict(enumerate(params["layers"]))}


def _from_nnx_state(state: dict) -> Params:
    layers = state["layers"]
    return {**state, "layers": [layers[i] for i in range(len(layers))]}


@functools.cache
def _abstract_model(config: QwenConfig) -> Qwen2:
    return nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0)))


def module(params: Params, config: QwenConfig) -> Qwen2:
    """The NNX model holding ``params`` (no copy); usable inside jit."""
    graphdef = nnx.graphdef(_abstract_model(config))
    return nnx.merge(graphdef, _to_nnx_state(params))


def init_params(config: QwenConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (normal(0, 0.02) weights, zero biases, unit norms), as transformers."""
    model = Qwen2(config, rngs=nnx.Rngs(params=key), param_dtype=dtype)
    return _from_nnx_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@functools.cache
def abstract_params(config: QwenConfig, dtype=jnp.float32, *, stacked: bool = False) -> Params:
    """ShapeDtypeStructs of init_params' output (stack_layers' layout with ``stacked``); traced
    once per config, nothing allocated. Read only: the result is shared."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))
    return jax.eval_shape(stack_layers, shapes) if stacked else shapes


def logical_axes(config: QwenConfig, *, stacked: bool = False) -> Params:
    """Pytree like params whose leaves are PartitionSpecs of logical axis names.

    Names: vocab, embed, q_heads, kv_heads, head_dim, mlp, layers (the leading axis of
    stacked layers), and None (norm scales). The leaves are PartitionSpecs rather than bare
    tuples so that jax.tree.map treats them as leaves; they iterate like tuples:
    ``NamedSharding(mesh, P(*(rules[a] for a in axes)))``.
    """
    state = nnx.state(_abstract_model(config), nnx.Param)
    axes = jax.tree.map(
        lambda v: v.get_metadata()["axes"], state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )
    axes = _from_nnx_state(nnx.to_pure_dict(axes))
    if not stacked:
        return axes
    return {
        **axes,
        "layers": jax.tree.map(lambda a: PartitionSpec("layers", *a), axes["layers"][0]),
    }


def stack_layers(params: Params) -> Params:
    """params with ``layers`` as one dict of [L, ...] arrays instead of a list of L dicts: the
    layout of the update, which runs the layers under lax.scan (``hidden_states``)."""
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *params["layers"])}


def unstack_layers(params: Params) -> Params:
    """The inverse of stack_layers: one dict per layer (the layout of decoding and of files)."""
    stacked = params["layers"]
    L = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(L)]}


@functools.cache
def _layer_graphdef(config: QwenConfig):
    return nnx.graphdef(_abstract_model(config).layers[0])


def positions(mask_BT: jax.Array) -> jax.Array:
    """RoPE position of each token: the number of valid tokens before it in its row."""
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def forward(
    params,
    config,
    tokens_BT,
    pos_BT,
    mask_BTS,
    k_LBXSH=None,
    v_LBXSH=None,
    slots_BT=None,
    options: ForwardOptions = PLAIN,
):
    """Decoder stack -> (final-normed x_BTD, k_LBXSH, v_LBXSH).

    mask_BTS[b, t, s]: query t may attend key slot s. Without a cache S = T (the tokens
    themselves); with one, s is a slot of each per-layer [B, X, S, H] cache, the T new tokens
    also attend each other causally, their keys/values are then written at slots_BT
    (``write_cache``), and the updated caches are returned. With slots_BT a ``Pages``, the
    caches are a paged cache's [X, P, p, H] pools (``paged_attention``; mask_BTS unused).
    ``options`` say how to run it (rematerialization, activation sharding, attention blocks).
    """
    return module(params, config)(tokens_BT, pos_BT, mask_BTS, k_LBXSH, v_LBXSH, slots_BT, options)


def lm_head(params: Params, config: QwenConfig) -> jax.Array:
    """The [V, D] output projection: the embedding when tied, else lm_head_VD."""
    return params["embed_VD"] if config.tie_word_embeddings else params["lm_head_VD"]


def head_logits(x_BTD: jax.Array, head_VD: jax.Array) -> jax.Array:
    """Logits in float32 (the dot accumulates in float32 for bfloat16 inputs)."""
    return dense(x_BTD, head_VD.astype(x_BTD.dtype), preferred_element_type=jnp.float32)


def causal_mask(mask_BT: jax.Array) -> jax.Array:
    """mask_BTS for a full sequence: key s <= query t, and key s is a valid token."""
    T = mask_BT.shape[1]
    causal_TS = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    return causal_TS[None] & mask_BT.astype(bool)[:, None, :]


def hidden_states(
    params: Params, config: QwenConfig, tokens_BT, mask_BT, options=PLAIN
) -> jax.Array:
    """Final-normed hidden states x_BTD of a (left-padded) batch; positions from the mask.

    The layers run under one lax.scan over stacked weights (``stack_layers``; a list of layers
    is stacked here): the program holds one layer, so compile time does not grow with depth,
    and with options.remat the backward pass keeps only each layer's input. (Measured on
    XLA:CPU: per-layer jax.checkpoint in an unrolled loop saved no memory at all; under the
    scan it keeps one layer's intermediates. Decoding keeps one weight array per layer and a
    Python loop over them, which XLA:CPU runs about 1.6x faster.)
    """
    if isinstance(params["layers"], list | tuple):
        params = stack_layers(params)
    x_BTD = options.constrain(params["embed_VD"].astype(config.compute_dtype)[tokens_BT])
    cos_BTH, sin_BTH = rope_tables(positions(mask_BT), config.head_dim, config.rope_theta)
    mask_BTS = causal_mask(mask_BT)
    graphdef = _layer_graphdef(config)

    def layer(layer_params, x_BTD, cos_BTH, sin_BTH, mask_BTS):
        x_BTD = checkpoint_name(x_BTD, "layer_input")
        module = nnx.merge(graphdef, layer_params)
        return options.constrain(module(x_BTD, cos_BTH, sin_BTH, mask_BTS, options=options)[0])

    if options.remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[options.remat])
    x_BTD, _ = jax.lax.scan(
        lambda x, p: (layer(p, x, cos_BTH, sin_BTH, mask_BTS), None), x_BTD, params["layers"]
    )
    return rms_norm(x_BTD, params["final_norm"]["scale_D"], config.rms_norm_eps)


def logits(params: Params, config: QwenConfig, tokens_BT, mask_BT) -> jax.Array:
    """Next-token logits_BTV (float32) at every position; rows may be left padded."""
    return head_logits(hidden_states(params, config, tokens_BT, mask_BT), lm_head(params, config))


def logits_chunks(rows: int, length: int, vocab: int, max_bytes: int) -> tuple[int, int]:
    """(row chunks, positions per chunk) for token_logprobs: each chunk's float32 logits, of
    rows / row_chunks rows x positions x vocab, stay under max_bytes where they can. Rows are
    split (row_chunks a divisor of rows) only when one position of every row is already over."""
    tokens = max(1, max_bytes // (vocab * 4))  # tokens per chunk
    row_chunks = next(j for j in range(1, rows + 1) if rows % j == 0 and rows // j <= tokens)
    return row_chunks, max(1, min(length, tokens // (rows // row_chunks)))


def token_logprobs(params: Params, config: QwenConfig, tokens_BT, mask_BT, options=PLAIN):
    """logp_BT[b, t] = log p(tokens[b, t] | tokens[b, :t]): the log-prob of each token given the
    ones before it, 0 at t = 0 and on padding. Leading axes other than one of rows (e.g.
    prompts x samples) are flattened into rows. The one log-prob function of the project (the
    update, old-policy and reference log-probs, the toy world's warm start).

    The log-softmax runs over chunks of rows x positions (``logits_chunks``: under
    options.logits_bytes per device) in a rematerialized loop, so neither the forward nor the
    backward pass holds the [B, T, V] float32 logits. On a mesh it is vocabulary-parallel: the
    head, cast once, stays split over the devices along V; each chunk's rows (a few MB) are
    gathered, every device scores them against its slice of the vocabulary, and the
    log-sum-exp and the picked logit are sums over the slices. No device ever holds the whole
    [V, D] head or its gradient.
    """
    lead = tokens_BT.shape[:-1]  # any leading axes (prompts x samples) are rows
    T = tokens_BT.shape[-1]
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32).reshape(-1, T)
    mask_BT = mask_BT.reshape(-1, T)
    B = tokens_BT.shape[0]
    x_BTD = hidden_states(params, config, tokens_BT, mask_BT, options)
    D = x_BTD.shape[-1]
    head_VD = options.constrain(lm_head(params, config).astype(x_BTD.dtype), 0)
    next_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros((B, 1), tokens_BT.dtype)], axis=1)
    next_mask_BT = jnp.concatenate([mask_BT[:, 1:], jnp.zeros((B, 1), mask_BT.dtype)], axis=1)
    rows = options.local_rows(B)
    R, c = logits_chunks(rows, T, config.vocab_size, options.logits_bytes)
    J = -(-T // c)
    # Row b = r * R + i goes to row chunk i, so every chunk keeps rows on every device.
    x_RJbcD = jnp.pad(x_BTD, ((0, 0), (0, J * c - T), (0, 0))).reshape(B // R, R, J, c, D)
    x_NbcD = options.constrain(x_RJbcD.transpose(1, 2, 0, 3, 4).reshape(R * J, B // R, c, D), 1)
    next_RJbc = jnp.pad(next_BT, ((0, 0), (0, J * c - T))).reshape(B // R, R, J, c)
    next_Nbc = options.constrain(next_RJbc.transpose(1, 2, 0, 3).reshape(R * J, B // R, c), 1)

    @jax.checkpoint
    def chunk_logp(x_bcD, next_bc):
        x_bcD, next_bc = options.whole(x_bcD), options.whole(next_bc)
        logits_bcV = options.constrain(head_logits(x_bcD, head_VD), 2)  # split along V
        vocab_bcV = jax.lax.broadcasted_iota(jnp.int32, logits_bcV.shape, 2)
        picked_bc = jnp.sum(jnp.where(vocab_bcV == next_bc[..., None], logits_bcV, 0.0), -1)
        return options.constrain(picked_bc - jax.nn.logsumexp(logits_bcV, axis=-1))

    logp_Nbc = jax.lax.map(lambda xs: chunk_logp(*xs), (x_NbcD, next_Nbc))
    logp_Nbc = options.constrain(logp_Nbc, 1)
    logp_bRJc = logp_Nbc.reshape(R, J, B // R, c).transpose(2, 0, 1, 3)
    next_logp_BT = logp_bRJc.reshape(B, J * c)[:, :T]  # of token t + 1, at t
    next_logp_BT = jnp.where(next_mask_BT.astype(bool), next_logp_BT, 0.0)
    logp_BT = jnp.concatenate([jnp.zeros((B, 1), next_logp_BT.dtype), next_logp_BT[:, :-1]], 1)
    return logp_BT.reshape(*lead, T)
