"""The toy world on disk: `build(out_dir, cfg)` writes, once (later calls with the same
settings reuse it):

    corpus.jsonl    every passage, Search-R1's format: {"id", "contents": "\\"Title\\"\\ntext"}
    train.jsonl     RL questions: {"question", "golden_answers", "hops", "chain", ...}
    heldout.jsonl   evaluation questions about a sub-world that training never sees
    demos.jsonl     demonstrations for a supervised warm start, as (text, trained) segments
    demo_corpora/   <i>.jsonl: the corpus of demo world i, which its demonstrations searched
    tokenizer/      a byte-level BPE for this world, a Hugging Face tokenizer folder
    world.json      the settings, their fingerprint and statistics of what was built

With the defaults: about 13,200 passages (10,600 training world, 2,600 held-out), 2,000 RL and
500 held-out questions (1, 2, 3 hops in proportion 1 : 2 : 2), 16,000 demonstrations from 16
demo worlds of 2,600 passages each, a vocabulary of 1,030 tokens, and about 87, 159 and 230
tokens for a whole trajectory with 1, 2 and 3 searches (prompt "Question: ...", top 3). On
held-out questions the scripted oracle (BM25 top 3) scores exact match 1.0 and answering after
the first search 0.2 (the 1-hop share); the demonstrations score 0.52. world.json has these
numbers for the world built.
"""

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from tspo_jax import cache
from tspo_jax.protocol import build_prompt, format_observation
from tspo_jax.retrieval import BM25Retriever, Passage
from tspo_jax.toyworld.demonstrations import (
    Demonstration,
    episode_stats,
    make_demonstrations,
    play,
)
from tspo_jax.toyworld.tokenizer import EOS_TOKEN, train_tokenizer
from tspo_jax.toyworld.world import (
    ToyWorldConfig,
    corpus_line,
    make_world,
    question_record,
    templates,
)

# Bump when the files build() writes change for the same settings, so old caches are rebuilt.
_FORMAT_VERSION = 3
STAMP = "world.json"


class ToyWorldPaths(NamedTuple):
    root: Path
    corpus: Path
    train: Path
    heldout: Path
    demos: Path
    tokenizer: Path
    info: Path
    demo_corpora: Path  # folder: <i>.jsonl is the corpus of demo world i


def _paths(root: Path) -> ToyWorldPaths:
    return ToyWorldPaths(
        root,
        root / "corpus.jsonl",
        root / "train.jsonl",
        root / "heldout.jsonl",
        root / "demos.jsonl",
        root / "tokenizer",
        root / STAMP,
        root / "demo_corpora",
    )


# Settings added after worlds were first cached; a world that leaves them at their defaults is
# the world it was before them.
_ADDED_LATER = ("country_in_passage", "early_reads")
_DEFAULTS = dataclasses.asdict(ToyWorldConfig())


def world_fingerprint(cfg: ToyWorldConfig) -> str:
    """Changes with the settings, the file format, and the protocol's prompt and observation
    text (which the demonstrations contain)."""
    probe = [Passage("0", '"T"', "x\ny.", 0.0), Passage("1", "U", "", 0.0)]
    settings = dataclasses.asdict(cfg)
    for name in _ADDED_LATER:  # at their defaults: as before they existed (caches stay valid)
        if settings[name] == _DEFAULTS[name]:
            del settings[name]
    return cache.fingerprint(
        _FORMAT_VERSION, settings, build_prompt("Q?"), format_observation(probe)
    )


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")


def _token_stats(tokenizer, demos: Sequence[Demonstration]) -> dict:
    texts = [t for d in demos for t, _ in d.segments]
    lengths = iter(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    by_hops: dict[int, list[int]] = {}
    for d in demos:
        n = sum(next(lengths) for _ in d.segments)
        searches = sum(t.startswith("<search>") for t, trained in d.segments if trained)
        by_hops.setdefault(searches, []).append(n)
    return {
        f"{s}_searches": {"mean": round(sum(v) / len(v), 1), "max": max(v)}
        for s, v in sorted(by_hops.items())
    }


def _write_world(root: Path, cfg: ToyWorldConfig) -> dict:
    """Writes the world's files into root; returns world.json's contents."""
    paths = _paths(root)
    world = make_world(cfg)
    _write_jsonl(paths.corpus, (corpus_line(f) for f in world.facts))
    paths.demo_corpora.mkdir()
    for i, corpus in enumerate(world.demo_facts):
        _write_jsonl(paths.demo_corpora / f"{i}.jsonl", (corpus_line(f) for f in corpus))
    _write_jsonl(paths.train, (question_record(q) for q in world.train))
    _write_jsonl(paths.heldout, (question_record(q) for q in world.heldout))
    tokenizer = train_tokenizer(templates(cfg))
    tokenizer.save_pretrained(paths.tokenizer)

    retriever = BM25Retriever(paths.corpus)
    demo_retrievers = [
        BM25Retriever(paths.demo_corpora / f"{i}.jsonl") for i in range(cfg.demo_worlds)
    ]
    demos, demo_stats = make_demonstrations(world, demo_retrievers, tokenizer, cfg)
    _write_jsonl(
        paths.demos,
        (
            {
                "question": d.question,
                "golden_answers": list(d.golden_answers),
                "flaw": d.flaw,
                "segments": [[t, trained] for t, trained in d.segments],
            }
            for d in demos
        ),
    )
    heldout = list(world.heldout)
    whole_chain = [len(q.chain) - 1 for q in heldout]
    oracle = play(heldout, whole_chain, world.facts, retriever, tokenizer, k=cfg.demo_top_k)
    shortcut = play(
        heldout, [0] * len(heldout), world.facts, retriever, tokenizer, k=cfg.demo_top_k
    )
    return {
        "config": dataclasses.asdict(cfg),
        "eos_token": EOS_TOKEN,
        "stats": {
            "passages": {
                "train": sum(f.split == "train" for f in world.facts),
                "heldout": sum(f.split == "heldout" for f in world.facts),
                "demo": sum(map(len, world.demo_facts)),
            },
            "questions": {
                split: dict(sorted(Counter(len(q.chain) for q in qs).items()))
                for split, qs in [
                    ("train", world.train),
                    ("demo", world.demo),
                    ("heldout", world.heldout),
                ]
            },
            "vocab_size": len(tokenizer),
            "demo_flaws": dict(sorted(Counter(d.flaw for d in demos).items())),
            "demo_episodes": demo_stats,
            "heldout_oracle": episode_stats(heldout, oracle),
            "heldout_first_search": episode_stats(heldout, shortcut),
            "demo_tokens": _token_stats(tokenizer, demos),
        },
    }


def build(out_dir: str | os.PathLike, cfg: ToyWorldConfig | None = None) -> ToyWorldPaths:
    """Writes the world of cfg (default: ToyWorldConfig()) to out_dir, atomically
    (tspo_jax/cache.py), and returns its paths; returns at once if out_dir already holds it."""
    cfg = cfg or ToyWorldConfig()
    write = lambda tmp: _write_world(tmp, cfg)
    return _paths(cache.build_folder(out_dir, world_fingerprint(cfg), write, stamp=STAMP))
