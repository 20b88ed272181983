"""The toy world (tspo_jax/toyworld/): determinism, answerability by search, held-out
isolation, the tokenizer, the demonstrations and the build cache.

Most tests use a small world built once per module (about a second); the tokenizer-coverage
test uses the default world's text, without retrieval.
"""

import dataclasses
import json
import os
import random
import re
from collections import Counter

import pytest
from transformers import AutoTokenizer

from tspo_jax import cache
from tspo_jax.data import load_examples
from tspo_jax.protocol import (
    TAGS,
    build_prompt,
    exact_match,
    format_observation,
    parse_action,
    split_title,
)
from tspo_jax.retrieval import BM25Retriever, Passage, load_corpus
from tspo_jax.toyworld import files
from tspo_jax.toyworld.demonstrations import demo_stop, load_demonstrations, play
from tspo_jax.toyworld.files import build
from tspo_jax.toyworld.tokenizer import train_tokenizer
from tspo_jax.toyworld.world import (
    KIND_INITIALS,
    NAME_SYLLABLES,
    QUESTIONS,
    RELATIONS,
    SYLLABLES,
    Question,
    ToyWorldConfig,
    make_world,
    syllables,
)

SMALL = ToyWorldConfig(
    countries=4,
    cities=12,
    people=60,
    works=40,
    companies=12,
    heldout_scale=0.5,
    demo_worlds=2,
    demo_scale=0.5,
    train_questions=60,
    demo_questions=60,
    heldout_questions=40,
    early_answer=(0.0, 0.3, 0.5),
    template="Question: {question}\n",
)
NAME_RE = re.compile(r"\b[A-Z][a-z]+\b")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    paths = build(tmp_path_factory.mktemp("toyworld") / "world", SMALL)
    demo_retrievers = [
        BM25Retriever(paths.demo_corpora / f"{i}.jsonl") for i in range(SMALL.demo_worlds)
    ]
    return paths, make_world(SMALL), BM25Retriever(paths.corpus), demo_retrievers


def all_questions(world):
    return [*world.train, *world.demo, *world.heldout]


def corpus_of(world, q):
    """The facts a question's retriever searches: the main corpus, or its demo world's."""
    return world.facts if q.split in ("train", "heldout") else world.demo_facts[int(q.split[4:])]


def by_corpus(built, questions):
    """(facts, retriever, positions in questions) for each corpus that the questions search."""
    _, world, retriever, demo_retrievers = built
    groups = {}
    for i, q in enumerate(questions):
        groups.setdefault(-1 if q.split in ("train", "heldout") else int(q.split[4:]), []).append(i)
    for key, positions in groups.items():
        if key < 0:
            yield world.facts, retriever, positions
        else:
            yield world.demo_facts[key], demo_retrievers[key], positions


# --- the world --------------------------------------------------------------------------------


def test_world_is_deterministic_per_seed():
    a, b = make_world(SMALL), make_world(SMALL)
    assert a == b
    c = make_world(dataclasses.replace(SMALL, world_seed=1))
    assert c.facts != a.facts
    assert c.names["train"] != a.names["train"]
    assert [q.question for q in c.heldout] != [q.question for q in a.heldout]


def test_world_shape(built):
    _, world, _, _ = built
    corpora = [world.facts, *world.demo_facts]
    for corpus in corpora:
        assert [f.id for f in corpus] == [str(i) for i in range(len(corpus))]
    sizes = Counter((f.split, f.relation) for corpus in corpora for f in corpus)
    # Training world: 12 cities, 60 people, 40 works, 12 companies; held-out and each of the
    # two demo worlds: half as many.
    for split, scale in [("train", 1.0), ("heldout", 0.5), ("demo0", 0.5), ("demo1", 0.5)]:
        assert sizes[split, "country"] == sizes[split, "border"] == round(12 * scale)
        assert sizes[split, "born"] == sizes[split, "lived"] == round(60 * scale)
        assert sizes[split, "author"] == sizes[split, "review"] == round(40 * scale)
        assert sizes[split, "founder"] == sizes[split, "office"] == round(12 * scale)
    assert {f.split for f in world.facts} == {"train", "heldout"}
    assert [{f.split for f in c} for c in world.demo_facts] == [{"demo0"}, {"demo1"}]
    # Questions: 1-, 2- and 3-hop in proportion 0.2 : 0.4 : 0.4, all distinct; demonstrations
    # spread evenly over the demo worlds.
    assert Counter(len(q.chain) for q in world.heldout) == {1: 8, 2: 16, 3: 16}
    assert Counter(len(q.chain) for q in world.train) == {1: 12, 2: 24, 3: 24}
    assert Counter(q.split for q in world.demo) == {"demo0": 30, "demo1": 30}
    texts = [q.question for q in all_questions(world)]
    assert len(set(texts)) == len(texts) == 160
    # Every name is one word of NAME_SYLLABLES syllables.
    names = set().union(*world.names.values())
    assert len(names) == sum(map(len, world.names.values()))  # no name in two splits
    for name in names:
        assert len(syllables(name)) == NAME_SYLLABLES and name[0].isupper(), name
    assert syllables("Vasfol") == ["vas", "fol"] and syllables("Vasfl") == []
    # A name's first letter tells its kind.
    for f in (f for corpus in corpora for f in corpus):
        relation = RELATIONS[f.relation]
        assert f.subject[0].lower() in KIND_INITIALS[relation.subject], f
        assert f.object[0].lower() in KIND_INITIALS[relation.object], f


def test_files_are_search_r1_formats(built):
    paths, world, _, _ = built
    lines = paths.corpus.read_text().splitlines()
    assert len(lines) == len(world.facts)
    first = json.loads(lines[0])
    assert set(first) == {"id", "contents"}
    assert first["contents"] == f'"{world.facts[0].title}"\n{world.facts[0].text}'
    corpora = [(paths.corpus, world.facts)]
    corpora += [(paths.demo_corpora / f"{i}.jsonl", c) for i, c in enumerate(world.demo_facts)]
    for path, facts in corpora:
        # Search-R1 keeps the title's quotes.
        assert [(p.id, p.title, p.text) for p in load_corpus(path)] == [
            (f.id, f'"{f.title}"', f.text) for f in facts
        ]
    for path, questions in [(paths.train, world.train), (paths.heldout, world.heldout)]:
        examples = load_examples(path)
        assert [(e.question, e.golden_answers) for e in examples] == [
            (q.question, (q.answer,)) for q in questions
        ]
        row = json.loads(path.read_text().splitlines()[0])
        assert row["hops"] == len(row["chain"]) == len(questions[0].chain)
        assert row["chain"][0]["passage_id"] == questions[0].chain[0].passage_id


def test_chains_are_stated_by_their_passages(built):
    _, world, _, _ = built
    for q in all_questions(world):
        assert q.chain[0].entity in q.question
        assert tuple(h.relation for h in q.chain) in QUESTIONS
        for i, hop in enumerate(q.chain):
            fact = corpus_of(world, q)[int(hop.passage_id)]
            assert (fact.relation, fact.subject, fact.object) == (
                hop.relation,
                hop.entity,
                hop.answer,
            )
            assert fact.split == q.split
            assert hop.answer in fact.text
            if i + 1 < len(q.chain):
                assert q.chain[i + 1].entity == hop.answer
        assert q.chain[-1].answer == q.answer
        kind = RELATIONS[q.chain[-1].relation].object
        asks = q.question.split(": ", 1)[1].split()[0]  # the subject comes first
        assert kind == {"where": "city", "which": "country", "who": "person"}[asks]


def test_every_hop_is_found_by_searching_entity_and_relation(built):
    _, world, _, _ = built
    hops = [(q, h) for q in all_questions(world) for h in q.chain]
    for _, retriever, positions in by_corpus(built, [q for q, _ in hops]):
        picked = [hops[i][1] for i in positions]
        results = retriever.search([f"{h.entity} {h.relation}" for h in picked], 3)
        assert [r[0].id for r in results] == [h.passage_id for h in picked]  # ranked first


def run_everywhere(built, questions, stop):
    """The scripted policy through the turn loop against each question's own corpus, answering
    after the search of hop stop(q); trajectories in question order."""
    episodes = [None] * len(questions)
    tokenizer = AutoTokenizer.from_pretrained(built[0].tokenizer)
    for facts, retriever, positions in by_corpus(built, questions):
        qs = [questions[i] for i in positions]
        played = play(qs, [stop(q) for q in qs], facts, retriever, tokenizer, k=3)
        for i, episode in zip(positions, played, strict=True):
            episodes[i] = episode
    return episodes


def test_oracle_answers_everything_and_first_search_only_one_hop(built):
    _, world, _, _ = built
    questions = all_questions(world)
    oracle = run_everywhere(built, questions, lambda q: len(q.chain) - 1)
    assert [e.answer for e in oracle] == [q.answer for q in questions]
    assert [len(e.turns) for e in oracle] == [len(q.chain) + 1 for q in questions]
    assert all(e.finish == "answer" for e in oracle)
    shortcut = run_everywhere(built, questions, lambda q: 0)
    em = [exact_match(e.answer, [q.answer]) for e, q in zip(shortcut, questions, strict=True)]
    # The first search's answer is of the wrong kind (a person or a city for a country).
    assert em == [float(len(q.chain) == 1) for q in questions]


def test_distractors_put_wrong_candidates_next_to_the_fact(built):
    _, world, retriever, _ = built
    hops = [h for q in world.heldout for h in q.chain]
    results = retriever.search([f"{h.entity} {h.relation}" for h in hops], 3)
    with_rival = 0
    for hop, passages in zip(hops, results, strict=True):
        kind = RELATIONS[hop.relation].object
        rivals = {
            world.facts[int(p.id)].object
            for p in passages[1:]
            if RELATIONS[world.facts[int(p.id)].relation].object == kind
        }
        with_rival += bool(rivals - {hop.answer})
    assert with_rival == len(hops)  # every top 3 shows a wrong name of the answer's kind


# --- held-out isolation -----------------------------------------------------------------------


def test_heldout_names_and_facts_never_appear_in_training(built):
    paths, world, _, _ = built
    train_names, heldout_names = world.names["train"], world.names["heldout"]
    demo_names = world.names["demo"]
    assert train_names and heldout_names and demo_names
    assert not (train_names & heldout_names or demo_names & heldout_names)
    assert not train_names & demo_names
    assert {q.question.split(":")[0] for q in world.heldout} <= heldout_names
    # Nothing training reads (RL questions, demonstrations and their observations) names a
    # held-out entity.
    train_text = [q.question + " " + q.answer for q in world.train + world.demo]
    train_text += [t for d in load_demonstrations(paths.demos) for t, _ in d.segments]
    words = {w for t in train_text for w in NAME_RE.findall(t)}
    assert not words & heldout_names
    assert words & train_names and words & demo_names
    heldout_ids = {f.id for f in world.facts if f.split == "heldout"}
    for q in world.train:
        assert not {h.passage_id for h in q.chain} & heldout_ids
    for q in world.heldout:
        assert {h.passage_id for h in q.chain} <= heldout_ids
        assert not {w for h in q.chain for w in h.answer.split()} & train_names


# --- the tokenizer ----------------------------------------------------------------------------


def test_tokenizer_folder_reloads_with_single_token_tags(built):
    paths, _, _, _ = built
    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    assert len(tok) == len(train_tokenizer()) < 1100
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    text = "<think> born </think>\n<search> Vasfol born </search><answer> Bo </answer>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == [
        "<think>", "Ġborn", "Ġ", "</think>", "Ċ", "<search>", "ĠVas", "fol", "Ġborn", "Ġ",
        "</search>", "<answer>", "ĠBo", "Ġ", "</answer>",
    ]  # fmt: skip
    for tag in TAGS:
        (tag_id,) = tok.encode(tag, add_special_tokens=False)
        assert tok.decode([tag_id], skip_special_tokens=True) == tag  # decodes as text
    assert tok.decode(ids) == text
    # Every word of the fixed text is one token (Search-R1 prompt's "write", "inside" and
    # "Give" are not: joining their syllables would join them in names), and a name is its
    # syllables.
    passage = Passage("0", '"Danker"', "Danker has the author Vasfol.", 0.0)
    assert tok.tokenize(format_observation([passage])) == [
        "ĊĊ", "<information>", "Doc", "Ġ1", "(", "Title", ":", 'Ġ"', "D", "an", "ker", '")',
        "ĠDan", "ker", "Ġhas", "Ġthe", "Ġauthor", "ĠVas", "fol", ".", "</information>", "ĊĊ",
    ]  # fmt: skip
    assert tok.tokenize("Question: Vurpis: which country is this company based in?\n") == [
        "Question", ":", "ĠVur", "pis", ":", "Ġwhich", "Ġcountry", "Ġis", "Ġthis", "Ġcompany",
        "Ġbased", "Ġin", "?", "Ċ",
    ]  # fmt: skip
    chat = build_prompt("Where was Bo born?", tokenizer=tok, chat=True)
    assert chat.startswith("<|im_start|>user\nAnswer the question below.")
    assert chat.endswith("Question: Where was Bo born?\n<|im_end|>\n<|im_start|>assistant\n")
    # The demonstrations' prompt template (the toy world's own) is whole words too.
    prompt = build_prompt("Bo: where was this person born?", template=SMALL.template)
    assert tok.tokenize(prompt) == [
        "Question", ":", "ĠBo", ":", "Ġwhere", "Ġwas", "Ġthis", "Ġperson", "Ġborn", "?", "Ċ",
    ]  # fmt: skip


def test_names_are_their_syllables_and_heldout_tokens_occur_in_training():
    world = make_world(ToyWorldConfig())
    tok = train_tokenizer()
    names = sorted(set().union(*world.names.values()))
    pieces = tok([" " + n for n in names], add_special_tokens=False)
    for name, ids in zip(names, pieces["input_ids"], strict=True):
        pieces = syllables(name)
        assert len(pieces) == NAME_SYLLABLES and all(p in SYLLABLES for p in pieces), name
        expected = ["Ġ" + pieces[0].capitalize(), *pieces[1:]]
        assert tok.convert_ids_to_tokens(ids) == expected, name

    def token_ids(facts, questions):
        texts = [f'Doc 1(Title: "{f.title}") {f.text}' for f in facts]
        texts += [build_prompt(q.question) for q in questions]
        texts += [f"<search> {h.entity} {h.relation} </search>" for q in questions for h in q.chain]
        texts += [f"<answer> {q.answer} </answer>" for q in questions]
        return {i for ids in tok(texts, add_special_tokens=False)["input_ids"] for i in ids}

    # Training text: the training world (RL) and the demo worlds (the warm start).
    train_facts = [f for f in world.facts if f.split == "train"]
    train_facts += [f for corpus in world.demo_facts for f in corpus]
    train = token_ids(train_facts, world.train + world.demo)
    heldout = token_ids([f for f in world.facts if f.split == "heldout"], world.heldout)
    assert heldout <= train
    assert len(train) > 2 * len(SYLLABLES)


# --- demonstrations ---------------------------------------------------------------------------


def test_demonstrations_are_rollout_text(built):
    paths, world, _, demo_retrievers = built
    demos = load_demonstrations(paths.demos)
    assert [d.question for d in demos] == [q.question for q in world.demo]
    for demo, q in zip(demos, world.demo, strict=True):
        (prompt, trained), *turns = demo.segments
        assert (prompt, trained) == (build_prompt(q.question, template=SMALL.template), False)
        assert prompt == f"Question: {q.question}\n"
        assert [t for _, t in turns] == [i % 2 == 0 for i in range(len(turns))]
        actions = [parse_action(text) for text, t in turns if t]
        assert [a.kind for a in actions] == ["search"] * (len(actions) - 1) + ["answer"]
        observations = [text for text, t in turns if not t]
        retriever = demo_retrievers[int(q.split[4:])]  # the demo world's own corpus
        expected = [
            format_observation(r) for r in retriever.search([a.content for a in actions[:-1]], 3)
        ]
        assert observations == expected
        em = exact_match(actions[-1].content, demo.golden_answers)
        searched = [a.content.rsplit(" ", 1)[0] for a in actions[:-1]]
        if demo.flaw == "":
            assert em == 1.0 and searched == [h.entity for h in q.chain]
        else:
            assert demo.flaw == "early_answer"
            assert em == 0.0 and len(searched) == len(q.chain) - 1
            # It read every hop right and answered with what it found one hop short.
            assert searched == [h.entity for h in q.chain[:-1]]
            assert actions[-1].content == q.chain[-2].answer
    assert set(d.flaw for d in demos) == {"", "early_answer"}


def test_demo_early_answer_rates_follow_the_config():
    cfg = SMALL
    rng = random.Random(0)
    for hops in (1, 2, 3):
        q = Question("q", "a", "train", (None,) * hops)
        stops = Counter(demo_stop(q, cfg, rng) for _ in range(20000))
        assert set(stops) <= {hops - 2, hops - 1}
        assert stops[hops - 2] / 20000 == pytest.approx(cfg.early_answer[hops - 1], abs=0.015)


# --- build cache ------------------------------------------------------------------------------


def test_build_is_cached_and_rebuilt_when_settings_change(tmp_path):
    cfg = dataclasses.replace(SMALL, train_questions=10, demo_questions=10, heldout_questions=10)
    paths = build(tmp_path / "w", cfg)
    stamp = os.stat(paths.info).st_mtime_ns
    assert build(tmp_path / "w", cfg) == paths
    assert os.stat(paths.info).st_mtime_ns == stamp  # nothing rewritten
    again = build(tmp_path / "again", cfg)  # the same files, byte for byte
    for a, b in zip(paths[1:], again[1:], strict=True):
        if a.is_file():
            assert a.read_bytes() == b.read_bytes(), a.name
    for i in range(cfg.demo_worlds):
        name = f"{i}.jsonl"
        assert (paths.demo_corpora / name).read_bytes() == (again.demo_corpora / name).read_bytes()
    assert (paths.tokenizer / "tokenizer.json").read_bytes() == (
        again.tokenizer / "tokenizer.json"
    ).read_bytes()
    other = dataclasses.replace(cfg, world_seed=7)
    assert build(tmp_path / "w", other) == paths
    info = json.loads(paths.info.read_text())
    assert info["fingerprint"] == files.world_fingerprint(other) != files.world_fingerprint(cfg)
    assert info["config"]["world_seed"] == 7
    assert [q.question for q in make_world(other).heldout] == [
        e.question for e in load_examples(paths.heldout)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "w"]  # no temporary leftovers


def test_killed_build_leaves_no_half_written_world(tmp_path, monkeypatch):
    cfg = dataclasses.replace(SMALL, train_questions=10, demo_questions=10, heldout_questions=10)

    def dies_midway(root, cfg):
        (root / "corpus.jsonl").write_text("{}\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "_write_world", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "w", cfg)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    paths = build(tmp_path / "w", cfg)
    assert split_title(json.loads(paths.corpus.read_text().splitlines()[0])["contents"])[1]


@pytest.mark.parametrize(
    "change",
    [
        {"early_answer": (0.1, 0.2, 0.3)},
        {"early_answer": (0.0, 0.3, 1.5)},
        {"hop_mix": (0.0, 0.0, 0.0)},
        {"cities": 2},
        {"people": 10},
        {"heldout_scale": 0.0},
        {"demo_top_k": 0},
        {"demo_worlds": 0},
        {"demo_scale": 0.0},
        {"template": "no field"},
    ],
)
def test_config_rejects_bad_settings(change):
    with pytest.raises(ValueError):
        ToyWorldConfig(**change)


def test_too_many_questions_for_the_world_is_an_error():
    with pytest.raises(ValueError, match="questions of 2 hops wanted, only 62 exist"):
        make_world(dataclasses.replace(SMALL, heldout_questions=200))


# --- the evidence world: the answer in sight one hop early ------------------------------------


def test_evidence_world_shows_the_answer_one_hop_early_and_demos_read_it(tmp_path):
    """country_in_passage: every passage whose object is a city names the city's country too,
    so the search before a "which country" question's last hop shows its answer: an early
    answer of the city is a near-miss, and with early_reads a third of those demonstrations
    answer the country instead (read off the evidence), scored right. Without the two settings
    the world, and its fingerprint, are what they were."""
    cfg = dataclasses.replace(
        SMALL, country_in_passage=True, early_reads=0.3, early_answer=(0.0, 1.0, 1.0),
        demo_questions=120,
    )  # fmt: skip
    world = make_world(cfg)
    country_of = {f.subject: f.object for f in world.facts if f.relation == "country"}
    for f in world.facts:
        if RELATIONS[f.relation].object == "city":
            assert f.country == country_of[f.object]
            assert f.text.endswith(f" {f.object} is a city in the country {f.country}.")
        else:
            assert f.country == ""
    plain = make_world(SMALL)
    assert [f._replace(country="") for f in world.facts] == list(plain.facts)
    assert files.world_fingerprint(SMALL) == cache.fingerprint(
        files._FORMAT_VERSION,
        {k: v for k, v in dataclasses.asdict(SMALL).items() if k not in files._ADDED_LATER},
        build_prompt("Q?"),
        format_observation([Passage("0", '"T"', "x\ny.", 0.0), Passage("1", "U", "", 0.0)]),
    )  # a world of before the settings keeps its cached files
    assert files.world_fingerprint(cfg) != files.world_fingerprint(SMALL)
    paths = build(tmp_path / "evidence", cfg)
    demos = load_demonstrations(paths.demos)
    by_question = {q.question: q for q in world.demo}
    chain = lambda d: by_question[d.question].chain
    country_chains = [d for d in demos if len(chain(d)) > 1 and chain(d)[-1].relation == "country"]
    flaws = Counter(d.flaw for d in country_chains)
    assert set(flaws) == {"early_answer", "early_read"}  # every one early (rate 1.0)
    assert 0.1 < flaws["early_read"] / len(country_chains) < 0.5  # about 0.3
    info = json.loads(paths.info.read_text())
    assert info["stats"]["demo_episodes"]["all"]["near_miss"] > 0.3  # early, the gold seen
    for d in country_chains:
        answer = re.search(r"<answer> (\w+) </answer>", d.segments[-1][0]).group(1)
        assert (answer == d.golden_answers[0]) == (d.flaw == "early_read")
        assert d.golden_answers[0] in d.segments[-2][0]  # in the last observation
    with pytest.raises(ValueError, match="early_reads needs country_in_passage"):
        dataclasses.replace(SMALL, early_reads=0.3)
