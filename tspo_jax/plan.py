"""The memory plan of a train.py run: bytes per device, from config.json and the options alone.

train.py computes it before any weights are loaded, picks the largest rollout wave that fits,
checks the micro-batch, and stops with one line naming the part that does not fit. Each part
is arithmetic on shapes (no compilation, so a 7B plan takes milliseconds): the quick estimate.
``train.py --plan-only --plan-target SLICE`` compiles the run's programs with the TPU compiler
instead (tspo_jax/aot.py), whose numbers decide; the two estimated parts below, the update's and
the decoder's temporaries, are fitted to them so as to err on the safe side on TPU.

Per device, with P parameters (P_shard of them on the device under fsdp), c bytes per compute
element, r rows of a micro-batch and w rows of a rollout wave on the device, T = max_context:
    params            4 P_shard              float32 master weights
    optimizer state   8 P_shard              AdamW's two float32 moments
    reference         c P_shard              when kl_coef > 0
    update temps      gradients, the layers' saved inputs (remat), one layer's activations,
                      the MLP in chunks (mlp_bytes), log-prob chunks (logits_bytes): UPDATE_FIT
    sampling weights  c P                    every device holds the whole policy
    KV cache          2 w S L 2 X H c        a second copy: the TPU decoding loop's, or growth's;
                                             S = T, or fewer (--rollout-slots: rows that
                                             outgrow S wait for a wave of fewer, longer rows)
      or paged:       w A p L 2 X H c        a pool of A = ceil(live / p) + 1 pages of p tokens
                                             per row: its mean live tokens (--live-tokens) and
                                             the page a decoding call may add
    decode temps      one observation's append and the next-token logits of the wave
The update and the rollout never run at the same time: peak = max(update, rollout), where
update = fixed + update temps; rollout = sampling weights + KV cache + decode temps, plus the
fixed part unless it waits in host memory while rollouts run (``offload``, train.py
--offload-state), and at least fixed + sampling weights (the copy is gathered from the state
before the state leaves).

Shape letters (the project's one key, README "Shape letters"): L layers, D model dim, F MLP
dim, N query / X key-value heads, H head dim, V vocabulary, S cache slots, C appended tokens.
"""

import functools
import math
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import AbstractMesh

from tspo_jax import learner, qwen, sampling

GiB = 2**30
PROMPT_TOKENS = 512  # prompts are planned for up to this many tokens (Search-R1's: about 250)
# The default rollout wave fills at most this share of a device, leaving room for what the
# formulas do not count (fragmentation, XLA's own buffers, the host's transfers).
WAVE_MARGIN = 0.9


class Plan(NamedTuple):
    """Bytes per device of each part, and the settings they were computed for."""

    params: int
    optimizer: int
    reference: int
    update: int  # update temporaries at the micro-batch
    sampling_weights: int
    kv_cache: int  # one wave's cache at max_context
    decode: int  # one wave's decode / append temporaries
    capacity: int  # bytes per device (0: unknown)
    rollout_batch: int  # rows per wave on this process
    micro_batch: int  # prompts per forward / backward pass
    largest_micro_batch: int  # the largest that fits of those dividing the mini-batch (0: none)
    offload: bool = False  # params, optimizer state and reference in host memory in rollouts
    slots: int = 0  # KV-cache slots per row of a wave
    page: int = 0  # tokens per page of a paged cache (0: dense)
    pages: int = 0  # pages per device of a paged cache's pool
    live: int = 0  # mean live tokens per row that the pool is sized for

    @property
    def fixed(self) -> int:
        return self.params + self.optimizer + self.reference

    @property
    def rollout_peak(self) -> int:
        on_chips = 0 if self.offload else self.fixed
        decoding = on_chips + self.sampling_weights + self.kv_cache + self.decode
        return max(decoding, self.fixed + self.sampling_weights)

    @property
    def update_peak(self) -> int:
        return self.fixed + self.update

    @property
    def peak(self) -> int:
        return max(self.rollout_peak, self.update_peak)

    def report(self) -> str:
        gib = lambda b: f"{b / GiB:8.2f} GiB"
        cap = gib(self.capacity) if self.capacity else "     unknown"
        rows = [
            ("params (float32)", self.params),
            ("optimizer state", self.optimizer),
            ("reference model", self.reference),
            (f"update temporaries, micro-batch {self.micro_batch}", self.update),
            ("sampling weights", self.sampling_weights),
            (
                f"KV pool, wave of {self.rollout_batch} rows, {self.pages} pages per device"
                if self.page
                else f"KV cache, wave of {self.rollout_batch} rows x {self.slots} slots",
                self.kv_cache,
            ),
            ("decode temporaries", self.decode),
        ]
        lines = [f"  {name:<44}{gib(b)}" for name, b in rows]
        lines += [
            f"  {'peak, update':<44}{gib(self.update_peak)}",
            f"  {'peak, rollout':<44}{gib(self.rollout_peak)}",
            *(
                [f"  {'in host memory during rollouts (state, ref.)':<44}{gib(self.fixed)}"]
                if self.offload
                else []
            ),
            f"  {'device capacity':<44}{cap}",
        ]
        return "memory plan, per device:\n" + "\n".join(lines)


@functools.cache
def param_shard_size(config: qwen.QwenConfig, data: int, fsdp: int) -> int:
    """Parameters of one device's shard, as learner.param_shardings splits them on a data x
    fsdp mesh (an abstract mesh: no devices needed)."""
    mesh = AbstractMesh((data, fsdp), learner.BATCH_AXES)
    shapes = qwen.abstract_params(config, stacked=True)
    shardings = learner.param_shardings(config, mesh)
    sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)), shapes, shardings)
    return sum(jax.tree.leaves(sizes))


def layer_params(config: qwen.QwenConfig) -> int:
    """Parameters of one decoder layer."""
    D, F = config.hidden_size, config.intermediate_size
    N, X, H = config.num_heads, config.num_kv_heads, config.head_dim
    return 2 * D + 2 * N * H * D + N * H + 2 * (X * H * D + X * H) + 3 * F * D


def param_count(config: qwen.QwenConfig) -> int:
    """Parameters of the whole model (3.09B for Qwen2.5-3B, 7.62B for 7B)."""
    heads = 1 if config.tie_word_embeddings else 2
    D = config.hidden_size
    return heads * config.vocab_size * D + config.num_layers * layer_params(config) + D


def update_terms(
    config: qwen.QwenConfig, *, rows: int, length: int, param_shard: int, options
) -> dict[str, float]:
    """The parts of the update's temporaries per device, in bytes, before their weights
    (UPDATE_FIT): ``rows`` rows of ``length`` tokens on the device in one micro-batch,
    ``param_shard`` parameters on the device, ``options`` the update's qwen.ForwardOptions."""
    c = np.dtype(config.compute_dtype).itemsize
    V, D, F, L = config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers
    N, X, H = config.num_heads, config.num_kv_heads, config.head_dim
    tokens = rows * length
    saved = {
        "full": (L + 1) * tokens * D * c,  # each layer's input
        "offload": 0,  # each layer's input, in host memory
        "dots": L * tokens * c * (2 * D + 2 * F + (N + 2 * X) * H),  # the matmuls' outputs
        "none": L * tokens * c * (2 * D + 3 * F + 4 * (N + 2 * X) * H),  # everything
    }[options.remat]
    mlp_chunk = qwen.block_size(length, rows * F * c, options.mlp_bytes)
    R, chunk = qwen.logits_chunks(rows, length, V, options.logits_bytes)
    return {
        "gradients": 4 * param_shard,  # float32 gradients, sharded like the params
        "saved": saved,  # what the backward pass keeps of each layer (remat)
        "layer": tokens * c * (D + (N + 2 * X) * H),  # one layer's residual, q, k and v
        "mlp": rows * mlp_chunk * F * c,  # one chunk of the MLP's activations (mlp_bytes)
        "logits": 4 * (rows // R) * chunk * V,  # one chunk of float32 logits (logits_bytes)
    }


# The weights of update_terms: the fit to the TPU compiler's temporaries of the compiled update
# (memory_analysis; tests/data/tpu_update_temporaries.jsonl: Qwen2.5-3B and 7B widths at 2-6
# layers and at full depth (the README's rows), TPU v4 / v5e / v6e / v5p topologies, 5-160 rows
# per chip, 1,024-4,096 tokens, remat full and offload) that is never under and whose largest
# relative error is least (a linear program; terms for the attention blocks, the gathered head
# and the causal mask did not lower it and were left out): on those shapes it is over by at most
# UPDATE_ERROR, on tiny shapes (where fixed costs dominate; tests/test_aot.py compiles two) by at
# most UPDATE_ERROR_TINY.
UPDATE_FIT = {
    "gradients": 4.39,
    "saved": 0.39,
    "layer": 8.37,
    "mlp": 2.3,
    "logits": 4.05,
}
UPDATE_ERROR = 0.4
UPDATE_ERROR_TINY = 3.0  # tens of MB, where the fixed costs of a program dominate


def update_temporaries(
    config: qwen.QwenConfig, *, rows: int, length: int, param_shard: int, options
) -> int:
    """Update temporaries per device (update_terms, weighed by UPDATE_FIT)."""
    terms = update_terms(config, rows=rows, length=length, param_shard=param_shard, options=options)
    return int(sum(UPDATE_FIT[k] * v for k, v in terms.items()))


def decode_temporaries(
    config: qwen.QwenConfig,
    *,
    rows: int,
    slots: int,
    chunk: int,
    attention_bytes: int,
    paged: bool = False,
    mlp_bytes: int = 0,
) -> int:
    """Temporaries per device of one wave (``rows`` rows on the device, ``slots`` cache slots):
    the larger of an append of ``chunk`` tokens (a prompt, an observation) and one decoding
    step. Fitted to XLA:CPU's memory_analysis of the compiled append and generate (8 devices, 4
    shapes, within 10%), with the scores' weight then raised from 1.3 to 2 so that it is not
    under the TPU compiler's for the waves of the README's table (a prompt's prefill, whose
    whole chunk of queries fits one block of scores, is the largest there):
      append: r C c (2 D + 2 F + (N + 2X) H) + 2 x one block of float32 scores + 3.5 r C S
      decode step: 4 x 4 r V (logits, their scaled and filtered copies, float32)
    A paged cache's append also gathers each row's pages into one layer's keys and values,
    2 r S X H c (qwen.paged_attention; a decoding step's kernel reads them in place), counted
    1.5 times (the gathered pages and their transposed copy; so that the formula is not under
    the TPU compiler's at the README's paged rows), and runs the MLP in chunks of positions
    under ``mlp_bytes`` (its 2 F term then a chunk's)."""
    c = np.dtype(config.compute_dtype).itemsize
    V, D, F = config.vocab_size, config.hidden_size, config.intermediate_size
    N, X, H = config.num_heads, config.num_kv_heads, config.head_dim
    block = qwen.query_block(rows, N, chunk, slots, attention_bytes)
    mlp = qwen.block_size(chunk, rows * F * c, mlp_bytes if paged else 0)
    append = rows * chunk * c * (2 * D + (N + 2 * X) * H) + 2 * rows * mlp * F * c
    append += 2 * 4 * rows * N * block * slots + 3.5 * rows * chunk * slots
    append += paged * 3 * rows * slots * X * H * c
    return int(max(append, 4 * 4 * rows * V))


def kv_bytes_per_token(config: qwen.QwenConfig) -> int:
    """One token's keys and values in every layer (36,864 bytes for Qwen2.5-3B in bfloat16)."""
    c = np.dtype(config.compute_dtype).itemsize
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * c


def pool_pages(*, rows: int, live: int, page: int, max_context: int) -> int:
    """Pages of a paged cache's pool on a device of ``rows`` rows: each row's live tokens and
    the page a decoding call may add (rollout.KVCachePolicy reserves a call's ``chunk``, one
    page), and at least one row's whole context and its next page (no row waits forever)."""
    return max(rows * (-(-live // page) + 1), -(-max_context // page) + 1)


def kv_cache_bytes(config: qwen.QwenConfig, *, rows: int, slots: int) -> int:
    """The cache of ``rows`` rows, ``slots`` slots each, counted twice: from about 20 rows per
    chip the TPU compiler's decoding loop keeps the cache in another layout (its [B, X, S, H]
    arrays laid out in memory as B, S, X, H: copies before and after the loop in
    ``compiled.as_text()``) and converts the wave's cache into it and back at each call, so
    both copies live during the loop (its temporaries equal the cache); and the last growth
    holds the old cache (half the slots) and the new one at once. Within a decoding step the
    cache is written in place."""
    c = np.dtype(config.compute_dtype).itemsize
    per_slot = config.num_layers * 2 * config.num_kv_heads * config.head_dim * c
    return 2 * rows * per_slot * slots


def make_plan(
    config: qwen.QwenConfig,
    *,
    data: int,
    fsdp: int,
    local_devices: int,
    processes: int,
    capacity: int,
    prompts_per_step: int,
    mini_batch: int,
    micro_batch: int,
    group_size: int,
    rollout_batch: int,
    max_context: int,
    max_obs_tokens: int,
    max_new_tokens: int,
    kl: bool,
    options,
    offload: bool = False,
    rollout_slots: int = 0,
    page_size: int = 0,
    live_tokens: int = 0,
) -> Plan:
    """The plan of one run. rollout_batch 0: the largest wave (whole groups, a multiple of the
    process's devices) whose peak stays under WAVE_MARGIN of the capacity (all of the
    process's rows when the capacity is unknown); otherwise that wave, as given.
    rollout_slots (0: max_context): cache slots per row of a wave. Rows that need more wait and
    finish in waves of wave x rollout_slots / max_context rows at max_context slots, whose
    cache takes no more bytes, so the plan at rollout_slots bounds both. page_size (0: a dense
    cache): a paged cache of pool_pages at live_tokens a row (Config.mean_live_tokens); appends
    gather a row's pages (qwen.paged_attention off TPU's decoding kernel) into one layer's
    [rows, X, slots, H] keys and values, counted with the decode temporaries."""
    c = np.dtype(config.compute_dtype).itemsize
    shard = param_shard_size(config, data, fsdp)

    def temporaries(micro: int) -> int:
        return update_temporaries(
            config,
            rows=micro * group_size // (data * fsdp),
            length=max_context,
            param_shard=shard,
            options=options,
        )

    fixed = (4 + 8 + (c if kl else 0)) * shard
    devices = data * fsdp
    micros = [m for m in range(devices, mini_batch + 1, devices) if mini_batch % m == 0]
    fitting = [m for m in micros if capacity and fixed + temporaries(m) <= capacity]
    slots = rollout_slots or max_context  # a row's cache in a wave (rollout.run_episodes)
    chunk = sampling.bucket_length(max_obs_tokens)
    prompt = sampling.bucket_length(PROMPT_TOKENS)
    first = min(sampling.bucket_length(PROMPT_TOKENS + max_new_tokens), slots)

    def plan(wave: int) -> Plan:
        per_device = wave // local_devices
        pages = pool_pages(
            rows=per_device, live=live_tokens, page=page_size or 1, max_context=slots
        )
        cache = kv_cache_bytes(config, rows=per_device, slots=slots)
        if page_size:
            cache = pages * page_size * kv_bytes_per_token(config)
        return Plan(
            params=4 * shard,
            optimizer=8 * shard,
            reference=c * shard if kl else 0,
            update=temporaries(micro_batch),
            sampling_weights=c * param_count(config),
            kv_cache=cache,
            decode=max(  # an observation into a full cache, a wave's prompts into a new one
                decode_temporaries(
                    config,
                    rows=per_device,
                    slots=slots,
                    chunk=chunk,
                    attention_bytes=options.attention_bytes,
                    paged=bool(page_size),
                    mlp_bytes=options.mlp_bytes,
                ),
                decode_temporaries(
                    config,
                    rows=per_device,
                    slots=first,
                    chunk=prompt,
                    attention_bytes=options.attention_bytes,
                    paged=bool(page_size),
                    mlp_bytes=options.mlp_bytes,
                ),
            ),
            capacity=capacity,
            rollout_batch=wave,
            micro_batch=micro_batch,
            largest_micro_batch=fitting[-1] if fitting else 0,
            offload=offload,
            slots=slots,
            page=page_size,
            pages=pages if page_size else 0,
            live=live_tokens if page_size else 0,
        )

    if rollout_batch:
        return plan(rollout_batch)
    step_rows = prompts_per_step // processes * group_size
    unit = math.lcm(group_size, local_devices)
    waves = list(range(unit, step_rows + 1, unit)) or [unit]
    if not capacity:
        return plan(waves[-1])
    fitting_waves = [w for w in waves if plan(w).rollout_peak <= WAVE_MARGIN * capacity]
    return plan(fitting_waves[-1] if fitting_waves else waves[0])


def check(plan: Plan) -> str | None:
    """None when the plan fits its capacity (or the capacity is unknown), else what does not
    fit and by how much, in one sentence."""
    if not plan.capacity:
        return None
    gib = lambda b: f"{b / GiB:.1f} GiB"
    over = lambda need: (
        f"{gib(need)} per device, {gib(need - plan.capacity)} over the {gib(plan.capacity)} "
        "of one device"
    )
    if plan.fixed > plan.capacity:
        return (
            f"params, optimizer state and reference model need {over(plan.fixed)}; shard them "
            "over more devices (--mesh-fsdp, or a larger slice)"
        )
    weights = plan.fixed + plan.sampling_weights
    if weights > plan.capacity:
        return (
            f"the train state and the sampling weights (a whole {gib(plan.sampling_weights)} "
            f"copy of the policy on every device) need {over(weights)}; use a larger slice "
            "(more --mesh-fsdp devices for the train state), or --kl-coef 0 (no reference)"
        )
    if plan.rollout_peak > plan.capacity:
        return (
            f"a rollout wave of {plan.rollout_batch} rows per process (--rollout-batch) needs "
            f"{over(plan.rollout_peak)} (KV cache {gib(plan.kv_cache)}); lower --rollout-batch "
            "or --max-context"
        )
    if plan.update_peak > plan.capacity:
        largest = (
            f"the largest that fits is {plan.largest_micro_batch}"
            if plan.largest_micro_batch
            else "none fits; lower --max-context or use more devices"
        )
        return (
            f"the update at --micro-batch {plan.micro_batch} needs {over(plan.update_peak)} "
            f"(temporaries {gib(plan.update)}); {largest}"
        )
    return None
