"""A stand-in for Search-R1's retrieval server, shared by the retrieval and training tests.

``StandInServer`` is retrieval.SearchServer over made-up passages (the query and the rank: the
same answer to the same query, always), answering, as ``mode`` says, with errors instead.
``requests`` records the bodies. ``outages`` plans it going down the way a restarted or crashed
server does: ``{n: seconds}`` hangs up on the n-th request and closes the port (connections are
refused) for that many seconds, or until ``up()`` when seconds is None.
"""

import threading
import time

from tspo_jax import retrieval


def contents_for(query, j):
    return f'"{query} {j}"\ntext {j} for {query}'


class MadeUp:
    """A retriever whose k passages for a query are made of the query and the rank."""

    def search(self, queries, k):
        passages = lambda q: [
            retrieval._passage({"id": f"{q}-{j}", "contents": contents_for(q, j)}, 10.0 - j, q)
            for j in range(k)
        ]
        return [passages(q) for q in queries]


class StandInServer(retrieval.SearchServer):
    def __init__(self):
        self.mode, self.requests, self.outages = "ok", [], {}
        super().__init__(MadeUp())

    def answer(self, path, request):
        self.requests.append(request)
        n = len(self.requests)
        if n in self.outages:
            self.go_down(self.outages[n])
            return None
        if path == "/retrieve" and self.mode == "flaky" and n <= 2:
            return 500, {"detail": "overloaded"}
        if path == "/retrieve" and self.mode == "slow":
            time.sleep(1.0)
        if path == "/retrieve" and self.mode == "malformed":
            return 200, b'{"result": [[{"document": '
        if path == "/retrieve" and self.mode == "html":
            return 200, b"<html><body>It works!</body></html>"
        if self.mode == "wrong_count":
            request = {**request, "queries": request["queries"][:-1]}
        return super().answer(path, {**request, "return_scores": self.mode != "bare"})

    def go_down(self, seconds):
        def outage():
            self.down()
            if seconds is not None:
                time.sleep(seconds)
                self.up()

        threading.Thread(target=outage, daemon=True).start()
