"""The streaming aggregator (`StreamAggregator`): windowed aggregates of stream views per (view, entity
key), updated event by event, with no I/O.

Exactness contract
------------------
Each distinct window ``W`` of a view is kept as ``R`` buckets (``resolution``, default 60) of width
``w = W / R``; an event at time ``ts`` belongs to bucket ``k = floor(ts / w)``. The value of a field *as of
time t* aggregates exactly the events whose bucket lies in ``(floor(t / w) - R, floor(t / w)]`` — the R
whole buckets ending with the one that contains ``t``. Consequently:

- when every timestamp is a multiple of ``w`` the value is exactly the sliding window ``(t - W, t]``, for
  every ``t``;
- otherwise the window's edges snap to bucket boundaries: it may miss events up to ``w`` before its
  trailing edge and include events up to ``w`` after ``t`` (only possible when reading in the past), so
  the edge error is at most ``W / R`` (1.7 % of the window at R = 60);
- count, min, max, last and last_n_distinct are exact under that definition; sum and mean are
  floating-point sums (exact up to rounding; exact for integers);
- ``last`` / ``last_n_distinct`` order values by event time, ties broken by processing order (and by
  position within an order's item list); ``last_n_distinct`` lists the most recent first;
- apart from that tie-break the result does not depend on arrival order: out-of-order and late events
  are exact as long as they are not older than the view's watermark, ``max event time seen −
  source.allowed_lateness``; older ones are dropped and counted (``late_dropped``);
- a repeated ``event_id`` is applied once while its first copy is remembered: ids are kept until their
  event time falls behind every view's watermark (a later copy would be dropped as late anyway) or
  ``dedupe_capacity`` newer ids push them out.

"Now" for a read: `StreamAggregator.values_as_of` answers for any ``t >=`` the view's watermark (older
buckets are pruned, so earlier ``t`` raises ``ValueError``). Rows written to the online store hold the
values as of the *stream time* — the newest event time seen (advanced to the clock while the log is idle)
— and their ``ts`` is the newest event time of that row. As stream time passes, a row whose oldest
in-window bucket leaves a window is written again (at most once per bucket per window), so
``orders_10m`` decays to 0 without new events; a row with nothing left in any window is dropped from
memory. State per row is bounded per window by ``1.5 R + lateness / w + 3`` buckets (R live ones, the
ones a late event may still reach, and slack that keeps pruning amortised O(1) per bucket).
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import msgspec

from kassa import schemas
from kassa.features.definitions import FeatureView
from kassa.features.streaming.keys import event_time
from kassa.features.streaming.plan import CNT, EVCOUNT, LAST, NUM, ViewPlan, plan_view

DEFAULT_RESOLUTION = 60
INF = math.inf


class _Row:
    __slots__ = ("buckets", "due", "emitted_empty", "newest")

    def __init__(self, n_series: int) -> None:
        self.buckets: list[dict[int, list[Any]]] = [{} for _ in range(n_series)]
        self.newest = -INF  # newest event time applied
        self.due = INF  # stream time at which its values next change without new events
        self.emitted_empty = False


class StreamAggregator:
    """Windowed aggregates of stream views, per (view, entity key); no I/O (see the module docstring)."""

    def __init__(
        self,
        views: Iterable[FeatureView],
        *,
        resolution: int = DEFAULT_RESOLUTION,
        max_future_skew: float | None = 300.0,
        dedupe_capacity: int = 100_000,
    ) -> None:
        if resolution < 1:
            raise ValueError("resolution must be >= 1")
        self.resolution = resolution
        self.max_future_skew = max_future_skew
        self.dedupe_capacity = dedupe_capacity
        self.views = [v for v in views if v.kind == "stream"]
        self._plans = [plan_view(i, v, resolution) for i, v in enumerate(self.views)]
        self._by_name = {p.view.name: p for p in self._plans}
        self._by_type: dict[str, list[ViewPlan]] = {}
        for p in self._plans:
            assert p.view.source is not None and p.view.source.events
            for t in p.view.source.events:
                self._by_type.setdefault(t, []).append(p)
        self._max_lateness = max((p.lateness for p in self._plans), default=0.0)
        self._rows: list[dict[str, _Row]] = [{} for _ in self._plans]
        self._changed: dict[tuple[int, str], None] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._ids: deque[tuple[float, str]] = deque()
        self._id_set: set[str] = set()
        self.stream_time = -INF  # newest event time seen (or advanced to the clock)
        self._ordinal = 0
        self.processed = 0  # distinct events applied (whether or not a view used them)
        self.duplicates = 0
        self.late_dropped = 0  # events dropped as late by at least one view that consumes them
        self.late_dropped_by_view: dict[str, int] = {p.view.name: 0 for p in self._plans}
        self.clamped = 0  # events whose time was in the future and was clamped

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """Changes whenever saved state could not be reused (views or resolution changed)."""
        return hashlib.sha256(msgspec.json.encode([self.views, self.resolution])).hexdigest()[:16]

    def watermark(self, view: str) -> float:
        return self.stream_time - self._by_name[view].lateness

    @property
    def rows(self) -> int:
        return sum(len(r) for r in self._rows)

    # ------------------------------------------------------------------ updates
    def update(self, event: schemas.Event, received_at: float | None = None) -> int:
        """Apply one event; returns the number of (view, key) rows it updated."""
        eid = event.event_id
        if eid in self._id_set:
            self.duplicates += 1
            return 0
        ts = event_time(event, received_at)
        if self.max_future_skew is not None and received_at is not None and ts > received_at + self.max_future_skew:
            ts = received_at
            self.clamped += 1
        self._ids.append((ts, eid))
        self._id_set.add(eid)
        self.processed += 1
        self._ordinal += 1
        ordinal = self._ordinal
        stream_time = self.stream_time
        n = 0
        late = False
        for vp in self._by_type.get(event.type, ()):
            wm = stream_time - vp.lateness
            if ts < wm:
                late = True
                self.late_dropped_by_view[vp.view.name] += 1
                continue
            for key, items in vp.keys(event):
                self._apply(vp, key, [fn(event, items) for fn in vp.paths], ts, ordinal, wm)
                n += 1
        if late:
            self.late_dropped += 1
        if ts > stream_time:
            self.stream_time = ts
        self._forget_ids()
        return n

    def _forget_ids(self) -> None:
        ids, idset = self._ids, self._id_set
        # An id older than every watermark need not be remembered: a copy of it would be late anyway.
        horizon = self.stream_time - self._max_lateness
        while ids and (ids[0][0] < horizon or len(ids) > self.dedupe_capacity):
            idset.discard(ids.popleft()[1])

    def _apply(self, vp: ViewPlan, key: str, vals: list[Any], ts: float, ordinal: int, wm: float) -> None:
        rows = self._rows[vp.index]
        row = rows.get(key)
        if row is None:
            row = rows[key] = _Row(len(vp.series))
        if ts > row.newest:
            row.newest = ts
        row.emitted_empty = False
        floor = math.floor
        for sp, buckets in zip(vp.series, row.buckets, strict=True):
            width = sp.width
            k = floor(ts / width)
            b = buckets.get(k)
            if b is None:
                if len(buckets) >= sp.limit and wm > -INF:
                    # Buckets at or below the cutoff are outside every window readable from now on.
                    # Pruning only when the row has grown past its bound keeps it amortised O(1).
                    cutoff = floor(wm / width) - self.resolution
                    for old in [j for j in buckets if j <= cutoff]:
                        del buckets[old]
                b = buckets[k] = sp.template.copy()
            for op, pi, off, cap in sp.ops:
                if op == EVCOUNT:
                    b[off] += 1
                    continue
                v = vals[pi]
                if v is None:
                    continue
                if op == NUM:
                    b[off] += 1
                    b[off + 1] += v
                    if v < b[off + 2]:
                        b[off + 2] = v
                    if v > b[off + 3]:
                        b[off + 3] = v
                elif op == CNT:
                    b[off] += len(v) if type(v) is list else 1
                elif op == LAST:
                    if type(v) is list:
                        stamp = (ts, ordinal, len(v) - 1)
                        v = v[-1]
                    else:
                        stamp = (ts, ordinal, 0)
                    cur = b[off]
                    if cur is None or stamp > cur[0]:
                        b[off] = (stamp, v)
                else:  # LND
                    d = b[off]
                    if d is None:
                        d = b[off] = {}
                    for i, x in enumerate(v if type(v) is list else (v,)):
                        stamp = (ts, ordinal, i)
                        prev = d.get(x)
                        if prev is None or stamp > prev:
                            d[x] = stamp
                    if len(d) > cap:
                        # The n most recent distinct values of a window are among the n most recent
                        # of each of its buckets, so a bucket never needs more than n.
                        keep = sorted(d.items(), key=lambda kv: kv[1], reverse=True)[:cap]
                        b[off] = dict(keep)
        self._changed[(vp.index, key)] = None

    # ------------------------------------------------------------------ reads
    def _compute(self, vp: ViewPlan, row: _Row | None, t: float) -> tuple[dict[str, Any], float, bool]:
        """Values as of ``t``; the next time they change without new events; whether any bucket is live."""
        out: dict[str, Any] = dict.fromkeys(vp.field_order)  # definition order, filled per series
        due = INF
        live_any = False
        res = self.resolution
        for si, sp in enumerate(vp.series):
            width = sp.width
            kt = math.floor(t / width) if t > -INF else 0
            lo = kt - res + 1
            live: list[list[Any]] = []
            if row is not None and t > -INF:
                found: list[tuple[int, list[Any]]] = []
                stop = lo - sp.reach
                # Newest-created first. A bucket created after another can be older than it by at most
                # the lateness (it would have been dropped otherwise), so once a bucket lies more than
                # that before the window, every bucket created earlier lies before it too.
                for k, b in reversed(row.buckets[si].items()):
                    if k >= lo:
                        if k <= kt:
                            found.append((k, b))
                    elif k < stop:
                        break
                if len(found) == 1:
                    live_any = True
                    live = [found[0][1]]
                    oldest = found[0][0]
                elif found:
                    live_any = True
                    if sp.ordered:
                        # Newest bucket first (creation order nearly is that already, so the sort is
                        # cheap): `last` and `last_n_distinct` stop early on it.
                        found.sort(key=_first, reverse=True)
                        oldest = found[-1][0]
                    else:
                        oldest = min(found, key=_first)[0]
                    live = [b for _, b in found]
                if live:
                    # The oldest live bucket leaves the window when floor(t / w) reaches its index + R.
                    due = min(due, (oldest + res) * width)
            stats: dict[int, tuple[int, float, float, float]] = {}
            for fp in sp.fields:
                out[fp.name] = fp.read(fp, live, stats)
        return out, due, live_any

    def values_as_of(self, view: str | FeatureView, key: str, t: float) -> dict[str, Any]:
        """Field values of one row as of time ``t`` (``t`` >= the view's watermark)."""
        vp = self._by_name[view if isinstance(view, str) else view.name]
        if t < self.stream_time - vp.lateness:
            raise ValueError(f"as_of {t} is older than the watermark of {vp.view.name!r}; that state is pruned")
        return self._compute(vp, self._rows[vp.index].get(key), t)[0]

    def values(self, view: str | FeatureView, key: str) -> dict[str, Any]:
        """Field values of one row as of the stream time."""
        return self.values_as_of(view, key, self.stream_time)

    def newest(self, view: str, key: str) -> float | None:
        row = self._rows[self._by_name[view].index].get(key)
        return None if row is None else row.newest

    # ------------------------------------------------------------------ emission
    def advance(self, now: float) -> None:
        """Move stream time forward to ``now`` (the clock, while the event log is idle)."""
        if now > self.stream_time:
            self.stream_time = now

    def expire(self, now: float | None = None) -> int:
        """Mark changed the rows whose values changed because stream time passed; returns how many."""
        if now is not None:
            self.advance(now)
        t, heap, n = self.stream_time, self._heap, 0
        while heap and heap[0][0] <= t:
            due, vi, key = heapq.heappop(heap)
            row = self._rows[vi].get(key)
            if row is None or row.due != due:
                continue  # superseded by a later schedule
            row.due = INF  # emit() schedules it again
            self._changed[(vi, key)] = None
            n += 1
        return n

    @property
    def pending(self) -> int:
        """Rows changed and not yet written (a backlog while the online store is down)."""
        return len(self._changed)

    def drain_changed(self) -> list[tuple[str, str]]:
        """The (view, key) rows changed since the last drain, in first-change order."""
        changed, self._changed = self._changed, {}
        return [(self._plans[vi].view.name, key) for vi, key in changed]

    def emit(self, view: str, key: str) -> tuple[dict[str, Any], float] | None:
        """Values as of stream time and the row's newest event time, to be written; None: nothing to write.

        Also reschedules the row's expiry and forgets a row that nothing can bring back into a window.
        """
        vp = self._by_name[view]
        rows = self._rows[vp.index]
        row = rows.get(key)
        if row is None:
            return None
        t = self.stream_time
        values, due, live = self._compute(vp, row, t)
        ts = row.newest
        if not live:
            was_empty, row.emitted_empty = row.emitted_empty, True
            if self._prunable(vp, row):
                del rows[key]
                return None if was_empty else (values, ts)
            # Not yet safe to forget: a late event may still land in a bucket that is out of the window
            # today. Look again once the watermark has passed every bucket.
            due = max((max(b) + self.resolution) * sp.width for sp, b in zip(vp.series, row.buckets, strict=True)
                      if b) + vp.lateness
            if was_empty:
                self._schedule(vp.index, key, row, due)
                return None
        self._schedule(vp.index, key, row, due)
        return values, ts

    def _schedule(self, vi: int, key: str, row: _Row, due: float) -> None:
        if due <= self.stream_time:
            # Float rounding at a bucket edge: look again once stream time has moved on.
            due = math.nextafter(self.stream_time, INF)
        if due != row.due:
            row.due = due
            if due < INF:
                heapq.heappush(self._heap, (due, vi, key))

    def _prunable(self, vp: ViewPlan, row: _Row) -> bool:
        wm = self.stream_time - vp.lateness
        for sp, buckets in zip(vp.series, row.buckets, strict=True):
            if buckets and max(buckets) > math.floor(wm / sp.width) - self.resolution:
                return False
        return True

    def mark_changed(self, view: str, key: str) -> None:
        """Have the next `drain_changed` include this row, and `emit` write it even if already empty."""
        vp = self._by_name[view]
        row = self._rows[vp.index].get(key)
        if row is not None:
            row.emitted_empty = False
            self._changed[(vp.index, key)] = None

    def all_keys(self) -> list[tuple[str, str]]:
        return [(p.view.name, key) for p in self._plans for key in self._rows[p.index]]

    # ------------------------------------------------------------------ persistence
    def dump(self) -> dict[str, Any]:
        """Everything needed to resume exactly: rows, remembered ids, stream time, counters.

        The result shares the live state (no copy, so a checkpoint costs one msgpack encode of it):
        encode it before the next update.
        """
        return {
            "fingerprint": self.fingerprint(),
            "stream_time": self.stream_time,
            "ordinal": self._ordinal,
            "counters": [self.processed, self.duplicates, self.late_dropped, self.clamped],
            "late_by_view": self.late_dropped_by_view,
            "ids": list(self._ids),
            "rows": [[vp.view.name, key, row.newest, row.buckets]
                     for vp in self._plans for key, row in self._rows[vp.index].items()],
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore a `dump`; raises ValueError when it was made for other views or resolution."""
        if state.get("fingerprint") != self.fingerprint():
            raise ValueError("saved stream state was made for other view definitions")
        self.stream_time = float(state["stream_time"])
        self._ordinal = int(state["ordinal"])
        self.processed, self.duplicates, self.late_dropped, self.clamped = state["counters"]
        self.late_dropped_by_view.update(state["late_by_view"])
        self._ids = deque((float(ts), eid) for ts, eid in state["ids"])
        self._id_set = {eid for _, eid in self._ids}
        self._rows = [{} for _ in self._plans]
        self._heap = []
        self._changed = {}
        for name, key, newest, series in state["rows"]:
            vp = self._by_name[name]
            row = _Row(len(vp.series))
            row.newest = float(newest)
            for si, buckets in enumerate(series):
                sp = vp.series[si]
                row.buckets[si] = {int(k): _load_bucket(b, sp.lnd_slots, sp.last_slots) for k, b in buckets.items()}
            self._rows[vp.index][key] = row
            # The store already holds these values; only schedule the row's next expiry.
            _, due, live = self._compute(vp, row, self.stream_time)
            row.emitted_empty = not live
            if not live:
                due = self.stream_time  # let the next expire() forget it or look again later
            self._schedule(vp.index, key, row, due)


def _first(kb: tuple[int, list[Any]]) -> int:
    return kb[0]


def _load_bucket(b: list[Any], lnd: list[int], last: list[int]) -> list[Any]:
    # msgpack has no tuples; stamps must be tuples again to compare with new ones.
    for off in last:
        if b[off] is not None:
            stamp, v = b[off]
            b[off] = (tuple(stamp), v)
    for off in lnd:
        if b[off] is not None:
            b[off] = {x: tuple(stamp) for x, stamp in b[off].items()}
    return b
