"""Multi-turn search rollouts, the environment side of TSPO, and evaluation (EM / F1).

The library half of the root script ``rollout.py`` (which is the evaluation command):
train.py's rollouts and evaluation and rollout.py's both run through ``run_episodes``.

One call of ``run_episodes`` runs B prompts x G samples, an episode each, through the turn loop
on a wave of rows (all of them, or ``wave_rows``):

    prefill the first episodes' prompts, one per row
    until every episode has ended:
        sample every live row until </search>, </answer> or EOS      (device, one while_loop)
        parse each row's action                                       (host)
        one batched retrieval for all rows that searched              (host)
        a row whose episode ended takes the next episode (refill)     (host)
        append each row's observation, or its new episode's prompt
            over its emptied cache, and go on                         (device, no re-prefill)

So the rows of one decoding call may be at different turns of their episodes: each row samples
turn k with its own turn's key and stop strings. An episode ends when it answers, samples EOS,
or runs out of turns or context; the last turn does not search (``force_answer`` starts it with
"<answer>" and stops it only at "</answer>"). Without refill, the next wave of episodes starts
once the whole wave has ended; with ``wave_slots``, an episode whose next turn could outgrow its
row's slots waits, its cache on the host, for a wave of fewer, longer rows. The trajectories are
the same either way. An invalid action
(no tag, unclosed tag, empty query, both tags) gets Search-R1's corrective observation, and the
turn counts. An episode starts from its data row's own prompt when it has one (Search-R1
parquet), else from the question in ``RolloutConfig.template``.
Per trajectory the host records everything Eq. F, A and L of TSPO.md need: the token ids as
sampled, which of them were sampled (``loss_mask``) and in which turn (``turn_id``, -1 on the
prompt and observations), the sampler's log-probs, ``num_turns``, ``outcome`` and
``first_hit``; ``pack`` lays them out as [B, G, T] arrays padded to a length bucket.
"""

import collections
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from tspo_jax import data, hf_io, protocol, qwen, retrieval, sampling
from tspo_jax.cli import option


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How a policy runs through the search protocol (Search-R1's settings by default)."""

    max_turns: int = option(4, "turns per trajectory; the last one does not search")
    passages: int = option(3, "passages retrieved per search (top-k)")
    max_new_tokens: int = option(500, "tokens the policy may sample in one turn")
    max_obs_tokens: int = option(500, "token budget of one observation")
    max_context: int = option(4096, "KV-cache slots per row: prompt, turns and observations")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling mass (1: off)")
    top_k: int = option(0, "sample among the k most likely tokens (0: off)")
    greedy: bool = option(False, "argmax decoding instead of sampling")
    chat: bool = option(False, "wrap the prompt in the tokenizer's chat template (instruct models)")
    force_answer: bool = option(False, "start the last turn with <answer> so that it answers")
    outcome: str = option("em", "outcome score of the final answer", choices=("em", "f1"))
    prompt_source: str = option(
        "row",
        "row: a data row's own prompt when it has one (Search-R1 parquet), else the template; "
        "template: always the template",
        choices=("row", "template"),
    )
    template: str = option(
        protocol.DEFAULT_TEMPLATE,
        "prompt template with a {question} field, for rows without a prompt of their own",
    )
    template_file: str = option("", "read --template from this file, byte for byte")

    def __post_init__(self):
        for name in ("max_turns", "passages", "max_new_tokens", "max_obs_tokens", "max_context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (or set greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        protocol.check_template(self.template)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetrieverConfig:
    """Where passages come from: BM25 over a local corpus, or Search-R1's retrieval server."""

    corpus: str = option("", "Search-R1 JSONL corpus for the embedded BM25 retriever")
    # The server's address and patience may change when a run is resumed (train.py --resume).
    retriever_url: str = option(
        "",
        "Search-R1 retrieval server, e.g. http://127.0.0.1:8000/retrieve, instead of --corpus",
        resumable=True,
    )
    retriever_timeout: float = option(
        retrieval.DEFAULT_TIMEOUT, "seconds per retrieval request", resumable=True
    )
    retriever_retries: int = option(
        retrieval.DEFAULT_RETRIES,
        "retries of a failed retrieval request (down, timeout, 5xx)",
        resumable=True,
    )
    retriever_max_wait: float = option(
        retrieval.DEFAULT_MAX_WAIT,
        "seconds a retrieval request may fail before the run stops",
        resumable=True,
    )

    def __post_init__(self):
        if self.retriever_url and self.corpus:
            raise ValueError("give one of --corpus and --retriever-url, not both")


def connect(cfg: RetrieverConfig, log=None) -> retrieval.HttpRetriever | None:
    """The Search-R1 server of --retriever-url, checked with one small query before the model
    loads (a server that is down, a wrong path, an answer of another shape); None without."""
    if not cfg.retriever_url:
        return None
    server = retrieval.HttpRetriever(
        cfg.retriever_url,
        timeout=cfg.retriever_timeout,
        retries=cfg.retriever_retries,
        max_wait=cfg.retriever_max_wait,
        log=log or retrieval.log_to_stderr,
        wait_option="--retriever-max-wait",
    )
    server.check()
    return server


class Turn(NamedTuple):
    """One turn of one trajectory, on the host."""

    prefix: list[int]  # forced tokens before the sampled ones (not trained), e.g. "<answer>"
    tokens: list[int]  # token ids exactly as sampled
    logps: list[float]  # their log-probs under the sampler
    text: str  # the decoded sampled text (prefix included)
    action: protocol.Action  # what the host read out of the text
    doc_ids: tuple[str, ...]  # passages retrieved for a search
    observation: str | None  # text appended after the turn (None: nothing appended)
    obs_tokens: list[int]  # its token ids


class Trajectory(NamedTuple):
    """A whole episode and its scores."""

    question: str
    golds: tuple[str, ...]
    prompt: str  # the prompt's text as the policy read it (chat template included)
    prompt_tokens: list[int]
    turns: list[Turn]
    answer: str | None  # content of the last <answer> the policy sampled
    outcome: float  # EM or F1 of the answer (RolloutConfig.outcome)
    em: float
    f1: float
    first_hit: int  # first turn whose retrieved observation contains a gold answer, -1 if none
    finish: str  # "answer", "eos", "turns" or "context"


class Batch(NamedTuple):
    """A rollout laid out for the loss: [B, G, T] token arrays, [B, G] trajectory signals."""

    tokens_BGT: np.ndarray  # int32 prompt, turns and observations, right-padded
    mask_BGT: np.ndarray  # bool real tokens (attention)
    loss_mask_BGT: np.ndarray  # bool sampled tokens
    turn_id_BGT: np.ndarray  # int32 turn of each sampled token, -1 elsewhere
    logp_BGT: np.ndarray  # float32 sampler log-probs of sampled tokens, 0 elsewhere
    outcome_BG: np.ndarray  # float32
    first_hit_BG: np.ndarray  # int32
    num_turns_BG: np.ndarray  # int32
    answered_BG: np.ndarray  # bool: the trajectory ended with a well-formed <answer>
    searched_BGK: np.ndarray  # bool: turn k's action was a search (K: pack's ``turns``)


class Timing(NamedTuple):
    """Where a rollout's time went, and how full its decoding steps were."""

    sample_s: float  # device time sampling and appending (host parsing included)
    retrieval_s: float  # time inside retriever.search
    sampled_tokens: int  # tokens the trajectories kept from sampling
    decode_steps: int  # decoding-loop steps, summed over the policy's sample calls
    decode_slots: int  # rows x steps, summed over those calls (padding rows included)

    @property
    def utilization(self) -> float:
        """Decode-slot utilization: sampled_tokens / decode_slots, the share of the rows'
        decoding steps that sampled a kept token (0 when the policy reports no decoding, as a
        scripted one)."""
        return self.sampled_tokens / self.decode_slots if self.decode_slots else 0.0


WAIT = "wait"  # TurnSample.stop of a row whose turn goes on in a later call (KVCachePolicy.sample)


class Sampled(NamedTuple):
    """What a policy's ``sample`` returns: one turn per row, and the decoding it took."""

    samples: list[sampling.TurnSample]  # one per row ("inactive" and empty where not live)
    steps: int  # decoding steps the call ran: the most tokens any of its rows generated
    rows: int  # rows each step ran, padding included (steps x rows: the call's decode slots)


class KVCachePolicy:
    """The policy side of the turn loop: the sampler over one KV cache kept across turns.

    The turn loop only calls ``start``, ``extend`` and ``sample``, so another way of keeping
    context (bench/rollout.py re-prefills every turn, as Search-R1 does) or a scripted policy
    (tests) can stand in for it. A row whose episode ended takes the next episode's prompt
    through ``extend(..., restart=...)``: its cache is emptied (``sampling.restart``) and the
    prompt appended in the same batched call as the other rows' observations.

    ``mesh``: the devices the rows are split over (``rollout_mesh``; None: the default device).
    ``attention_bytes``, ``mlp_bytes``: qwen.ForwardOptions' bounds for appends.
    ``params`` must then be replicated on it (runtime.sampler_weights). A batch of fewer than
    ``wave_rows`` rows, or whose rows do not divide evenly over the devices, is padded with
    empty rows that never sample (so a last, smaller wave compiles nothing new). The cache
    starts sized for the prompts' first turn and grows by buckets (``sampling.grow``), never
    past the wave's slots (``start``; ``max_context`` at most): every decode step attends over
    the whole cache, so a cache sized for the worst case up front would make the early turns
    pay for slots they do not use. ``slots``: a wave's slots per row by default; a wave of
    longer rows (``start(..., slots=more)``) has fewer rows, wave_rows x slots / more, so that
    its cache takes no more memory. ``park`` and ``resume`` move a row's cache from one wave
    to another.

    ``pages`` (per device; 0: the dense cache above): the cache is a pool of that many pages
    of ``page`` tokens on each device (``sampling.PageTable``), and a row holds only the pages
    its tokens fill: before each call it reserves what the call may add (an observation, up
    to ``chunk`` tokens of its turn), after it gives back what it did not use. ``chunk`` (0:
    max_new_tokens) bounds each call's tokens per row, so that a row reserves one chunk, not a
    whole turn: a turn may take several calls (``sample``). A row whose device's pool is
    short waits: it samples nothing, what it was to append waits with it (``backlog``), and
    it goes on in a later call. When every live row of a device would wait, the last of them
    moves to host memory (``swapped``) until its pages fit again. A row's trajectory is the
    same whenever it runs.
    """

    def __init__(
        self,
        params,
        model_config,
        tokenizer,
        cfg: RolloutConfig,
        *,
        mesh=None,
        attention_bytes=0,
        wave_rows=1,
        slots=0,
        pages=0,
        page=16,
        chunk=0,
        mlp_bytes=0,
    ):
        self.params, self.model_config, self.cfg = params, model_config, cfg
        self.pages, self.page, self.chunk = pages, page, chunk
        self.slots = self.wave_slots = slots or cfg.max_context
        self.tokenizer = tokenizer
        eos = set(model_config.eos_token_ids) | {tokenizer.eos_token_id}
        self.sampling_params = sampling.SamplingParams(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            greedy=cfg.greedy,
            eos_ids=tuple(sorted(eos - {None})),
        )
        self.pad_id = tokenizer.pad_token_id or 0
        self.devices = 1 if mesh is None else mesh.size
        self.wave_rows = -(-wave_rows // self.devices) * self.devices
        rows = None if mesh is None else NamedSharding(mesh, P(mesh.axis_names))
        self.options = qwen.ForwardOptions(
            batch_sharding=rows, attention_bytes=attention_bytes, mlp_bytes=mlp_bytes
        )
        self.state, self.rows = None, 0
        self._stopping_at = {}  # stop strings -> sampling params with their table

    def _pad(self, rows: Sequence, empty=()) -> list:
        """rows, then ``empty`` ones up to the padded batch (a multiple of the devices)."""
        return [*rows, *[empty] * (self._padded(len(rows)) - len(rows))]

    def _padded(self, n: int) -> int:
        rows = self.wave_rows * self.slots // self.wave_slots  # the same memory at any slots
        return max(rows - rows % self.devices, self.devices, n + -n % self.devices)

    def start(self, prompts: Sequence[list[int]], slots: int = 0) -> None:
        """Prefills the prompts into a fresh cache (the previous one is freed first) for a
        wave whose rows use at most ``slots`` slots (0: the policy's ``slots``)."""
        self.state, self.rows = None, len(prompts)
        self.wave_slots = slots or self.slots
        first_turn = max(map(len, prompts)) + self.cfg.max_new_tokens
        slots = max(min(sampling.bucket_length(first_turn), self.wave_slots), *map(len, prompts))
        B, sharding = len(self._pad(prompts)), self.options.batch_sharding
        self.partial = [sampling.NOT_BEGUN] * B  # each row's turn so far, while it goes on
        if self.pages:
            self.table = sampling.PageTable(B, self.devices, self.pages, self.page)
            self.backlog, self.swapped = [[] for _ in range(B)], [None] * B
            self.state = sampling.init_paged(
                self.model_config, B, self.table, slots, sharding=sharding
            )
        else:
            self.state = sampling.init_cache(self.model_config, B, slots, sharding=sharding)
        self.extend(prompts)

    def extend(self, rows: Sequence[list[int]], restart: Sequence[bool] | None = None) -> None:
        """Appends each row's tokens (an observation, a forced prefix; none for some rows).
        A row with restart[b] is emptied first: its tokens are a new episode's prompt."""
        if restart is not None and any(restart):
            restart_B = np.pad(np.asarray(restart, bool), (0, self._padded(len(rows)) - len(rows)))
            self.state = sampling.restart(self.state, restart_B, self.options)
            for b in np.flatnonzero(restart_B) if self.pages else ():
                self.table.release(b)
                self.backlog[b], self.swapped[b] = [], None
            self.partial = [
                sampling.NOT_BEGUN if r else p for p, r in zip(self.partial, restart_B, strict=True)
            ]
        rows = self._pad(rows)
        if self.pages:  # what a row's pages cannot take yet waits in its backlog
            length_B = np.asarray(self.state.length_B)
            for b, row in enumerate(rows):
                if row and (self.backlog[b] or not self.table.reserve(b, length_B[b] + len(row))):
                    self.backlog[b], rows[b] = self.backlog[b] + list(row), []
            self._send_table()
        self._append(rows)

    def _append(self, rows):
        tokens_BC, n_B = sampling.pad_chunk(rows, pad_id=self.pad_id)
        if not n_B.any():
            return
        self.state = sampling.grow(self.state, n_B, limit=self.wave_slots)
        self.state = sampling.append(
            self.params, self.model_config, self.state, tokens_BC, n_B, self.options
        )

    def _send_table(self):
        """The host's page table to the devices, the table as wide as the most pages held."""
        widest = max(map(len, self.table.held)) * self.page
        self.state = sampling.grow(self.state, widest - self.state.length_B, limit=self.wave_slots)
        self.state = sampling.set_table(self.state, self.table)

    def _make_room(self, live, limit_B) -> np.ndarray:
        """Which live rows sample this call (paged cache): those whose pages hold their
        backlog and turn, each device's rows in order; a device whose live rows all wait
        moves its last one holding pages to host memory, until one of them fits."""
        for b in np.flatnonzero(~live):  # rows whose episodes ended hold nothing
            self.table.release(b)
        while True:
            length_B, active = np.asarray(self.state.length_B), np.zeros_like(live)
            for b in np.flatnonzero(live):
                saved = self.swapped[b]
                held = length_B[b] if saved is None else saved.k_LXnH.shape[2]
                active[b] = self.table.reserve(b, held + len(self.backlog[b]) + limit_B[b])
            self._send_table()
            for b in np.flatnonzero(active):
                if self.swapped[b] is not None:  # back from host memory
                    self.state = sampling.load_row(self.state, b, self.swapped[b], self.table)
                    self.swapped[b] = None
            self._append([self.backlog[b] if active[b] else [] for b in range(len(live))])
            self.backlog = [
                [] if on else rest for rest, on in zip(self.backlog, active, strict=True)
            ]
            device_B = np.arange(len(live)) // self.table.per_device
            stuck = [d for d in set(device_B[live]) if not active[live & (device_B == d)].any()]
            if not stuck:
                return active
            for d in stuck:
                holding = [b for b in np.flatnonzero(live & (device_B == d)) if self.table.held[b]]
                if not holding:
                    raise ValueError(
                        f"a pool of {self.pages} pages of {self.page} tokens per device cannot "
                        f"hold one row's context and turn ({max(limit_B)} tokens more): give "
                        "it more pages"
                    )
                b = holding[-1]
                self.swapped[b] = sampling.save_row(self.state, b, self.table)
                self.table.release(b)

    def sample(self, key, live, stops, max_new_tokens, limit_B) -> Sampled:
        """One turn for the live rows, row b until one of its own stop strings stops[b] (a
        tuple), EOS, max_new_tokens or its own limit_B[b] (what is left of its context).
        key: [B] per-row keys. A call samples at most ``chunk`` tokens a row: a row whose turn
        goes on, or whose pages do not fit (paged cache), comes back WAIT, and a later call
        continues its turn from what it sampled (``partial``), with the same tokens."""
        strings = tuple(dict.fromkeys(s for own in stops for s in own))  # every row's, once
        if strings not in self._stopping_at:
            self._stopping_at[strings] = self.sampling_params.with_stops(self.tokenizer, strings)
        live, limit_B = np.asarray(live, bool), np.minimum(limit_B, max_new_tokens)
        pad = self._padded(len(live)) - len(live)
        live, limit_B = np.pad(live, (0, pad)), np.pad(np.where(live, limit_B, 0), (0, pad))
        if pad:
            key = jnp.concatenate([key, jnp.stack([key[0]] * pad)])
        chunk = self.chunk or max_new_tokens
        call_B = np.minimum(limit_B - [len(s.tokens) for s in self.partial], chunk)
        waiting = live & ~self._make_room(live, call_B) if self.pages else np.zeros_like(live)
        live = live & ~waiting
        self.state = sampling.grow(self.state, np.where(live, call_B, 0), limit=self.wave_slots)
        self.state, samples = sampling.sample_turn(
            self.params,
            self.model_config,
            self.state,
            key,
            self.tokenizer,
            max_new_tokens=chunk,
            sampling_params=self._stopping_at[strings],
            active_B=live,
            limit_B=limit_B,
            stop_strings_B=self._pad(stops, empty=strings),
            options=self.options,
            before=self.partial,
        )
        if self.pages:  # each row keeps the pages its tokens fill
            for b, n in enumerate(np.asarray(self.state.length_B)):
                self.table.trim(b, n if self.swapped[b] is None else 0)
            self.state = sampling.set_table(self.state, self.table)
        wait = sampling.TurnSample([], [], "", WAIT, None)
        goes_on = [w or s.stop == sampling.PAUSED for s, w in zip(samples, waiting, strict=True)]
        self.partial = [
            (p if w else s) if on else sampling.NOT_BEGUN
            for p, s, w, on in zip(self.partial, samples, waiting, goes_on, strict=True)
        ]
        samples = [wait if on else s for s, on in zip(samples, goes_on, strict=True)]
        steps = max(s.generated for s in samples)
        return Sampled(samples[: self.rows], steps=steps, rows=len(samples))

    def park(self, b: int) -> sampling.SavedRow:
        """Row b's cache, off the devices: its episode waits for a wave of longer rows (the
        row itself ends here; a refill may take it)."""
        return sampling.save_row(self.state, b)

    def resume(self, b: int, saved: sampling.SavedRow) -> None:
        """Row b (a row of this wave with nothing in it) goes on from a parked row's cache."""
        needed_B = np.zeros(self._padded(self.rows), np.int32)
        needed_B[b] = saved.k_LXnH.shape[2]
        self.state = sampling.grow(self.state, needed_B, limit=self.wave_slots)
        self.state = sampling.load_row(self.state, b, saved)


def rollout_mesh(devices=None) -> Mesh:
    """A one-axis mesh over this process's devices (``jax.local_devices()`` by default): the
    rows of a rollout wave are split over it."""
    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("rows",))


@dataclasses.dataclass
class Episode:
    """One trajectory in progress, on the host (in a row of the wave while it runs)."""

    example: data.Example
    key_index: int  # which row key it samples with: fold_in(fold_in(key, example id), sample)
    prompt: str  # the prompt's text as the policy reads it (chat template included)
    prompt_tokens: list[int]
    length: int  # real tokens of its context so far: prompt, turns, prefixes, observations
    turns: list[Turn] = dataclasses.field(default_factory=list)
    finish: str = "turns"  # Trajectory.finish, once it ends
    live: bool = True  # it samples another turn
    saved: sampling.SavedRow | None = None  # its cache, while it waits for a longer wave
    waiting: bool = False  # its turn goes on in the policy's next call (KVCachePolicy.sample)


def run_episodes(
    policy,
    tokenizer,
    retriever,
    examples: Sequence[data.Example],
    *,
    group_size: int,
    key: jax.Array,
    cfg: RolloutConfig,
    example_ids: Sequence[int] | None = None,
    wave_rows: int | None = None,
    wave_slots: int | None = None,
    refill: bool = True,
) -> tuple[list[Trajectory], Timing]:
    """Runs every example ``group_size`` times through the turn loop (see the module docstring).

    The episodes, (example, sample) in order, go through the loop on a wave of at most
    ``wave_rows`` rows (whole groups; default: all rows at once), so memory is bounded by the
    wave. With ``refill`` (the default), a row whose episode ends takes the next pending
    episode at the end of that turn, so the decoding steps serve as many rows as there are
    episodes left; without it, each wave runs until its slowest row ends, and then the next
    wave starts. Sample g of example i draws turn k's tokens from the key
    fold_in(fold_in(fold_in(key, example_ids[i]), g), k), and a row's cache holds only its own
    tokens, so a trajectory depends neither on which other rows share its wave, nor on when it
    started (refill or not), nor on the number of devices: processes that each roll out a
    share of the prompts sample what one process would. example_ids defaults to
    0 .. len(examples) - 1.

    ``wave_slots`` (default: max_context): a row's cache slots in the wave. An episode whose
    next turn could outgrow them waits: its row's cache goes to the host (``policy.park``), and
    once the other episodes are done it goes on, from that very cache (``policy.resume``), in
    a wave of wave_rows x wave_slots / max_context rows of max_context slots: no more memory
    than the first, so a wave never outgrows its plan, and the trajectory is the same.

    Returns the trajectories in (example, sample) order and where the time went.
    """
    ids = range(len(examples)) if example_ids is None else example_ids
    if len(ids) != len(examples):
        raise ValueError(f"{len(ids)} example_ids for {len(examples)} examples")
    wave_rows = wave_rows or len(examples) * group_size
    if wave_rows % group_size:
        raise ValueError(f"a wave of {wave_rows} rows is not whole groups of {group_size}")
    row_keys = jax.vmap(lambda i, g: jax.random.fold_in(jax.random.fold_in(key, i), g))(
        np.repeat(np.asarray(ids, np.uint32), group_size),
        np.tile(np.arange(group_size, dtype=np.uint32), len(ids)),
    )
    episodes = []
    for example in (ex for ex in examples for _ in range(group_size)):
        text = prompt_text(example, tokenizer, cfg)
        tokens = tokenizer.encode(text, add_special_tokens=False)
        episodes.append(Episode(example, len(episodes), text, tokens, length=len(tokens)))
    longest = max(e.length for e in episodes)
    if longest >= cfg.max_context:
        raise ValueError(f"a prompt of {longest} tokens does not fit max_context={cfg.max_context}")
    wave_slots = wave_slots or cfg.max_context
    forced = len(tokenizer.encode(protocol.FORCED_ANSWER_PREFIX, add_special_tokens=False))
    if _needs(longest, forced, cfg) > wave_slots:
        raise ValueError(
            f"wave_slots={wave_slots} is too few for the first turn of a prompt of {longest} "
            f"tokens and max_new_tokens={cfg.max_new_tokens}"
        )
    timing = _turn_loop(
        policy,
        tokenizer,
        retriever,
        episodes,
        row_keys,
        wave_rows=wave_rows,
        wave_slots=wave_slots,
        refill=refill,
        cfg=cfg,
    )
    trajectories = [
        _score(e.example, e.prompt, e.prompt_tokens, e.turns, e.finish, cfg) for e in episodes
    ]
    return trajectories, timing


def _needs(length: int, forced: int, cfg: RolloutConfig) -> int:
    """The most cache slots a row of ``length`` tokens may use by the end of its next turn
    (with a forced prefix of ``forced`` tokens under force_answer)."""
    return min(length + forced * cfg.force_answer + cfg.max_new_tokens, cfg.max_context)


def _turn_loop(
    policy, tokenizer, retriever, episodes, row_keys, *, wave_rows, wave_slots, refill, cfg
):
    """The turn loop of the module docstring, over the episodes on a wave of wave_rows rows
    of wave_slots slots (run_episodes' docstring) -> Timing. Each row is at its own episode's
    turn."""
    forced = tokenizer.encode(protocol.FORCED_ANSWER_PREFIX, add_special_tokens=False)
    pending = collections.deque(episodes)
    parked = collections.deque()  # episodes waiting for a wave of longer rows, with their caches
    idle = Episode(None, 0, "", [], 0, live=False)  # a row with no episode
    rows: list[Episode] = []  # the episode in each row (one that ended, until a refill)
    t0, retrieval_s, steps, slots = time.perf_counter(), 0.0, 0, 0
    while pending or parked or any(e.live for e in rows):
        if not any(e.live for e in rows):  # a new wave: the first, or the last one drained
            rows, room = _next_wave(policy, pending, parked, wave_rows, wave_slots, cfg)
        # Under force_answer the last turn starts with "<answer>" and stops only at "</answer>".
        last = [e.live and len(e.turns) == cfg.max_turns - 1 for e in rows]
        prefixes = [forced if cfg.force_answer and x else [] for x in last]
        if any(p and not e.waiting for p, e in zip(prefixes, rows, strict=True)):
            policy.extend([[] if e.waiting else p for p, e in zip(prefixes, rows, strict=True)])
            for e, prefix in zip(rows, prefixes, strict=True):
                e.length += 0 if e.waiting else len(prefix)
        turn_keys = sampling.fold_in_rows(  # each row's key for its own episode's turn
            row_keys[np.array([e.key_index for e in rows])], np.array([len(e.turns) for e in rows])
        )
        sampled = policy.sample(
            turn_keys,
            [e.live for e in rows],
            [protocol.ANSWER_STOP if p else protocol.STOP_STRINGS for p in prefixes],
            cfg.max_new_tokens,
            np.array([cfg.max_context - e.length for e in rows]),
        )
        steps, slots = steps + sampled.steps, slots + sampled.steps * sampled.rows
        for e, s in zip(rows, sampled.samples, strict=True):  # its turn goes on in a later call
            e.waiting, e.live = s.stop == WAIT, e.live and s.stop != WAIT
        retrieval_s += _read_turn(rows, sampled.samples, prefixes, tokenizer, retriever, cfg)
        # Park: an episode whose next turn could outgrow the wave's slots waits, its cache off
        # the devices and its observation not yet appended, for a wave of longer rows.
        for b, e in enumerate(rows):
            if e.live and _needs(e.length, len(forced), cfg) > room:
                e.saved, rows[b] = policy.park(b), idle
                parked.append(e)
        # Refill: each row whose episode ended takes the next pending episode, in order.
        restart = [False] * len(rows)
        for b, e in enumerate(rows):
            if refill and not e.live and not e.waiting and pending:
                rows[b], restart[b] = pending.popleft(), True
        if any(e.live for e in rows):  # each row's observation, or its new episode's prompt
            appended = [
                e.prompt_tokens if new else (e.turns[-1].obs_tokens if e.live else [])
                for e, new in zip(rows, restart, strict=True)
            ]
            policy.extend(appended, restart=restart)
        for e in rows:
            e.live = e.live or e.waiting
    sampled_tokens = sum(len(t.tokens) for e in episodes for t in e.turns)
    return Timing(time.perf_counter() - t0 - retrieval_s, retrieval_s, sampled_tokens, steps, slots)


def _next_wave(policy, pending, parked, wave_rows, wave_slots, cfg) -> tuple[list, int]:
    """Starts the next wave -> (its episodes, a row's slots in it): up to wave_rows new
    episodes (their prompts prefilled), or, once none is pending, up to wave_rows x wave_slots
    / max_context parked ones, each going on from its own cache and its pending observation."""
    if pending:
        rows = [pending.popleft() for _ in range(min(wave_rows, len(pending)))]
        policy.start([e.prompt_tokens for e in rows])
        return rows, wave_slots
    long_rows = max(1, wave_rows * wave_slots // cfg.max_context)
    rows = [parked.popleft() for _ in range(min(long_rows, len(parked)))]
    policy.start([[] for _ in rows], slots=cfg.max_context)
    for b, e in enumerate(rows):
        policy.resume(b, e.saved)
        e.saved = None
    policy.extend([e.turns[-1].obs_tokens for e in rows])
    return rows, cfg.max_context


def _read_turn(rows, samples, prefixes, tokenizer, retriever, cfg) -> float:
    """Reads each live row's turn into its episode: the sampled tokens (held to max_context
    real tokens), the action, the passages of a search (one retrieval for all rows) and the
    observation; a row that gets no observation has ended. Returns the retrieval's seconds."""
    live = [b for b, e in enumerate(rows) if e.live]
    for b in live:  # hold each row to max_context real tokens
        e, s = rows[b], samples[b]
        budget = cfg.max_context - e.length
        if len(s.tokens) >= budget:
            kept = s.tokens[:budget]
            samples[b] = s._replace(
                tokens=kept, logps=s.logps[:budget], text=tokenizer.decode(kept)
            )
            e.finish = "context"
        e.length += len(samples[b].tokens)
    head = [protocol.FORCED_ANSWER_PREFIX if p else "" for p in prefixes]
    actions = {b: protocol.parse_action(head[b] + samples[b].text) for b in live}
    last = [len(e.turns) == cfg.max_turns - 1 for e in rows]  # the last turn does not search
    searching = [
        b for b in live if actions[b].kind == "search" and not last[b] and rows[b].finish == "turns"
    ]
    t0 = time.perf_counter()
    found = (
        retriever.search([actions[b].content for b in searching], cfg.passages) if searching else []
    )
    retrieval_s = time.perf_counter() - t0
    passages = dict(zip(searching, found, strict=True))
    for b in live:
        e, s, action = rows[b], samples[b], actions[b]
        obs, obs_tokens = None, []
        if action.kind == "answer":
            e.finish = "answer"
        elif s.stop == "eos":
            e.finish = "eos"
        elif b in passages:
            obs = protocol.format_observation(
                passages[b], tokenizer=tokenizer, max_tokens=cfg.max_obs_tokens
            )
        elif not last[b] and e.finish == "turns":
            obs = protocol.INVALID_ACTION_OBSERVATION
        if obs is not None:
            obs_tokens = tokenizer.encode(obs, add_special_tokens=False)
            if e.length + len(obs_tokens) >= cfg.max_context:
                obs, obs_tokens, e.finish = None, [], "context"
        e.length += len(obs_tokens)
        e.turns.append(
            Turn(
                prefix=list(prefixes[b]),
                tokens=s.tokens,
                logps=s.logps,
                text=head[b] + s.text,
                action=action,
                doc_ids=tuple(p.id for p in passages.get(b, [])),
                observation=obs,
                obs_tokens=obs_tokens,
            )
        )
        e.live = obs is not None
    return retrieval_s


def prompt_text(example: data.Example, tokenizer, cfg: RolloutConfig) -> str:
    """The first prompt of an episode: the row's own prompt when it has one (and
    ``cfg.prompt_source`` is "row"), else the question in ``cfg.template``; through the chat
    template with ``cfg.chat``."""
    if example.prompt is not None and cfg.prompt_source == "row":
        return protocol.chat_prompt(example.prompt, tokenizer=tokenizer, chat=cfg.chat)
    return protocol.build_prompt(
        example.question, tokenizer=tokenizer, chat=cfg.chat, template=cfg.template
    )


def read_template_file(cfg: RolloutConfig) -> RolloutConfig:
    """``cfg`` with ``template`` read from ``template_file`` (byte for byte, a trailing newline
    included) when one is given; the run's config then records the text it used."""
    if not cfg.template_file:
        return cfg
    path = cfg.template_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--template-file {path!r}: no such file")
    with open(path, encoding="utf-8", newline="") as f:
        template = f.read()
    try:
        return dataclasses.replace(cfg, template=template)
    except ValueError as e:
        raise ValueError(f"--template-file {path!r}: {e}") from None


def _score(example, prompt, prompt_tokens, turns, finish, cfg) -> Trajectory:
    answer = protocol.final_answer([t.text for t in turns])
    em = protocol.exact_match(answer, example.golden_answers)
    f1 = protocol.f1_score(answer, example.golden_answers)
    observations = [t.observation if t.action.kind == "search" else None for t in turns]
    return Trajectory(
        question=example.question,
        golds=tuple(example.golden_answers),
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        turns=turns,
        answer=answer,
        outcome=em if cfg.outcome == "em" else f1,
        em=em,
        f1=f1,
        first_hit=protocol.first_hit(observations, example.golden_answers),
        finish=finish,
    )


def sequence(traj: Trajectory):
    """The trajectory as one token sequence: (tokens, loss_mask, turn_id, logp) lists."""
    tokens, loss_mask, turn_id, logp = list(traj.prompt_tokens), [], [], []
    loss_mask += [0] * len(tokens)
    turn_id += [-1] * len(tokens)
    logp += [0.0] * len(tokens)
    for k, t in enumerate(traj.turns):
        for ids, trained in ((t.prefix, False), (t.tokens, True), (t.obs_tokens, False)):
            tokens += ids
            loss_mask += [int(trained)] * len(ids)
            turn_id += [k if trained else -1] * len(ids)
        logp += [0.0] * len(t.prefix) + list(t.logps) + [0.0] * len(t.obs_tokens)
    return tokens, loss_mask, turn_id, logp


def sequence_length(traj: Trajectory) -> int:
    """len(sequence(traj)[0]), without building the sequence."""
    turns = sum(len(t.prefix) + len(t.tokens) + len(t.obs_tokens) for t in traj.turns)
    return len(traj.prompt_tokens) + turns


def pack(
    trajectories: Sequence[Trajectory],
    group_size: int,
    *,
    length: int | None = None,
    pad_id: int = 0,
    turns: int | None = None,
) -> Batch:
    """[B, G, T] arrays for the loss, T = ``length`` or the bucket of the longest sequence;
    [B, G, K] per-turn arrays, K = ``turns`` (max_turns) or the most turns of any trajectory."""
    seqs = [sequence(t) for t in trajectories]
    longest = max(len(s[0]) for s in seqs)
    T = sampling.bucket_length(longest) if length is None else length
    if longest > T:
        raise ValueError(f"pack: a trajectory of {longest} tokens does not fit length={T}")
    N = len(seqs)
    if N % group_size:
        raise ValueError(f"pack: {N} trajectories are not whole groups of {group_size}")
    out = {
        "tokens": np.full((N, T), pad_id, np.int32),
        "mask": np.zeros((N, T), bool),
        "loss_mask": np.zeros((N, T), bool),
        "turn_id": np.full((N, T), -1, np.int32),
        "logp": np.zeros((N, T), np.float32),
    }
    for i, (tokens, loss_mask, turn_id, logp) in enumerate(seqs):
        n = len(tokens)
        out["tokens"][i, :n] = tokens
        out["mask"][i, :n] = True
        out["loss_mask"][i, :n] = loss_mask
        out["turn_id"][i, :n] = turn_id
        out["logp"][i, :n] = logp
    B, G = N // group_size, group_size
    shape = lambda x: x.reshape(B, G, *x.shape[1:])
    K = turns or max(len(t.turns) for t in trajectories)
    searched = np.zeros((N, K), bool)
    for i, t in enumerate(trajectories):
        kinds = [turn.action.kind for turn in t.turns[:K]]
        searched[i, : len(kinds)] = [kind == "search" for kind in kinds]
    return Batch(
        tokens_BGT=shape(out["tokens"]),
        mask_BGT=shape(out["mask"]),
        loss_mask_BGT=shape(out["loss_mask"]),
        turn_id_BGT=shape(out["turn_id"]),
        logp_BGT=shape(out["logp"]),
        outcome_BG=shape(np.array([t.outcome for t in trajectories], np.float32)),
        first_hit_BG=shape(np.array([t.first_hit for t in trajectories], np.int32)),
        num_turns_BG=shape(np.array([len(t.turns) for t in trajectories], np.int32)),
        answered_BG=shape(np.array([t.finish == "answer" for t in trajectories])),
        searched_BGK=shape(searched),
    )


def summarize(trajectories: Sequence[Trajectory]) -> dict:
    """Rollout numbers (of a step's rollouts, and of an evaluation's): EM, F1, turns,
    searches, invalid actions, FOLR hits and where.

    folr_hit_rate: trajectories whose observations held a gold answer (h >= 0);
    near_miss_rate: trajectories that hit the answer but did not earn full credit (outcome < 1).

    invalid_rate: turns that got the corrective observation (neither one search nor one
    answer); eos_rate: turns that ended at EOS without an answer (the episode's last), counted
    apart; both per turn."""
    n = len(trajectories)
    turns = [t for traj in trajectories for t in traj.turns]
    hits = Counter(t.first_hit for t in trajectories if t.first_hit >= 0)
    eos_turns = sum(t.finish == "eos" for t in trajectories)
    invalid = sum(t.action.kind == "invalid" for t in turns)
    invalid -= sum(t.finish == "eos" and t.turns[-1].action.kind == "invalid" for t in trajectories)
    return {
        "em": float(np.mean([t.em for t in trajectories])),
        "f1": float(np.mean([t.f1 for t in trajectories])),
        "answer_rate": float(np.mean([t.answer is not None for t in trajectories])),
        "turns": len(turns) / n,
        "searches": sum(t.action.kind == "search" for t in turns) / n,
        "invalid_rate": invalid / max(len(turns), 1),
        "eos_rate": eos_turns / max(len(turns), 1),
        "folr_hit_rate": sum(hits.values()) / n,
        "near_miss_rate": sum(t.first_hit >= 0 and t.outcome < 1 for t in trajectories) / n,
        "response_tokens": sum(len(t.tokens) for t in turns) / n,
        "first_hit_turns": {str(k): hits[k] for k in sorted(hits)},
    }


def sample_rows(step: int, trajs, adv_BGK) -> list[dict]:
    """samples.jsonl's rows of a step: each trajectory with its outcome and turn advantages."""
    adv_rows = np.asarray(adv_BGK).reshape(len(trajs), -1)
    return [
        {"step": step, "outcome": t.outcome, "advantages": a[: len(t.turns)].tolist()} | to_json(t)
        for t, a in zip(trajs, adv_rows, strict=True)
    ]


def to_json(traj: Trajectory) -> dict:
    """A readable record of a trajectory (for the evaluation's JSONL output)."""
    return {
        "question": traj.question,
        "prompt": traj.prompt,
        "golden_answers": list(traj.golds),
        "answer": traj.answer,
        "em": traj.em,
        "f1": traj.f1,
        "first_hit": traj.first_hit,
        "num_turns": len(traj.turns),
        "finish": traj.finish,
        "turns": [
            {
                "text": t.text,
                "action": t.action.kind,
                "content": t.action.content,
                "error": t.action.error,
                "doc_ids": list(t.doc_ids),
                "observation": t.observation,
            }
            for t in traj.turns
        ],
    }


def evaluate(
    params,
    model_config,
    tokenizer,
    retriever,
    examples,
    *,
    cfg: RolloutConfig,
    batch_size=64,
    key=None,
    progress=True,
    mesh=None,
    attention_bytes=0,
):
    """One trajectory per example (greedy unless cfg samples) -> (summary, trajectories).

    Examples run in waves of ``batch_size`` rows, split over ``mesh`` (see KVCachePolicy).
    """
    key = jax.random.key(0) if key is None else key
    policy = KVCachePolicy(
        params,
        model_config,
        tokenizer,
        cfg,
        mesh=mesh,
        attention_bytes=attention_bytes,
        wave_rows=batch_size,
    )
    trajectories = []
    with tqdm(total=len(examples), desc="eval", disable=not progress, file=sys.stderr) as bar:
        for i in range(0, len(examples), batch_size):
            chunk = list(examples[i : i + batch_size])
            trajs, _ = run_episodes(
                policy,
                tokenizer,
                retriever,
                chunk,
                group_size=1,
                key=key,
                cfg=cfg,
                example_ids=range(i, i + len(chunk)),
            )
            trajectories += trajs
            bar.update(len(chunk))
    return summarize(trajectories), trajectories


def load_policy(model_dir: str, dtype=jnp.float32, *, sharding=None):
    """(model_config, params, tokenizer) from a Hugging Face Qwen2 folder."""
    from transformers import AutoTokenizer

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(
            f"--model {model_dir!r}: no such folder (a Hugging Face checkpoint)"
        )
    model_config, params = hf_io.load_hf(model_dir, dtype, sharding=sharding)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model_config, params, tokenizer


# Written by train.py beside config.json in every export: the rollout settings that its own
# evaluation used, which rollout.py then takes as its defaults for that folder.
SETTINGS_FILE = "tspo_rollout.json"


def save_settings(path, cfg: RolloutConfig, *, batch_size: int, dtype: str) -> None:
    """Writes ``path``/SETTINGS_FILE: ``cfg`` (the template as its text, not its file), the
    evaluation's batch size and compute dtype, as EvalConfig's option names."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "template_file"}
    settings |= {"batch_size": batch_size, "dtype": dtype}
    with open(os.path.join(path, SETTINGS_FILE), "w") as f:
        json.dump(settings, f, indent=1)
        f.write("\n")


def load_settings(model_dir: str) -> dict:
    """EvalConfig defaults from ``model_dir``/SETTINGS_FILE ({} when the folder has none)."""
    path = os.path.join(model_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            settings = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected an object of rollout settings")
    known = {f.name for f in dataclasses.fields(RolloutConfig)} | {"batch_size", "dtype"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{path}: unknown rollout settings {unknown}")
    return settings
