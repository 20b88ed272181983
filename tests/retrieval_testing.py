"""A stand-in for Search-R1's retrieval server (standard library only), shared by the retrieval
and training tests.

``StandInServer`` answers ``POST /retrieve`` on 127.0.0.1 in Search-R1's shape with made-up
passages (the query and the rank: the same answer to the same query, always), or, as ``mode``
says, with errors. ``outages`` plans it going down the way a restarted or crashed server does:
``{n: seconds}`` hangs up on the n-th request and closes the port (connections are refused) for
that many seconds, or until ``up()`` when seconds is None.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def contents_for(query, j):
    return f'"{query} {j}"\ntext {j} for {query}'


class Handler(BaseHTTPRequestHandler):
    """Search-R1's /retrieve; the StandInServer's `mode` picks a behaviour, `requests` records
    the bodies."""

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up, as test_http_timeout intends

    def do_POST(self):
        stand_in = self.server.stand_in
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        stand_in.requests.append(request)
        n, mode = len(stand_in.requests), stand_in.mode
        queries, k = request["queries"], request["topk"]
        if n in stand_in.outages:
            self.close_connection = True  # no answer: the client sees the connection drop
            stand_in.go_down(stand_in.outages[n])
            return None
        if self.path != "/retrieve":
            return self.reply(404, {"detail": "Not Found"})
        if mode == "flaky" and n <= 2:
            return self.reply(500, {"detail": "overloaded"})
        if mode == "slow":
            time.sleep(1.0)
        if mode == "malformed":
            return self.reply(200, b'{"result": [[{"document": ')
        if mode == "html":
            return self.reply(200, b"<html><body>It works!</body></html>")
        if mode == "wrong_count":
            queries = queries[:-1]
        docs = [
            [{"id": f"{q}-{j}", "contents": contents_for(q, j)} for j in range(k)] for q in queries
        ]
        if mode == "bare":
            return self.reply(200, {"result": docs})
        scored = [[{"document": d, "score": 10.0 - j} for j, d in enumerate(ds)] for ds in docs]
        return self.reply(200, {"result": scored})


class StandInServer:
    """The server on a fixed port of 127.0.0.1 that can go down and come back (see above)."""

    def __init__(self):
        self.mode, self.requests, self.outages = "ok", [], {}
        self.port, self.httpd, self.closed = 0, None, False
        self.up()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/retrieve"

    def up(self):
        if self.closed or self.httpd is not None:
            return
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)  # reuses the address
        httpd.daemon_threads, httpd.stand_in = True, self
        self.port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.httpd = httpd

    def down(self):
        """Closes the port: connections are refused until ``up()``."""
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def go_down(self, seconds):
        def outage():
            self.down()
            if seconds is not None:
                time.sleep(seconds)
                self.up()

        threading.Thread(target=outage, daemon=True).start()

    def close(self):
        self.closed = True
        self.down()
