"""A toy world in which TSPO can be seen working end to end, on one CPU, with no downloads.

`build(out_dir, cfg)` writes, once (later calls with the same settings reuse it):
    corpus.jsonl    every passage, Search-R1's format: {"id", "contents": "\\"Title\\"\\ntext"}
    train.jsonl     RL questions: {"question", "golden_answers", "hops", "chain", ...}
    heldout.jsonl   evaluation questions about a sub-world that training never sees
    demos.jsonl     demonstrations for a supervised warm start, as (text, trained) segments
    demo_corpora/   <i>.jsonl: the corpus of demo world i, which its demonstrations searched
    tokenizer/      a byte-level BPE for this world, a Hugging Face tokenizer folder
    world.json      the settings, their fingerprint and statistics of what was built

The world
---------
Invented countries, cities, people, works and companies, tied by five relations. Each fact is
one short passage titled by its subject, and the relation's name is the word a search needs;
the answer is the name that follows it:

    born     person  -> city       "Vasfol was born in Daskus."
    country  city    -> country    "Daskus is a city in the country Fundi."
    author   work    -> person     "Danker has the author Vasfol."
    founder  company -> person     "Vurpis has the founder Kolzen."
    based    company -> city       "Vurpis is based in Kerper."

Distractor passages put a wrong candidate of the same kind next to each fact, in the same
search results: "Vasfol lived for some years in Folbo.", "Vasfol once met Mumul in Dofil.",
"Daskus lies close to the border with Folzun.", "Mumul wrote a short review of Danker.",
"The story of Danker is set in Dofil.", "Gilden worked at Vurpis.", "Vurpis expanded to
Folbo.". A search for "Vasfol born" (entity, then relation) ranks the fact first and
distractors next: their lengths are chosen so that BM25 does, for every hop of every question
(tests check it).

Questions follow chains of one to three relations from their subject, e.g. "Which country was
the author of Danker born in?" is author -> born -> country: three searches, each naming the
entity that the previous one found, and an answer. Each question carries its chain (entity,
relation, answer and supporting passage of every hop) as metadata.

Why held-out questions need reading
-----------------------------------
Sub-worlds are generated alike and share no name and no fact: the training world (RL
questions), the held-out world (evaluation questions) and `demo_worlds` small demo worlds (the
demonstrations). A policy cannot answer a held-out question from what it memorized; it has to
search, read the right passage and copy a name it has never seen. Training and held-out worlds
share one corpus, as one retriever serves both; every entity is named in at least three
passages of its own sub-world, so a search naming it ranks no passage of the other in the top 3.
Each demo world has a corpus of its own.

The demonstrations come from many small worlds of fresh names, not from the training world,
because a tiny policy learns what is cheapest: on demonstrations that keep naming the same few
hundred cities and 24 countries it learns those names (and facts) by heart and never learns to
copy (measured: copy accuracy on held-out names stayed under 0.3); when no name recurs, copying
from the observation is the only way to lower the loss.

Every name is one word of NAME_SYLLABLES syllables from one inventory (an onset, a vowel and an
optional coda: 250 syllables), so a held-out name is a new sequence of syllables that training
used everywhere, and the end of a name is where its last syllable is.

The tokenizer
-------------
A byte-level BPE (GPT-2 / Qwen2 style) trained offline on the world's fixed text (the protocol's
prompts, Search-R1's and the demonstrations' template, the corrective message, every passage
and question template, the observation format) and on the syllable inventory, not on the names
themselves. Merges that would join two syllables are dropped, so a name is always its syllables
("ĠVas", "fol"), held-out names included, and every token of held-out text occurs in training
text. Most other words of the fixed text are one token. The tags <think>, </think>, <search>,
</search>, <answer>, </answer>, <information> and </information> are single added tokens that
decode as text; <|endoftext|>, <|im_start|> and <|im_end|> are special tokens. eos (and pad)
is <|endoftext|>, as in Qwen2.5 base models, which this plain-text protocol stands in for.

Demonstrations
--------------
Trajectories of a scripted policy, in the exact text a rollout produces: the prompt of
`protocol.build_prompt(question, template=cfg.template)`, then per turn the policy's text,
`<search> entity relation </search>` or `<answer> name </answer>` (no <think> content, to keep
sequences short; no eos, as the episode ends at </answer>), and after each search the
observation `protocol.format_observation` of the real BM25 top-k of its demo world. Each is a
list of (text, trained) segments, to be tokenized one by one as a rollout does. Some are flawed
on purpose (rates in `ToyWorldConfig`), so that a warm-started policy is imperfect in ways RL
can fix:
- early_answer: answers one hop before the last, with the entity it just found (by default
  in 60% of multi-hop demonstrations: more than half, so that the greedy warm-started policy
  answers after its first search, while sampling still goes on searching 40% of the time);
- wrong_entity: at an intermediate hop, follows the candidate of a distractor passage;
- wrong_passage: at the last hop, answers from a distractor passage (a near-miss: the gold
  answer was retrieved, in the same observation).
The last two are off by default: copying the wrong name a quarter of the time made a tiny
policy copy the right one far less often (on held-out names, 0.16 against 0.95), so reading
errors are left to the warm start's own imperfection, and the designed flaw is one of
decision, answering too early.

With the defaults: about 13,200 passages (10,600 training world, 2,600 held-out), 2,000 RL and
500 held-out questions (1, 2, 3 hops in proportion 1 : 2 : 2), 16,000 demonstrations from 16
demo worlds of 2,600 passages each, a vocabulary of 1,030 tokens, and about 87, 159 and 230
tokens for a whole trajectory with 1, 2 and 3 searches (prompt "Question: ...", top 3). On
held-out questions the scripted oracle (BM25 top 3) scores exact match 1.0 and answering after
the first search 0.2 (the 1-hop share); the demonstrations score 0.52. world.json has these
numbers for the world built.
"""

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tspo_jax.cli import option
from tspo_jax.protocol import (
    DEFAULT_TEMPLATE,
    INVALID_ACTION_OBSERVATION,
    build_prompt,
    exact_match,
    first_hit,
    format_observation,
)
from tspo_jax.retrieval import BM25Retriever, Passage, Retriever

# Bump when the files build() writes change for the same settings, so old caches are rebuilt.
_FORMAT_VERSION = 3

# A syllable is an onset, a vowel and an optional coda ("ka", "kal"). No letter is both an onset
# and a coda, so a name splits into syllables in one way only.
ONSETS = "bdfgkmptvz"
VOWELS = "aeiou"
CODAS = ("", "l", "n", "r", "s")
SYLLABLES = tuple(o + v + c for o in ONSETS for v in VOWELS for c in CODAS)
NAME_SYLLABLES = 2  # every name is one word of this many syllables
# A name's first letter tells its kind, as a word's shape often does (the answer to "where"
# is a place): the policy can tell the name to copy from the subject it searched for.
KIND_INITIALS = {"person": "bd", "city": "fg", "country": "k", "work": "mp", "company": "tvz"}
_SYLLABLE_RE = re.compile(f"[{ONSETS}][{VOWELS}][{''.join(CODAS)}]?")


def syllables(name: str) -> list[str]:
    """A name's syllables, lower-cased ("Vasfol" -> ["vas", "fol"]); [] if it is not made of
    syllables of the inventory."""
    pieces = _SYLLABLE_RE.findall(name.lower())
    return pieces if "".join(pieces) == name.lower() else []


TAG_TOKENS = (
    "<think>",
    "</think>",
    "<search>",
    "</search>",
    "<answer>",
    "</answer>",
    "<information>",
    "</information>",
)
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")
# ChatML, as Qwen2.5's tokenizers; used only by build_prompt(..., chat=True).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Relation(NamedTuple):
    subject: str  # kind of the subject: "person", "city", "country", "work" or "company"
    object: str  # kind of the object
    text: str  # the passage: {s} subject, {o} object, {x} a second person ("met" only)


# The first five are the facts questions ask about; a search names the entity and the relation.
# The rest are distractors: the same subject next to a wrong candidate of the same kind.
RELATIONS = {
    "born": Relation("person", "city", "{s} was born in {o}."),
    "country": Relation("city", "country", "{s} is a city in the country {o}."),
    "author": Relation("work", "person", "{s} has the author {o}."),
    "founder": Relation("company", "person", "{s} has the founder {o}."),
    "based": Relation("company", "city", "{s} is based in {o}."),
    "lived": Relation("person", "city", "{s} lived for some years in {o}."),
    "met": Relation("person", "city", "{s} once met {x} in {o}."),
    "border": Relation("city", "country", "{s} lies close to the border with {o}."),
    "review": Relation("work", "person", "{s} got a short review by {o}."),
    "setting": Relation("work", "city", "{s} tells a story set in {o}."),
    "worker": Relation("company", "person", "{s} once employed {o}."),
    "office": Relation("company", "city", "{s} expanded to {o}."),
}

# Question templates by chain of relations; {} is the subject of the first hop. The subject
# comes first and no name follows a relation word, so that in a rollout's context the name after
# a relation word ("... has the author Vasfol.") is always an answer that a passage gave.
QUESTIONS = {
    ("born",): "{}: where was this person born?",
    ("country",): "{}: which country is this city in?",
    ("author",): "{}: who is the author of this work?",
    ("founder",): "{}: who is the founder of this company?",
    ("based",): "{}: where is this company based?",
    ("born", "country"): "{}: which country was this person born in?",
    ("author", "born"): "{}: where was the author of this work born?",
    ("founder", "born"): "{}: where was the founder of this company born?",
    ("based", "country"): "{}: which country is this company based in?",
    ("author", "born", "country"): "{}: which country was the author of this work born in?",
    ("founder", "born", "country"): "{}: which country was the founder of this company born in?",
}

QUESTION_RELATIONS = frozenset(r for chain in QUESTIONS for r in chain)

FLAWS = ("", "early_answer", "wrong_entity", "wrong_passage")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyWorldConfig:
    """The toy world: its size, its questions and its demonstrations."""

    world_seed: int = option(0, "seed of the world: names, facts, questions, demonstrations")
    countries: int = option(24, "countries in the training world")
    cities: int = option(240, "cities in the training world")
    people: int = option(1600, "people in the training world")
    works: int = option(1600, "works in the training world")
    companies: int = option(400, "companies in the training world")
    heldout_scale: float = option(0.25, "size of the held-out world relative to the training one")
    demo_worlds: int = option(
        16, "worlds of the demonstrations, each with its own names and corpus"
    )
    demo_scale: float = option(0.25, "size of each demo world relative to the training world")
    met_rate: float = option(0.3, "fraction of people with a 'met' passage (two people, a city)")
    train_questions: int = option(2000, "RL questions about the training world")
    demo_questions: int = option(16000, "demonstrations, spread evenly over the demo worlds")
    heldout_questions: int = option(500, "questions about the held-out world")
    hop_mix: tuple[float, float, float] = option(
        (0.2, 0.4, 0.4), "relative frequency of 1-, 2- and 3-hop questions"
    )
    early_answer: tuple[float, float, float] = option(
        (0.0, 0.6, 0.6), "fraction of 1-, 2-, 3-hop demonstrations that answer one hop early"
    )
    wrong_entity_rate: float = option(0.0, "multi-hop demonstrations that follow a distractor")
    wrong_passage_rate: float = option(0.0, "demonstrations that answer from a distractor")
    demo_top_k: int = option(3, "passages per search in the demonstrations (the rollout's top-k)")
    template: str = option(
        DEFAULT_TEMPLATE, "prompt of the demonstrations (the rollout's template)"
    )

    def __post_init__(self):
        if min(self.countries, self.cities, self.people, self.works, self.companies) < 3:
            raise ValueError("need at least 3 entities of each kind")
        if self.cities < self.countries or self.people < self.cities:
            raise ValueError("need countries <= cities <= people (every city has a native)")
        if not 0 < self.heldout_scale <= 1:
            raise ValueError(f"heldout_scale must lie in (0, 1], got {self.heldout_scale}")
        if not self.demo_scale > 0 or self.demo_worlds < 1:
            raise ValueError("need demo_scale > 0 and demo_worlds >= 1")
        if not 0 <= self.met_rate <= 1:
            raise ValueError(f"met_rate must lie in [0, 1], got {self.met_rate}")
        if min(self.train_questions, self.demo_questions, self.heldout_questions) < 0:
            raise ValueError("question counts must be >= 0")
        if len(self.hop_mix) != 3 or min(self.hop_mix) < 0 or sum(self.hop_mix) <= 0:
            raise ValueError(f"hop_mix needs 3 weights >= 0, not all 0; got {self.hop_mix}")
        if len(self.early_answer) != 3 or self.early_answer[0] != 0:
            raise ValueError("early_answer needs 3 rates, the first 0 (1 hop has no early)")
        for hops, early in enumerate(self.early_answer, start=1):
            entity = self.wrong_entity_rate if hops > 1 else 0.0
            rates = (early, entity, self.wrong_passage_rate)
            if min(rates) < 0 or sum(rates) > 1:
                raise ValueError(f"flaw rates of {hops}-hop demonstrations must sum to <= 1")
        if self.demo_top_k < 1:
            raise ValueError(f"demo_top_k must be >= 1, got {self.demo_top_k}")
        if "{question}" not in self.template:
            raise ValueError("template has no {question} field")


# ---------------------------------------------------------------------------------------------
# Containers


class Fact(NamedTuple):
    """One passage of the corpus: a fact, or a distractor."""

    id: str  # its id in corpus.jsonl: its position there, as a string
    split: str  # the sub-world it belongs to: "train" or "heldout"
    relation: str  # a key of RELATIONS
    subject: str
    object: str
    other: str  # the second person of a "met" passage, else ""

    @property
    def title(self) -> str:
        return self.subject

    @property
    def text(self) -> str:
        return RELATIONS[self.relation].text.format(s=self.subject, o=self.object, x=self.other)


class Hop(NamedTuple):
    entity: str  # what this hop searches for
    relation: str  # what it asks about the entity
    answer: str  # the relation's object: the next hop's entity, or the final answer
    passage_id: str  # the passage that states it


class Question(NamedTuple):
    question: str
    answer: str
    split: str  # "train" or "heldout"
    chain: tuple[Hop, ...]


class World(NamedTuple):
    facts: tuple[Fact, ...]  # the corpus (training and held-out worlds): facts[i].id == str(i)
    demo_facts: tuple[tuple[Fact, ...], ...]  # each demo world's own corpus, numbered alike
    train: tuple[Question, ...]  # RL questions (training world)
    demo: tuple[Question, ...]  # questions of the demonstrations, split "demo<i>": world i
    heldout: tuple[Question, ...]  # held-out world
    names: dict[str, frozenset[str]]  # "train", "heldout", "demo" -> every name of the split


class Episode(NamedTuple):
    """What a scripted policy did for one question."""

    question: Question
    flaw: str  # one of FLAWS, "" for a correct run; as it happened, not as it was planned
    turns: tuple[str, ...]  # the policy's text, one string a turn
    observations: tuple[str, ...]  # the observation after each search turn
    answer: str


class Demonstration(NamedTuple):
    question: str
    golden_answers: tuple[str, ...]
    flaw: str  # one of FLAWS, "" for a correct demonstration
    segments: tuple[tuple[str, bool], ...]  # (text, trained): prompt and observations are not


class ToyWorldPaths(NamedTuple):
    root: Path
    corpus: Path
    train: Path
    heldout: Path
    demos: Path
    tokenizer: Path
    info: Path
    demo_corpora: Path  # folder: <i>.jsonl is the corpus of demo world i


# ---------------------------------------------------------------------------------------------
# The world


def _fixed_text(templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> list[str]:
    """Every piece of English the policy reads or writes, in context, with one-syllable
    placeholder names."""
    subject, obj, other = "Ta", "Ko", "Ba"
    passages = [r.text.format(s=subject, o=obj, x=other) for r in RELATIONS.values()]
    texts = [
        build_prompt(q.format(subject), template=t) for q in QUESTIONS.values() for t in templates
    ]
    # Titles as the corpus writes them, in double quotes (kept in observations, as Search-R1).
    texts.append(format_observation([Passage("", f'"{subject}"', t, 0.0) for t in passages]))
    texts.append(INVALID_ACTION_OBSERVATION)
    texts += [f"<search> {subject} {relation} </search>" for relation in RELATIONS]
    texts += [f"<answer> {subject} </answer>", "user\nassistant\nsystem\n"]
    return texts


def _templates(cfg: ToyWorldConfig) -> tuple[str, ...]:
    """Search-R1's prompt template, and the demonstrations' if it is another."""
    return tuple(dict.fromkeys((DEFAULT_TEMPLATE, cfg.template)))


def _english_words(templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> frozenset[str]:
    words = (w for t in _fixed_text(templates) for w in re.findall(r"[A-Za-z]+", t))
    return frozenset(w.lower() for w in words)


def _new_name(rng: random.Random, used: set[str], kind: str) -> str:
    """A capitalized name of NAME_SYLLABLES random syllables, not yet in `used` (lower-cased),
    whose first letter is one of KIND_INITIALS[kind]."""
    first = [s for s in SYLLABLES if s[0] in KIND_INITIALS[kind]]
    while True:
        name = "".join([rng.choice(first), *rng.choices(SYLLABLES, k=NAME_SYLLABLES - 1)])
        if name not in used:
            used.add(name)
            return name.capitalize()


def _scaled(cfg: ToyWorldConfig, split: str) -> dict[str, int]:
    """Entities of each kind in the sub-world of `split`."""
    scale = {"train": 1.0, "heldout": cfg.heldout_scale, "demo": cfg.demo_scale}[split]
    sizes = {"country": cfg.countries, "city": cfg.cities, "person": cfg.people}
    sizes |= {"work": cfg.works, "company": cfg.companies}
    sizes = {kind: max(3, round(n * scale)) for kind, n in sizes.items()}
    sizes["city"] = max(sizes["city"], sizes["country"])
    sizes["person"] = max(sizes["person"], sizes["city"])
    return sizes


def _sub_world(
    sizes: dict[str, int], met_rate: float, rng: random.Random, used: set[str]
) -> tuple[dict[str, list[str]], list[tuple[str, str, str, str]]]:
    """The entities of one sub-world by kind, and its facts as (relation, subject, object,
    other) tuples. Names are drawn without replacement from `used`, shared by both splits."""

    def other_than(items, *excluded):
        return rng.choice([x for x in items if x not in excluded])

    def cover(items, n):  # n draws that use every item once before any twice, shuffled
        out = [items[i % len(items)] for i in range(n)]
        rng.shuffle(out)
        return out

    countries, cities, people, works, companies = (
        [_new_name(rng, used, kind) for _ in range(sizes[kind])]
        for kind in ("country", "city", "person", "work", "company")
    )

    facts = []
    city_country = dict(zip(cities, cover(countries, len(cities)), strict=True))
    for city, country in city_country.items():
        facts.append(("country", city, country, ""))
        facts.append(("border", city, other_than(countries, country), ""))
    born = dict(zip(people, cover(cities, len(people)), strict=True))
    for person, city in born.items():
        facts.append(("born", person, city, ""))
        facts.append(("lived", person, other_than(cities, city), ""))
        if rng.random() < met_rate:
            friend = other_than(people, person)
            facts.append(("met", person, other_than(cities, city, born[friend]), friend))
    for work in works:
        author = rng.choice(people)
        facts.append(("author", work, author, ""))
        facts.append(("review", work, other_than(people, author), ""))
        facts.append(("setting", work, other_than(cities, born[author]), ""))
    for company in companies:
        founder, city = rng.choice(people), rng.choice(cities)
        facts.append(("founder", company, founder, ""))
        facts.append(("worker", company, other_than(people, founder), ""))
        facts.append(("based", company, city, ""))
        facts.append(("office", company, other_than(cities, city), ""))
    entities = {
        "country": countries,
        "city": cities,
        "person": people,
        "work": works,
        "company": companies,
    }
    return entities, facts


def _questions(
    split: str,
    entities: dict[str, list[str]],
    fact_of: dict[tuple[str, str], Fact],
    n: int,
    hop_mix: Sequence[float],
    rng: random.Random,
) -> list[Question]:
    """n distinct questions; per number of hops, drawn uniformly from every (chain, subject)."""
    counts = [round(n * w / sum(hop_mix)) for w in hop_mix]
    counts[max(range(3), key=lambda h: hop_mix[h])] += n - sum(counts)
    out = []
    for hops, count in enumerate(counts, start=1):
        pool = [
            (chain, subject)
            for chain in QUESTIONS
            if len(chain) == hops
            for subject in entities[RELATIONS[chain[0]].subject]
        ]
        if count > len(pool):
            raise ValueError(
                f"{split}: {count} questions of {hops} hops wanted, only {len(pool)} exist; "
                "ask for fewer questions or a larger world"
            )
        for chain, subject in rng.sample(pool, count):
            hops_, entity = [], subject
            for relation in chain:
                fact = fact_of[(relation, entity)]
                hops_.append(Hop(entity, relation, fact.object, fact.id))
                entity = fact.object
            out.append(Question(QUESTIONS[chain].format(subject), entity, split, tuple(hops_)))
    rng.shuffle(out)
    return out


def _corpus(rng: random.Random, subs: dict, splits: Sequence[str]) -> tuple[Fact, ...]:
    """The facts of the sub-worlds `splits`, shuffled together and numbered."""
    tagged = [(split, *f) for split in splits for f in subs[split][1]]
    rng.shuffle(tagged)
    return tuple(Fact(str(i), *t) for i, t in enumerate(tagged))


def make_world(cfg: ToyWorldConfig) -> World:
    """The world of `cfg`: deterministic in cfg (no I/O, no retrieval)."""
    rng = random.Random(cfg.world_seed)
    used = set(_english_words(_templates(cfg)))  # shared: no name is in two sub-worlds
    demo_splits = [f"demo{i}" for i in range(cfg.demo_worlds)]
    kinds = {"train": "train", "heldout": "heldout"} | dict.fromkeys(demo_splits, "demo")
    subs = {
        split: _sub_world(_scaled(cfg, kind), cfg.met_rate, rng, used)
        for split, kind in kinds.items()
    }
    corpora = {"train": _corpus(rng, subs, ("train", "heldout"))}
    corpora["heldout"] = corpora["train"]  # one retriever serves both
    corpora |= {split: _corpus(rng, subs, (split,)) for split in demo_splits}
    per_world, extra = divmod(cfg.demo_questions, cfg.demo_worlds)
    counts = {"train": cfg.train_questions, "heldout": cfg.heldout_questions}
    counts |= {split: per_world + (i < extra) for i, split in enumerate(demo_splits)}
    questions = {}
    for split, corpus in corpora.items():
        fact_of = {(f.relation, f.subject): f for f in corpus if f.relation in QUESTION_RELATIONS}
        entities = subs[split][0]
        questions[split] = _questions(split, entities, fact_of, counts[split], cfg.hop_mix, rng)
    names = {kind: set() for kind in ("train", "heldout", "demo")}
    for split, kind in kinds.items():
        names[kind].update(name for group in subs[split][0].values() for name in group)
    return World(
        facts=corpora["train"],
        demo_facts=tuple(corpora[split] for split in demo_splits),
        train=tuple(questions["train"]),
        demo=tuple(q for split in demo_splits for q in questions[split]),
        heldout=tuple(questions["heldout"]),
        names={kind: frozenset(v) for kind, v in names.items()},
    )


def corpus_line(fact: Fact) -> str:
    """The fact as one line of a Search-R1 corpus."""
    return json.dumps({"id": fact.id, "contents": f'"{fact.title}"\n{fact.text}'})


def question_record(q: Question) -> dict:
    """A question as a JSONL row: the columns `data.load_examples` reads, then metadata."""
    return {
        "question": q.question,
        "golden_answers": [q.answer],
        "split": q.split,
        "hops": len(q.chain),
        "chain": [h._asdict() for h in q.chain],
    }


# ---------------------------------------------------------------------------------------------
# The tokenizer


def _without_cross_syllable_merges(tok: Tokenizer) -> Tokenizer:
    """`tok` less every merge that joins two syllables (learned from English words such as
    "write" = "w" "ri" "te", it would also join them in a name) and every token that only such a
    merge made reachable; ids stay in their order, renumbered without gaps."""
    state = json.loads(tok.to_str())
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    pieces = set(SYLLABLES) | {"Ġ" + s.capitalize() for s in SYLLABLES}
    reachable = {t for t in vocab if len(t) == 1} | set(SPECIAL_TOKENS)  # bytes, specials
    kept = []
    for left, right in merges:
        if left in reachable and right in reachable and not (left in pieces and right in pieces):
            reachable.add(left + right)
            kept.append([left, right])
    order = sorted(reachable, key=vocab.__getitem__)
    state["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    state["model"]["merges"] = kept
    state["model"]["ignore_merges"] = False  # a name is always its merges, never a vocab hit
    for added in state["added_tokens"]:
        added["id"] = state["model"]["vocab"][added["content"]]
    return Tokenizer.from_str(json.dumps(state))


def train_tokenizer(templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> PreTrainedTokenizerFast:
    """The world's byte-level BPE (see the module docstring), with every word of the prompt
    templates whole. Deterministic; no world needed, since names are syllables and syllables
    are fixed."""
    strip = re.compile("|".join(re.escape(t) for t in TAG_TOKENS + SPECIAL_TOKENS))
    texts = [strip.sub(" ", t) for t in _fixed_text(templates)]
    # Syllables as words of their own, word-initial (" Ta") and word-internal ("ta"), far more
    # frequent than any English pair, so that their merges rank first.
    texts += [" " + s.capitalize() for s in SYLLABLES] * 100 + list(SYLLABLES) * 100
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,  # a cap never reached: merging stops when every training word is whole
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok = _without_cross_syllable_merges(tok)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---------------------------------------------------------------------------------------------
# Scripted policies: the oracle, its flawed variants, and a shortcut baseline


class Script(NamedTuple):
    stop: int  # the hop after whose search it answers; hops - 1 follows the whole chain
    misread: int  # the hop at which it reads a distractor passage instead of the fact; -1 none


def _read(passages: list[Passage], facts: Sequence[Fact], hop: Hop, entity: str, misread: bool):
    """The name a reader takes from the search results for (entity, hop.relation), and whether
    it misread. The fact's object if it is among the results; with `misread`, the object of the
    best-ranked distractor of the same kind instead (if there is one)."""
    shown = [facts[int(p.id)] for p in passages]
    kind = RELATIONS[hop.relation].object
    fact = next((f for f in shown if (f.relation, f.subject) == (hop.relation, entity)), None)
    wrong = [
        f.object
        for f in shown
        if f is not fact
        and RELATIONS[f.relation].object == kind
        and (fact is None or f.object != fact.object)
    ]
    if fact is not None and not (misread and wrong):
        return fact.object, False
    if wrong:
        return wrong[0], fact is not None
    return (shown[0].subject if shown else entity), False


def run_scripts(
    questions: Sequence[Question],
    scripts: Sequence[Script],
    facts: Sequence[Fact],
    retriever: Retriever,
    *,
    k: int,
) -> list[Episode]:
    """Plays each question with its script against the retriever, all questions in lockstep
    (one batched search a hop). Queries are "<entity> <relation>"."""
    n = len(questions)
    entity = [q.chain[0].entity for q in questions]
    turns = [[] for _ in range(n)]
    observations = [[] for _ in range(n)]
    answers: list[str | None] = [None] * n
    misread = [False] * n
    for hop in range(max((len(q.chain) for q in questions), default=0)):
        active = [i for i in range(n) if answers[i] is None]
        queries = [f"{entity[i]} {questions[i].chain[hop].relation}" for i in active]
        for i, query, passages in zip(active, queries, retriever.search(queries, k), strict=True):
            turns[i].append(f"<search> {query} </search>")
            observations[i].append(format_observation(passages))
            value, wrong = _read(
                passages, facts, questions[i].chain[hop], entity[i], scripts[i].misread == hop
            )
            misread[i] |= wrong
            if hop == scripts[i].stop:
                answers[i] = value
                turns[i].append(f"<answer> {value} </answer>")
            entity[i] = value
    episodes = []
    for i, (q, script) in enumerate(zip(questions, scripts, strict=True)):
        hops = len(q.chain)
        if script.stop < hops - 1:
            flaw = "early_answer"
        elif misread[i]:
            flaw = "wrong_passage" if script.misread == hops - 1 else "wrong_entity"
        else:
            flaw = ""
        episodes.append(Episode(q, flaw, tuple(turns[i]), tuple(observations[i]), answers[i]))
    return episodes


def oracle_script(q: Question) -> Script:
    return Script(len(q.chain) - 1, -1)


def first_search_script(q: Question) -> Script:
    """The shortcut baseline: answers what the first search finds, without further hops."""
    return Script(0, -1)


def demo_script(q: Question, cfg: ToyWorldConfig, rng: random.Random) -> Script:
    """The oracle, or one of its flaws at the rates of cfg."""
    hops = len(q.chain)
    early = cfg.early_answer[hops - 1]
    entity = cfg.wrong_entity_rate if hops > 1 else 0.0
    u = rng.random()
    if u < early:
        return Script(hops - 2, -1)
    if u < early + entity:
        return Script(hops - 1, rng.randrange(hops - 1))
    if u < early + entity + cfg.wrong_passage_rate:
        return Script(hops - 1, hops - 1)
    return Script(hops - 1, -1)


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
    """Demonstrations for world.demo, flawed at the rates of cfg, and their episodes.
    `retrievers[i]` searches the corpus of demo world i (world.demo_facts[i])."""
    rng = random.Random(f"{cfg.world_seed}/demos")
    scripts = [demo_script(q, cfg, rng) for q in world.demo]
    episodes = []
    for i, (facts, retriever) in enumerate(zip(world.demo_facts, retrievers, strict=True)):
        picked = [j for j, q in enumerate(world.demo) if q.split == f"demo{i}"]
        questions, their_scripts = [world.demo[j] for j in picked], [scripts[j] for j in picked]
        episodes += run_scripts(questions, their_scripts, facts, retriever, k=cfg.demo_top_k)
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


# ---------------------------------------------------------------------------------------------
# Building and caching


def _paths(root: Path) -> ToyWorldPaths:
    return ToyWorldPaths(
        root,
        root / "corpus.jsonl",
        root / "train.jsonl",
        root / "heldout.jsonl",
        root / "demos.jsonl",
        root / "tokenizer",
        root / "world.json",
        root / "demo_corpora",
    )


def fingerprint(cfg: ToyWorldConfig) -> str:
    """Changes with the settings, the file format, and the protocol's prompt and observation
    text (which the demonstrations contain)."""
    probe = [Passage("0", '"T"', "x\ny.", 0.0), Passage("1", "U", "", 0.0)]
    key = {
        "version": _FORMAT_VERSION,
        "config": dataclasses.asdict(cfg),
        "prompt": build_prompt("Q?"),
        "observation": format_observation(probe),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _is_built(paths: ToyWorldPaths, key: str) -> bool:
    try:
        return json.loads(paths.info.read_text())["fingerprint"] == key
    except (OSError, ValueError, KeyError):
        return False


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


def _write_world(root: Path, cfg: ToyWorldConfig, key: str) -> None:
    paths = _paths(root)
    world = make_world(cfg)
    _write_jsonl(paths.corpus, (corpus_line(f) for f in world.facts))
    paths.demo_corpora.mkdir()
    for i, corpus in enumerate(world.demo_facts):
        _write_jsonl(paths.demo_corpora / f"{i}.jsonl", (corpus_line(f) for f in corpus))
    _write_jsonl(paths.train, (question_record(q) for q in world.train))
    _write_jsonl(paths.heldout, (question_record(q) for q in world.heldout))
    tokenizer = train_tokenizer(_templates(cfg))
    tokenizer.save_pretrained(paths.tokenizer)

    retriever = BM25Retriever(paths.corpus)
    demo_retrievers = [
        BM25Retriever(paths.demo_corpora / f"{i}.jsonl") for i in range(cfg.demo_worlds)
    ]
    demos, episodes = make_demonstrations(world, demo_retrievers, cfg)
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
    oracle = run_scripts(
        heldout, [oracle_script(q) for q in heldout], world.facts, retriever, k=cfg.demo_top_k
    )
    shortcut = run_scripts(
        heldout, [first_search_script(q) for q in heldout], world.facts, retriever, k=cfg.demo_top_k
    )
    info = {
        "fingerprint": key,
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
            "demo_episodes": episode_stats(episodes),
            "heldout_oracle": episode_stats(oracle),
            "heldout_first_search": episode_stats(shortcut),
            "demo_tokens": _token_stats(tokenizer, demos),
        },
    }
    paths.info.write_text(json.dumps(info, indent=1) + "\n")  # written last: marks it complete


def build(out_dir: str | os.PathLike, cfg: ToyWorldConfig = ToyWorldConfig()) -> ToyWorldPaths:
    """Writes the world of cfg to out_dir and returns its paths; returns at once if out_dir
    already holds it. Built in a temporary directory beside out_dir and renamed into place, so
    a build killed midway leaves no half-written world."""
    root = Path(out_dir)
    paths, key = _paths(root), fingerprint(cfg)
    if _is_built(paths, key):
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    stale = None
    try:
        _write_world(tmp, cfg, key)
        if root.exists():  # a world of other settings: moved aside, then removed
            stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.rename(root, stale / root.name)
        try:
            os.rename(tmp, root)
        except OSError:  # another process renamed its build in first
            if not _is_built(paths, key):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    return paths
