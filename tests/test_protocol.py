"""Tag protocol: prompts, action parsing, observations, answer scoring (tspo_jax/protocol.py)."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tspo_jax.protocol import (
    DEFAULT_TEMPLATE,
    INVALID_ACTION_OBSERVATION,
    Action,
    build_prompt,
    chat_prompt,
    contains_answer,
    exact_match,
    f1_score,
    final_answer,
    first_hit,
    format_observation,
    normalize_answer,
    parse_action,
    split_title,
)
from tspo_jax.retrieval import Passage

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """One token per word or run of punctuation (`\\w+|[^\\w\\s]+`), so counts are by hand."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", chat_template=CHAT_TEMPLATE
    )


def ref_count(text):
    return len(re.findall(r"\w+|[^\w\s]+", text))


# --- prompts ----------------------------------------------------------------------------------


def test_build_prompt_plain():
    prompt = build_prompt("  who wrote hamlet? ")
    assert prompt == DEFAULT_TEMPLATE.replace("{question}", "who wrote hamlet?")
    assert prompt.endswith("\nQuestion: who wrote hamlet?\n")
    for tag in ("<think>", "<search>", "</search>", "<information>", "<answer>", "</answer>"):
        assert tag in prompt
    assert build_prompt("x {y}", template="Q: {question} A:") == "Q: x {y} A:"


def test_build_prompt_chat(tokenizer):
    prompt = build_prompt("who?", tokenizer=tokenizer, chat=True, template="Q: {question}")
    assert prompt == "<|im_start|>user\nQ: who?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_prompt_keeps_a_rows_messages(tokenizer):
    """A Search-R1 row's own prompt: verbatim without the chat template (trailing newline
    included), through it with chat=True (all its messages, then the generation prompt)."""
    user = [{"role": "user", "content": "Answer it. Question: who?\n"}]
    assert chat_prompt(user) == "Answer it. Question: who?\n"
    assert chat_prompt(user, tokenizer=tokenizer, chat=True) == (
        "<|im_start|>user\nAnswer it. Question: who?\n<|im_end|>\n<|im_start|>assistant\n"
    )
    two = [{"role": "system", "content": "Be brief."}, *user]
    assert chat_prompt(two, tokenizer=tokenizer, chat=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAnswer it. Question: who?\n"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="2 chat messages needs the chat template"):
        chat_prompt(two)


def test_invalid_action_observation_is_search_r1s():
    assert INVALID_ACTION_OBSERVATION == (
        "\nMy previous action is invalid. If I want to search, I should put the query between "
        "<search> and </search>. If I want to give the final answer, I should put the answer "
        "between <answer> and </answer>. Let me try again.\n"
    )


def test_build_prompt_errors():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_prompt("who?", chat=True)
    with pytest.raises(ValueError, match=r"no \{question\} field"):
        build_prompt("who?", template="no placeholder")


# --- actions ----------------------------------------------------------------------------------

LONG = "a" * 501
BOTH = "both a search and an answer in one turn"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>hm</think>\n<search> capital </search>", ("search", "capital", "")),
        ("<think>so</think> <answer> Paris </answer>", ("answer", "Paris", "")),
        ("<answer>\nNew York\n</answer>", ("answer", "New York", "")),
        ("I think it is Paris.", ("invalid", "", "no <search> or <answer> tag")),
        ("<SEARCH>x</SEARCH>", ("invalid", "", "no <search> or <answer> tag")),
        ("<search>capital of", ("invalid", "", "unclosed <search> tag")),
        ("</search> x <search>", ("invalid", "", "unclosed <search> tag")),
        ("done </answer>", ("invalid", "", "</answer> without <answer>")),
        ("<search>   </search>", ("invalid", "", "empty query")),
        ("<answer></answer>", ("invalid", "", "empty answer")),
        (f"<search>{LONG}</search>", ("invalid", "", "query longer than 500 characters")),
        ("<search>a</search><answer>b</answer>", ("invalid", "", BOTH)),
        ("<answer>a <search>b</answer>", ("invalid", "", BOTH)),
        ("<search>a</search><search>b", ("invalid", "", "more than one <search> in one turn")),
        ("<answer>a</answer><answer>b", ("invalid", "", "more than one <answer> in one turn")),
    ],
)
def test_parse_action_table(text, expected):
    assert parse_action(text) == Action(*expected)


def test_parse_action_max_query_chars():
    assert parse_action(f"<search>{LONG}</search>", max_query_chars=501) == Action(
        "search", LONG, ""
    )
    assert parse_action("<search> abcd </search>", max_query_chars=3).kind == "invalid"


TAGS = ("<search>", "</search>", "<answer>", "</answer>")
_NOT_TAG = r"(?:(?!<search>|</search>|<answer>|</answer>).)*"


def reference_action(text, max_query_chars):
    """Independent oracle: a valid turn is tag-free text, one pair of one kind, tag-free text."""
    for kind in ("search", "answer"):
        m = re.fullmatch(f"(?s){_NOT_TAG}<{kind}>({_NOT_TAG})</{kind}>{_NOT_TAG}", text)
        if m:
            content = m.group(1).strip()
            too_long = kind == "search" and len(content) > max_query_chars
            return (kind, content) if content and not too_long else ("invalid", "")
    return ("invalid", "")


FRAGMENTS = [*TAGS, "<think>", "</think>", "<", ">", "/", "search", "answer", "<search", "answer>"]
FRAGMENTS += [" ", "\n", "q", "Paris", "é"]
tag_soup = st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join)
one_action = st.builds(
    "{}<{}>{}</{}>{}".format,
    tag_soup,
    st.sampled_from(["search", "answer"]),
    st.text(max_size=12),
    st.sampled_from(["search", "answer"]),
    st.text(max_size=6),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=60), tag_soup, one_action))
def test_parse_action_never_raises_and_matches_oracle(text):
    action = parse_action(text, max_query_chars=8)
    assert action.kind in ("search", "answer", "invalid")
    assert (action.kind, action.content) == reference_action(text, 8)
    assert (action.kind == "invalid") == bool(action.error)


def test_final_answer():
    assert (
        final_answer(["<think>a</think><search>q</search>", "<answer> Paris </answer>"]) == "Paris"
    )
    assert final_answer("<answer>a</answer> then <answer> b </answer>") == "b"
    assert final_answer(["<answer>x</answer>", "<search>y</search>"]) == "x"
    assert final_answer(["<answer></answer>"]) == ""
    assert final_answer(["<search>q</search>", "<answer>Paris"]) is None
    assert final_answer([]) is None
    # A tag split across two turns is not an answer: each turn's text is read on its own.
    assert final_answer(["<answer>Pa", "ris</answer>"]) is None


# --- observations -----------------------------------------------------------------------------


def test_split_title():
    """Search-R1's split (`_passages2string`): the first line verbatim, the rest joined by
    newlines; lines end at "\\n" only."""
    assert split_title('"Paris"\nParis is the capital.') == ('"Paris"', "Paris is the capital.")
    assert split_title("Paris\nline one\nline two\n") == ("Paris", "line one\nline two\n")
    assert split_title('"A "quoted" word"\ntext') == ('"A "quoted" word"', "text")
    assert split_title("Only a title") == ("Only a title", "")
    assert split_title(' "T" \r\nline\r\n') == (' "T" \r', "line\r\n")


def passages_of(*contents):
    """Passages as the retrievers make them from Search-R1 `contents`."""
    return [Passage(str(i), *split_title(c), 0.0) for i, c in enumerate(contents)]


def test_format_observation_is_search_r1_byte_for_byte():
    """Strings written out by hand from Search-R1's format: "Doc {i}(Title: {title}) {text}\\n"
    per passage, the block stripped, wrapped in "\\n\\n<information>...</information>\\n\\n"."""
    wiki = [
        '"Iowa Highway 17"\nIowa Highway 17 (Iowa 17) is a north-south state highway.',
        '"Ames, Iowa"\nAmes is a city in Story County, Iowa.',
    ]
    assert format_observation(passages_of(*wiki)) == (
        '\n\n<information>Doc 1(Title: "Iowa Highway 17") Iowa Highway 17 (Iowa 17) is a '
        'north-south state highway.\nDoc 2(Title: "Ames, Iowa") Ames is a city in Story County, '
        "Iowa.</information>\n\n"
    )
    # A title-only passage keeps the space after its title, unless it ends the block.
    assert format_observation(passages_of('"Solo"', "T\nx")) == (
        '\n\n<information>Doc 1(Title: "Solo") \nDoc 2(Title: T) x</information>\n\n'
    )
    assert format_observation(passages_of("T\nx", '"Solo"')) == (
        '\n\n<information>Doc 1(Title: T) x\nDoc 2(Title: "Solo")</information>\n\n'
    )
    # Internal newlines and runs of spaces are kept; only the block's ends are stripped.
    assert format_observation(passages_of("  T\nline  one\n\nline two \n")) == (
        "\n\n<information>Doc 1(Title:   T) line  one\n\nline two</information>\n\n"
    )
    # CRLF: the title keeps its "\\r", the text its "\\r\\n" line ends.
    assert format_observation(passages_of('"T"\r\nline one\r\nline two\r\n', "U\r\nv")) == (
        '\n\n<information>Doc 1(Title: "T"\r) line one\r\nline two\r\n\nDoc 2(Title: U\r) v'
        "</information>\n\n"
    )


PASSAGES = [Passage("1", "A", "one two three", 1.0), Passage("2", "B", "four\nfive", 0.5)]
FULL = (
    "\n\n<information>Doc 1(Title: A) one two three\nDoc 2(Title: B) four\nfive</information>\n\n"
)


def test_format_observation_full():
    assert format_observation(PASSAGES) == FULL
    assert format_observation([]) == "\n\n<information></information>\n\n"


@pytest.mark.parametrize(
    "max_tokens, body",
    [
        # 6 tokens of tags (< information > </ information >); the body's words cost
        # Doc 1, "1(Title:" 4, "A)" 2, one two three 1 each, Doc 1, "2(Title:" 4, "B)" 2, ...
        (25, "Doc 1(Title: A) one two three\nDoc 2(Title: B) four\nfive"),
        (24, "Doc 1(Title: A) one two three\nDoc 2(Title: B) four"),
        (17, "Doc 1(Title: A) one two three\nDoc"),
        (16, "Doc 1(Title: A) one two three"),
        (14, "Doc 1(Title: A) one"),
        (6, ""),
        (1, ""),  # the tags are never cut, even over budget
    ],
)
def test_format_observation_token_budget(tokenizer, max_tokens, body):
    out = format_observation(PASSAGES, tokenizer=tokenizer, max_tokens=max_tokens)
    assert out == f"\n\n<information>{body}</information>\n\n"


def test_format_observation_word_budget_without_tokenizer():
    # No tokenizer: whitespace words, 11 here ("<information>Doc" and "five</information>"
    # count one each).
    assert format_observation(PASSAGES, max_tokens=11) == FULL
    out = format_observation(PASSAGES, max_tokens=5)
    assert out == "\n\n<information>Doc 1(Title: A) one two</information>\n\n"


words = st.text(alphabet="abc .,()", min_size=1, max_size=30)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(words, words), max_size=4), st.integers(0, 60))
def test_format_observation_longest_prefix_that_fits(tokenizer, pairs, max_tokens):
    passages = [Passage(str(i), t, x, 0.0) for i, (t, x) in enumerate(pairs)]
    full = format_observation(passages, max_tokens=10**6)
    out = format_observation(passages, tokenizer=tokenizer, max_tokens=max_tokens)
    head, tail = "\n\n<information>", "</information>\n\n"
    assert out.startswith(head) and out.endswith(tail)
    body, full_body = out[len(head) : -len(tail)], full[len(head) : -len(tail)]
    assert full_body.startswith(body)
    if body:
        assert ref_count(out) <= max_tokens
    if body != full_body:  # maximal: one more word would not fit
        next_end = re.compile(r"\S+").search(full_body, len(body)).end()
        assert ref_count(head + full_body[:next_end] + tail) > max_tokens


# --- answer scoring ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("The  Eiffel-Tower!", "eiffeltower"),
        ("An apple a day", "apple day"),
        ("U.S.A.", "usa"),
        ("  Théâtre\tde la Ville ", "théâtre de la ville"),
        ("theater", "theater"),
        ("a", ""),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_match():
    assert exact_match("the Beatles", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatles!", "beatles") == 1.0
    assert exact_match("Beatle", ["Beatles"]) == 0.0
    assert exact_match("P", "Paris") == 0.0  # a str gold is one answer, not its characters
    assert exact_match(None, ["Paris"]) == 0.0
    assert exact_match("Paris", []) == 0.0


def test_f1_score():
    # "cat sat on mat" vs "cat on mat": 3 common, precision 3/4, recall 1, F1 = 6/7.
    assert f1_score("the cat sat on mat", ["dog", "a cat on the mat"]) == pytest.approx(6 / 7)
    # "cat cat" vs "cat": 1 common, precision 1/2, recall 1, F1 = 2/3.
    assert f1_score("cat cat", "cat") == pytest.approx(2 / 3)
    assert f1_score("the", ["a"]) == 1.0  # both empty after normalization
    assert f1_score("the", ["cat"]) == 0.0
    assert f1_score("dog", ["cat"]) == 0.0
    assert f1_score(None, ["cat"]) == 0.0


@pytest.mark.parametrize(
    "text, golds, hit",
    [
        ("Joe Biden lives in the US.", ["us"], True),
        ("He studied on campus.", ["us"], False),  # Search-R1's substring test would hit
        ("The U.S. president", ["U.S."], True),
        ("at Harvard University, in Cambridge", ["harvard university"], True),
        ("new york city", ["York New"], False),
        ("The Beatles", ["the"], False),  # empty after normalization
        ("Doc 1(Title: Paris) capital", ["London", "paris"], True),
        ("Doc 1(Title: Paris) capital", "paris", True),
    ],
)
def test_contains_answer(text, golds, hit):
    assert contains_answer(text, golds) is hit


def test_first_hit():
    observations = [None, "Doc 1(Title: X) on campus", "Doc 1(Title: Y) the US army", "US"]
    assert first_hit(observations, ["us"]) == 2
    assert first_hit(["US"], ["us"]) == 0
    assert first_hit([None, None], ["us"]) == -1
    assert first_hit([], ["us"]) == -1
    # The corrective observation retrieves nothing, even where it holds the gold's words.
    assert contains_answer(INVALID_ACTION_OBSERVATION, ["answer"])
    assert first_hit([INVALID_ACTION_OBSERVATION, "the answer is 42"], ["answer"]) == 1
