"""Multi-turn search rollouts, the environment side of TSPO, and evaluation (EM / F1).

    python rollout.py --model DIR --data FILE --corpus FILE          # embedded BM25
    python rollout.py --model DIR --data FILE --retriever-url URL    # Search-R1's server

One call of ``run_episodes`` runs B prompts x G samples as one batch of rows through the turn loop:

    prefill the prompts
    for turn k = 0 .. max_turns - 1:
        sample every live row until </search>, </answer> or EOS      (device, one while_loop)
        parse each row's action                                       (host)
        one batched retrieval for all rows that searched              (host)
        append each row's observation to its KV cache, and go on      (device, no re-prefill)

A row stops when it answers, samples EOS, or runs out of turns or context; the last turn does
not search (``force_answer`` starts it with "<answer>"). An invalid action (no tag, unclosed
tag, empty query, both tags) gets Search-R1's corrective observation, and the turn counts.
An episode starts from its data row's own prompt when it has one (Search-R1 parquet), else from
the question in ``RolloutConfig.template``.
Per trajectory the host records everything Eq. F, A and L of TSPO.md need: the token ids as
sampled, which of them were sampled (``loss_mask``) and in which turn (``turn_id``, -1 on the
prompt and observations), the sampler's log-probs, ``num_turns``, ``outcome`` and
``first_hit``; ``pack`` lays them out as [B, G, T] arrays padded to a length bucket.
"""

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

from tspo_jax import cli, data, hf_io, protocol, qwen, retrieval, sampling
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
        if "{question}" not in self.template:
            raise ValueError("template has no {question} field")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetrieverConfig:
    """Where passages come from: BM25 over a local corpus, or Search-R1's retrieval server."""

    corpus: str = option("", "Search-R1 JSONL corpus for the embedded BM25 retriever")
    retriever_url: str = option(
        "", "Search-R1 retrieval server, e.g. http://127.0.0.1:8000/retrieve, instead of --corpus"
    )
    retriever_timeout: float = option(retrieval.DEFAULT_TIMEOUT, "seconds per retrieval request")
    retriever_retries: int = option(
        retrieval.DEFAULT_RETRIES, "retries of a failed retrieval request (down, timeout, 5xx)"
    )
    retriever_max_wait: float = option(
        retrieval.DEFAULT_MAX_WAIT, "seconds a retrieval request may fail before the run stops"
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


class Timing(NamedTuple):
    sample_s: float  # device time sampling and appending (host parsing included)
    retrieval_s: float  # time inside retriever.search
    sampled_tokens: int


class KVCachePolicy:
    """The policy side of the turn loop: the sampler over one KV cache kept across turns.

    The turn loop only calls ``start``, ``extend`` and ``sample``, so another way of keeping
    context (bench/rollout.py re-prefills every turn, as Search-R1 does) or a scripted policy
    (tests) can stand in for it.

    ``mesh``: the devices the rows are split over (``rollout_mesh``; None: the default device).
    ``params`` must then be replicated on it (train.sampler_weights). A batch of fewer than
    ``batch_rows`` rows, or whose rows do not divide evenly over the devices, is padded with
    empty rows that never sample (so a last, smaller wave compiles nothing new). The cache
    starts sized for the prompts' first turn and grows by buckets (``sampling.grow``), never
    past ``max_context`` slots: every decode step attends over the whole cache, so a cache
    sized for the worst case up front would make the early turns pay for slots they do not use.
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
        batch_rows=1,
    ):
        self.params, self.model_config, self.cfg = params, model_config, cfg
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
        self.batch_rows = -(-batch_rows // self.devices) * self.devices
        rows = None if mesh is None else NamedSharding(mesh, P(mesh.axis_names))
        self.options = qwen.ForwardOptions(batch_sharding=rows, attention_bytes=attention_bytes)
        self.state, self.rows = None, 0
        self._stopping_at = {}  # stop strings -> sampling params with their table

    def _pad(self, rows: Sequence) -> list:
        """rows, then empty rows up to the padded batch (a multiple of the devices)."""
        return [*rows, *[[]] * (self._padded(len(rows)) - len(rows))]

    def _padded(self, n: int) -> int:
        return max(self.batch_rows, -(-n // self.devices) * self.devices)

    def start(self, prompts: Sequence[list[int]]) -> None:
        """Prefills the prompts into a fresh cache (the previous one is freed first)."""
        self.state, self.rows = None, len(prompts)
        first_turn = max(map(len, prompts)) + self.cfg.max_new_tokens
        slots = min(sampling.bucket_length(first_turn), self.cfg.max_context)
        self.state = sampling.init_cache(
            self.model_config,
            len(self._pad(prompts)),
            max(slots, max(map(len, prompts))),
            sharding=self.options.batch_sharding,
        )
        self.extend(prompts)

    def extend(self, rows: Sequence[list[int]]) -> None:
        """Appends each row's tokens (an observation, a forced prefix; none for some rows)."""
        tokens_BC, n_B = sampling.pad_chunk(self._pad(rows), pad_id=self.pad_id)
        self.state = sampling.grow(self.state, n_B, limit=self.cfg.max_context)
        self.state = sampling.append(
            self.params, self.model_config, self.state, tokens_BC, n_B, self.options
        )

    def sample(self, key, live, stop_strings, max_new_tokens, limit_B) -> list:
        """One turn for the live rows, each until a stop string, EOS, max_new_tokens or its
        own limit_B[b] (what is left of its context)."""
        if stop_strings not in self._stopping_at:
            stopping = self.sampling_params.with_stops(self.tokenizer, stop_strings)
            self._stopping_at[stop_strings] = stopping
        live, limit_B = np.asarray(live, bool), np.minimum(limit_B, max_new_tokens)
        pad = self._padded(len(live)) - len(live)
        live, limit_B = np.pad(live, (0, pad)), np.pad(np.where(live, limit_B, 0), (0, pad))
        if pad and key.ndim == 1:
            key = jnp.concatenate([key, jnp.stack([key[0]] * pad)])
        self.state = sampling.grow(self.state, limit_B, limit=self.cfg.max_context)
        self.state, samples = sampling.sample_turn(
            self.params,
            self.model_config,
            self.state,
            key,
            self.tokenizer,
            max_new_tokens=max_new_tokens,
            sampling_params=self._stopping_at[stop_strings],
            active_B=live,
            limit_B=limit_B,
            options=self.options,
        )
        return samples[: self.rows]


def rollout_mesh(devices=None) -> Mesh:
    """A one-axis mesh over this process's devices (``jax.local_devices()`` by default): the
    rows of a rollout wave are split over it."""
    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("rows",))


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
) -> tuple[list[Trajectory], Timing]:
    """Runs every example ``group_size`` times through the turn loop (see the module docstring).

    The rows go through the loop in waves of at most ``wave_rows`` rows (whole groups; default:
    all rows in one wave), one after the other, so memory is bounded by the wave. Sample g of
    example i draws its tokens from the key fold_in(fold_in(key, example_ids[i]), g), and a
    row's cache holds only its own tokens, so a trajectory depends neither on which other rows
    share its wave nor on the number of devices: processes that each roll out a share of the
    prompts sample what one process would. example_ids defaults to 0 .. len(examples) - 1.

    Returns the trajectories in (example, sample) order and where the time went.
    """
    ids = range(len(examples)) if example_ids is None else example_ids
    if len(ids) != len(examples):
        raise ValueError(f"{len(ids)} example_ids for {len(examples)} examples")
    wave_rows = wave_rows or len(examples) * group_size
    if wave_rows % group_size:
        raise ValueError(f"a wave of {wave_rows} rows is not whole groups of {group_size}")
    per_wave = wave_rows // group_size
    trajectories, timings = [], []
    for i in range(0, len(examples), per_wave):
        trajs, timing = _wave(
            policy,
            tokenizer,
            retriever,
            examples[i : i + per_wave],
            ids[i : i + per_wave],
            group_size=group_size,
            key=key,
            cfg=cfg,
        )
        trajectories += trajs
        timings.append(timing)
    return trajectories, Timing(*(sum(t) for t in zip(*timings, strict=True)))


def _wave(policy, tokenizer, retriever, examples, ids, *, group_size, key, cfg):
    """The turn loop over one wave of rows (run_episodes' docstring)."""
    rows = [ex for ex in examples for _ in range(group_size)]
    N = len(rows)
    row_keys = jax.vmap(lambda i, g: jax.random.fold_in(jax.random.fold_in(key, i), g))(
        np.repeat(np.asarray(ids, np.uint32), group_size),
        np.tile(np.arange(group_size, dtype=np.uint32), len(ids)),
    )
    texts = [prompt_text(q, tokenizer, cfg) for q in rows]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    longest = max(map(len, prompts))
    if longest >= cfg.max_context:
        raise ValueError(f"a prompt of {longest} tokens does not fit max_context={cfg.max_context}")
    forced = tokenizer.encode(protocol.FORCED_ANSWER_PREFIX, add_special_tokens=False)

    t0, retrieval_s, sampled = time.perf_counter(), 0.0, 0
    policy.start(prompts)
    length = np.array([len(p) for p in prompts])  # real tokens of each row so far
    turns: list[list[Turn]] = [[] for _ in range(N)]
    finish = ["turns"] * N
    live = np.ones(N, bool)
    for k in range(cfg.max_turns):
        last = k == cfg.max_turns - 1
        prefix = forced if (last and cfg.force_answer) else []
        if prefix:
            policy.extend([prefix if a else [] for a in live])
            length += len(prefix) * live
        samples = policy.sample(
            sampling.fold_in_rows(row_keys, k),
            live,
            protocol.ANSWER_STOP if prefix else protocol.STOP_STRINGS,
            cfg.max_new_tokens,
            cfg.max_context - length,
        )
        head = protocol.FORCED_ANSWER_PREFIX if prefix else ""
        for b in np.flatnonzero(live):  # hold each row to max_context real tokens
            budget = cfg.max_context - length[b]
            if len(samples[b].tokens) >= budget:
                kept = samples[b].tokens[:budget]
                samples[b] = samples[b]._replace(
                    tokens=kept, logps=samples[b].logps[:budget], text=tokenizer.decode(kept)
                )
                finish[b] = "context"
            length[b] += len(samples[b].tokens)
        actions = {b: protocol.parse_action(head + samples[b].text) for b in np.flatnonzero(live)}
        searching = [
            b
            for b, a in actions.items()
            if a.kind == "search" and not last and finish[b] == "turns"
        ]
        t1 = time.perf_counter()
        found = (
            retriever.search([actions[b].content for b in searching], cfg.passages)
            if searching
            else []
        )
        retrieval_s += time.perf_counter() - t1
        passages = dict(zip(searching, found, strict=True))
        obs_tokens = [[] for _ in range(N)]
        for b, action in actions.items():
            s = samples[b]
            sampled += len(s.tokens)
            obs = None
            if action.kind == "answer":
                finish[b] = "answer"
            elif s.stop == "eos":
                finish[b] = "eos"
            elif b in passages:
                obs = protocol.format_observation(
                    passages[b], tokenizer=tokenizer, max_tokens=cfg.max_obs_tokens
                )
            elif not last and finish[b] == "turns":
                obs = protocol.INVALID_ACTION_OBSERVATION
            if obs is not None:
                obs_tokens[b] = tokenizer.encode(obs, add_special_tokens=False)
                if length[b] + len(obs_tokens[b]) >= cfg.max_context:
                    obs, obs_tokens[b], finish[b] = None, [], "context"
            length[b] += len(obs_tokens[b])
            turns[b].append(
                Turn(
                    prefix=list(prefix),
                    tokens=s.tokens,
                    logps=s.logps,
                    text=head + s.text,
                    action=action,
                    doc_ids=tuple(p.id for p in passages.get(b, [])),
                    observation=obs,
                    obs_tokens=obs_tokens[b],
                )
            )
            live[b] = obs is not None
        if not live.any():
            break
        policy.extend(obs_tokens)
    timing = Timing(time.perf_counter() - t0 - retrieval_s, retrieval_s, sampled)
    scored = [_score(*args, cfg) for args in zip(rows, texts, prompts, turns, finish, strict=True)]
    return scored, timing


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
    if "{question}" not in template:
        raise ValueError(f"--template-file {path!r}: the template has no {{question}} field")
    return dataclasses.replace(cfg, template=template)


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
) -> Batch:
    """[B, G, T] arrays for the loss, T = ``length`` or the bucket of the longest sequence."""
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
    return Batch(
        tokens_BGT=shape(out["tokens"]),
        mask_BGT=shape(out["mask"]),
        loss_mask_BGT=shape(out["loss_mask"]),
        turn_id_BGT=shape(out["turn_id"]),
        logp_BGT=shape(out["logp"]),
        outcome_BG=shape(np.array([t.outcome for t in trajectories], np.float32)),
        first_hit_BG=shape(np.array([t.first_hit for t in trajectories], np.int32)),
        num_turns_BG=shape(np.array([len(t.turns) for t in trajectories], np.int32)),
    )


def summarize(trajectories: Sequence[Trajectory]) -> dict:
    """Evaluation numbers: EM, F1, turns, searches, invalid actions, FOLR hits and where.

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
        "near_miss_rate": float(np.mean([t.first_hit >= 0 and t.em < 1 for t in trajectories])),
        "response_tokens": sum(len(t.tokens) for t in turns) / n,
        "first_hit_turns": {str(k): hits[k] for k in sorted(hits)},
    }


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
        batch_rows=batch_size,
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluate a policy on a question set with retrieval (greedy by default). A folder that
    train.py exported carries the rollout settings of the run (tspo_rollout.json): they are the
    defaults, each still overridable on the command line."""

    model: str = option("", "Hugging Face checkpoint folder of the policy")
    data: str = option("", "questions: Search-R1 parquet, or JSONL with question/golden_answers")
    retriever: RetrieverConfig = RetrieverConfig()
    out: str = option("", "write trajectories here as JSONL (empty: not written)")
    limit: int = option(0, "evaluate the first N questions only (0: all)")
    batch_size: int = option(64, "questions per rollout batch")
    dtype: str = option("float32", "parameter and compute dtype", choices=("float32", "bfloat16"))
    seed: int = option(0, "sampling seed (when not greedy)")
    agent: RolloutConfig = RolloutConfig(greedy=True)

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model is required")
        if not self.data:
            raise ValueError("--data is required")
        if not (self.retriever.corpus or self.retriever.retriever_url):
            raise ValueError("give exactly one of --corpus and --retriever-url")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


def main(argv=None):
    settings = lambda given: load_settings(given["model"]) if given.get("model") else {}
    cfg = cli.parse(EvalConfig, argv, defaults=settings)
    cfg = dataclasses.replace(cfg, agent=read_template_file(cfg.agent))
    print("tspo_jax evaluation\n" + cli.describe(cfg), file=sys.stderr)
    server = connect(cfg.retriever)  # before the model loads: down, a wrong path, ...
    mesh = rollout_mesh()  # the rows of each batch split over this host's devices
    model_config, params, tokenizer = load_policy(
        cfg.model, getattr(jnp, cfg.dtype), sharding=NamedSharding(mesh, P())
    )
    retriever = server or retrieval.BM25Retriever(cfg.retriever.corpus)
    examples = data.load_examples(cfg.data)
    if cfg.limit:
        examples = examples[: cfg.limit]
    summary, trajectories = evaluate(
        params,
        model_config,
        tokenizer,
        retriever,
        examples,
        cfg=cfg.agent,
        batch_size=cfg.batch_size,
        key=jax.random.key(cfg.seed),
        mesh=mesh,
    )
    if cfg.out:
        with open(cfg.out, "w") as f:
            for t in trajectories:
                f.write(json.dumps(to_json(t)) + "\n")
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    cli.run(main)
