"""KV-cache sampling for tspo_jax/qwen.py: prefill, one-loop decoding, stop strings, and
continuation of the same cache across turns (a rollout appends each observation and goes on).

A rollout:
    state = init_state(config, batch, max_len)
    state = append(params, config, state, *pad_chunk(prompts))       # prefill
    state, turn = sample_turn(params, config, state, key, tokenizer, max_new_tokens=500, ...)
    state = append(params, config, state, *pad_chunk(observations))  # no re-prefill
    state, turn = sample_turn(...)                                   # ... and so on

The cache: one static-size [B, K, S, H] key and value array per layer, shared by the batch with a
single write cursor. Every call writes its C new tokens (or N generated ones) at slots
cursor .. cursor + C - 1 of every row; a row with nothing to add writes invalid slots
(``valid_BS`` False), which no query attends to. So an append is one dynamic_update_slice, and
attention is causal in slot order and restricted to valid slots. (B, K) lead the cache layout
because they are the batch axes of the attention matmuls: any other order makes XLA transpose
the whole cache at every step. RoPE positions are per row
(``pos_B`` counts the row's valid tokens), so rows of different lengths, padding on either side,
and invalidated slots all keep transformers' positions.

Compiled shapes (each distinct value compiles once; keep them to a few): batch B and cache slots
S (``init_state``), chunk length C (``append``; pad with ``pad_chunk`` to length buckets),
``max_new_tokens`` N, the stop table [M, J] and the number of EOS ids E (``generate``), and the
flags greedy, top_k and (top_p < 1). Temperature and the top_p value are traced, not static.

Shape letters: B rows, S cache slots, C appended tokens, N new tokens, V vocabulary, L layers,
K key/value heads, H head dim, D model dim, M stop sequences, J tokens per stop sequence
(right-aligned, left-padded with -1), E EOS ids.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tspo_jax import qwen

# Why a row of generate() stopped (Generation.stop_B).
LENGTH = 0  # reached max_new_tokens
EOS = 1  # sampled an EOS id
STOP_STRING = 2  # its last tokens matched a row of the stop table (or, on the host, the text)
INACTIVE = 3  # not active in this call (generated nothing)
STOP_NAMES = ("length", "eos", "stop", "inactive")

DEFAULT_STOP_STRINGS = ("</search>", "</answer>")
BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class DecodeState(NamedTuple):
    """Everything a batch of partial sequences needs to continue; donated to every call."""

    k_LBKSH: tuple[jax.Array, ...]  # per layer [B, K, S, H] keys (RoPE applied)
    v_LBKSH: tuple[jax.Array, ...]  # per layer [B, K, S, H] values
    valid_BS: jax.Array  # bool: slot s of row b holds a real token
    pos_B: jax.Array  # int32: RoPE position of row b's next token (its valid-token count)
    cursor: jax.Array  # int32 scalar: next free slot, the same for all rows
    logits_BV: jax.Array  # float32: next-token logits of each row (after its last valid token)


class Generation(NamedTuple):
    """What generate() sampled, as sampled (never re-tokenized)."""

    tokens_BN: jax.Array  # int32, 0 after each row's length
    logp_BN: jax.Array  # float32 log-probs of tokens_BN (see sample_logits), 0 after length
    length_B: jax.Array  # int32 tokens generated per row, the EOS / stop token included
    stop_B: jax.Array  # int32 LENGTH, EOS, STOP_STRING or INACTIVE
    start: jax.Array  # int32 scalar: the j-th generated token of every row is in slot start + j


class TurnSample(NamedTuple):
    """One row's turn, from sample_turn."""

    tokens: list[int]  # sampled ids up to and including the one that ends the turn
    logps: list[float]  # their log-probs
    text: str  # tokenizer.decode(tokens)
    stop: str  # "eos", "stop", "length" or "inactive"
    stop_string: str | None  # which stop string ended the turn, if one did


def init_state(config: qwen.QwenConfig, batch: int, max_len: int, dtype=None) -> DecodeState:
    """An empty cache of ``max_len`` slots (prompt + every turn and observation must fit)."""
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    return DecodeState(
        k_LBKSH=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        v_LBKSH=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        valid_BS=jnp.zeros((batch, max_len), bool),
        pos_B=jnp.zeros((batch,), jnp.int32),
        cursor=jnp.zeros((), jnp.int32),
        logits_BV=jnp.zeros((batch, config.vocab_size), jnp.float32),
    )


@functools.partial(jax.jit, static_argnums=1)
def _grow(state: DecodeState, slots: int) -> DecodeState:
    pad = slots - state.valid_BS.shape[1]
    kv = lambda x_BKSH: jnp.pad(x_BKSH, ((0, 0), (0, 0), (0, pad), (0, 0)))
    return state._replace(
        k_LBKSH=tuple(map(kv, state.k_LBKSH)),
        v_LBKSH=tuple(map(kv, state.v_LBKSH)),
        valid_BS=jnp.pad(state.valid_BS, ((0, 0), (0, pad))),
    )


def grow(state: DecodeState, needed: int) -> DecodeState:
    """The state with room for ``needed`` more slots after the cursor: unchanged when it has
    them, else copied into a cache of bucket_length(cursor + needed) slots.

    Every decode step attends over all S slots of the cache, used or not, so a cache that
    starts small and grows by buckets decodes faster than one sized for the worst case.
    """
    total = int(state.cursor) + needed
    if total <= state.valid_BS.shape[1]:
        return state
    return _grow(state, bucket_length(total))


def _append(params, config: qwen.QwenConfig, state: DecodeState, tokens_BC, mask_BC):
    """Writes C tokens per row at the cursor and updates each row's next-token logits."""
    C = tokens_BC.shape[1]
    S = state.valid_BS.shape[1]
    mask_BC = mask_BC.astype(bool)
    pos_BC = state.pos_B[:, None] + jnp.cumsum(mask_BC, axis=1, dtype=jnp.int32) - 1
    valid_BS = jax.lax.dynamic_update_slice(state.valid_BS, mask_BC, (0, state.cursor))
    slot_C = state.cursor + jnp.arange(C)
    mask_BCS = valid_BS[:, None, :] & (jnp.arange(S)[None, None, :] <= slot_C[None, :, None])
    x_BCD, k_LBKSH, v_LBKSH = qwen.forward(
        params,
        config,
        tokens_BC.astype(jnp.int32),
        jnp.maximum(pos_BC, 0),
        mask_BCS,
        state.k_LBKSH,
        state.v_LBKSH,
        state.cursor,
    )
    last_B = C - 1 - jnp.argmax(mask_BC[:, ::-1], axis=1)
    x_BD = jnp.take_along_axis(x_BCD, last_B[:, None, None], axis=1)[:, 0]
    logits_BV = qwen.head_logits(x_BD, qwen.lm_head(params, config))
    any_B = mask_BC.any(axis=1)
    return DecodeState(
        k_LBKSH=k_LBKSH,
        v_LBKSH=v_LBKSH,
        valid_BS=valid_BS,
        pos_B=state.pos_B + mask_BC.sum(axis=1, dtype=jnp.int32),
        cursor=state.cursor + C,
        logits_BV=jnp.where(any_B[:, None], logits_BV, state.logits_BV),
    )


_append_jit = jax.jit(_append, static_argnums=1, donate_argnums=2)


def _check_room(state: DecodeState, needed: int, what: str) -> None:
    if isinstance(state.cursor, jax.core.Tracer):
        return
    cursor, S = int(state.cursor), state.valid_BS.shape[1]
    if cursor + needed > S:
        raise ValueError(
            f"{what}: {needed} more slots do not fit in the cache ({cursor} of {S} used); "
            "make init_state's max_len larger"
        )


def append(params, config: qwen.QwenConfig, state: DecodeState, tokens_BC, mask_BC) -> DecodeState:
    """Appends a chunk (the prompt, or an observation) to every row; ``state`` is donated.

    mask_BC marks each row's real tokens (left, right or no padding). A row whose mask is all
    zero adds nothing and keeps its logits. Compiles once per (B, S, C).
    """
    _check_room(state, tokens_BC.shape[1], "append")
    return _append_jit(params, config, state, jnp.asarray(tokens_BC), jnp.asarray(mask_BC))


def first_index_of_max(x_BV, max_B1):
    """argmax as two plain reductions (XLA:CPU's variadic argmax reduce is several times
    slower): the smallest index holding the row's maximum."""
    iota_BV = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, 1)
    first_B = jnp.min(jnp.where(x_BV == max_B1, iota_BV, x_BV.shape[1]), axis=-1)
    return jnp.minimum(first_B, x_BV.shape[1] - 1)


def nucleus_threshold(weight_BV, top_p):
    """The largest t with sum(w >= t) >= top_p * sum(w), per row, for non-negative weights.

    Keeping w >= t is top-p (nucleus) filtering: the smallest set of most likely tokens whose
    probability reaches top_p. Found by bisection on the float32 bit pattern of t (monotone for
    t >= 0), 32 masked sums instead of a sort over the vocabulary (which XLA:CPU makes slow).
    """
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
    """jax.random.fold_in for one key or a [B] array of per-row keys."""
    if key.ndim == 0:
        return jax.random.fold_in(key, data)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, data)


def sample_weights(key, weight_BV, block: int = 1024):
    """One index per row with probability weight / sum(weight) (non-negative weights).

    Inverse-CDF sampling with one uniform per row, in two levels (block sums, then inside the
    chosen block), so nothing scans the whole vocabulary sequentially. On XLA:CPU this is
    about 10x cheaper than jax.random.categorical's Gumbel noise over [B, V].
    """
    B, V = weight_BV.shape
    R = -(-V // block)
    w_BRb = jnp.pad(weight_BV, ((0, 0), (0, R * block - V))).reshape(B, R, block)
    block_BR = jnp.sum(w_BRb, axis=-1)
    cum_BR = jnp.cumsum(block_BR, axis=-1)
    u_B = uniform_rows(key, B) * cum_BR[:, -1]
    r_B = jnp.minimum(jnp.sum(cum_BR <= u_B[:, None], axis=-1), R - 1)
    inner_Bb = jnp.take_along_axis(w_BRb, r_B[:, None, None], axis=1)[:, 0]
    u_B = u_B - jnp.take_along_axis(cum_BR - block_BR, r_B[:, None], axis=1)[:, 0]
    i_B = jnp.minimum(jnp.sum(jnp.cumsum(inner_Bb, axis=-1) <= u_B[:, None], axis=-1), block - 1)
    tok_B = jnp.minimum(r_B * block + i_B, V - 1)
    # Float rounding at a block's edge can land on a zero weight: take the row's mode then.
    picked_B = jnp.take_along_axis(weight_BV, tok_B[:, None], axis=1)[:, 0]
    mode_B = first_index_of_max(weight_BV, jnp.max(weight_BV, axis=-1, keepdims=True))
    return jnp.where(picked_B > 0, tok_B, mode_B).astype(jnp.int32)


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
        tok_B = first_index_of_max(logits_BV, max_B1)
        return tok_B, -jnp.log(jnp.sum(jnp.exp(logits_BV - max_B1), axis=-1))
    scaled_BV = logits_BV / temperature
    max_B1 = jnp.max(scaled_BV, axis=-1, keepdims=True)
    weight_BV = jnp.exp(scaled_BV - max_B1)  # unnormalized probabilities
    log_z_B = jnp.log(jnp.sum(weight_BV, axis=-1))
    if top_k > 0:
        # The k-th largest as a min over all k: XLA:CPU turns top_k()[:, -1] into a full sort.
        kth_B1 = jnp.min(jax.lax.top_k(scaled_BV, top_k)[0], axis=-1, keepdims=True)
        weight_BV = jnp.where(scaled_BV >= kth_B1, weight_BV, 0.0)
    if use_top_p:
        weight_BV = jnp.where(weight_BV >= nucleus_threshold(weight_BV, top_p), weight_BV, 0.0)
    tok_B = sample_weights(key, weight_BV)
    picked_B = jnp.take_along_axis(scaled_BV, tok_B[:, None], axis=-1)[:, 0]
    return tok_B, picked_B - max_B1[:, 0] - log_z_B


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_new_tokens", "top_k", "use_top_p", "greedy"),
    donate_argnames="state",
)
def _generate(
    params,
    config,
    state: DecodeState,
    key,
    active_B,
    stop_table_MJ,
    eos_E,
    temperature,
    top_p,
    *,
    max_new_tokens: int,
    top_k: int,
    use_top_p: bool,
    greedy: bool,
):
    B = state.pos_B.shape[0]
    N = max_new_tokens
    J = stop_table_MJ.shape[1]

    def cond(carry):
        step, _, _, _, _, alive_B, _, _ = carry
        return (step < N) & jnp.any(alive_B)

    def body(carry):
        step, state, tokens_BN, logp_BN, window_BJ, alive_B, length_B, stop_B = carry
        tok_B, logp_B = sample_logits(
            state.logits_BV,
            fold_in_rows(key, step),
            temperature,
            top_p,
            top_k=top_k,
            use_top_p=use_top_p,
            greedy=greedy,
        )
        tok_B = jnp.where(alive_B, tok_B, 0)
        tokens_BN = jax.lax.dynamic_update_slice(tokens_BN, tok_B[:, None], (0, step))
        logp_BN = jax.lax.dynamic_update_slice(
            logp_BN, jnp.where(alive_B, logp_B, 0.0)[:, None], (0, step)
        )
        # The last J sampled tokens against every right-aligned stop sequence (-1 = wildcard).
        window_BJ = jnp.concatenate([window_BJ[:, 1:], jnp.where(alive_B, tok_B, -2)[:, None]], 1)
        match_BMJ = (stop_table_MJ[None] == -1) | (stop_table_MJ[None] == window_BJ[:, None, :])
        hit_B = jnp.any(jnp.all(match_BMJ, axis=-1), axis=-1)
        eos_B = jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)
        state = _append(params, config, state, tok_B[:, None], alive_B[:, None])
        stop_B = jnp.where(alive_B & eos_B, EOS, jnp.where(alive_B & hit_B, STOP_STRING, stop_B))
        length_B = length_B + alive_B
        alive_B = alive_B & ~eos_B & ~hit_B
        return step + 1, state, tokens_BN, logp_BN, window_BJ, alive_B, length_B, stop_B

    active_B = active_B.astype(bool)
    carry = (
        jnp.zeros((), jnp.int32),
        state,
        jnp.zeros((B, N), jnp.int32),
        jnp.zeros((B, N), jnp.float32),
        jnp.full((B, J), -2, jnp.int32),
        active_B,
        jnp.zeros((B,), jnp.int32),
        jnp.where(active_B, LENGTH, INACTIVE).astype(jnp.int32),
    )
    start = state.cursor
    _, state, tokens_BN, logp_BN, _, _, length_B, stop_B = jax.lax.while_loop(cond, body, carry)
    return state, Generation(tokens_BN, logp_BN, length_B, stop_B, start)


def generate(
    params,
    config: qwen.QwenConfig,
    state: DecodeState,
    key: jax.Array,
    *,
    max_new_tokens: int,
    active_B=None,
    stop_table=None,
    eos_ids: Sequence[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
) -> tuple[DecodeState, Generation]:
    """Samples up to max_new_tokens per row in one lax.while_loop; ``state`` is donated.

    Each step samples from every live row's logits, writes the tokens at the cursor (finished
    and inactive rows write invalid slots) and runs the model on them. A row stops on an EOS id
    or when its last tokens equal a row of ``stop_table`` (``make_stop_table``); its stopping
    token is kept, both in the output and in the cache, and the state's logits then predict
    the token after it, so the cache can continue. The loop ends when no row is live.
    key: one key, or a [B] array of per-row keys so that each row's tokens depend only on its
    own key and context, not on the rest of the batch (what multi-process rollouts need).
    eos_ids: default config.eos_token_ids; () disables EOS.
    """
    B = state.pos_B.shape[0]
    _check_room(state, max_new_tokens, "generate")
    active_B = np.ones((B,), bool) if active_B is None else np.asarray(active_B, bool)
    table_MJ = np.full((0, 1), -1, np.int32) if stop_table is None else np.asarray(stop_table)
    eos_E = np.asarray(config.eos_token_ids if eos_ids is None else eos_ids, np.int32).reshape(-1)
    if not greedy and not temperature > 0:
        raise ValueError("generate: temperature must be > 0 (use greedy=True for argmax)")
    if key.ndim not in (0, 1) or (key.ndim == 1 and key.shape[0] != B):
        raise ValueError(f"generate: key must be one key or {B} per-row keys, got {key.shape}")
    return _generate(
        params,
        config,
        state,
        key,
        active_B,
        table_MJ.astype(np.int32),
        eos_E,
        jnp.float32(temperature),
        jnp.float32(top_p),
        max_new_tokens=max_new_tokens,
        top_k=0 if greedy else int(top_k),
        use_top_p=bool(not greedy and top_p < 1.0),
        greedy=bool(greedy),
    )


@functools.partial(jax.jit, static_argnums=1, donate_argnums=2)
def _rewind(params, config, state: DecodeState, start, keep_B, length_B, last_B):
    S = state.valid_BS.shape[1]
    cut_B = keep_B < length_B
    slot_S = jnp.arange(S)
    # Drop the cut tokens and the last kept one, which is then appended again (at the cursor,
    # with its original position) so that logits_BV predicts the token after it.
    drop_BS = (
        cut_B[:, None]
        & (slot_S[None] >= start + keep_B[:, None] - 1)
        & (slot_S[None] < start + length_B[:, None])
    )
    state = state._replace(
        valid_BS=state.valid_BS & ~drop_BS,
        pos_B=jnp.where(cut_B, state.pos_B - (length_B - keep_B) - 1, state.pos_B),
    )
    return _append(params, config, state, last_B[:, None], cut_B[:, None])


def rewind(params, config, state: DecodeState, generation: Generation, keep_B) -> DecodeState:
    """Cuts each row's generated tokens back to its first keep_B[b] (>= 1 where cut).

    The cut tokens' slots become invalid and pos_B moves back. To recompute the next-token
    logits, the last kept token's slot is invalidated too and the token is appended again at
    the cursor (same position, same context, so the same keys and values): one more slot and
    one one-token step for the batch. Rows with keep_B == length_B are untouched.
    """
    keep_B = np.asarray(keep_B, np.int32)
    length_B = np.asarray(generation.length_B)
    if np.any((keep_B < length_B) & (keep_B < 1)) or np.any(keep_B > length_B):
        raise ValueError("rewind: need 1 <= keep_B <= length_B on rows that are cut")
    tokens_BN = np.asarray(generation.tokens_BN)
    last_B = tokens_BN[np.arange(len(keep_B)), np.maximum(keep_B - 1, 0)]
    _check_room(state, 1, "rewind")
    return _rewind(params, config, state, generation.start, keep_B, length_B, last_B)


def make_stop_table(tokenizer, stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS) -> np.ndarray:
    """Token-id sequences of the stop strings, right-aligned in an int32 [M, J] table padded
    with -1 on the left. Each string is tokenized alone and after a space (" </search>" starts
    with the token " </"); a stop string that the model emits merged into a larger token
    (">\\n\\n") is not in the table and is caught on the host by sample_turn.
    """
    seqs = []
    for s in stop_strings:
        for text in (s, " " + s):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids not in seqs:
                seqs.append(ids)
    J = max((len(q) for q in seqs), default=1)
    table_MJ = np.full((len(seqs), J), -1, np.int32)
    for m, ids in enumerate(seqs):
        table_MJ[m, J - len(ids) :] = ids
    return table_MJ


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
    active_B=None,
    stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
    stop_table=None,
    eos_ids: Sequence[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
) -> tuple[DecodeState, list[TurnSample]]:
    """One turn for every active row: generate, then cut each row after the token that
    completes its first stop string in the decoded text (a stop string merged into a larger
    token, which the in-loop table cannot see), and rewind the cache to match.
    ``stop_table`` defaults to make_stop_table(tokenizer, stop_strings); pass it to reuse one.
    """
    _check_room(state, max_new_tokens + 1, "sample_turn")
    if stop_table is None:
        stop_table = make_stop_table(tokenizer, stop_strings)
    state, gen = generate(
        params,
        config,
        state,
        key,
        max_new_tokens=max_new_tokens,
        active_B=active_B,
        stop_table=stop_table,
        eos_ids=eos_ids,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        greedy=greedy,
    )
    tokens_BN, logp_BN, length_B, stop_B = jax.device_get(
        (gen.tokens_BN, gen.logp_BN, gen.length_B, gen.stop_B)
    )
    keep_B = length_B.copy()
    samples = []
    for b in range(len(length_B)):
        tokens = tokens_BN[b, : length_B[b]].tolist()
        n, found = find_stop(tokenizer, tokens, stop_strings)
        reason = STOP_NAMES[stop_B[b]] if found is None else "stop"
        keep_B[b] = n
        samples.append(
            TurnSample(
                tokens=tokens[:n],
                logps=logp_BN[b, :n].tolist(),
                text=tokenizer.decode(tokens[:n]),
                stop=reason,
                stop_string=found,
            )
        )
    if np.any(keep_B < length_B):
        state = rewind(params, config, state, gen, keep_B)
    return state, samples


def bucket_length(n: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket >= n (multiples of the largest bucket beyond it)."""
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def pad_chunk(
    rows: Sequence[Sequence[int]],
    *,
    buckets: Sequence[int] = BUCKETS,
    left: bool = False,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists (possibly empty) -> (tokens_BC int32, mask_BC bool), C = bucket_length of the
    longest, right-padded (left=True: left-padded). Bucketing keeps the compiled shapes few.
    """
    C = bucket_length(max((len(r) for r in rows), default=1), buckets)
    tokens_BC = np.full((len(rows), C), pad_id, np.int32)
    mask_BC = np.zeros((len(rows), C), bool)
    for b, r in enumerate(rows):
        if len(r):
            sl = slice(C - len(r), C) if left else slice(0, len(r))
            tokens_BC[b, sl] = r
            mask_BC[b, sl] = True
    return tokens_BC, mask_BC
