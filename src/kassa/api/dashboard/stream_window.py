"""The JetStream events stream's outcome events since a time, held in memory and brought up to date by reading
only what was stored after the last message read: the reward tables of the dashboard on ``events.backend:
jetstream`` (`outcomes.Outcomes.placements`).

A full read (`JetStreamEventLog.scan_since`) of the page's window re-reads and decodes up to `outcomes.MAX_EVENTS`
events on every page view. `StreamEventWindow` reads that window once (positioned by stored time, as the full
read is), then on each view only the messages after the last sequence it holds, and drops from its front the
events older than the view's ``since``; it decodes the four fields the join reads (`Outcome`), not whole
events. It holds what the full read would return, by the same rules, so the page's numbers do not change
(tests/test_dashboard_jetstream.py compares the two):

- the events from the first one stored at or after ``since``, in stream order, up to the stream's last message
  when the view began, at most ``max_events`` of them (the read cap stays a cap on what the page counts; reads
  stop while the window is full and go on once its front has aged out);
- messages the stream no longer has (``retention_seconds``) are dropped, as a fresh read would not see them;
- a ``since`` before the window's start (or a stream whose last sequence went back: recreated or purged) reads the
  window afresh.

One difference, while NATS is unreachable: a full read finds nothing, the window keeps what it holds and says
(``cut_at``) up to when it read.

Reads within ``refresh_seconds`` of the last one reuse it (the placement page's numbers may then be that many
seconds old). Views serialize on a lock: the caller holds it while it uses the returned mapping.

Cost, measured on the shared 2-core VM (bench/dashboard_outcomes.py, ~95,000 events, 20,000 decisions, 500 new
events per view, load average 12-17): 1.4-1.6 s of process CPU per placement view with a full read, 0.15-0.29 s
incremental, of which ~0.1 s is the decision log's side (DuckDB and the tally, untouched here). Memory: ~51 MB
for 100,000 held events each of a different decision (tracemalloc), less when decisions have several events.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import msgspec

from kassa import schemas
from kassa.events.jetstream_log import JetStreamEventLog


class Outcome(msgspec.Struct, frozen=True, gc=False):
    """The fields of an outcome event the reward join reads (`outcomes._credit`); the rest is not decoded."""

    type: schemas.EventType
    decision_id: str | None = None
    offer_id: str | None = None
    value: float | None = None


_decode = msgspec.json.Decoder(Outcome).decode
EventsByDecision = dict[str, list[tuple[float, Outcome]]]


class StreamEventWindow:
    """Outcome events (stored at, `Outcome`) by decision id, from the first stored at or after a time."""

    def __init__(self, stream: JetStreamEventLog, max_events: int, refresh_seconds: float = 2.0,
                 batch: int = 200) -> None:
        self.stream = stream
        self.max_events = max_events
        self.refresh_seconds = refresh_seconds
        self.batch = batch
        self.read_events = 0  # messages read from the stream so far (each read once, unless the window restarts)
        self._lock = threading.Lock()
        self._start: float | None = None  # None: nothing held, the next view reads the window afresh
        self._last_seq = 0  # the last stream sequence read
        self._held: collections.deque[tuple[int, float, str | None]] = collections.deque()  # (seq, at, decision)
        self._by_decision: EventsByDecision = {}
        self._complete = False
        self._read_at = -float("inf")

    @contextlib.contextmanager
    def since(self, since: float) -> Iterator[tuple[EventsByDecision, float | None]]:
        """(events by decision id, oldest first; when the stream was not read to its end, the time up to which it
        was): what ``scan_since(since, max_events)`` would return, decoded. Hold the result only inside the
        ``with``: the next view changes it."""
        with self._lock:
            self._update(since)
            cut_at = None if self._complete else (self._held[-1][1] if self._held else since)
            yield self._by_decision, cut_at

    # ------------------------------------------------------------------ keeping up
    def _update(self, since: float) -> None:
        if self._start is None or since < self._start:
            self._restart(since)
            return
        self._drop(lambda seq, at: at < since)
        self._start = since
        if time.monotonic() - self._read_at < self.refresh_seconds:
            return
        if not self._held:  # nothing left to continue from: the server finds the first message at ``since``
            self._restart(since)
            return
        rows, complete, bounds = self.stream.scan(self.max_events - len(self._held), after_seq=self._last_seq,
                                                  batch=self.batch)
        if bounds is not None:
            first, last = bounds
            if last < self._last_seq:  # the stream was recreated or purged: sequences start again
                self._restart(since)
                return
            self._drop(lambda seq, at: seq < first)  # aged out of the stream (``retention_seconds``)
            if not self._held:
                self._restart(since)
                return
        self._add(rows)
        self._complete = complete
        self._read_at = time.monotonic()

    def _restart(self, since: float) -> None:
        self._held.clear()
        self._by_decision = {}
        self._last_seq = 0
        self._start = since
        rows, complete, _ = self.stream.scan(self.max_events, start_time=since, batch=self.batch)
        self._add(rows)
        self._complete = complete
        if not rows and not complete:
            self._start = None  # NATS did not answer: nothing known, the next view starts again
        self._read_at = time.monotonic()

    def _add(self, rows: list[tuple[int, float, bytes]]) -> None:
        held, by_decision = self._held, self._by_decision
        for seq, at, body in rows:
            self._last_seq = seq
            event = _decode(body)
            held.append((seq, at, event.decision_id))
            if event.decision_id is not None:
                by_decision.setdefault(event.decision_id, []).append((at, event))
        self.read_events += len(rows)

    def _drop(self, older: Callable[[int, float], bool]) -> None:
        """Drop held events from the front while ``older(seq, stored at)``."""
        held, by_decision = self._held, self._by_decision
        while held and older(held[0][0], held[0][1]):
            _, _, decision_id = held.popleft()
            if decision_id is not None:
                events = by_decision[decision_id]
                del events[0]  # a decision's events are held in stream order: its oldest is the front's
                if not events:
                    del by_decision[decision_id]
