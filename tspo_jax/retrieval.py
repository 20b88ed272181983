"""Retrievers: BM25 over a local corpus, or a client for Search-R1's retrieval server.

Formats (docs/SEARCH_R1_FORMATS.md):
- Corpus: JSONL, one passage a line, `{"id": "...", "contents": "\\"Title\\"\\nPassage text"}`.
- Server: `POST <url>` (its /retrieve endpoint) with `{"queries": [...], "topk": k,
  "return_scores": true}`; the answer is `{"result": [per_query, ...]}` in query order, each
  per_query a list of `{"document": {"id", "contents"}, "score": float}` or, without scores, of
  bare document objects.

Both retrievers have one method, `search(queries, k) -> list[list[Passage]]`: one list per query,
in query order, best first, at most k passages each.
"""

import http.client
import http.server
import json
import logging
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from tspo_jax import cache
from tspo_jax.data import jsonl_rows
from tspo_jax.protocol import split_title

_WORD_RE = re.compile(r"\w+")


def _bm25s():
    """bm25s, imported on first use: importing it starts JAX's backend (it probes for jax), which
    must wait for jax.distributed.initialize() in multi-process runs. Its logger is set to
    DEBUG on import and announces every index it builds: quieted to warnings."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


# Bump when the tokenization or the bm25s parameters change, so old caches are rebuilt.
_INDEX_VERSION = 2
_STAMP = "key.json"


class Passage(NamedTuple):
    id: str
    title: str
    text: str
    score: float  # retrieval score; 0.0 when the source gives none


class Retriever(Protocol):
    def search(self, queries: list[str], k: int) -> list[list[Passage]]: ...


class RetrievalError(RuntimeError):
    """The retrieval server is unreachable or answered something unusable."""


def _passage(doc: object, score: float, where: str) -> Passage:
    if not isinstance(doc, dict) or not isinstance(doc.get("contents"), str):
        raise ValueError(f"{where}: expected an object with a string 'contents', got {doc!r:.200}")
    title, text = split_title(doc["contents"])
    return Passage(str(doc.get("id", "")), title, text, float(score))


def load_corpus(path: str | os.PathLike) -> list[Passage]:
    """Reads a Search-R1 JSONL corpus (blank lines skipped); score is 0.0."""
    passages = [_passage(doc, 0.0, where) for where, doc in jsonl_rows(path)]
    if not passages:
        raise ValueError(f"{path}: the corpus has no passages")
    return passages


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens; shared by the BM25 index and its queries. No stemming, no
    stopwords (BM25's IDF weighs common words down)."""
    return _WORD_RE.findall(text.lower())


class BM25Retriever:
    """bm25s over a JSONL corpus. The index is cached in `<corpus>.bm25s/` (tspo_jax/cache.py:
    written whole or not at all) and rebuilt when the corpus's size or modification time
    changes; where the cache cannot be written, the index is used uncached."""

    def __init__(self, corpus_path: str | os.PathLike):
        self.corpus_path = Path(corpus_path)
        self.passages = load_corpus(self.corpus_path)
        self.cache_dir = self.corpus_path.with_name(self.corpus_path.name + ".bm25s")
        stat = self.corpus_path.stat()
        key = cache.fingerprint(_INDEX_VERSION, stat.st_size, stat.st_mtime_ns)
        self.index, self.from_cache = None, cache.is_current(self.cache_dir, key, _STAMP)
        if self.from_cache:
            try:
                self.index = _bm25s().BM25.load(
                    str(self.cache_dir), show_progress=False, verbosity=0
                )
            except Exception:  # an unreadable cache: unstamped, then rebuilt below
                (self.cache_dir / _STAMP).unlink(missing_ok=True)
                self.from_cache = False
        if self.index is None:
            self.index = _bm25s().BM25()
            self.index.index(
                [tokenize(f"{p.title}\n{p.text}") for p in self.passages], show_progress=False
            )
            try:
                save = lambda tmp: self.index.save(str(tmp), show_progress=False)
                cache.build_folder(self.cache_dir, key, save, stamp=_STAMP)
            except OSError as e:  # a read-only corpus folder, a full disk
                warnings.warn(f"not caching the BM25 index in {self.cache_dir}: {e}", stacklevel=2)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Top-k passages per query by BM25 score; passages sharing no word with the query
        (score 0) are left out, so a list may hold fewer than k."""
        vocab = self.index.vocab_dict
        ids = [[vocab[t] for t in tokenize(q) if t in vocab] for q in queries]
        results: list[list[Passage]] = [[] for _ in queries]
        rows = [i for i, q in enumerate(ids) if q]
        k = min(k, len(self.passages))
        if not rows or k < 1:
            return results
        docs_QK, scores_QK = self.index.retrieve(
            [ids[i] for i in rows], k=k, show_progress=False, backend_selection="numpy"
        )
        for i, docs, scores in zip(rows, np.asarray(docs_QK), np.asarray(scores_QK), strict=True):
            results[i] = [
                self.passages[d]._replace(score=float(s))
                for d, s in zip(docs, scores, strict=True)
                if s > 0
            ]
        return results


# The HTTP client's retry schedule: waits of backoff, 2 backoff, 4 backoff, ... capped at
# MAX_BACKOFF seconds, until the retries or the seconds of max_wait are spent. The defaults ride
# out a restart of Search-R1's server (it loads a 21M-passage FAISS index for minutes).
DEFAULT_TIMEOUT, DEFAULT_RETRIES, DEFAULT_MAX_WAIT, MAX_BACKOFF = 60.0, 30, 600.0, 30.0


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class HttpRetriever:
    """Client for Search-R1's retrieval server: one batched POST per call, a timeout per
    attempt, and retries on connection errors, timeouts and 5xx answers (each logged once with
    its cause) with exponential backoff, until `retries` retries or `max_wait` seconds since the
    first failed attempt are spent; then a RetrievalError says for how long the server was
    unreachable. The first retry's line says how long the client will wait and, as
    ``wait_option``, what shortens the wait (a command-line option). A 4xx answer or a malformed
    one is not retried."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        max_wait: float = DEFAULT_MAX_WAIT,
        backoff: float = 1.0,
        log=log_to_stderr,
        wait_option: str = "",
    ):
        if retries < 0 or timeout <= 0 or max_wait < 0 or backoff < 0:
            raise ValueError(
                f"need timeout > 0, retries >= 0, max_wait >= 0, backoff >= 0; got {timeout=}, "
                f"{retries=}, {max_wait=}, {backoff=}"
            )
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"retriever URL {url!r} is not an http:// or https:// URL (Search-R1's server "
                "listens at http://HOST:PORT/retrieve, e.g. http://127.0.0.1:8000/retrieve)"
            )
        self.url, self.timeout, self.retries = url, timeout, retries
        self.max_wait, self.backoff, self.log = max_wait, backoff, log
        self.wait_option = wait_option

    def _post(self, payload: dict) -> bytes:
        data = json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url, data=data, headers={"Content-Type": "application/json"}, method="POST"
        )
        start = time.monotonic()
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    raise RetrievalError(self._refused(e)) from None
                cause = f"HTTP {e.code}"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                cause = str(getattr(e, "reason", e)) or type(e).__name__
            spent = time.monotonic() - start
            wait = min(self.backoff * 2**attempt, MAX_BACKOFF, self.max_wait - spent)
            if attempt == self.retries or wait <= 0:
                break
            budget = f"{spent:.0f} of {self.max_wait:.0f} s spent"
            if attempt == 0:  # what is going on, and how to wait less
                budget = f"waiting up to {self.max_wait:g} s for it to answer"
                budget += f"; {self.wait_option} N waits less" if self.wait_option else ""
            self.log(
                f"retrieval server {self.url}: {cause}; retry {attempt + 1} of {self.retries} in "
                f"{wait:.1f} s ({budget})"
            )
            time.sleep(wait)
        raise RetrievalError(
            f"retrieval server {self.url} unreachable for {time.monotonic() - start:.0f} s "
            f"({attempt + 1} attempt{'s' if attempt else ''}; last: {cause})"
        )

    def _refused(self, error: urllib.error.HTTPError) -> str:
        """The message for a 4xx answer, with a hint when the path looks wrong."""
        try:
            body = error.read()[:200]
        except OSError:
            body = b""
        message = f"retrieval server {self.url} answered HTTP {error.code} {body!r}"
        if error.code in (404, 405):
            root = urllib.parse.urlunsplit(urllib.parse.urlsplit(self.url)._replace(path=""))
            message += (
                f": wrong path? Search-R1's server answers POST requests at /retrieve "
                f"({root}/retrieve)"
            )
        return message

    def check(self) -> None:
        """One small query, so that a server that is down, a wrong path or an answer not in
        Search-R1's shape are reported before a run loads its model (RetrievalError)."""
        self.search(["retrieval check"], 1)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        if not queries:
            return []
        body = self._post({"queries": list(queries), "topk": k, "return_scores": True})
        try:
            result = json.loads(body)["result"]
            if not isinstance(result, list) or len(result) != len(queries):
                raise ValueError(f"'result' is not a list of {len(queries)} per-query lists")
            out = []
            for i, hits in enumerate(result):
                if not isinstance(hits, list):
                    raise ValueError(f"result {i} is not a list")
                where = f"result {i}"
                out.append(
                    [
                        _passage(h["document"], h.get("score", 0.0), where)
                        if isinstance(h, dict) and "document" in h
                        else _passage(h, 0.0, where)
                        for h in hits[:k]
                    ]
                )
            return out
        except (ValueError, KeyError, TypeError) as e:
            detail = e if not isinstance(e, KeyError) else f"missing key {e}"
            raise RetrievalError(
                f"retrieval server {self.url} gave an answer not in Search-R1's shape ({detail}); "
                f"it starts {body[:200]!r}"
            ) from None


# ---------------------------------------------------------------------------------------------
# A retrieval server in Search-R1's shape, over any retriever (BM25 over a local corpus, say):
# what bench/chaos.py takes down and brings back, and a stand-in for Search-R1's server where its
# FAISS index is not at hand.


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        try:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        except (ValueError, TypeError):
            return self.reply(400, {"detail": "the body is not JSON"})
        answer = self.server.owner.answer(self.path, request)
        if answer is None:  # hang up without an answer, as a server that crashes mid-request
            self.close_connection = True
            return None
        return self.reply(*answer)

    def reply(self, code: int, body: dict | bytes) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout) and hung up


class SearchServer:
    """Answers ``POST /retrieve`` as Search-R1's retrieval server does, from ``retriever``, on
    ``host``:``port`` (0: a free port), served by a background thread. ``down()`` closes the
    port (connections are refused, as while a server restarts) and ``up()`` opens the same port
    again. ``answer`` is the one method to override for other behaviour (tests: errors)."""

    def __init__(self, retriever: Retriever | None, *, host: str = "127.0.0.1", port: int = 0):
        self.retriever, self.host, self.port = retriever, host, port
        self.httpd, self.closed = None, False
        self.up()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/retrieve"

    def answer(self, path: str, request: dict) -> tuple[int, dict | bytes] | None:
        """(HTTP status, body) for one request; None hangs up without answering."""
        if path != "/retrieve":
            return 404, {"detail": "Not Found"}
        try:
            queries, k = list(request["queries"]), int(request.get("topk", 3))
        except (KeyError, TypeError, ValueError):
            return 422, {"detail": "expected {'queries': [...], 'topk': k}"}
        hits = self.retriever.search(queries, k)
        if request.get("return_scores"):
            return 200, {"result": [[_document(p) | {"score": p.score} for p in ps] for ps in hits]}
        return 200, {"result": [[_document(p)["document"] for p in ps] for ps in hits]}

    def up(self) -> None:
        if self.closed or self.httpd is not None:
            return
        httpd = http.server.ThreadingHTTPServer((self.host, self.port), _Handler)
        httpd.daemon_threads, httpd.owner = True, self
        self.port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.httpd = httpd

    def down(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def close(self) -> None:
        self.closed = True
        self.down()


def _document(p: Passage) -> dict:
    """A passage as Search-R1's server returns it: {"document": {"id", "contents"}}."""
    contents = f"{p.title}\n{p.text}" if p.text else p.title
    return {"document": {"id": p.id, "contents": contents}}
