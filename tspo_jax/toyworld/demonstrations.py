"""Demonstrations for the warm start: trajectories of a scripted policy, some flawed on purpose.

Each is in the exact text a rollout produces: the prompt of
`protocol.build_prompt(question, template=cfg.template)`, then per turn the policy's text,
`<search> entity relation </search>` or `<answer> name </answer>` (no <think> content, to keep
sequences short; no eos, as the episode ends at </answer>), and after each search the
observation `protocol.format_observation` of the real BM25 top-k of its demo world. Each is a
list of (text, trained) segments, to be tokenized one by one as a rollout does (tests check the
text against the protocol's functions).

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
from collections.abc import Sequence
from typing import NamedTuple

from tspo_jax.protocol import (
    DEFAULT_TEMPLATE,
    build_prompt,
    exact_match,
    first_hit,
    format_observation,
)
from tspo_jax.retrieval import Passage, Retriever
from tspo_jax.toyworld.world import RELATIONS, Fact, Hop, Question, ToyWorldConfig, World


class Episode(NamedTuple):
    """What a scripted policy did for one question."""

    question: Question
    flaw: str  # "early_answer", or "" for a run that followed the whole chain
    turns: tuple[str, ...]  # the policy's text, one string a turn
    observations: tuple[str, ...]  # the observation after each search turn
    answer: str


class Demonstration(NamedTuple):
    question: str
    golden_answers: tuple[str, ...]
    flaw: str  # "early_answer", or "" for a correct demonstration
    segments: tuple[tuple[str, bool], ...]  # (text, trained): prompt and observations are not


# ---------------------------------------------------------------------------------------------
# Scripted policies: a script is the hop after whose search it answers (len(chain) - 1: the
# whole chain, the oracle; 0: answer what the first search finds, the shortcut baseline).


def _read(passages: list[Passage], facts: Sequence[Fact], hop: Hop, entity: str) -> str:
    """The name a reader takes from the search results for (entity, hop.relation): the fact's
    object if it is among them, else the object of the best-ranked passage whose object is of
    the same kind, else the first passage's subject (the entity itself if nothing was found)."""
    shown = [facts[int(p.id)] for p in passages]
    fact = next((f for f in shown if (f.relation, f.subject) == (hop.relation, entity)), None)
    if fact is not None:
        return fact.object
    kind = RELATIONS[hop.relation].object
    candidates = [f.object for f in shown if RELATIONS[f.relation].object == kind]
    if candidates:
        return candidates[0]
    return shown[0].subject if shown else entity


def run_scripts(
    questions: Sequence[Question],
    stops: Sequence[int],
    facts: Sequence[Fact],
    retriever: Retriever,
    *,
    k: int,
) -> list[Episode]:
    """Plays each question, answering after the search of hop ``stops[i]``, against the
    retriever, all questions in lockstep (one batched search a hop). Queries are
    "<entity> <relation>"."""
    n = len(questions)
    entity = [q.chain[0].entity for q in questions]
    turns = [[] for _ in range(n)]
    observations = [[] for _ in range(n)]
    answers: list[str | None] = [None] * n
    for hop in range(max((len(q.chain) for q in questions), default=0)):
        active = [i for i in range(n) if answers[i] is None]
        queries = [f"{entity[i]} {questions[i].chain[hop].relation}" for i in active]
        for i, query, passages in zip(active, queries, retriever.search(queries, k), strict=True):
            turns[i].append(f"<search> {query} </search>")
            observations[i].append(format_observation(passages))
            entity[i] = _read(passages, facts, questions[i].chain[hop], entity[i])
            if hop == stops[i]:
                answers[i] = entity[i]
                turns[i].append(f"<answer> {entity[i]} </answer>")
    return [
        Episode(q, "early_answer" if stop < len(q.chain) - 1 else "", tuple(t), tuple(o), a)
        for q, stop, t, o, a in zip(questions, stops, turns, observations, answers, strict=True)
    ]


def demo_stop(q: Question, cfg: ToyWorldConfig, rng: random.Random) -> int:
    """The oracle's script, or one hop early at the rate cfg.early_answer gives."""
    hops = len(q.chain)
    return hops - 2 if rng.random() < cfg.early_answer[hops - 1] else hops - 1


def episode_stats(episodes: Sequence[Episode]) -> dict:
    """Exact match, near-miss rate (gold retrieved, answered wrong) and hit rate, overall and
    by number of hops."""

    def summary(eps):
        n = max(1, len(eps))
        em = [exact_match(e.answer, [e.question.answer]) == 1.0 for e in eps]
        hit = [first_hit(e.observations, [e.question.answer]) >= 0 for e in eps]
        near_miss = [h and not m for h, m in zip(hit, em, strict=True)]
        return {
            "n": len(eps),
            "em": round(sum(em) / n, 4),
            "near_miss": round(sum(near_miss) / n, 4),
            "hit": round(sum(hit) / n, 4),
        }

    out = {"all": summary(episodes)}
    for hops in (1, 2, 3):
        out[f"{hops}_hop"] = summary([e for e in episodes if len(e.question.chain) == hops])
    return out


# ---------------------------------------------------------------------------------------------
# Demonstrations


def demonstration(episode: Episode, template: str = DEFAULT_TEMPLATE) -> Demonstration:
    """The episode as the text a rollout produces: prompt, then turns and observations."""
    segments = [(build_prompt(episode.question.question, template=template), False)]
    for k, turn in enumerate(episode.turns):
        segments.append((turn, True))
        if k < len(episode.observations):
            segments.append((episode.observations[k], False))
    q = episode.question
    return Demonstration(q.question, (q.answer,), episode.flaw, tuple(segments))


def make_demonstrations(
    world: World, retrievers: Sequence[Retriever], cfg: ToyWorldConfig
) -> tuple[list[Demonstration], list[Episode]]:
    """Demonstrations for world.demo, early at the rates of cfg, and their episodes.
    `retrievers[i]` searches the corpus of demo world i (world.demo_facts[i])."""
    rng = random.Random(f"{cfg.world_seed}/demos")
    stops = [demo_stop(q, cfg, rng) for q in world.demo]
    episodes = []
    for i, (facts, retriever) in enumerate(zip(world.demo_facts, retrievers, strict=True)):
        picked = [j for j, q in enumerate(world.demo) if q.split == f"demo{i}"]
        questions, their_stops = [world.demo[j] for j in picked], [stops[j] for j in picked]
        episodes += run_scripts(questions, their_stops, facts, retriever, k=cfg.demo_top_k)
    return [demonstration(e, cfg.template) for e in episodes], episodes


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
