"""Retrievers (tspo_jax/retrieval.py): corpus loading, BM25 and its cache, the HTTP client."""

import json
import math
import os
import random
import re
import socket
import time
import urllib.request
from collections import Counter

import bm25s
import pytest
from retrieval_testing import StandInServer

from tspo_jax import retrieval
from tspo_jax.protocol import format_observation
from tspo_jax.retrieval import (
    BM25Retriever,
    HttpRetriever,
    Passage,
    RetrievalError,
    load_corpus,
)


def write_corpus(path, docs):
    """docs: (id, title, text) triples, written as Search-R1 JSONL."""
    lines = [json.dumps({"id": i, "contents": f'"{t}"\n{x}'}) for i, t, x in docs]
    path.write_text("\n".join(lines) + "\n")
    return path


def distractors(n, seed=0):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(300)] + ["river", "city", "king", "war", "music"]
    return [(f"d{i}", f"Topic {i}", " ".join(rng.choices(words, k=40))) for i in range(n)]


# --- corpus -----------------------------------------------------------------------------------


def test_load_corpus(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"id": "0", "contents": "\\"Paris\\"\\nParis is the capital."}\n\n'
        '{"id": 7, "contents": "No quotes\\nline one\\nline two"}\n'
    )
    assert load_corpus(path) == [
        Passage("0", '"Paris"', "Paris is the capital.", 0.0),  # Search-R1 keeps the quotes
        Passage("7", "No quotes", "line one\nline two", 0.0),
    ]


OK = '{"id": "0", "contents": "a"}\n'


@pytest.mark.parametrize(
    "text, message",
    [
        (OK + '{"id": "1", "contents": \n', r"c\.jsonl, line 2: not valid JSON"),
        (OK + '\n{"id": "1"}\n', r"c\.jsonl, line 3: expected an object"),
        ('{"id": "0", "contents": 5}\n', r"c\.jsonl, line 1: expected an object with a string"),
        ("[1, 2]\n", r"c\.jsonl, line 1: expected an object"),
        ("\n\n", r"c\.jsonl: the corpus has no passages"),
    ],
)
def test_load_corpus_errors(tmp_path, text, message):
    path = tmp_path / "c.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_corpus(path)


# --- BM25 -------------------------------------------------------------------------------------


def reference_bm25(docs, query, k1=1.5, b=0.75):
    """Lucene's BM25 written out: sum over query words of idf * tf / (tf + k1 (1 - b + b dl/avgdl)),
    idf = ln(1 + (N - df + 0.5) / (df + 0.5)), over lower-case word tokens of title and text."""
    toks = [re.findall(r"\w+", f"{t}\n{x}".lower()) for _, t, x in docs]
    avgdl = sum(map(len, toks)) / len(toks)
    scores = []
    for doc in toks:
        tf, score = Counter(doc), 0.0
        for word in re.findall(r"\w+", query.lower()):
            df = sum(word in d for d in toks)
            if tf[word]:
                idf = math.log(1 + (len(toks) - df + 0.5) / (df + 0.5))
                score += idf * tf[word] / (tf[word] + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(score)
    return scores


TINY = [
    ("a", "Cloves", "Cloves are grown on Zanzibar. Cloves smell."),
    ("b", "Zanzibar", "Zanzibar is an island off Tanzania."),
    ("c", "Paris", "Paris is the capital of France."),
    ("d", "Rome", "Rome is the capital of Italy, not France."),
]


def test_bm25_scores_match_reference(tmp_path):
    retriever = BM25Retriever(write_corpus(tmp_path / "c.jsonl", TINY))
    query = "Where are CLOVES grown? capital"
    expected = reference_bm25(TINY, query)
    (hits,) = retriever.search([query], k=4)
    assert [p.id for p in hits] == ["a", "c", "d"]  # "b" shares no word with the query
    for p in hits:
        assert p.score == pytest.approx(expected["abcd".index(p.id)], rel=1e-5)
    assert hits[0] == Passage(
        "a", '"Cloves"', "Cloves are grown on Zanzibar. Cloves smell.", hits[0].score
    )


def test_bm25_finds_planted_passages_batched(tmp_path):
    docs = distractors(500)
    docs.insert(123, ("planted-1", "Zanzibar", "The island of Zanzibar exports cloves and spices."))
    docs.insert(321, ("planted-2", "Hamlet", "Shakespeare wrote Hamlet around 1600 in London."))
    retriever = BM25Retriever(write_corpus(tmp_path / "c.jsonl", docs))
    queries = ["who wrote hamlet", "zzz qqq", "which island exports cloves", "river city"]
    results = retriever.search(queries, k=3)
    assert len(results) == 4
    assert results[0][0].id == "planted-2" and results[0][0].title == '"Hamlet"'
    assert results[1] == []  # no query word in the corpus
    assert results[2][0].id == "planted-1"
    assert len(results[3]) == 3 and all(p.id.startswith("d") for p in results[3])
    assert results[3][0].score >= results[3][1].score >= results[3][2].score > 0
    assert retriever.search([], k=3) == []
    assert len(retriever.search(["river"], k=10_000)[0]) <= 502  # k beyond the corpus: clamped


def test_bm25_cache_reused_and_invalidated(tmp_path):
    path = write_corpus(tmp_path / "c.jsonl", TINY)
    first = BM25Retriever(path)
    assert not first.from_cache
    assert (tmp_path / "c.jsonl.bm25s" / "key.json").is_file()
    second = BM25Retriever(path)
    assert second.from_cache
    assert second.search(["cloves capital"], 4) == first.search(["cloves capital"], 4)

    # New content (size changes): rebuilt, and the new passage is found.
    write_corpus(path, [*TINY, ("e", "Kilimanjaro", "Kilimanjaro is in Tanzania.")])
    third = BM25Retriever(path)
    assert not third.from_cache
    assert third.search(["kilimanjaro"], 1)[0][0].id == "e"
    assert BM25Retriever(path).from_cache

    # Same size, new modification time: rebuilt.
    write_corpus(path, [*TINY, ("e", "Kilimanjaro", "Kilimanjaro is in Tanzanix.")])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    fourth = BM25Retriever(path)
    assert not fourth.from_cache
    assert fourth.search(["tanzanix"], 1)[0][0].id == "e"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "c.jsonl.bm25s"]


def test_bm25_cache_crash_mid_write_leaves_no_cache(tmp_path, monkeypatch):
    path = write_corpus(tmp_path / "c.jsonl", TINY)

    def crash(self, save_dir, **kwargs):
        (open(os.path.join(save_dir, "vocab.index.json"), "w")).write('{"half')
        raise OSError("disk full")

    with monkeypatch.context() as m, pytest.warns(UserWarning, match="disk full"):
        m.setattr(bm25s.BM25, "save", crash)
        retriever = BM25Retriever(path)
    assert retriever.search(["paris"], 1)[0][0].id == "c"  # the in-memory index still works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]
    assert not BM25Retriever(path).from_cache
    assert BM25Retriever(path).from_cache


def test_bm25_unreadable_cache_is_rebuilt(tmp_path):
    path = write_corpus(tmp_path / "c.jsonl", TINY)
    BM25Retriever(path)
    (tmp_path / "c.jsonl.bm25s" / "vocab.index.json").write_text("{garbage")
    retriever = BM25Retriever(path)
    assert not retriever.from_cache
    assert retriever.search(["paris"], 1)[0][0].id == "c"
    assert BM25Retriever(path).from_cache


def test_bm25_indexes_10k_passages(tmp_path):
    path = write_corpus(tmp_path / "c.jsonl", distractors(10_000))
    results = BM25Retriever(path).search([f"w{i} river" for i in range(100)], k=3)
    assert len(results) == 100 and all(len(r) == 3 for r in results)
    assert BM25Retriever(path).search([f"w{i} river" for i in range(100)], k=3) == results


# --- HTTP -------------------------------------------------------------------------------------


@pytest.fixture
def server():
    stand_in = StandInServer()
    yield stand_in
    stand_in.close()


def test_http_ok(server):
    results = HttpRetriever(server.url).search(["who wrote hamlet", "capital"], k=2)
    assert server.requests == [
        {"queries": ["who wrote hamlet", "capital"], "topk": 2, "return_scores": True}
    ]
    assert results == [
        [
            Passage(
                "who wrote hamlet-0", '"who wrote hamlet 0"', "text 0 for who wrote hamlet", 10.0
            ),
            Passage(
                "who wrote hamlet-1", '"who wrote hamlet 1"', "text 1 for who wrote hamlet", 9.0
            ),
        ],
        [
            Passage("capital-0", '"capital 0"', "text 0 for capital", 10.0),
            Passage("capital-1", '"capital 1"', "text 1 for capital", 9.0),
        ],
    ]
    # What the policy reads: Search-R1's observation, byte for byte (title quotes kept).
    assert format_observation(results[1]) == (
        '\n\n<information>Doc 1(Title: "capital 0") text 0 for capital\n'
        'Doc 2(Title: "capital 1") text 1 for capital</information>\n\n'
    )
    assert HttpRetriever(server.url).search([], k=2) == []
    assert len(server.requests) == 1  # no request for no queries


def test_http_bare_documents(server):
    server.mode = "bare"
    (hits,) = HttpRetriever(server.url).search(["q"], k=2)
    assert hits == [
        Passage("q-0", '"q 0"', "text 0 for q", 0.0),
        Passage("q-1", '"q 1"', "text 1 for q", 0.0),
    ]


def test_http_retries_on_5xx_then_succeeds(server):
    server.mode = "flaky"
    start = time.perf_counter()
    results = HttpRetriever(server.url, retries=3, backoff=0.05).search(["q"], k=1)
    assert results == [[Passage("q-0", '"q 0"', "text 0 for q", 10.0)]]
    assert len(server.requests) == 3
    assert time.perf_counter() - start >= 0.05 + 0.1  # backoff 0.05, then 0.1


def unreachable(url, attempts, last):
    """The message of a spent retry budget, for pytest.raises(match=...)."""
    plural = "s" if attempts > 1 else ""
    return (
        re.escape(f"{url} unreachable for ")
        + rf"\d+ s \({attempts} attempt{plural}; last: {last}\)"
    )


def test_http_5xx_gives_up_after_retries(server):
    server.mode = "flaky"
    with pytest.raises(RetrievalError, match=unreachable(server.url, 2, "HTTP 500")):
        HttpRetriever(server.url, retries=1, backoff=0.01, log=print).search(["q"], k=1)
    assert len(server.requests) == 2


def test_http_4xx_is_not_retried(server):
    url = server.url.replace("/retrieve", "/nope")
    root = server.url.removesuffix("/retrieve")
    message = (
        f'{url} answered HTTP 404 b\'{{"detail": "Not Found"}}\': wrong path? Search-R1\'s '
        f"server answers POST requests at /retrieve ({root}/retrieve)"
    )
    with pytest.raises(RetrievalError, match=re.escape(message)):
        HttpRetriever(url, retries=3, backoff=0.01).search(["q"], k=1)
    assert len(server.requests) == 1


def closed_port_url():
    with socket.socket() as s:  # a free port that nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/retrieve"


def test_http_server_down():
    url = closed_port_url()
    with pytest.raises(RetrievalError, match=unreachable(url, 3, ".*Connection refused")):
        HttpRetriever(url, timeout=1.0, retries=2, backoff=0.01).search(["q"], k=3)


def test_http_timeout(server):
    server.mode = "slow"
    with pytest.raises(RetrievalError, match=unreachable(server.url, 2, "timed out")):
        HttpRetriever(server.url, timeout=0.2, retries=1, backoff=0.01).search(["q"], k=1)
    assert len(server.requests) == 2


def logged_waits(logs):
    return [float(re.search(r"in ([\d.]+) s", line).group(1)) for line in logs]


def test_http_rides_out_a_restart(server):
    """The server hangs up on the first request and refuses connections for 1 s, then answers:
    the client retries (backoff 0.1, 0.2, 0.4, ... s), logs each retry once with its cause, and
    gets the answer."""
    server.outages = {1: 1.0}
    logs = []
    retriever = HttpRetriever(server.url, retries=20, max_wait=30, backoff=0.1, log=logs.append)
    assert retriever.search(["q"], k=1) == [[Passage("q-0", '"q 0"', "text 0 for q", 10.0)]]
    assert len(server.requests) == 2  # the one it hung up on, then the answered retry
    assert len(logs) >= 3  # retries at 0.1, 0.3 and 0.7 s were all refused
    assert "Remote end closed connection" in logs[0]
    assert all("Connection refused" in line for line in logs[1:])
    assert [f"retry {i + 1} of 20" in line for i, line in enumerate(logs)] == [True] * len(logs)
    assert logged_waits(logs) == pytest.approx([0.1 * 2**i for i in range(len(logs))])


def test_http_max_wait_bounds_the_retries():
    """A server that stays down: retries end once max_wait seconds are spent (the last wait cut
    to fit), long before the retry count runs out."""
    url, logs = closed_port_url(), []
    retriever = HttpRetriever(url, retries=100, max_wait=1.0, backoff=0.2, log=logs.append)
    with pytest.raises(RetrievalError) as error:
        retriever.search(["q"], k=1)
    assert re.search(unreachable(url, len(logs) + 1, ".*refused"), str(error.value))
    waits = logged_waits(logs)
    assert waits[:2] == pytest.approx([0.2, 0.4]) and 1 <= len(waits) - 2 <= 2
    assert sum(waits) <= 1.0 + 0.05  # the waits fit the budget (the log rounds to 0.1 s)


@pytest.mark.parametrize(
    "mode, message",
    [
        ("malformed", "an answer not in Search-R1's shape (Expecting value"),
        ("wrong_count", "an answer not in Search-R1's shape ('result' is not a list of 2 "),
    ],
)
def test_http_malformed_answer(server, mode, message):
    server.mode = mode
    with pytest.raises(RetrievalError, match=re.escape(f"{server.url} gave {message}")):
        HttpRetriever(server.url, retries=3, backoff=0.01).search(["a", "b"], k=1)
    assert len(server.requests) == 1  # an answer that parses badly is not retried


def test_http_check_says_what_is_wrong(server):
    """One small query says in one line what is wrong with a --retriever-url."""
    HttpRetriever(server.url).check()
    assert server.requests == [{"queries": ["retrieval check"], "topk": 1, "return_scores": True}]
    for url in ("127.0.0.1:8000/retrieve", "ftp://127.0.0.1/retrieve", "http:///retrieve"):
        with pytest.raises(ValueError, match=re.escape(f"{url!r} is not an http:// or https://")):
            HttpRetriever(url)
    with pytest.raises(RetrievalError, match="wrong path"):
        HttpRetriever(server.url.removesuffix("/retrieve")).check()
    server.mode = "html"
    with pytest.raises(RetrievalError, match=r"not in Search-R1's shape.*It works"):
        HttpRetriever(server.url).check()
    url = closed_port_url()
    with pytest.raises(RetrievalError, match=unreachable(url, 1, ".*refused")):
        HttpRetriever(url, max_wait=0).check()


def test_a_dead_server_at_start_up_says_how_long_and_how_to_wait_less():
    """The first line of a server that does not answer names it, says for how long the run will
    wait for it, and which option shortens the wait; the lines after it count the budget."""
    from tspo_jax import rollout

    url, logs = closed_port_url(), []
    cfg = rollout.RetrieverConfig(retriever_url=url, retriever_max_wait=0.5)
    with pytest.raises(RetrievalError, match=unreachable(url, len(logs) + 2, ".*refused")):
        rollout.connect(cfg, log=logs.append)  # backoff 1 s: one retry, cut to fit 0.5 s
    (first,) = logs
    assert re.fullmatch(
        re.escape(f"retrieval server {url}: ")
        + r".*Connection refused; retry 1 of 30 in 0\.5 s "
        + re.escape("(waiting up to 0.5 s for it to answer; --retriever-max-wait N waits less)"),
        first,
    ), first


def test_search_server_answers_as_search_r1_from_bm25(tmp_path):
    """retrieval.SearchServer over BM25, read by the HTTP client: the same passages and scores as
    BM25 in process, in Search-R1's shape with and without scores."""
    corpus = write_corpus(tmp_path / "c.jsonl", [*distractors(200), ("p", "Paris", "capital")])
    bm25 = BM25Retriever(corpus)
    server = retrieval.SearchServer(bm25)
    try:
        queries = ["capital of paris", "w1 w2 river", "nothing matches zzz"]
        assert HttpRetriever(server.url).search(queries, k=3) == bm25.search(queries, k=3)
        bare = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    server.url, data=json.dumps({"queries": ["paris"], "topk": 1}).encode()
                )
            ).read()
        )
        assert bare == {"result": [[{"id": "p", "contents": '"Paris"\ncapital'}]]}
        server.down()
        with pytest.raises(RetrievalError, match=r".*refused"):
            HttpRetriever(server.url, max_wait=0).search(queries, k=3)
        server.up()
        assert HttpRetriever(server.url).search(queries, k=3) == bm25.search(queries, k=3)
    finally:
        server.close()
