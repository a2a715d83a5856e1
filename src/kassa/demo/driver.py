"""`Driver`: replays the simulated checkouts against a running Kassa over real HTTP.

Per checkout, in the order a real shop produces them: the order event (so profiles and co-purchase
retrieval learn), a decision on the placement of the checkout's slice, the buyer's answers drawn from
the ground truth, then an impression per shown offer and an accept per yes. To keep the request count
down, each worker sends one ``/v1/events`` batch per chunk of checkouts: the orders of the next chunk
together with the outcomes of the previous one. Outcomes therefore reach Kassa a few decisions after
their own, far inside the placement's reward wait.

A few worker threads keep requests in flight while another waits on the server (which shares this
process and its GIL) or on the event log's fsync.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from typing import Any

from kassa.demo.client import ApiClient
from kassa.demo.simulator import SLICE_PLACEMENT, Checkout, World, decision_request_body, order_event, outcome_events
from kassa.demo.stats import Scoreboard


class Driver:
    def __init__(
        self,
        world: World,
        checkouts: Sequence[Checkout],
        board: Scoreboard,
        host: str,
        port: int,
        key: str,
        workers: int = 3,
        chunk: int = 16,
    ) -> None:
        self.world = world
        self.checkouts = checkouts
        self.board = board
        self.host = host
        self.port = port
        self.key = key
        self.workers = max(1, workers)
        self.chunk = max(1, chunk)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.requests = 0
        self._next = itertools.count(0, self.chunk)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> Driver:
        for n in range(self.workers):
            t = threading.Thread(target=self._work, name=f"kassa-demo-shopper-{n}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the workers to finish, or at most ``timeout`` seconds in total."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _take(self) -> Sequence[Checkout]:
        with self._lock:
            start = next(self._next)
        return self.checkouts[start : start + self.chunk]

    def _work(self) -> None:
        api = ApiClient(self.host, self.port, self.key)
        outcomes: list[dict[str, Any]] = []
        try:
            while not self.stop.is_set():
                chunk = self._take()
                if not chunk:
                    break
                api.post("/v1/events", {"events": [*outcomes, *map(order_event, chunk)]})
                outcomes = []
                for c in chunk:
                    outcomes.extend(self._checkout(api, c))
                    if self.stop.is_set():
                        break
            if outcomes:
                api.post("/v1/events", {"events": outcomes})
        except BaseException as exc:  # surfaced by run_demo; the other workers stop too
            if self.error is None:
                self.error = exc
            self.stop.set()
        finally:
            with self._lock:
                self.requests += api.requests
            api.close()

    def _checkout(self, api: ApiClient, c: Checkout) -> list[dict[str, Any]]:
        body = decision_request_body(c, SLICE_PLACEMENT[c.slice])
        t0 = time.perf_counter()
        decision = api.post("/v1/decisions", body)
        client_ms = (time.perf_counter() - t0) * 1000.0
        shown = [o["offer_id"] for o in decision["offers"]]
        answers = self.world.accepts(c, shown)
        expected = sum(self.world.p_accept(c, o) for o in shown)
        self.board.record(c, sum(answers), expected, decision["took_ms"], client_ms, decision["explored"],
                          decision["fallback"], decision["model_version"])
        return outcome_events(decision["decision_id"], shown, answers)
