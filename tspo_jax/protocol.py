"""The Search-R1 tag protocol: prompts, actions, observations and answer scoring.

Speaks the formats of docs/SEARCH_R1_FORMATS.md unchanged:
- the policy reasons in `<think>`, searches with `<search> query </search>`, reads the passages
  the host returns inside `<information>`, and answers with `<answer> answer </answer>`;
- an observation numbers passages from 1, `Doc i(Title: <title>) <text>` each, byte for byte as
  Search-R1 writes it, wrapped as "\\n\\n<information>...</information>\\n\\n"; over its token
  budget it is cut at a word boundary (Search-R1 cuts the token ids);
- a corpus passage's `contents` is its title line (often in double quotes, kept), then its text;
- answers are scored by exact match after SQuAD normalization.

`first_hit` is the match rule of docs/TSPO.md: the gold answer's words must appear as a
contiguous run of whole words of the observation, both SQuAD-normalized.

Pure host functions, standard library only. A tokenizer, where one is accepted, is any object
with `encode(text, add_special_tokens=False)` (transformers or tokenizers) and, for chat
prompts, transformers' `apply_chat_template`.
"""

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

DEFAULT_TEMPLATE = (
    "Answer the question below. Think inside <think> </think>. To look something up, write "
    "<search> query </search> and the results will appear inside <information> </information>; "
    "search as often as you need. Give the final answer as <answer> answer </answer>.\n"
    "Question: {question}\n"
)

# Shown after a turn that is neither one well-formed search nor one well-formed answer:
# Search-R1's message, byte for byte (search_r1/llm_agent/generation.py, execute_predictions).
INVALID_ACTION_OBSERVATION = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n"
)

MAX_QUERY_CHARS = 500

# The protocol's tags, here and nowhere else. A turn ends where the policy closes an action:
# STOP_STRINGS are what the sampler stops on (ANSWER_STOP when only an answer may follow).
ACTION_TAGS = ("<search>", "</search>", "<answer>", "</answer>")
TAGS = ("<think>", "</think>", *ACTION_TAGS, "<information>", "</information>")
STOP_STRINGS = ("</search>", "</answer>")
ANSWER_STOP = ("</answer>",)
FORCED_ANSWER_PREFIX = "<answer>"  # what the last turn starts with under force_answer
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


class Action(NamedTuple):
    kind: str  # "search" | "answer" | "invalid"
    content: str  # the query or the answer, stripped; "" when invalid
    error: str  # why the action is invalid; "" otherwise


# ---------------------------------------------------------------------------------------------
# Prompts


def check_template(template: str) -> None:
    """A prompt template must have a {question} field (where build_prompt puts the question)."""
    if "{question}" not in template:
        raise ValueError("the template has no {question} field")


def build_prompt(
    question: str, *, tokenizer: Any = None, chat: bool = False, template: str = DEFAULT_TEMPLATE
) -> str:
    """The first prompt of an episode: plain text for base models, chat-formatted for instruct
    models (one user message, then the assistant's generation prompt)."""
    check_template(template)
    text = template.replace("{question}", question.strip())
    return chat_prompt([{"role": "user", "content": text}], tokenizer=tokenizer, chat=chat)


def chat_prompt(messages: Sequence[dict], *, tokenizer: Any = None, chat: bool = False) -> str:
    """A prompt given as chat messages (a Search-R1 parquet row's `prompt`) as the text the
    policy continues: with ``chat``, the tokenizer's chat template with the assistant's
    generation prompt (as Search-R1 / verl's RLHFDataset); without, the content of the one
    message, verbatim."""
    if chat:
        if tokenizer is None:
            raise ValueError("chat=True needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
    if len(messages) != 1:
        raise ValueError(
            f"a prompt of {len(messages)} chat messages needs the chat template (--chat true)"
        )
    return messages[0]["content"]


# ---------------------------------------------------------------------------------------------
# Actions


def parse_action(text: str, *, max_query_chars: int = MAX_QUERY_CHARS) -> Action:
    """Reads the action out of the text the policy sampled in one turn.

    Valid: exactly one `<search>q</search>` (q non-empty, at most max_query_chars after
    stripping) or exactly one `<answer>a</answer>` (a non-empty), and no tag of the other kind.
    Anything else is invalid, with the reason in `error`. Never raises.
    """
    count = {tag: text.count(tag) for tag in ACTION_TAGS}
    has_search = count["<search>"] + count["</search>"] > 0
    has_answer = count["<answer>"] + count["</answer>"] > 0
    if has_search and has_answer:
        return Action("invalid", "", "both a search and an answer in one turn")
    if not (has_search or has_answer):
        return Action("invalid", "", "no <search> or <answer> tag")
    kind = "search" if has_search else "answer"
    open_tag, close_tag = f"<{kind}>", f"</{kind}>"
    if count[open_tag] > 1 or count[close_tag] > 1:
        return Action("invalid", "", f"more than one {open_tag} in one turn")
    start, end = text.find(open_tag), text.find(close_tag)
    if start < 0:
        return Action("invalid", "", f"{close_tag} without {open_tag}")
    if end < start:
        return Action("invalid", "", f"unclosed {open_tag} tag")
    content = text[start + len(open_tag) : end].strip()
    if not content:
        return Action("invalid", "", f"empty {'query' if kind == 'search' else 'answer'}")
    if kind == "search" and len(content) > max_query_chars:
        return Action("invalid", "", f"query longer than {max_query_chars} characters")
    return Action(kind, content, "")


def final_answer(sampled_texts: str | Sequence[str]) -> str | None:
    """Content (stripped) of the last `<answer>...</answer>` in the text the policy sampled, one
    string per turn; None if there is none. Pass sampled turns only, never the prompt: a prompt
    may hold an example answer (SEARCH_R1_FORMATS.md)."""
    if isinstance(sampled_texts, str):
        sampled_texts = [sampled_texts]
    answer = None
    for text in sampled_texts:
        matches = _ANSWER_RE.findall(text)
        if matches:
            answer = matches[-1].strip()
    return answer


# ---------------------------------------------------------------------------------------------
# Observations


def split_title(contents: str) -> tuple[str, str]:
    """Search-R1 corpus `contents` -> (title, text), as Search-R1's `_passages2string` splits it:
    the title is the first line verbatim (Wikipedia titles keep their double quotes, a CRLF file
    its "\\r"), the text the remaining lines joined by "\\n" ("" for a title-only passage).
    Lines end at "\\n" only, so title + "\\n" + text == contents whenever there is a text."""
    title, _, text = contents.partition("\n")
    return title, text


def count_tokens(text: str, tokenizer: Any = None) -> int:
    """Tokens of `text` by `tokenizer.encode` (no special tokens); whitespace-separated words
    when no tokenizer is given (a rough, tokenizer-free proxy)."""
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer.encode(text, add_special_tokens=False))


def format_observation(
    passages: Iterable[Any], *, tokenizer: Any = None, max_tokens: int = 500
) -> str:
    """Search-R1's observation for retrieved passages (objects with `.title` and `.text`, such as
    retrieval.Passage), at most max_tokens long by `count_tokens`.

    Within budget it is byte for byte Search-R1's (`_passages2string`, then `execute_predictions`):
    "Doc {i}(Title: {title}) {text}\\n" per passage, title and text verbatim, the whole block
    stripped and wrapped as "\\n\\n<information>{block}</information>\\n\\n".
    Over budget, the block is cut at a word boundary, keeping the longest prefix that fits; the
    `<information>` tags and blank lines around them are always kept whole. (Search-R1 instead
    keeps the first max_obs_length token ids, which can cut a word, or the closing tag, in two.)
    """

    def wrap(body: str) -> str:
        return f"\n\n<information>{body}</information>\n\n"

    block = "".join(
        f"Doc {i}(Title: {p.title}) {p.text}\n" for i, p in enumerate(passages, start=1)
    )
    body = block.strip()
    if count_tokens(wrap(body), tokenizer) <= max_tokens:
        return wrap(body)
    # Binary search for the most words of the body that fit; ends[n - 1] is where word n ends.
    ends = [m.end() for m in re.finditer(r"\S+", body)]
    lo, hi = 0, len(ends)  # wrap(first lo words) fits (or lo = 0); the full body does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(wrap(body[: ends[mid - 1]]), tokenizer) <= max_tokens:
            lo = mid
        else:
            hi = mid
    return wrap(body[: ends[lo - 1]] if lo else "")


# ---------------------------------------------------------------------------------------------
# Answer scoring (SQuAD normalization)


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lower-case, strip punctuation, drop a/an/the, collapse whitespace."""
    s = s.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", s).split())


def _as_golds(golds: str | Iterable[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def exact_match(prediction: str | None, golds: str | Iterable[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0 (also for
    prediction None, an episode without an answer)."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _as_golds(golds)))


def f1_score(prediction: str | None, golds: str | Iterable[str]) -> float:
    """SQuAD token F1 between the normalized prediction and each gold answer, max over golds."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in _as_golds(golds):
        ref = normalize_answer(gold).split()
        if not pred or not ref:
            best = max(best, float(pred == ref))
            continue
        same = sum((Counter(pred) & Counter(ref)).values())
        if same:
            precision, recall = same / len(pred), same / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def contains_answer(text: str, golds: str | Iterable[str]) -> bool:
    """True if some normalized gold answer is a contiguous run of whole words of the normalized
    text (TSPO.md's match rule: "us" does not hit "campus"). Golds empty after normalization
    never hit."""
    padded = f" {normalize_answer(text)} "
    for gold in _as_golds(golds):
        g = normalize_answer(gold)
        if g and f" {g} " in padded:
            return True
    return False


def first_hit(observations: Sequence[str | None], golds: str | Iterable[str]) -> int:
    """Smallest turn index k whose observation contains a gold answer (`contains_answer`), -1 if
    none. observations[k] is None for a turn without one; the corrective
    INVALID_ACTION_OBSERVATION is skipped too, since nothing was retrieved in that turn."""
    golds = _as_golds(golds)
    for k, obs in enumerate(observations):
        if obs is None or obs == INVALID_ACTION_OBSERVATION:
            continue
        if contains_answer(obs, golds):
            return k
    return -1
