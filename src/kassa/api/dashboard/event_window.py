"""The SQLite event log's outcome events since a time, held in memory and brought up to date by reading only the rows
added after the last one read: the reward tables of the dashboard on ``events.backend: sqlite``
(`outcomes.Outcomes.placements`), as `stream_window.StreamEventWindow` is on JetStream.

A full read of the page's window (every event since the oldest decision shown) went through SQLAlchemy and decoded
whole events on every view: ~3-6 µs an event, 90 ms for 15,000 and ~250 ms for 105,000 (30,000 decisions with an
impression per shown offer: most of a placement view; `bench/dashboard_pages.py --impressions`). Rows are only
appended (``seq`` is AUTOINCREMENT, never reused), so each view reads the rows after the last ``seq`` it has seen,
decodes the three fields the join reads (`Credit`) and drops from its front the events received
before the view's ``since``. It holds what the full read returns: events with a ``decision_id`` received at or after
``since``, in ``seq`` order, by decision. (An event received out of ``received_at`` order stays until the events
before it age out; the join only counts an event received after its decision, so the numbers are the same.)

Memory: ~0.28 KB an event (tracemalloc: 29 MB for 105,000; offer ids interned, the decision id is the key, not
a field); past ``max_events`` held, the window lets go of them and every later view reads in full, as before.
Views serialize on a lock: the caller holds it while it uses the mapping.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator

import msgspec
import sqlalchemy as sa

from kassa import schemas


class Credit(msgspec.Struct, frozen=True, gc=False):
    """What the join reads of an event (`outcomes.Credited`); its decision is the key it is held under."""

    type: schemas.EventType
    offer_id: str | None = None
    value: float | None = None


_decode = msgspec.json.Decoder(Credit).decode
CreditsByDecision = dict[str, list[tuple[float, Credit]]]


class SqliteEventWindow:
    """Outcome events (received at, `Outcome`) by decision id, received at or after a time."""

    def __init__(self, engine: sa.Engine, max_events: int) -> None:
        self.engine = engine
        self.max_events = max_events
        self.read_events = 0  # rows read so far (each once, unless the window starts again)
        self.full_reads = False  # True once the window outgrew max_events: callers read in full
        self._lock = threading.Lock()
        self._start: float | None = None
        self._last_seq = 0
        self._held: collections.deque[tuple[float, str]] = collections.deque()  # (received at, decision id)
        self._by_decision: CreditsByDecision = {}
        self._offers: dict[str, str] = {}

    @contextlib.contextmanager
    def since(self, since: float) -> Iterator[CreditsByDecision | None]:
        """The events by decision id received at or after ``since``, oldest first; None when the window holds too
        many (read in full). Hold the result only inside the ``with``: the next view changes it."""
        with self._lock:
            if self.full_reads:
                yield None
                return
            if self._start is None or since < self._start:
                self._held.clear()
                self._by_decision = {}
                self._offers = {}
                self._last_seq = 0
            else:
                self._drop(since)
            self._start = since
            self._read(since)
            if len(self._held) > self.max_events:
                self.full_reads = True
                self._held.clear()
                self._by_decision = {}
                yield None
                return
            yield self._by_decision

    def _read(self, since: float) -> None:
        with self.engine.connect() as conn:
            last = conn.exec_driver_sql("SELECT max(seq) FROM events").scalar() or 0
            if last < self._last_seq:  # a new database file: start again
                self._held.clear()
                self._by_decision = {}
                self._last_seq = 0
            rows = conn.exec_driver_sql(
                "SELECT decision_id, received_at, body FROM events WHERE seq > ? AND seq <= ? "
                "AND decision_id IS NOT NULL AND received_at >= ? ORDER BY seq",
                (self._last_seq, last, since)).fetchall()
        held, by_decision, offers = self._held, self._by_decision, self._offers
        for decision_id, received_at, body in rows:
            at = float(received_at)
            credit = _decode(body)
            if credit.offer_id is not None:  # one string per offer id, not one per event
                offer_id = offers.setdefault(credit.offer_id, credit.offer_id)
                if offer_id is not credit.offer_id:
                    credit = Credit(credit.type, offer_id, credit.value)
            held.append((at, decision_id))
            by_decision.setdefault(decision_id, []).append((at, credit))
        self._last_seq = last
        self.read_events += len(rows)

    def _drop(self, since: float) -> None:
        held, by_decision = self._held, self._by_decision
        while held and held[0][0] < since:
            _, decision_id = held.popleft()
            events = by_decision[decision_id]
            del events[0]  # a decision's events are held in seq order: its oldest is the front's
            if not events:
                del by_decision[decision_id]
