"""KV-cache sampling for tspo_jax/qwen.py: prefill, one-loop decoding, stop strings, and
continuation of the same cache across turns (a rollout appends each observation and goes on).

A rollout:
    state = init_cache(config, batch, slots)
    state = append(params, config, state, *pad_chunk(prompts))       # prefill
    state, turn = sample_turn(params, config, state, key, tokenizer, max_new_tokens=500, ...)
    state = append(params, config, state, *pad_chunk(observations))  # no re-prefill
    state, turn = sample_turn(...)                                   # ... and so on
    state = restart(state, done_B)                   # rows that ended start over from slot 0
    state = append(params, config, state, *pad_chunk(next_prompts))  # ... with a new prompt

The cache: one [B, X, S, H] key and value array per layer. Row b's tokens fill slots
0 .. length_B[b] - 1 in order, with no holes, so a token's slot is also its RoPE position and
the keys a query may attend are exactly the slots before it. Every call writes each row's new
tokens at that row's own end (a scatter: padding and rows with nothing to add write nowhere),
so a row's cache, and hence its tokens, do not depend on which other rows share the batch or
how long they are; the cache needs only as many slots as its longest row. A rewind moves a
row's end back; a restart moves it to 0, and the row's next append writes a new sequence over
the old one's slots (the slots past a row's end are never attended, so they need no clearing).
Each row may stop at its own subset of the stop strings (``generate``'s stop_rows_BW,
``sample_turn``'s stop_strings_B), so rows at different turns of a protocol share one call.
(B, X) lead the layout because they are the batch axes of the attention matmuls: any other
order makes XLA transpose the whole cache at every step.

The paged cache (``init_paged``; vLLM's PagedAttention, JAX's Pallas kernel on TPU): each
layer's keys and values are one [X, P, p, H] pool of P pages of p tokens per device, and the
page table (``PageTable`` on the host, ``DecodeState.table_BI`` on the devices) lists the
pages that hold each row's slots in order, so a row holds only the pages its tokens fill, and
a decoding step on TPU reads only those (qwen.paged_attention). The caller reserves the pages a
call may fill (``PageTable.reserve``, then ``set_table``; a call past them is refused) and
gives back what a row no longer uses (``trim``, ``release``). Every function here takes either
cache, with the same results: on CPU a row's pages are gathered into the dense layout, bit for
bit the dense cache's numbers at the same slots.

Sharding: ``options.batch_sharding`` (qwen.ForwardOptions) splits the rows over the devices of
a mesh; the cache is created split (``init_cache``) and every call keeps it so, with the
weights replicated. Rows never interact, so no device waits for another's rows.

Compiled shapes (each distinct value compiles once; keep them to a few): batch B and cache slots
S (``init_cache``, ``grow``), chunk length C (``append``; pad with ``pad_chunk`` to length
buckets), ``max_new_tokens`` T, the stop table [W, U] and the number of EOS ids E
(``generate``), and the flags greedy, top_k and (top_p < 1). Temperature, the top_p value, the
per-row limits and the per-row stop masks are traced, not static.

Shape letters (the project's one key, README "Shape letters"): B rows, S cache slots, C appended
tokens, T new tokens, V vocabulary, L layers, X key/value heads, H head dim, D model dim, W stop
sequences, U tokens of a stop sequence (right-aligned, left-padded with -1), E EOS ids, J blocks
of the vocabulary, P pages of a pool, I a row's entries in the page table; lower case: n a
row's cached tokens, b a block's entries, p a page's tokens.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tspo_jax import qwen

# Why a row of generate() stopped (Generation.stop_B).
LENGTH = 0  # reached max_new_tokens, or its own limit
EOS = 1  # sampled an EOS id
STOP_STRING = 2  # its last tokens matched a row of the stop table (or, on the host, the text)
INACTIVE = 3  # not active in this call (generated nothing)
STOP_NAMES = ("length", "eos", "stop", "inactive")
PAUSED = "paused"  # sample_turn: the call's bound came before the turn's end (it goes on)

BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class SamplingParams(NamedTuple):
    """How tokens are drawn and where a turn ends: one value for generate and sample_turn."""

    temperature: float = 1.0
    top_p: float = 1.0  # nucleus mass (1: off)
    top_k: int = 0  # sample among the k most likely tokens (0: off)
    greedy: bool = False  # argmax instead of sampling
    eos_ids: tuple[int, ...] | None = None  # None: config.eos_token_ids; (): no EOS
    stop_strings: tuple[str, ...] = ()  # a turn ends after the first of these it writes
    stop_table: np.ndarray | None = None  # their token ids (make_stop_table); None: none

    def with_stops(self, tokenizer, stop_strings: Sequence[str]) -> "SamplingParams":
        """These params, stopping at ``stop_strings`` (their table built once, here)."""
        table = make_stop_table(tokenizer, stop_strings)
        return self._replace(stop_strings=tuple(stop_strings), stop_table=table)


class DecodeState(NamedTuple):
    """Everything a batch of partial sequences needs to continue; donated to every call.
    With a page table (``init_paged``) the cache is paged: each layer's keys and values are
    [X, P, p, H] pools of P pages of p tokens (the pool's pages take the place of the rows),
    and row b's slot s is offset s % p of page table_BI[b, s // p] (``PageTable``)."""

    k_LBXSH: tuple[jax.Array, ...]  # per layer [B, X, S, H] keys (RoPE applied), or pools
    v_LBXSH: tuple[jax.Array, ...]  # per layer [B, X, S, H] values, or pools
    length_B: jax.Array  # int32: row b's tokens are in slots 0 .. length - 1 (its next position)
    logits_BV: jax.Array  # float32: next-token logits of each row (after its last token)
    table_BI: jax.Array | None = None  # int32 page table of a paged cache (S = I p slots)


class Generation(NamedTuple):
    """What generate() sampled, as sampled (never re-tokenized)."""

    tokens_BT: jax.Array  # int32, 0 after each row's length
    logp_BT: jax.Array  # float32 log-probs of tokens_BT (see sample_logits), 0 after length
    length_B: jax.Array  # int32 tokens generated per row, the EOS / stop token included
    stop_B: jax.Array  # int32 LENGTH, EOS, STOP_STRING or INACTIVE
    start_B: jax.Array  # int32: row b's j-th generated token is in slot start_B[b] + j


class TurnSample(NamedTuple):
    """One row's turn, from sample_turn."""

    tokens: list[int]  # sampled ids up to and including the one that ends the turn
    logps: list[float]  # their log-probs
    text: str  # tokenizer.decode(tokens)
    stop: str  # "eos", "stop", "length" or "inactive"
    stop_string: str | None  # which stop string ended the turn, if one did
    generated: int = 0  # tokens the decoding loop generated for the row, before the host's cut


NOT_BEGUN = TurnSample([], [], "", PAUSED, None)  # a turn that sampled nothing yet (``before``)


def init_cache(config: qwen.QwenConfig, batch: int, slots: int, *, sharding=None) -> DecodeState:
    """An empty cache of ``slots`` slots per row, in the compute dtype. ``sharding``: a
    NamedSharding that splits the leading (row) axis, e.g. ForwardOptions.batch_sharding;
    the cache is then created split, never whole on one device."""
    dtype = config.compute_dtype
    shape = (batch, config.num_kv_heads, slots, config.head_dim)
    zeros = lambda shape, dtype: jnp.zeros(shape, dtype, device=sharding)
    return DecodeState(
        k_LBXSH=tuple(zeros(shape, dtype) for _ in range(config.num_layers)),
        v_LBXSH=tuple(zeros(shape, dtype) for _ in range(config.num_layers)),
        length_B=zeros((batch,), jnp.int32),
        logits_BV=zeros((batch, config.vocab_size), jnp.float32),
    )


class PageTable:
    """Which pages of its device's pool each row of a paged cache holds (host side; the
    device's copy is DecodeState.table_BI, sent by ``set_table``).

    Each device has a pool of ``pages`` pages of ``page`` tokens; row b lives on device
    b // (rows / devices), as ForwardOptions.batch_sharding splits the rows, and takes its
    pages from that device's pool (a stack of free pages each): ``reserve`` before a call adds
    tokens, ``trim`` after it gives back what the row did not use, ``release`` when its episode
    ends. Entries past a row's pages are -1. A row's pages need not be
    contiguous, and which pages it holds never changes what it computes.
    """

    def __init__(self, rows: int, devices: int, pages: int, page: int):
        if rows % devices:
            raise ValueError(f"PageTable: {rows} rows do not split over {devices} devices")
        self.page, self.pages, self.per_device = page, pages, rows // devices
        self.held = [[] for _ in range(rows)]  # row b's pages, in order of position
        self.free = [list(range(pages - 1, -1, -1)) for _ in range(devices)]  # a stack each

    def reserve(self, b: int, tokens: int) -> bool:
        """Row b holds pages for ``tokens`` tokens (True), or, when its device's pool has too
        few free pages, nothing changes (False)."""
        need = -(-tokens // self.page) - len(self.held[b])
        free = self.free[b // self.per_device]
        if need > len(free):
            return False
        self.held[b] += [free.pop() for _ in range(max(need, 0))]
        return True

    def trim(self, b: int, tokens: int) -> None:
        """Row b keeps the pages its first ``tokens`` tokens use; the rest go back."""
        keep = -(-tokens // self.page)
        self.free[b // self.per_device] += reversed(self.held[b][keep:])
        del self.held[b][keep:]

    def release(self, b: int) -> None:
        self.trim(b, 0)

    def pool_pages(self, b: int) -> np.ndarray:
        """Row b's pages as the whole pool numbers them (its device's pages come after the
        previous devices')."""
        return np.asarray(self.held[b], np.int32) + b // self.per_device * self.pages

    def table(self, width: int) -> np.ndarray:
        """The [rows, width] int32 table (-1 past each row's pages)."""
        table_BI = np.full((len(self.held), width), -1, np.int32)
        for b, held in enumerate(self.held):
            table_BI[b, : len(held)] = held[:width]
        return table_BI


def set_table(state: DecodeState, table: PageTable) -> DecodeState:
    """``state`` with the host's page table (its width kept)."""
    table_BI = table.table(state.table_BI.shape[1])
    return state._replace(table_BI=jax.device_put(table_BI, state.table_BI.sharding))


def pool_sharding(rows: NamedSharding) -> NamedSharding:
    """A paged cache's [X, P, p, H] pools, their pages split as ``rows`` splits the rows."""
    return NamedSharding(rows.mesh, P(None, rows.spec[0]))


def init_paged(
    config: qwen.QwenConfig, batch: int, table: "PageTable", slots: int, *, sharding=None
) -> DecodeState:
    """An empty paged cache: ``table.pages`` pages of ``table.page`` tokens per device (each
    device's pool holds its rows' pages; ``sharding`` as init_cache's), rows of ``slots``."""
    devices = 1 if sharding is None else sharding.mesh.size
    shape = (config.num_kv_heads, table.pages * devices, table.page, config.head_dim)
    pools = None if sharding is None else pool_sharding(sharding)
    pool = lambda: jnp.zeros(shape, config.compute_dtype, device=pools)
    return DecodeState(
        k_LBXSH=tuple(pool() for _ in range(config.num_layers)),
        v_LBXSH=tuple(pool() for _ in range(config.num_layers)),
        length_B=jnp.zeros((batch,), jnp.int32, device=sharding),
        logits_BV=jnp.zeros((batch, config.vocab_size), jnp.float32, device=sharding),
        table_BI=jax.device_put(table.table(-(-slots // table.page)), sharding),
    )


def slots(state: DecodeState) -> int:
    """S, the cache's slots per row."""
    if state.table_BI is not None:
        return state.table_BI.shape[1] * state.k_LBXSH[0].shape[2]
    return state.k_LBXSH[0].shape[2]


@functools.partial(jax.jit, static_argnums=1)
def _grow(state: DecodeState, slots: int) -> DecodeState:
    pad = slots - state.k_LBXSH[0].shape[2]
    kv = lambda x_BXSH: jnp.pad(x_BXSH, ((0, 0), (0, 0), (0, pad), (0, 0)))
    return state._replace(
        k_LBXSH=tuple(map(kv, state.k_LBXSH)), v_LBXSH=tuple(map(kv, state.v_LBXSH))
    )


def grow(state: DecodeState, needed_B, *, limit: int | None = None) -> DecodeState:
    """The state with room for needed_B[b] more tokens in each row b (an int: in every row):
    unchanged when it has it, else copied into a cache of bucket_length(longest) slots, at
    most ``limit`` (the longest row any caller allows, e.g. max_context).

    Every decode step attends over all S slots of the cache, used or not, so a cache that
    starts small and grows by buckets decodes faster than one sized for the worst case.
    """
    longest = int(np.max(np.asarray(state.length_B) + np.asarray(needed_B)))
    if longest <= slots(state):
        return state
    size = bucket_length(longest)
    if limit is not None and longest <= limit:
        size = min(size, limit)
    if state.table_BI is not None:  # a wider page table; the pools stay as they are
        width = -(-size // state.k_LBXSH[0].shape[2]) - state.table_BI.shape[1]
        table_BI = np.pad(np.asarray(state.table_BI), ((0, 0), (0, width)), constant_values=-1)
        return state._replace(table_BI=jax.device_put(table_BI, state.table_BI.sharding))
    return _grow(state, size)


def _append(params, config, state: DecodeState, tokens_BC, n_B, options: qwen.ForwardOptions):
    """Writes tokens_BC[b, :n_B[b]] at the end of each row b and updates its next-token logits.

    Every row runs all C positions (one batched forward); the padding positions write nowhere
    (scatter index S, dropped) and their outputs are ignored.
    """
    C, S = tokens_BC.shape[1], slots(state)
    n_B = n_B.astype(jnp.int32)
    slot_BC = state.length_B[:, None] + jnp.arange(C, dtype=jnp.int32)
    write_BC = jnp.where(jnp.arange(C) < n_B[:, None], slot_BC, S)
    # The rows' cached tokens (no holes); the new tokens also see each other, causally.
    mask_BCS = jnp.broadcast_to(jnp.arange(S) < state.length_B[:, None, None], (len(n_B), C, S))
    if state.table_BI is not None:  # qwen.paged_attention writes and masks by position
        write_BC, mask_BCS = qwen.Pages(state.table_BI, state.length_B, n_B), None
    x_BCD, k_LBXSH, v_LBXSH = qwen.forward(
        params,
        config,
        tokens_BC.astype(jnp.int32),
        slot_BC,
        mask_BCS,
        state.k_LBXSH,
        state.v_LBXSH,
        write_BC,
        options,
    )
    last_B = jnp.maximum(n_B - 1, 0)
    x_BD = jnp.take_along_axis(x_BCD, last_B[:, None, None], axis=1)[:, 0]
    logits_BV = qwen.head_logits(x_BD, qwen.lm_head(params, config))
    return state._replace(
        k_LBXSH=k_LBXSH,
        v_LBXSH=v_LBXSH,
        length_B=state.length_B + n_B,
        logits_BV=options.constrain(jnp.where((n_B > 0)[:, None], logits_BV, state.logits_BV)),
    )


_append_jit = jax.jit(_append, static_argnums=(1, 5), donate_argnums=2)


def _check_room(state: DecodeState, needed_B, what: str) -> None:
    """needed_B[b] more tokens must fit in row b (host check; reads length_B)."""
    end_B = np.asarray(state.length_B) + np.asarray(needed_B)
    if np.max(end_B) > slots(state):
        raise ValueError(
            f"{what}: a row of {np.max(end_B)} tokens does not fit in the cache of "
            f"{slots(state)} slots; make init_cache's slots larger (or grow the state first)"
        )
    if state.table_BI is not None:
        held_B = np.sum(np.asarray(state.table_BI) >= 0, axis=1) * state.k_LBXSH[0].shape[2]
        short_B = (end_B > held_B) & (np.asarray(needed_B) > 0)
        if np.any(short_B):
            b = int(np.argmax(short_B))
            raise ValueError(
                f"{what}: row {b} needs {end_B[b]} tokens of pages and holds {held_B[b]}; "
                "reserve them first (PageTable.reserve, then set_table)"
            )


def _rows(x, options: qwen.ForwardOptions):
    """A host array with a leading row axis, placed on the devices as options say."""
    if options.batch_sharding is None:
        return jnp.asarray(x)
    return jax.device_put(x if isinstance(x, jax.Array) else np.asarray(x), options.batch_sharding)


def append(
    params,
    config: qwen.QwenConfig,
    state: DecodeState,
    tokens_BC,
    n_B,
    options: qwen.ForwardOptions = qwen.PLAIN,
) -> DecodeState:
    """Appends tokens_BC[b, :n_B[b]] to each row b (the prompt, or an observation; n_B[b] = 0
    adds nothing and keeps the row's logits); ``state`` is donated. Compiles once per (B, S, C).
    """
    _check_room(state, n_B, "append")
    tokens_BC, n_B = _rows(tokens_BC, options), _rows(n_B, options)
    return _append_jit(params, config, state, tokens_BC, n_B, options)


# ---------------------------------------------------------------------------------------------
# Drawing a token: argmax, the nucleus (top-p) and one draw per row, each in its plain form (what
# a TPU or GPU runs) and in an exact form without sorts or long scans that XLA:CPU runs several
# times faster (qwen.plain_or_cpu picks; tests check that both give the same tokens).


def first_index_of_max(x_BV):
    """The smallest index holding each row's maximum."""
    return qwen.plain_or_cpu(lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), _cpu_argmax, x_BV)


def _cpu_argmax(x_BV):
    """XLA:CPU: argmax as two plain reductions (its variadic argmax reduce is several times
    slower)."""
    iota_BV = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, 1)
    max_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
    first_B = jnp.min(jnp.where(x_BV == max_B1, iota_BV, x_BV.shape[1]), axis=-1)
    return jnp.minimum(first_B, x_BV.shape[1] - 1)


def nucleus_threshold(weight_BV, top_p):
    """The largest t with sum(w >= t) >= top_p * sum(w), per row, for non-negative weights.

    Keeping w >= t is top-p (nucleus) filtering: the smallest set of most likely tokens whose
    probability reaches top_p. t is the weight at which the descending cumulative sum first
    reaches top_p of the total.
    """
    return qwen.plain_or_cpu(_sorted_threshold, _cpu_threshold, weight_BV, top_p)


def _sorted_threshold(weight_BV, top_p):
    sorted_BV = -jnp.sort(-weight_BV, axis=-1)
    cum_BV = jnp.cumsum(sorted_BV, axis=-1)
    k_B1 = jnp.sum(cum_BV < top_p * cum_BV[:, -1:], axis=-1, keepdims=True)
    return jnp.take_along_axis(sorted_BV, jnp.minimum(k_B1, weight_BV.shape[1] - 1), axis=-1)


def _cpu_threshold(weight_BV, top_p):
    """XLA:CPU: the threshold by bisection on the float32 bit pattern of t (monotone for
    t >= 0), 32 masked sums instead of a sort over the vocabulary (which XLA:CPU makes slow)."""
    target_B1 = top_p * jnp.sum(weight_BV, axis=-1, keepdims=True)
    lo_B1 = jnp.zeros(target_B1.shape, jnp.int32)  # t = 0 keeps everything: always enough
    hi_B1 = jax.lax.bitcast_convert_type(jnp.max(weight_BV, -1, keepdims=True), jnp.int32) + 1

    def halve(_, bounds):
        lo_B1, hi_B1 = bounds
        mid_B1 = lo_B1 + (hi_B1 - lo_B1) // 2
        t_B1 = jax.lax.bitcast_convert_type(mid_B1, jnp.float32)
        enough_B1 = jnp.sum(jnp.where(weight_BV >= t_B1, weight_BV, 0.0), -1, keepdims=True)
        enough_B1 = enough_B1 >= target_B1
        return jnp.where(enough_B1, mid_B1, lo_B1), jnp.where(enough_B1, hi_B1, mid_B1)

    lo_B1, _ = jax.lax.fori_loop(0, 32, halve, (lo_B1, hi_B1))
    return jax.lax.bitcast_convert_type(lo_B1, jnp.float32)


def uniform_rows(key, B: int):
    """One U[0, 1) draw per row: from one key, or from a [B] array of per-row keys (then a row's
    draw depends only on its own key, not on which other rows share the batch)."""
    if key.ndim == 0:
        return jax.random.uniform(key, (B,), jnp.float32)
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(key)


def fold_in_rows(key, data):
    """jax.random.fold_in for one key or a [B] array of per-row keys, and one datum for all
    rows or (with per-row keys) a [B] array of them: row b's key is fold_in(key[b], data[b])."""
    if key.ndim == 0:
        return jax.random.fold_in(key, data)
    return jax.vmap(jax.random.fold_in, in_axes=(0, 0 if np.ndim(data) else None))(key, data)


def sample_weights(key, weight_BV):
    """One index per row with probability weight / sum(weight) (non-negative weights), by the
    inverse CDF of one uniform draw per row (uniform_rows): the first index whose cumulative
    weight passes u * sum(w)."""
    u_B = uniform_rows(key, weight_BV.shape[0])
    tok_B = qwen.plain_or_cpu(_inverse_cdf, _cpu_inverse_cdf, weight_BV, u_B)
    # Float rounding at the end of the CDF can land on a zero weight: take the row's mode then.
    picked_B = jnp.take_along_axis(weight_BV, tok_B[:, None], axis=1)[:, 0]
    return jnp.where(picked_B > 0, tok_B, first_index_of_max(weight_BV)).astype(jnp.int32)


def _inverse_cdf(weight_BV, u_B):
    cum_BV = jnp.cumsum(weight_BV, axis=-1)
    tok_B = jnp.sum(cum_BV <= (u_B * cum_BV[:, -1])[:, None], axis=-1)
    return jnp.minimum(tok_B, weight_BV.shape[1] - 1).astype(jnp.int32)


def _cpu_inverse_cdf(weight_BV, u_B, block: int = 1024):
    """XLA:CPU: the inverse CDF in two levels (block sums, then inside the chosen block), so
    nothing scans the whole vocabulary sequentially (about 10x cheaper there than a cumsum over
    [B, V], and than jax.random.categorical's Gumbel noise)."""
    B, V = weight_BV.shape
    J = -(-V // block)
    w_BJb = jnp.pad(weight_BV, ((0, 0), (0, J * block - V))).reshape(B, J, block)
    block_BJ = jnp.sum(w_BJb, axis=-1)
    cum_BJ = jnp.cumsum(block_BJ, axis=-1)
    u_B = u_B * cum_BJ[:, -1]
    r_B = jnp.minimum(jnp.sum(cum_BJ <= u_B[:, None], axis=-1), J - 1)
    inner_Bb = jnp.take_along_axis(w_BJb, r_B[:, None, None], axis=1)[:, 0]
    u_B = u_B - jnp.take_along_axis(cum_BJ - block_BJ, r_B[:, None], axis=1)[:, 0]
    i_B = jnp.minimum(jnp.sum(jnp.cumsum(inner_Bb, axis=-1) <= u_B[:, None], axis=-1), block - 1)
    return jnp.minimum(r_B * block + i_B, V - 1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Decoding


def sample_logits(logits_BV, key, temperature, top_p, *, top_k: int, use_top_p: bool, greedy: bool):
    """Samples one token per row -> (tok_B, logp_B).

    greedy: argmax, and logp = log_softmax(logits) at it. Otherwise the logits are divided by
    temperature, filtered to the top_k largest (top_k > 0) and then to the smallest set whose
    probability reaches top_p (use_top_p), and sampled. logp is always log_softmax(logits /
    temperature) of the full distribution, before top-k / top-p filtering (what the policy
    gradient needs); with filtering it is not the probability the sampler actually used.
    """
    if greedy:
        max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
        tok_B = first_index_of_max(logits_BV)
        return tok_B, -jnp.log(jnp.sum(jnp.exp(logits_BV - max_B1), axis=-1))
    scaled_BV = logits_BV / temperature
    max_B1 = jnp.max(scaled_BV, axis=-1, keepdims=True)
    weight_BV = jnp.exp(scaled_BV - max_B1)  # unnormalized probabilities
    log_z_B = jnp.log(jnp.sum(weight_BV, axis=-1))
    if top_k > 0:
        # The k-th largest as a min over all k (XLA:CPU turns top_k()[:, -1] into a full sort).
        kth_B1 = jnp.min(jax.lax.top_k(scaled_BV, top_k)[0], axis=-1, keepdims=True)
        weight_BV = jnp.where(scaled_BV >= kth_B1, weight_BV, 0.0)
    if use_top_p:
        weight_BV = jnp.where(weight_BV >= nucleus_threshold(weight_BV, top_p), weight_BV, 0.0)
    tok_B = sample_weights(key, weight_BV)
    picked_B = jnp.take_along_axis(scaled_BV, tok_B[:, None], axis=-1)[:, 0]
    return tok_B, picked_B - max_B1[:, 0] - log_z_B


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_new_tokens", "top_k", "use_top_p", "greedy", "options"),
    donate_argnames="state",
)
def _generate(
    params,
    config,
    state: DecodeState,
    key,
    limit_B,
    stop_table_WU,
    eos_E,
    temperature,
    top_p,
    *,
    max_new_tokens: int,
    top_k: int,
    use_top_p: bool,
    greedy: bool,
    options: qwen.ForwardOptions,
    stop_rows_BW=None,
    offset_B=0,
    window_BU=None,
):
    B = state.length_B.shape[0]
    T = max_new_tokens
    W, U = stop_table_WU.shape
    if stop_rows_BW is None:
        stop_rows_BW = jnp.ones((B, W), bool)

    def cond(carry):
        step, _, _, _, _, alive_B, _, _ = carry
        return (step < T) & jnp.any(alive_B)

    def body(carry):
        step, state, tokens_BT, logp_BT, window_BU, alive_B, length_B, stop_B = carry
        tok_B, logp_B = sample_logits(
            state.logits_BV,
            fold_in_rows(key, offset_B + step),
            temperature,
            top_p,
            top_k=top_k,
            use_top_p=use_top_p,
            greedy=greedy,
        )
        tok_B = jnp.where(alive_B, tok_B, 0)
        tokens_BT = jax.lax.dynamic_update_slice(tokens_BT, tok_B[:, None], (0, step))
        logp_BT = jax.lax.dynamic_update_slice(
            logp_BT, jnp.where(alive_B, logp_B, 0.0)[:, None], (0, step)
        )
        # The last J sampled tokens against every right-aligned stop sequence (-1 = wildcard).
        window_BU = jnp.concatenate([window_BU[:, 1:], jnp.where(alive_B, tok_B, -2)[:, None]], 1)
        match_BWU = (stop_table_WU[None] == -1) | (stop_table_WU[None] == window_BU[:, None, :])
        hit_B = jnp.any(jnp.all(match_BWU, axis=-1) & stop_rows_BW, axis=-1)
        eos_B = jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)
        state = _append(params, config, state, tok_B[:, None], alive_B.astype(jnp.int32), options)
        stop_B = jnp.where(alive_B & eos_B, EOS, jnp.where(alive_B & hit_B, STOP_STRING, stop_B))
        length_B = length_B + alive_B
        alive_B = alive_B & ~eos_B & ~hit_B & (length_B < limit_B)
        return step + 1, state, tokens_BT, logp_BT, window_BU, alive_B, length_B, stop_B

    active_B = limit_B > 0
    carry = (
        jnp.zeros((), jnp.int32),
        state,
        options.constrain(jnp.zeros((B, T), jnp.int32)),
        options.constrain(jnp.zeros((B, T), jnp.float32)),
        options.constrain(jnp.full((B, U), -2, jnp.int32) if window_BU is None else window_BU),
        active_B,
        jnp.zeros_like(state.length_B),
        jnp.where(active_B, LENGTH, INACTIVE).astype(jnp.int32),
    )
    start_B = state.length_B
    _, state, tokens_BT, logp_BT, _, _, length_B, stop_B = jax.lax.while_loop(cond, body, carry)
    return state, Generation(tokens_BT, logp_BT, length_B, stop_B, start_B)


def generate(
    params,
    config: qwen.QwenConfig,
    state: DecodeState,
    key: jax.Array,
    *,
    max_new_tokens: int,
    sampling_params: SamplingParams,
    active_B=None,
    limit_B=None,
    stop_rows_BW=None,
    options: qwen.ForwardOptions = qwen.PLAIN,
    before_B=None,
) -> tuple[DecodeState, Generation]:
    """Samples up to max_new_tokens per row in one lax.while_loop; ``state`` is donated.

    Each step samples from every live row's logits, writes the tokens at the rows' ends and
    runs the model on them. A row stops on an EOS id, when its last tokens equal a row of
    the stop table (``SamplingParams.with_stops``) that applies to it (stop_rows_BW[b, m],
    bool; default: every row of the table, for every row), or after limit_B[b] tokens (default
    max_new_tokens); its stopping token is kept, both in the output and in the cache, and the
    state's logits then predict the token after it, so the cache can continue. The loop ends
    when no row is live. Rows with active_B False (or limit 0) generate nothing.
    key: one key, or a [B] array of per-row keys so that each row's tokens depend only on its
    own key and context, not on the rest of the batch (what multi-process rollouts need).
    before_B: the tokens each row already sampled in this sequence (a list per row), which this
    call continues: its j-th token is drawn with key fold_in(key[b], len(before) + j), and a
    stop sequence may begin among them, exactly as in one longer call (per-row keys only).
    """
    sp = sampling_params
    B = state.length_B.shape[0]
    active_B = np.ones((B,), bool) if active_B is None else np.asarray(active_B, bool)
    limit_B = np.full((B,), max_new_tokens) if limit_B is None else np.asarray(limit_B)
    limit_B = np.where(active_B, np.clip(limit_B, 0, max_new_tokens), 0).astype(np.int32)
    _check_room(state, limit_B, "generate")
    table_WU = np.full((0, 1), -1, np.int32) if sp.stop_table is None else sp.stop_table
    eos_ids = config.eos_token_ids if sp.eos_ids is None else sp.eos_ids
    if not sp.greedy and not sp.temperature > 0:
        raise ValueError("generate: temperature must be > 0 (use greedy=True for argmax)")
    if key.ndim not in (0, 1) or (key.ndim == 1 and key.shape[0] != B):
        raise ValueError(f"generate: key must be one key or {B} per-row keys, got {key.shape}")
    if stop_rows_BW is not None:
        stop_rows_BW = np.asarray(stop_rows_BW, bool)
        if stop_rows_BW.shape != (B, len(table_WU)):
            raise ValueError(
                f"generate: stop_rows_BW must be [{B}, {len(table_WU)}] (rows x stop-table rows), "
                f"got {stop_rows_BW.shape}"
            )
        stop_rows_BW = _rows(stop_rows_BW, options)
    offset_B, window_BU = 0, None
    if before_B is not None:
        if key.ndim != 1:
            raise ValueError("generate: a call that continues (before_B) needs per-row keys")
        offset_B = _rows(np.array([len(t) for t in before_B], np.int32), options)
        window_BU = np.full((B, table_WU.shape[1]), -2, np.int32)
        for b, before in enumerate(before_B):
            last = list(before[-table_WU.shape[1] :])
            window_BU[b, window_BU.shape[1] - len(last) :] = last
        window_BU = _rows(window_BU, options)
    return _generate(
        params,
        config,
        state,
        key if key.ndim == 0 else _rows(key, options),
        _rows(limit_B, options),
        np.asarray(table_WU, np.int32),
        np.asarray(eos_ids, np.int32).reshape(-1),
        jnp.float32(sp.temperature),
        jnp.float32(sp.top_p),
        max_new_tokens=max_new_tokens,
        top_k=0 if sp.greedy else int(sp.top_k),
        use_top_p=bool(not sp.greedy and sp.top_p < 1.0),
        greedy=bool(sp.greedy),
        options=options,
        stop_rows_BW=stop_rows_BW,
        offset_B=offset_B,
        window_BU=window_BU,
    )


@functools.partial(jax.jit, static_argnums=(1, 7), donate_argnums=2)
def _rewind(params, config, state: DecodeState, start_B, keep_B, length_B, last_B, options):
    cut_B = keep_B < length_B
    # The row ends before its last kept token, which is then written again (same slot, same
    # context, so the same keys and values) so that logits_BV predicts the token after it.
    state = state._replace(length_B=jnp.where(cut_B, start_B + keep_B - 1, state.length_B))
    return _append(params, config, state, last_B[:, None], cut_B.astype(jnp.int32), options)


def rewind(
    params,
    config,
    state: DecodeState,
    generation: Generation,
    keep_B,
    options: qwen.ForwardOptions = qwen.PLAIN,
) -> DecodeState:
    """Cuts each row's generated tokens back to its first keep_B[b] (>= 1 where cut).

    The row's end moves back (the cut tokens' slots are free again), and its last kept token
    is written again to recompute the next-token logits: one one-token step for the batch.
    Rows with keep_B == length_B are untouched.
    """
    keep_B = np.asarray(keep_B, np.int32)
    length_B = np.asarray(generation.length_B)
    if np.any((keep_B < length_B) & (keep_B < 1)) or np.any(keep_B > length_B):
        raise ValueError("rewind: need 1 <= keep_B <= length_B on rows that are cut")
    tokens_BT = np.asarray(generation.tokens_BT)
    last_B = tokens_BT[np.arange(len(keep_B)), np.maximum(keep_B - 1, 0)]
    args = (generation.start_B, *(_rows(x, options) for x in (keep_B, length_B, last_B)))
    return _rewind(params, config, state, *args, options)


@jax.jit
def _restart(length_B, rows_B):
    return jnp.where(rows_B, 0, length_B)


def restart(state: DecodeState, rows_B, options: qwen.ForwardOptions = qwen.PLAIN) -> DecodeState:
    """Empties the rows with rows_B[b] True (their length goes back to 0), so that the next
    append starts a new sequence there. It writes over the old one's slots, which until then
    no query attends (a query sees only the slots before it); the keys and values stay put."""
    rows_B = _rows(np.asarray(rows_B, bool), options)
    return state._replace(length_B=_restart(state.length_B, rows_B))


class SavedRow(NamedTuple):
    """One row's cache off the devices (``save_row``), to go on in another wave (``load_row``)."""

    k_LXnH: np.ndarray  # [L, X, n, H]: the keys of its n cached tokens
    v_LXnH: np.ndarray
    logits_V: np.ndarray  # float32 logits of the token after its last


@jax.jit
def _take_row(state: DecodeState, b):
    take = lambda x: jax.lax.dynamic_index_in_dim(x, b, keepdims=False)
    k_LXSH, v_LXSH = (
        jnp.stack(list(map(take, state.k_LBXSH))),
        jnp.stack(list(map(take, state.v_LBXSH))),
    )
    return k_LXSH, v_LXSH, take(state.logits_BV), take(state.length_B)


@jax.jit
def _take_pages(state: DecodeState, b, pages_I):
    take = lambda pool: jnp.take(pool, pages_I, axis=1).reshape(pool.shape[0], -1, pool.shape[3])
    k_LXSH, v_LXSH = (jnp.stack(list(map(take, kv))) for kv in (state.k_LBXSH, state.v_LBXSH))
    row = lambda x: jax.lax.dynamic_index_in_dim(x, b, keepdims=False)
    return k_LXSH, v_LXSH, row(state.logits_BV), row(state.length_B)


def save_row(state: DecodeState, b: int, table: PageTable | None = None) -> SavedRow:
    """Row b's cache, copied to the host (its slots past the row's length left out); a paged
    cache's ``table`` says where its pages are."""
    if state.table_BI is None:
        k_LXSH, v_LXSH, logits_V, n = jax.device_get(_take_row(state, np.int32(b)))
    else:
        pages_I = table.pool_pages(b)
        k_LXSH, v_LXSH, logits_V, n = jax.device_get(_take_pages(state, np.int32(b), pages_I))
    return SavedRow(k_LXSH[:, :, :n], v_LXSH[:, :, :n], logits_V)


@functools.partial(jax.jit, donate_argnums=0)
def _put_row(state: DecodeState, b, k_LXSH, v_LXSH, n, logits_V):
    put = lambda x, row: jax.lax.dynamic_update_index_in_dim(x, row.astype(x.dtype), b, 0)
    return DecodeState(
        k_LBXSH=tuple(put(x, k_XSH) for x, k_XSH in zip(state.k_LBXSH, k_LXSH, strict=True)),
        v_LBXSH=tuple(put(x, v_XSH) for x, v_XSH in zip(state.v_LBXSH, v_LXSH, strict=True)),
        length_B=put(state.length_B, n),
        logits_BV=put(state.logits_BV, logits_V),
    )


@functools.partial(jax.jit, donate_argnums=0)
def _put_pages(state: DecodeState, b, pages_I, k_LXSH, v_LXSH, n, logits_V):
    def put(pool, x_XSH):
        X, _, p, H = pool.shape
        x_XIpH = x_XSH.reshape(X, -1, p, H).astype(pool.dtype)
        return pool.at[:, pages_I].set(x_XIpH)

    row = lambda x, value: jax.lax.dynamic_update_index_in_dim(x, value.astype(x.dtype), b, 0)
    return state._replace(
        k_LBXSH=tuple(map(put, state.k_LBXSH, k_LXSH)),
        v_LBXSH=tuple(map(put, state.v_LBXSH, v_LXSH)),
        length_B=row(state.length_B, n),
        logits_BV=row(state.logits_BV, logits_V),
    )


def load_row(
    state: DecodeState, b: int, saved: SavedRow, table: PageTable | None = None
) -> DecodeState:
    """``state`` (donated) with row b holding ``saved``, bit for bit as save_row took it, so
    that the row goes on exactly as it would have where it was saved. A paged cache's
    ``table`` must have row b's pages reserved (and be set: ``set_table``)."""
    n = saved.k_LXnH.shape[2]
    if n > slots(state):
        raise ValueError(f"load_row: a row of {n} tokens does not fit {slots(state)} slots")
    if state.table_BI is not None:
        pages_I = table.pool_pages(b)
        pad = ((0, 0), (0, 0), (0, len(pages_I) * table.page - n), (0, 0))
        k_LXSH, v_LXSH = np.pad(saved.k_LXnH, pad), np.pad(saved.v_LXnH, pad)
        args = (pages_I, k_LXSH, v_LXSH, np.int32(n), saved.logits_V)
        return _put_pages(state, np.int32(b), *args)
    pad = ((0, 0), (0, 0), (0, slots(state) - n), (0, 0))
    k_LXSH, v_LXSH = np.pad(saved.k_LXnH, pad), np.pad(saved.v_LXnH, pad)
    return _put_row(state, np.int32(b), k_LXSH, v_LXSH, np.int32(n), saved.logits_V)


def make_stop_table(tokenizer, stop_strings: Sequence[str]) -> np.ndarray:
    """Token-id sequences of the stop strings, right-aligned in an int32 [W, U] table padded
    with -1 on the left. Each string is tokenized alone and after a space (" </search>" starts
    with the token " </"); a stop string that the model emits merged into a larger token
    (">\\n\\n") is not in the table and is caught on the host by sample_turn.
    """
    seqs = _stop_sequences(tokenizer, stop_strings)
    U = max((len(q) for q in seqs), default=1)
    table_WU = np.full((len(seqs), U), -1, np.int32)
    for m, ids in enumerate(seqs):
        table_WU[m, U - len(ids) :] = ids
    return table_WU


def _stop_sequences(tokenizer, stop_strings: Sequence[str]) -> list[tuple[int, ...]]:
    """The rows of make_stop_table, in order: each string alone and after a space, once."""
    seqs = []
    for s in stop_strings:
        for text in (s, " " + s):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids not in seqs:
                seqs.append(ids)
    return seqs


def stop_rows(
    tokenizer, stop_strings: Sequence[str], stop_strings_B: Sequence[Sequence[str]]
) -> np.ndarray:
    """[B, W] bool: which rows of make_stop_table(tokenizer, stop_strings) end row b, whose
    own stop strings stop_strings_B[b] are a subset of stop_strings (generate's stop_rows_BW)."""
    table = _stop_sequences(tokenizer, stop_strings)
    rows = {}  # a row's strings -> its mask, made once per distinct set
    for own in map(tuple, stop_strings_B):
        if own not in rows:
            if not set(own) <= set(stop_strings):
                raise ValueError(f"stop strings {own} are not among the table's {stop_strings}")
            mine = set(_stop_sequences(tokenizer, own))
            rows[own] = np.array([seq in mine for seq in table], bool)
    mask_BW = np.array([rows[tuple(own)] for own in stop_strings_B], bool)
    return mask_BW.reshape(len(stop_strings_B), len(table))


def find_stop(
    tokenizer, tokens: Sequence[int], stop_strings: Sequence[str]
) -> tuple[int, str | None]:
    """(n, s): the shortest prefix tokens[:n] whose decoded text contains a stop string s,
    or (len(tokens), None). A binary search over prefixes: O(log n) decodes.
    """
    text = tokenizer.decode(list(tokens))
    if not any(s in text for s in stop_strings):
        return len(tokens), None
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        prefix = tokenizer.decode(list(tokens[:mid]))
        if any(s in prefix for s in stop_strings):
            hi = mid
        else:
            lo = mid + 1
    prefix = tokenizer.decode(list(tokens[:lo]))
    found = [s for s in stop_strings if s in prefix]
    return lo, min(found, key=prefix.index)


def sample_turn(
    params,
    config: qwen.QwenConfig,
    state: DecodeState,
    key: jax.Array,
    tokenizer,
    *,
    max_new_tokens: int,
    sampling_params: SamplingParams,
    active_B=None,
    limit_B=None,
    stop_strings_B=None,
    options: qwen.ForwardOptions = qwen.PLAIN,
    before=None,
) -> tuple[DecodeState, list[TurnSample]]:
    """One turn for every active row: generate, then cut each row after the token that
    completes its first stop string in the decoded text (a stop string merged into a larger
    token, which the in-loop table cannot see), and rewind the cache to match. Build
    ``sampling_params`` with ``with_stops`` once and reuse it: its table is made there.
    stop_strings_B: row b's own stop strings, a subset of sampling_params.stop_strings
    (default: all of them, for every row), in the loop and on the host alike.

    A turn may take several calls: limit_B[b] (default max_new_tokens) bounds row b's turn,
    max_new_tokens one call. A row that reaches the call's bound before its turn ends comes
    back PAUSED with what it sampled so far, and the next call, given those samples as
    ``before`` (per row; an empty TurnSample for a row that starts its turn), goes on with
    them: the same tokens as one call of the turn's length (generate's before_B).
    """
    stop_strings = sampling_params.stop_strings
    if sampling_params.stop_table is None and stop_strings:
        sampling_params = sampling_params.with_stops(tokenizer, stop_strings)
    stop_rows_BW = None
    if stop_strings_B is not None:
        stop_rows_BW = stop_rows(tokenizer, stop_strings, stop_strings_B)
    B = len(state.length_B)
    turn_B = np.full(B, max_new_tokens) if limit_B is None else np.asarray(limit_B)
    before = before or [NOT_BEGUN] * B
    done_B = np.array([len(s.tokens) for s in before])
    state, gen = generate(
        params,
        config,
        state,
        key,
        max_new_tokens=max_new_tokens,
        sampling_params=sampling_params,
        active_B=active_B,
        limit_B=turn_B - done_B,
        stop_rows_BW=stop_rows_BW,
        options=options,
        before_B=[s.tokens for s in before] if done_B.any() else None,
    )
    tokens_BT, logp_BT, length_B, stop_B = jax.device_get(
        (gen.tokens_BT, gen.logp_BT, gen.length_B, gen.stop_B)
    )
    keep_B = length_B.copy()
    samples = []
    for b in range(len(length_B)):
        tokens = before[b].tokens + tokens_BT[b, : length_B[b]].tolist()
        logps = before[b].logps + logp_BT[b, : length_B[b]].tolist()
        own = stop_strings if stop_strings_B is None else stop_strings_B[b]
        n, found = find_stop(tokenizer, tokens, own)
        reason = STOP_NAMES[stop_B[b]] if found is None else "stop"
        if reason == "length" and len(tokens) < turn_B[b]:
            reason = PAUSED
        keep_B[b] = n - done_B[b]
        samples.append(
            TurnSample(
                tokens=tokens[:n],
                logps=logps[:n],
                text=tokenizer.decode(tokens[:n]),
                stop=reason,
                stop_string=found,
                generated=int(length_B[b]),
            )
        )
    if np.any(keep_B < length_B):
        state = rewind(params, config, state, gen, keep_B, options)
    return state, samples


def bucket_length(n: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket >= n (multiples of the largest bucket beyond it)."""
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def pad_chunk(
    rows: Sequence[Sequence[int]], *, buckets: Sequence[int] = BUCKETS, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists (possibly empty) -> (tokens_BC int32 right-padded, n_B int32 lengths),
    C = bucket_length of the longest. Bucketing keeps the compiled shapes few."""
    C = bucket_length(max((len(r) for r in rows), default=1), buckets)
    tokens_BC = np.full((len(rows), C), pad_id, np.int32)
    for b, r in enumerate(rows):
        tokens_BC[b, : len(r)] = r
    return tokens_BC, np.array([len(r) for r in rows], np.int32)
