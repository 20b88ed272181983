"""Question-answer data, one question a row (docs/SEARCH_R1_FORMATS.md).

`load_examples` reads, by file suffix and by the columns a row has:
- Search-R1's parquet files (`.parquet`): `data_source`, `prompt` =
  `[{"role": "user", "content": <full prompt>}]`, `reward_model` =
  `{"style": "rule", "ground_truth": {"target": [gold answers]}}`, `extra_info` =
  `{"split", "index"}`, and the FlashRAG columns its scripts start from (`question`,
  `golden_answers`, `id`). The question is the `question` column; a row without one gives the
  prompt text after its first "Question:" (Search-R1's prompt ends with "Question: {question}\\n"
  and has no "Question:" before it, while a question may contain one).
- FlashRAG-style parquet or JSONL (`.jsonl`) rows with `question` and `golden_answers` (a list
  of strings or one string); `data_source` is read when present.
A row's `prompt` (a list of chat messages, each {"role", "content"}), when it has one, is kept
as it is: rollouts start from it rather than from a template (rollout.RolloutConfig).
Errors name the file and the row: "line N" (1-based) in JSONL, "row N" (0-based) in parquet.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

QUESTION_MARKER = "Question:"  # what precedes the question in Search-R1's prompt


class Example(NamedTuple):
    question: str
    golden_answers: tuple[str, ...]
    data_source: str  # e.g. "nq", "hotpotqa"; "" when the file does not say
    index: int  # extra_info.index in Search-R1 files, else the row's position (0-based)
    prompt: tuple[dict, ...] | None = None  # the row's own chat messages, or None


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


def jsonl_rows(path, *, skip_torn: bool = False) -> Iterator[tuple[str, Any]]:
    """(where, parsed JSON) per non-blank line of a local file or a URL (gs://...); where is
    "<path>, line N" for error messages. A line that is not JSON is an error, or with
    ``skip_torn`` is skipped (a log's last line, cut short by a kill)."""
    with epath.Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                if not skip_torn:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None


def _example(row: Any, where: str, position: int) -> Example:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    index = position
    prompt = _prompt(row["prompt"], where) if row.get("prompt") is not None else None
    if "reward_model" in row:  # Search-R1
        try:
            golds = row["reward_model"]["ground_truth"]["target"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(
                f"{where}: a Search-R1 row needs reward_model['ground_truth']['target']"
            ) from None
        if row.get("question") is not None:
            question = row["question"]
        elif prompt is not None and QUESTION_MARKER in prompt[-1]["content"]:
            question = prompt[-1]["content"].partition(QUESTION_MARKER)[2]
        else:
            raise ValueError(
                f"{where}: a Search-R1 row needs a 'question' column, or a prompt with "
                f"{QUESTION_MARKER!r} before the question"
            )
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
    return Example(question.strip(), tuple(g.strip() for g in golds), data_source, index, prompt)


def _prompt(messages: Any, where: str) -> tuple[dict, ...]:
    """A row's `prompt`: a non-empty list of {"role": str, "content": str} chat messages."""
    ok = isinstance(messages, list | tuple) and len(messages) > 0
    ok = ok and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok:
        raise ValueError(
            f"{where}: 'prompt' must be a list of chat messages, each with a string 'role' and "
            f"'content': {messages!r:.200}"
        )
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)
