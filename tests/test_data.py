"""Question-answer data loading (tspo_jax/data.py): Search-R1 parquet, FlashRAG, plain JSONL."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tspo_jax.data import Example, load_examples

# The shape of Search-R1's prompt: instructions with an example answer, then the question.
INSTRUCTIONS = (
    "Answer the given question. Reason inside <think> and </think>. Search with <search> query "
    "</search>. Answer inside <answer> and </answer>, for example <answer> Beijing </answer>. "
)


def search_r1_row(question, target, source="nq", index=0, keep_question=False):
    """A row as Search-R1's scripts write it; they keep FlashRAG's `question` column beside the
    prompt (``keep_question``), older files may not have it."""
    row = {
        "data_source": source,
        "prompt": [{"role": "user", "content": prompt_text(question)}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": target}},
        "extra_info": {"split": "train", "index": index},
    }
    return {"question": question, "golden_answers": target, **row} if keep_question else row


def prompt_text(question):
    return f"{INSTRUCTIONS}Question: {question}\n"


def write_parquet(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_jsonl(path, lines):
    path.write_text(
        "".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines)
    )
    return path


def test_search_r1_parquet(tmp_path):
    rows = [
        search_r1_row(
            "who got the first nobel prize in physics?", ["Wilhelm Conrad Röntgen"], index=7
        ),
        search_r1_row("Question: what is it? what?", ["a", " b "], source="hotpotqa", index=8),
    ]
    path = write_parquet(tmp_path / "train.parquet", rows)
    q0 = "who got the first nobel prize in physics?"
    q1 = "Question: what is it? what?"
    assert load_examples(path) == [
        Example(q0, ("Wilhelm Conrad Röntgen",), "nq", 7, user_prompt(q0)),
        Example(q1, ("a", "b"), "hotpotqa", 8, user_prompt(q1)),  # after the first "Question:"
    ]


def user_prompt(question):
    return ({"role": "user", "content": prompt_text(question)},)


def test_search_r1_question_column_keeps_questions_whole(tmp_path):
    """The `question` column when a row has one; else the prompt after its first marker. A
    question that itself contains "Question:" loads whole either way."""
    tricky = "what does the line 'Question: why?' refer to?"
    rows = [
        search_r1_row(tricky, ["a poem"], index=3, keep_question=True),
        search_r1_row("  plain?  ", ["b"], index=4, keep_question=True),
        search_r1_row(tricky, ["a poem"], index=5),  # no question column in this row
    ]
    examples = load_examples(write_parquet(tmp_path / "train.parquet", rows))
    assert examples == [
        Example(tricky, ("a poem",), "nq", 3, user_prompt(tricky)),
        Example("plain?", ("b",), "nq", 4, user_prompt("  plain?  ")),
        Example(tricky, ("a poem",), "nq", 5, user_prompt(tricky)),
    ]
    assert examples[0].prompt[0]["content"].endswith("Question: " + tricky + "\n")


def test_flashrag_parquet(tmp_path):
    rows = [
        {"id": "test_0", "question": "who sang x?", "golden_answers": ["A", "B"]},
        {"id": "test_1", "question": " where is y? ", "golden_answers": ["C"]},
    ]
    path = write_parquet(tmp_path / "test.parquet", rows)
    assert load_examples(path) == [
        Example("who sang x?", ("A", "B"), "", 0),
        Example("where is y?", ("C",), "", 1),
    ]


def test_plain_jsonl(tmp_path):
    lines = [
        {"question": "q1", "golden_answers": "one answer"},
        "\n",
        {"question": "q2", "golden_answers": ["x", "y"], "data_source": "popqa", "id": 5},
    ]
    assert load_examples(write_jsonl(tmp_path / "dev.jsonl", lines)) == [
        Example("q1", ("one answer",), "", 0),
        Example("q2", ("x", "y"), "popqa", 1),
    ]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "holds no examples"),
        (["\n", "  \n"], "holds no examples"),
        ([{"question": "q", "golden_answers": "a"}, "{oops\n"], "line 2: not valid JSON"),
        ([[1, 2]], "line 1: expected an object, got list"),
        ([{"question": "q"}], "line 1: expected Search-R1 columns .* found \\['question'\\]"),
        ([{"question": " ", "golden_answers": "a"}], "line 1: the question is empty"),
        ([{"question": 3, "golden_answers": "a"}], "line 1: the question is empty or not a string"),
        ([{"question": "q", "golden_answers": []}], "line 1: golden answers must be"),
        ([{"question": "q", "golden_answers": {"a": 1}}], "line 1: golden answers must be"),
        ([{"question": "q", "golden_answers": ["a", 1]}], "line 1: every golden answer"),
        ([{"question": "q", "golden_answers": ["a", ""]}], "line 1: every golden answer"),
        ([{"question": "q", "golden_answers": "a", "data_source": 3}], "line 1: data_source"),
        ([{"question": "q", "golden_answers": "a", "prompt": "q?"}], "line 1: 'prompt' must be"),
        (
            [{"question": "q", "golden_answers": "a", "prompt": [{"role": "user"}]}],
            "line 1: 'prompt' must be a list of chat messages",
        ),
    ],
)
def test_jsonl_errors(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=f"bad\\.jsonl(, )?.*{message}"):
        load_examples(path)


def test_parquet_errors(tmp_path):
    good = search_r1_row("q?", ["a"])
    no_question = search_r1_row("q?", ["a"])
    no_question["prompt"] = [{"role": "user", "content": "Just instructions."}]
    path = write_parquet(tmp_path / "a.parquet", [good, good, no_question])
    with pytest.raises(ValueError, match=r"a\.parquet, row 2: .* needs a 'question' column"):
        load_examples(path)

    empty_target = search_r1_row("q?", [])
    path = write_parquet(tmp_path / "b.parquet", [good, empty_target])
    with pytest.raises(ValueError, match=r"b\.parquet, row 1: golden answers must be"):
        load_examples(path)

    no_prompt = dict(good, prompt=[])
    path = write_parquet(tmp_path / "c.parquet", [no_prompt])
    with pytest.raises(ValueError, match=r"c\.parquet, row 0: 'prompt' must be a list of chat"):
        load_examples(path)

    rows = [{"question": "q", "golden_answers": ["a"]}, {"question": "q", "golden_answers": None}]
    path = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(ValueError, match=r"d\.parquet, row 1: golden answers must be"):
        load_examples(path)

    schema = pa.schema([("question", pa.string()), ("golden_answers", pa.list_(pa.string()))])
    path = write_parquet(tmp_path / "e.parquet", [], schema=schema)
    with pytest.raises(ValueError, match=r"e\.parquet: the file holds no examples"):
        load_examples(path)

    path = tmp_path / "f.parquet"
    path.write_text('{"question": "not parquet"}\n')
    with pytest.raises(ValueError, match=r"f\.parquet: not a readable parquet file"):
        load_examples(path)


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: no such file"):
        load_examples(tmp_path / "missing.jsonl")
    path = tmp_path / "data.csv"
    path.write_text("question,golden_answers\n")
    with pytest.raises(ValueError, match=r"data\.csv: expected a \.parquet or \.jsonl file"):
        load_examples(path)
