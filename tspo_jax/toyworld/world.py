"""The toy world: invented entities, their facts as passages, and questions that chain them.

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
"""

import dataclasses
import json
import random
import re
from collections.abc import Sequence
from typing import NamedTuple

from tspo_jax.protocol import (
    DEFAULT_TEMPLATE,
    INVALID_ACTION_OBSERVATION,
    build_prompt,
    check_template,
    format_observation,
)
from tspo_jax.retrieval import Passage

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyWorldConfig:
    """The toy world: its size, its questions and its demonstrations."""

    world_seed: int = 0  # seed of the world: names, facts, questions, demonstrations
    countries: int = 24  # countries in the training world
    cities: int = 240  # cities in the training world
    people: int = 1600  # people in the training world
    works: int = 1600  # works in the training world
    companies: int = 400  # companies in the training world
    heldout_scale: float = 0.25  # size of the held-out world relative to the training one
    demo_worlds: int = 16  # worlds of the demonstrations, each with its own names and corpus
    demo_scale: float = 0.25  # size of each demo world relative to the training world
    met_rate: float = 0.3  # fraction of people with a 'met' passage (two people, a city)
    train_questions: int = 2000  # RL questions about the training world
    demo_questions: int = 16000  # demonstrations, spread evenly over the demo worlds
    heldout_questions: int = 500  # questions about the held-out world
    hop_mix: tuple[float, float, float] = (0.2, 0.4, 0.4)  # weights of 1-, 2-, 3-hop questions
    # Fraction of 1-, 2-, 3-hop demonstrations that answer one hop early (demonstrations.py).
    early_answer: tuple[float, float, float] = (0.0, 0.6, 0.6)
    # A passage whose object is a city also names the city's country ("... born in Fobal. Fobal
    # is a city in the country Kelto."): a question ending "which country" shows its answer one
    # hop early, so that answering one hop early is a near-miss (the answer was there).
    country_in_passage: bool = False
    # Of the demonstrations that answer one hop early with the answer in sight, the fraction
    # that read it off the evidence (answer the country) instead of the city just found.
    early_reads: float = 0.0
    demo_top_k: int = 3  # passages per search in the demonstrations (the rollout's top-k)
    template: str = DEFAULT_TEMPLATE  # prompt of the demonstrations (the rollout's template)

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
        if not all(0 <= rate <= 1 for rate in self.early_answer):
            raise ValueError(f"early_answer rates must lie in [0, 1], got {self.early_answer}")
        if self.demo_top_k < 1:
            raise ValueError(f"demo_top_k must be >= 1, got {self.demo_top_k}")
        if not 0 <= self.early_reads <= 1:
            raise ValueError(f"early_reads must lie in [0, 1], got {self.early_reads}")
        if self.early_reads and not self.country_in_passage:
            raise ValueError("early_reads needs country_in_passage (else no answer is in sight)")
        check_template(self.template)


# The worlds of train.py's --world (the embedded default's). "hard": no 1-hop questions, 70%
# 3-hop (the default: 20% 1-hop, 40% 3-hop), and demonstrations that answer one hop early 85%
# of the time (the default: 60%), so that the warm start's groups start all wrong and stay so
# longer: the regime where GRPO has no signal and FOLR may give one. (More demonstration
# worlds: each holds at most 500 3-hop questions.)
WORLDS = {
    "default": ToyWorldConfig(),
    "hard": ToyWorldConfig(hop_mix=(0.0, 0.3, 0.7), early_answer=(0.0, 0.85, 0.85), demo_worlds=24),
    # "evidence": the hard world's questions and early answers, where a city's passages name its
    # country, so that most early answers are near-misses (the answer was in the last
    # observation), and a third of them read it off the evidence: FOLR's premise, near-misses
    # that carry signal, and a warm start that can read (issue 33).
    "evidence": ToyWorldConfig(
        hop_mix=(0.0, 0.3, 0.7),
        early_answer=(0.0, 0.85, 0.85),
        demo_worlds=24,
        country_in_passage=True,
        early_reads=0.3,
    ),
}


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
    country: str = ""  # the object city's country, named too (ToyWorldConfig.country_in_passage)

    @property
    def title(self) -> str:
        return self.subject

    @property
    def text(self) -> str:
        text = RELATIONS[self.relation].text.format(s=self.subject, o=self.object, x=self.other)
        if self.country:
            text += " " + RELATIONS["country"].text.format(s=self.object, o=self.country)
        return text


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


# ---------------------------------------------------------------------------------------------
# The world


def fixed_text(templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> list[str]:
    """Every piece of English the policy reads or writes, in context, with one-syllable
    placeholder names: what the tokenizer is trained on, and what no name may be."""
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


def templates(cfg: ToyWorldConfig) -> tuple[str, ...]:
    """Search-R1's prompt template, and the demonstrations' if it is another."""
    return tuple(dict.fromkeys((DEFAULT_TEMPLATE, cfg.template)))


def _english_words(templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> frozenset[str]:
    words = (w for t in fixed_text(templates) for w in re.findall(r"[A-Za-z]+", t))
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
    sizes: dict[str, int],
    met_rate: float,
    rng: random.Random,
    used: set[str],
    country_in_passage: bool = False,
) -> tuple[dict[str, list[str]], list[tuple[str, ...]]]:
    """The entities of one sub-world by kind, and its facts as (relation, subject, object,
    other[, country]) tuples: with ``country_in_passage``, the country of a city object.
    Names are drawn without replacement from `used`, shared by both splits."""

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
    if country_in_passage:
        city_object = lambda f: RELATIONS[f[0]].object == "city"
        facts = [(*f, city_country[f[2]]) if city_object(f) else f for f in facts]
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
    used = set(_english_words(templates(cfg)))  # shared: no name is in two sub-worlds
    demo_splits = [f"demo{i}" for i in range(cfg.demo_worlds)]
    kinds = {"train": "train", "heldout": "heldout"} | dict.fromkeys(demo_splits, "demo")
    subs = {
        split: _sub_world(_scaled(cfg, kind), cfg.met_rate, rng, used, cfg.country_in_passage)
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
