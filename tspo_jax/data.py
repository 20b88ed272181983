"""Question-answer data, one question a row (docs/SEARCH_R1_FORMATS.md).

`load_examples` reads, by file suffix and by the columns a row has:
- Search-R1's parquet files (`.parquet`): `data_source`, `prompt` =
  `[{"role": "user", "content": <full prompt>}]`, `reward_model` =
  `{"style": "rule", "ground_truth": {"target": [gold answers]}}`, `extra_info` =
  `{"split", "index"}`. The question is the prompt text after its last "Question:" (Search-R1's
  prompt ends with "Question: {question}\\n").
- FlashRAG-style parquet or JSONL (`.jsonl`) rows with `question` and `golden_answers` (a list
  of strings or one string); `data_source` is read when present.
Errors name the file and the row: "line N" (1-based) in JSONL, "row N" (0-based) in parquet.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq


class Example(NamedTuple):
    question: str
    golden_answers: tuple[str, ...]
    data_source: str  # e.g. "nq", "hotpotqa"; "" when the file does not say
    index: int  # extra_info.index in Search-R1 files, else the row's position (0-based)


def load_examples(path: str | os.PathLike) -> list[Example]:
    """All examples of a Search-R1 / FlashRAG parquet file or a JSONL file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".parquet":
        rows = _parquet_rows(path)
    elif path.suffix == ".jsonl":
        rows = jsonl_rows(path)
    else:
        raise ValueError(f"{path}: expected a .parquet or .jsonl file")
    examples = [_example(row, where, position) for position, (where, row) in enumerate(rows)]
    if not examples:
        raise ValueError(f"{path}: the file holds no examples")
    return examples


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    for i, row in enumerate(rows):
        yield f"{path}, row {i}", row


def jsonl_rows(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(where, parsed JSON) per non-blank line; where is "<path>, line N" for error messages."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None


def _example(row: Any, where: str, position: int) -> Example:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    index = position
    if "reward_model" in row:  # Search-R1
        try:
            prompt = row["prompt"][0]["content"]
            golds = row["reward_model"]["ground_truth"]["target"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(
                f"{where}: a Search-R1 row needs prompt[0]['content'] and "
                "reward_model['ground_truth']['target']"
            ) from None
        if not isinstance(prompt, str) or "Question:" not in prompt:
            raise ValueError(f"{where}: the prompt has no 'Question:' to read the question from")
        question = prompt.rpartition("Question:")[2]
        extra_info = row.get("extra_info")
        if isinstance(extra_info, dict):
            index = extra_info.get("index", position)
    elif "question" in row and "golden_answers" in row:  # FlashRAG, plain JSONL
        question, golds = row["question"], row["golden_answers"]
    else:
        raise ValueError(
            f"{where}: expected Search-R1 columns (prompt, reward_model) or question and "
            f"golden_answers; found {sorted(row)}"
        )
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: the question is empty or not a string: {question!r:.100}")
    golds = [golds] if isinstance(golds, str) else golds
    if not isinstance(golds, list | tuple) or not golds:
        raise ValueError(f"{where}: golden answers must be a string or a non-empty list")
    if not all(isinstance(g, str) and g.strip() for g in golds):
        raise ValueError(f"{where}: every golden answer must be a non-empty string: {golds!r:.200}")
    data_source = row.get("data_source") or ""
    if not isinstance(data_source, str):
        raise ValueError(f"{where}: data_source must be a string: {data_source!r:.100}")
    if not isinstance(index, int) or isinstance(index, bool):
        raise ValueError(f"{where}: extra_info['index'] must be an integer: {index!r:.100}")
    return Example(question.strip(), tuple(g.strip() for g in golds), data_source, index)
