"""Demonstrations for the warm start: trajectories of a scripted policy, some flawed on purpose.

Each is a trajectory of `rollout.run_episodes`, the turn loop of RL and evaluation, with a
scripted policy in place of the model: the prompt of `RolloutConfig.template`, then per turn the
policy's text, `<search> entity relation </search>` or `<answer> name </answer>` (no <think>
content, to keep sequences short; no eos, as the episode ends at </answer>), and after each
search the loop's observation of the real BM25 top-k of its demo world. It is kept as a list of
(text, trained) segments, to be tokenized one by one as a rollout does.

The one flaw is one of decision, answering too early: `early_answer` answers one hop before the
last, with the entity it just found (by default in 60% of multi-hop demonstrations: more than
half, so that the greedy warm-started policy answers after its first search, while sampling
still goes on searching 40% of the time). Reading errors are left to the warm start's own
imperfection: demonstrations that copied the wrong name a quarter of the time made a tiny policy
copy the right one far less often (on held-out names, 0.16 against 0.95).
"""

import json
import os
import random
import re
from collections.abc import Sequence
from typing import NamedTuple

import jax

from tspo_jax import rollout
from tspo_jax.data import Example
from tspo_jax.protocol import DEFAULT_TEMPLATE
from tspo_jax.retrieval import Retriever
from tspo_jax.sampling import TurnSample
from tspo_jax.toyworld.world import RELATIONS, Fact, Hop, Question, ToyWorldConfig, World


class Demonstration(NamedTuple):
    question: str
    golden_answers: tuple[str, ...]
    flaw: str  # "early_answer", "early_read" (one hop early, right), or "" (the whole chain)
    segments: tuple[tuple[str, bool], ...]  # (text, trained): prompt and observations are not


# ---------------------------------------------------------------------------------------------
# Scripted policies: a script is the hop after whose search it answers (len(chain) - 1: the
# whole chain, the oracle; 0: answer what the first search finds, the shortcut baseline). They
# play through rollout.run_episodes, the turn loop of RL and evaluation, so that a demonstration
# is the text a rollout produces by construction.

_PASSAGE_TEXT = re.compile(r"Doc \d+\(Title: .*?\) (.*?)(?:</information>)?$", re.MULTILINE)


class ScriptedReader:
    """A policy for rollout.run_episodes (``start``, ``extend``, ``sample``, as KVCachePolicy)
    that plays row b's question ``questions[b]``: it searches "<entity> <relation>" hop by hop,
    reads each hop's answer out of the observation the loop appended (`_read`), and answers
    after the search of hop ``stops[b]``: the entity it read last or, with ``reads[b]``, the
    country its last passage names (ToyWorldConfig.country_in_passage) when there is one.
    ``facts`` are the passages its retriever searches."""

    def __init__(self, tokenizer, questions: Sequence[Question], stops, facts, reads=None):
        self.tokenizer, self.questions, self.stops = tokenizer, questions, stops
        self.reads = reads or [False] * len(questions)
        self.facts = {f.text: f for f in facts}  # a fact's text names its subject and object

    def start(self, prompts):
        self.hop = [0] * len(prompts)
        self.entity = [q.chain[0].entity for q in self.questions]
        self.country = [""] * len(prompts)  # the country the last passage read names
        self.seen = [""] * len(prompts)  # the text appended after the row's last turn

    def extend(self, rows, restart=None):  # one wave of all rows: never restarted
        for b, ids in enumerate(rows):
            self.seen[b] = self.tokenizer.decode(ids)

    def sample(self, key, live, stops, max_new_tokens, limit_B):
        out = []
        for b, q in enumerate(self.questions):
            if not live[b]:
                out.append(TurnSample([], [], "", "inactive", None))
                continue
            hop = self.hop[b]
            if hop:  # read the results of the last search
                shown = [self.facts[t] for t in _PASSAGE_TEXT.findall(self.seen[b])]
                searched = (q.chain[hop - 1].relation, self.entity[b])
                fact = next((f for f in shown if (f.relation, f.subject) == searched), None)
                self.country[b] = fact.country if fact else ""
                self.entity[b] = _read(shown, q.chain[hop - 1], self.entity[b])
            if hop > self.stops[b]:
                read_on = self.reads[b] and self.country[b]  # the answer in sight, read off
                tag, content = "answer", self.country[b] if read_on else self.entity[b]
            else:
                tag, content = "search", f"{self.entity[b]} {q.chain[hop].relation}"
            self.hop[b] += 1
            text = f"<{tag}> {content} </{tag}>"
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            out.append(TurnSample(ids, [0.0] * len(ids), text, "stop", f"</{tag}>"))
        return rollout.Sampled(out, steps=0, rows=0)  # no decoding


def _read(shown: Sequence[Fact], hop: Hop, entity: str) -> str:
    """The name a reader takes from the search results for (entity, hop.relation): the fact's
    object if it is among them, else the object of the best-ranked passage whose object is of
    the same kind, else the first passage's subject (the entity itself if nothing was found)."""
    fact = next((f for f in shown if (f.relation, f.subject) == (hop.relation, entity)), None)
    if fact is not None:
        return fact.object
    kind = RELATIONS[hop.relation].object
    candidates = [f.object for f in shown if RELATIONS[f.relation].object == kind]
    if candidates:
        return candidates[0]
    return shown[0].subject if shown else entity


def play(
    questions: Sequence[Question],
    stops: Sequence[int],
    facts: Sequence[Fact],
    retriever: Retriever,
    tokenizer,
    *,
    k: int,
    template: str = DEFAULT_TEMPLATE,
    reads: Sequence[bool] | None = None,
) -> list[rollout.Trajectory]:
    """Each question played by `ScriptedReader` through the turn loop, against the retriever
    over ``facts`` (top ``k``); trajectories in question order."""
    cfg = rollout.RolloutConfig(
        max_turns=max(len(q.chain) for q in questions) + 1, passages=k, template=template
    )
    examples = [Example(q.question, (q.answer,), "toyworld", i) for i, q in enumerate(questions)]
    policy = ScriptedReader(tokenizer, questions, stops, facts, reads)
    key = jax.random.key(0)  # unused by the script
    return rollout.run_episodes(
        policy, tokenizer, retriever, examples, group_size=1, key=key, cfg=cfg
    )[0]


def demo_stop(q: Question, cfg: ToyWorldConfig, rng: random.Random) -> int:
    """The oracle's script, or one hop early at the rate cfg.early_answer gives."""
    hops = len(q.chain)
    return hops - 2 if rng.random() < cfg.early_answer[hops - 1] else hops - 1


def episode_stats(questions: Sequence[Question], played: Sequence[rollout.Trajectory]) -> dict:
    """Exact match, near-miss rate (gold retrieved, answered wrong) and hit rate, overall and
    by number of hops."""

    def summary(rows):
        n = max(1, len(rows))
        em = [t.em == 1.0 for t in rows]
        hit = [t.first_hit >= 0 for t in rows]
        near_miss = [h and not m for h, m in zip(hit, em, strict=True)]
        return {
            "n": len(rows),
            "em": round(sum(em) / n, 4),
            "near_miss": round(sum(near_miss) / n, 4),
            "hit": round(sum(hit) / n, 4),
        }

    out = {"all": summary(played)}
    for hops in (1, 2, 3):
        rows = [t for q, t in zip(questions, played, strict=True) if len(q.chain) == hops]
        out[f"{hops}_hop"] = summary(rows)
    return out


# ---------------------------------------------------------------------------------------------
# Demonstrations


def demonstration(traj: rollout.Trajectory, flaw: str) -> Demonstration:
    """The trajectory's text as (text, trained) segments: prompt, then turns and observations."""
    segments = [(traj.prompt, False)]
    for turn in traj.turns:
        segments.append((turn.text, True))
        if turn.observation is not None:
            segments.append((turn.observation, False))
    return Demonstration(traj.question, traj.golds, flaw, tuple(segments))


def make_demonstrations(
    world: World, retrievers: Sequence[Retriever], tokenizer, cfg: ToyWorldConfig
) -> tuple[list[Demonstration], dict]:
    """Demonstrations for world.demo, early at the rates of cfg, and their `episode_stats`.
    `retrievers[i]` searches the corpus of demo world i (world.demo_facts[i])."""
    rng = random.Random(f"{cfg.world_seed}/demos")
    stops = [demo_stop(q, cfg, rng) for q in world.demo]
    if cfg.early_reads:  # (drawn apart, so that the stops are those of a world without them)
        reads_rng = random.Random(f"{cfg.world_seed}/demo-reads")
        reads = [reads_rng.random() < cfg.early_reads for _ in world.demo]
    else:
        reads = [False] * len(world.demo)
    demos, questions, played = [], [], []
    for i, (facts, retriever) in enumerate(zip(world.demo_facts, retrievers, strict=True)):
        picked = [j for j, q in enumerate(world.demo) if q.split == f"demo{i}"]
        qs, their_stops = [world.demo[j] for j in picked], [stops[j] for j in picked]
        trajs = play(
            qs, their_stops, facts, retriever, tokenizer, k=cfg.demo_top_k, template=cfg.template,
            reads=[reads[j] for j in picked],
        )  # fmt: skip
        for q, stop, traj in zip(qs, their_stops, trajs, strict=True):
            flaw = "" if stop == len(q.chain) - 1 else "early_answer"
            flaw = "early_read" if flaw and traj.em == 1.0 else flaw  # read off the evidence
            demos.append(demonstration(traj, flaw))
        questions += qs
        played += trajs
    return demos, episode_stats(questions, played)


def load_demonstrations(path: str | os.PathLike) -> list[Demonstration]:
    """demos.jsonl as written by build()."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            segments = tuple((text, bool(trained)) for text, trained in row["segments"])
            out.append(
                Demonstration(row["question"], tuple(row["golden_answers"]), row["flaw"], segments)
            )
    return out
