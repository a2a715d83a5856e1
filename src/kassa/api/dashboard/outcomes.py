"""Decisions joined with their outcome events, read back from the two logs for the dashboard.

The decision log (Parquet, one record per decision) says what was shown, by which model version, with
which probabilities; the event log holds every accepted outcome event with its ``decision_id``: the embedded
SQLite table (``events.backend: sqlite``) or the events stream on NATS JetStream (``events.backend: jetstream``).
This module joins them the way `RewardJoiner` does for learning: an event counts for a shown offer when
it arrives inside the placement's wait window, weighted by the placement's reward definition, each
offer's reward capped, and a shown offer with no outcome gets the default. Two simplifications, both
said on the page: the reward definition is today's (not the one in force when the decision was made),
and an ``order`` event without a ``decision_id`` (attributed by customer in the joiner) is not counted.

Reads are bounded (``since`` and ``max_decisions``) and run on a worker thread (the caller's job): the
dashboard reads the logs, it never slows the hot path. The decision log writer is flushed first, so a
decision served a moment ago can be looked up. The decision log's last day comes from
`decision_window.DecisionLogWindow` (each Parquet file read once); a query of the log itself opens only the date
partitions from ``since`` on.

An event's time, against which the reward window is checked: on SQLite its ``received_at`` (when Kassa
accepted it); on JetStream the time JetStream stored the message (read from each delivery's reply subject),
which is the moment Kassa acknowledged it except for an event spooled while NATS was away, stored (and so
dated) when the spool was replayed. The stream has no index by decision: `Outcomes` reads it from the first
message stored at or after ``since`` (a consumer started by time, so nothing older is read) to its end and
keeps the events of the decisions asked for. That scan reads at most ``max_events`` events (`MAX_EVENTS`):
when it stops short, ``events_cut_at`` on the result says up to when events were read, and the page says so.
The placement pages (`placements`) do not scan it again on every view: `stream_window.StreamEventWindow` holds
what the last view read and reads only the messages stored since (the same events as a full scan). A single
decision's lookup scans from the decision's own time (less `_SKEW_SECONDS`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from kassa import schemas
from kassa.api.dashboard.decision_window import DecisionLogWindow, DecisionRow
from kassa.api.dashboard.event_window import SqliteEventWindow
from kassa.api.dashboard.stream_window import StreamEventWindow
from kassa.app import Kassa
from kassa.events.decision_log import (
    decision_files,
    log_files,
    lookup_partitions,
    parquet_list,
    read_log,
    serving_duckdb,
)
from kassa.events.jetstream_log import JetStreamEventLog
from kassa.events.log import SqliteEventLog, events_table

_event_decoder = msgspec.json.Decoder(schemas.Event)
_features_decoder = msgspec.json.Decoder(dict[str, Any])
# learning-curve bucket widths (seconds): about `buckets` points whether the log holds a minute or a day
_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0)


ALL_VERSIONS = "all versions"
# The placement pages' decisions: the newest this many of the last `DECISION_WINDOW_SECONDS` (the page says so).
MAX_DECISIONS = 100_000
DECISION_WINDOW_SECONDS = 24 * 3600.0
# At most this many events are read from the JetStream events stream for one page (`Outcomes.max_events`):
# 100,000 took 1.8-3.6 s and 1.2-2.1 s of CPU on the shared 2-core VM (`JetStreamEventLog.scan_since`).
MAX_EVENTS = 100_000
# The SQLite log's window (`event_window`) holds at most this many events, ~0.28 KB each (tracemalloc: 29 MB for
# 105,000); past it the placement pages read the log in full on every view, as before.
SQLITE_WINDOW_EVENTS = 200_000
# Events are read from this long before a decision's time: the decision's clock (the serving host's) and
# the event's (JetStream's stored time, or the SQLite writer's) can differ a little.
_SKEW_SECONDS = 5.0


@dataclass(slots=True)
class Tally:
    decisions: int = 0  # closed decisions (or impressions, per offer)
    reward: float = 0.0
    revenue: float = 0.0
    open: int = 0  # still inside their wait window: not counted in the rates yet

    @property
    def reward_rate(self) -> float | None:
        return self.reward / self.decisions if self.decisions else None

    @property
    def revenue_per_1000(self) -> float | None:
        return 1000 * self.revenue / self.decisions if self.decisions else None


@dataclass(slots=True)
class PlacementOutcomes:
    placement: str
    by_version: dict[str, Tally] = field(default_factory=dict)
    by_offer: dict[str, Tally] = field(default_factory=dict)
    # reward per closed decision in time buckets, per model version: {version: [(bucket start, rate, n)]}
    curve: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)
    bucket_seconds: float = 60.0
    # set when the event log was not read to its end (the JetStream read cap, or NATS unreachable): events
    # stored after this time are not counted
    events_cut_at: float | None = None


@dataclass(slots=True)
class OfferOutcome:
    offer_id: str
    slot: int
    probability: float
    reward: float
    revenue: float


@dataclass(slots=True)
class DecisionDetail:
    record: dict[str, Any]
    features: dict[str, Any]
    candidates: list[tuple[str, float]]  # (offer id, policy probability)
    events: list[tuple[float, schemas.Event, bool]]  # (received at, event, inside the window)
    shown: list[OfferOutcome]
    closes_at: float
    closed: bool
    reward: float
    events_cut_at: float | None = None  # as in `PlacementOutcomes`


def _weights(definition: schemas.RewardDefinition | None) -> schemas.RewardDefinition:
    return definition if definition is not None else schemas.RewardDefinition()


class Credited(Protocol):
    """What the join reads of an outcome event: a `schemas.Event`, or the window's `stream_window.Outcome`."""

    @property
    def type(self) -> schemas.EventType: ...
    @property
    def offer_id(self) -> str | None: ...
    @property
    def value(self) -> float | None: ...


def _credit(definition: schemas.RewardDefinition, event: Credited, offer_value: float) -> tuple[float, float]:
    """(reward, revenue) one event adds to the offer it names."""
    weight = definition.weights.get(event.type)
    reward = 0.0
    if weight is not None:
        reward = (event.value or 0.0) if weight == "value" else float(weight)
    revenue = event.value if event.value is not None else (offer_value if event.type == "accept" else 0.0)
    return reward, revenue


class Outcomes:
    """Reads of one Kassa process's decision and event logs."""

    def __init__(self, kassa: Kassa, max_events: int | None = None, incremental: bool = True,
                 refresh_seconds: float = 2.0) -> None:
        self.kassa = kassa
        self.max_events = MAX_EVENTS if max_events is None else max_events
        # The decision log this process's data dir holds (on JetStream, the writer role's; ADR 0008).
        self.decisions_dir = kassa.settings.data_path / "decisions"
        # NullPool: no connection stays open on the event log between dashboard reads. On JetStream the events
        # stream is scanned through the process's bus (`JetStreamEventLog.scan_since`).
        log = kassa.event_log
        self._events = (sa.create_engine(f"sqlite:///{log.path}", poolclass=NullPool)
                        if isinstance(log, SqliteEventLog) else None)
        self._stream = log if isinstance(log, JetStreamEventLog) else None
        # The placement pages' reads of the stream: incremental, each message read and decoded once (see
        # `stream_window`); ``incremental=False`` reads the whole window on every view, as `decision` does.
        self._window = (StreamEventWindow(self._stream, self.max_events, refresh_seconds)
                        if self._stream is not None and incremental else None)
        # On SQLite, the same: the rows added since the last view (`event_window`).
        self._sqlite_window = (SqliteEventWindow(self._events, SQLITE_WINDOW_EVENTS)
                               if self._events is not None and incremental else None)
        # The decision log's last day, each file read once (see `decision_window`); ``incremental=False`` queries
        # the whole log on every view.
        self.decision_window = (DecisionLogWindow(self.decisions_dir, DECISION_WINDOW_SECONDS, MAX_DECISIONS)
                                if incremental else None)

    # ------------------------------------------------------------------ raw reads
    def _decisions_since(self, since: float, limit: int, now: float) -> list[DecisionRow]:
        """The newest ``limit`` decisions at or after ``since``, newest first: from the window when it covers
        ``since``, else from the log."""
        window = self.decision_window
        if window is not None and limit <= window.max_rows:
            self.kassa.decision_log.flush()
            held = window.rows(since, now)
            if held is not None:
                return held[:limit]
        rows = self._query_decisions("ts >= ?", [since], "decision_id, ts, placement, model_version, chosen, "
                                     "fallback, took_ms", limit, from_day=_day(since))
        return [DecisionRow(d, ts, p, v, tuple(chosen or ()), bool(fb), took) for d, ts, p, v, chosen, fb, took in rows]

    def _source(self, from_day: str | None = None, path: str | None = None,
                partitions: list[Path] | None = None) -> str | None:
        """The log as a DuckDB table: its partitions from ``from_day`` on (all: None), the ``partitions`` given, or
        one of its files; None when there is nothing to read. Partitions are listed here: DuckDB opens the first file
        of a glob to bind the query even when a filter on ``date`` then prunes it, and a parameter in that filter
        pruned nothing."""
        if path is not None:
            globs = [path]
        elif partitions is not None:
            globs = [f for part in partitions for f in decision_files(part)]
            if not globs:
                return None
        else:
            # the files, not a glob: a small file a compacted hour's file covers is left out (`decision_files`)
            globs = log_files(self.decisions_dir, from_day)
            if not globs:
                return None
        return f"read_parquet({parquet_list(globs)}, hive_partitioning = true, hive_types = {{'date': DATE}})"

    def _query_decisions(self, where: str, params: list[Any], columns: str, limit: int,
                         path: str | None = None, from_day: str | None = None,
                         partitions: list[Path] | None = None) -> list[tuple]:
        """A query of the log (its partitions from ``from_day`` on, or the ``partitions`` given), or of one of its
        files (``path``)."""
        self.kassa.decision_log.flush()

        def query() -> list[tuple]:
            if path is not None and not os.path.exists(path):  # merged by compaction: the caller reads the log
                return []
            source = self._source(from_day, path, partitions)
            if source is None:
                return []
            sql = f"SELECT {columns} FROM {source} WHERE {where} ORDER BY ts DESC LIMIT {int(limit)}"
            con = serving_duckdb()
            try:
                return con.execute(sql, params).fetchall()
            finally:
                con.close()

        return read_log(query, base=self.decisions_dir)

    def throughput(self, since: float, points: int = 30, now: float | None = None
                   ) -> tuple[float, list[tuple[float, float, float, float, float]]]:
        """Decisions since ``since`` in time buckets, from the log as written (no flush: this runs on every
        overview refresh): (bucket seconds, [(bucket start, decisions/s, fallback share, P50 ms, P99 ms)])."""
        now = time.time() if now is None else now
        window = self.decision_window
        held = window.rows(since, now) if window is not None else None
        if held is not None and len(held) < window.max_rows:  # type: ignore[union-attr]  # else: maybe cut short
            return _throughput(held, since, points, now)

        def query() -> tuple[float, list[tuple]]:
            table = self._source(_day(since))
            if table is None:
                return 60.0, []
            source = f"{table} WHERE ts >= ?"
            con = serving_duckdb()
            try:
                first = con.execute(f"SELECT min(ts) FROM {source}", [since]).fetchone()
                if first is None or first[0] is None:
                    return 60.0, []
                bucket = next((b for b in _BUCKETS if b >= (now - first[0]) / points), _BUCKETS[-1])
                return bucket, con.execute(
                    f"SELECT floor(ts / {bucket}) * {bucket} AS t, count(*), avg(CAST(fallback AS DOUBLE)), "
                    f"quantile_cont(took_ms, 0.5), quantile_cont(took_ms, 0.99) FROM {source} GROUP BY t ORDER BY t",
                    [since]).fetchall()
            finally:
                con.close()

        bucket, rows = read_log(query, base=self.decisions_dir)
        # a rate over the part of the bucket that has happened (and is inside the window): the newest bucket
        # is still filling, and n / bucket made every refresh end on a dip towards zero
        return bucket, [(float(t), n / max(min(t + bucket, now) - max(t, since), min(bucket, 1.0)),
                         float(fb or 0.0), float(p50), float(p99)) for t, n, fb, p50, p99 in rows]

    def _events_for(self, decision_ids: Iterable[str] | None, since: float | None = None
                    ) -> tuple[dict[str, list[tuple[float, schemas.Event]]], float | None]:
        """The outcome events (event time, event) of ``decision_ids`` (None: of every decision) at or after
        ``since``, oldest first, by decision id; and, when the log was not read to its end, the time up to which
        it was (see the module doc)."""
        if self._stream is not None:
            return self._stream_events_for(decision_ids, since)
        t = events_table
        stmt = sa.select(t.c.decision_id, t.c.received_at, t.c.body).where(t.c.decision_id.is_not(None))
        if decision_ids is not None:
            stmt = stmt.where(t.c.decision_id.in_(list(decision_ids)))
        if since is not None:
            stmt = stmt.where(t.c.received_at >= since)
        out: dict[str, list[tuple[float, schemas.Event]]] = {}
        if self._events is None:
            return out, None
        with self._events.connect() as conn:
            for decision_id, received_at, body in conn.execute(stmt.order_by(t.c.seq)):
                out.setdefault(decision_id, []).append((float(received_at), _event_decoder.decode(body)))
        return out, None

    def _stream_events_for(self, decision_ids: Iterable[str] | None, since: float | None
                           ) -> tuple[dict[str, list[tuple[float, schemas.Event]]], float | None]:
        assert self._stream is not None
        wanted = set(decision_ids) if decision_ids is not None else None
        start = since if since is not None else 0.0
        rows, complete = self._stream.scan_since(start, self.max_events)
        # A few ids: skip the bodies that do not contain one (as msgspec encodes it) before decoding.
        needles = ([msgspec.json.encode(d)[1:-1] for d in wanted] if wanted is not None and len(wanted) <= 8
                   else None)
        out: dict[str, list[tuple[float, schemas.Event]]] = {}
        decode = _event_decoder.decode
        for at, body in rows:
            if needles is not None and not any(n in body for n in needles):
                continue
            event = decode(body)
            if event.decision_id is None or (wanted is not None and event.decision_id not in wanted):
                continue
            out.setdefault(event.decision_id, []).append((at, event))
        cut_at = None if complete else (rows[-1][0] if rows else start)
        return out, cut_at

    # ------------------------------------------------------------------ per placement
    def placements(self, since: float, max_decisions: int = 100_000, buckets: int = 20,
                   now: float | None = None) -> dict[str, PlacementOutcomes]:
        """Reward and revenue by model version, by offer and over time, for decisions since ``since``."""
        now = time.time() if now is None else now
        rows = self._decisions_since(since, max_decisions, now)
        if not rows:
            return {}
        # events of these decisions only arrive after the oldest of them: no older event is read
        events_since = min(r.ts for r in rows) - _SKEW_SECONDS
        if self._window is not None:
            with self._window.since(events_since) as (held, cut_at):
                return self._tally(rows, held, cut_at, buckets, now)
        if self._sqlite_window is not None:
            with self._sqlite_window.since(events_since) as by_decision:
                if by_decision is not None:
                    return self._tally(rows, by_decision, None, buckets, now)
        events, cut_at = self._events_for(None, events_since)
        return self._tally(rows, events, cut_at, buckets, now)

    def _tally(self, rows: list[DecisionRow], events: Mapping[str, Sequence[tuple[float, Credited]]],
               cut_at: float | None, buckets: int, now: float) -> dict[str, PlacementOutcomes]:
        snapshot = self.kassa.catalog.snapshot
        span = max(now - min((r.ts for r in rows), default=now), 1.0)
        bucket_seconds = next((b for b in _BUCKETS if b >= span / buckets), _BUCKETS[-1])
        out: dict[str, PlacementOutcomes] = {}
        curves: dict[tuple[str, str, float], list[float]] = {}
        # per placement (PlacementOutcomes, reward definition): looked up once, not per row (30,000 rows: 150 ms
        # of tally went half to per-row lookups and to Tally() objects made for setdefault and thrown away)
        placements: dict[str, tuple[PlacementOutcomes, schemas.RewardDefinition]] = {}
        no_events: list[tuple[float, Credited]] = []
        for row in rows:
            decision_id, ts, placement, version, chosen = (row.decision_id, row.ts, row.placement, row.model_version,
                                                           row.chosen)
            known = placements.get(placement)
            if known is None:
                view = snapshot.placements.get(placement)
                known = placements[placement] = (
                    out.setdefault(placement, PlacementOutcomes(placement, bucket_seconds=bucket_seconds,
                                                                events_cut_at=cut_at)),
                    _weights(view.placement.reward if view else None))
            po, definition = known
            by_version = po.by_version.get(version)
            if by_version is None:
                by_version = po.by_version[version] = Tally()
            by_offer = po.by_offer
            if now < ts + definition.wait_seconds:
                by_version.open += 1
                for offer_id in chosen or ():
                    t = by_offer.get(offer_id)
                    if t is None:
                        t = by_offer[offer_id] = Tally()
                    t.open += 1
                continue
            per_offer = self._offer_rewards(definition, ts, chosen, events.get(decision_id, no_events))
            reward = revenue = 0.0
            for offer_id, (r, v) in per_offer.items():
                reward += r
                revenue += v
                t = by_offer.get(offer_id)
                if t is None:
                    t = by_offer[offer_id] = Tally()
                t.decisions += 1
                t.reward += r
                t.revenue += v
            by_version.decisions += 1
            by_version.reward += reward
            by_version.revenue += revenue
            bucket = ts - ts % bucket_seconds
            acc = curves.setdefault((placement, version, bucket), [0.0, 0.0])
            acc[0] += reward
            acc[1] += 1
        overall: dict[tuple[str, float], list[float]] = {}
        for (placement, version, bucket), (reward, n) in sorted(curves.items()):
            out[placement].curve.setdefault(version, []).append((bucket, reward / n, int(n)))
            acc = overall.setdefault((placement, bucket), [0.0, 0.0])
            acc[0] += reward
            acc[1] += n
        for (placement, bucket), (reward, n) in sorted(overall.items()):
            if len(out[placement].curve) > 1:
                out[placement].curve.setdefault(ALL_VERSIONS, []).append((bucket, reward / n, int(n)))
        return out

    def _offer_rewards(self, definition: schemas.RewardDefinition, ts: float, chosen: Sequence[str],
                       events: Sequence[tuple[float, Credited]]) -> dict[str, tuple[float, float]]:
        offers = self.kassa.catalog.snapshot.offers
        deadline = ts + definition.wait_seconds
        got: dict[str, list[float]] = {}
        for received_at, event in events:
            if received_at > deadline or event.offer_id not in chosen:
                continue
            offer = offers.get(event.offer_id) if event.offer_id else None
            reward, revenue = _credit(definition, event, offer.value if offer else 0.0)
            acc = got.setdefault(event.offer_id or "", [0.0, 0.0])
            acc[0] += reward
            acc[1] += revenue
        out: dict[str, tuple[float, float]] = {}
        for offer_id in chosen:
            if offer_id in got:
                reward, revenue = got[offer_id]
                if definition.cap is not None:
                    reward = min(reward, definition.cap)
                out[offer_id] = (reward, revenue)
            else:
                out[offer_id] = (definition.default, 0.0)
        return out

    # ------------------------------------------------------------------ one decision
    def decision(self, decision_id: str, now: float | None = None) -> DecisionDetail | None:
        """One logged decision with its outcome events and joined reward; None when it is not logged."""
        now = time.time() if now is None else now
        columns = ("decision_id, ts, placement, model_version, request_id, customer_id, features_json, "
                   "candidates, probabilities, chosen, chosen_probabilities, explored, fallback, took_ms")
        rows: list[tuple] = []
        if self.decision_window is not None:  # a decision of the last day: read only its file
            self.kassa.decision_log.flush()
            path = self.decision_window.file_of(decision_id, self.kassa.clock())
            if path is not None:
                rows = self._query_decisions("decision_id = ?", [decision_id], columns, 1, path)
        if not rows:  # the partitions the id can be in (`lookup_partitions`), never the whole history
            partitions = lookup_partitions(self.decisions_dir, decision_id, self.kassa.clock(),
                                           self.kassa.settings.decision_lookup_days)
            rows = self._query_decisions("decision_id = ?", [decision_id], columns, 1, partitions=partitions)
        if not rows:
            return None
        names = [c.strip() for c in columns.split(",")]
        record = dict(zip(names, rows[0], strict=True))
        view = self.kassa.catalog.snapshot.placements.get(record["placement"])
        definition = _weights(view.placement.reward if view else None)
        # events of a decision arrive after it: none older is read (on JetStream, the scan starts there)
        found, cut_at = self._events_for([decision_id], record["ts"] - _SKEW_SECONDS)
        events = found.get(decision_id, [])
        chosen: list[str] = list(record["chosen"] or [])
        per_offer = self._offer_rewards(definition, record["ts"], chosen, events)
        closes_at = record["ts"] + definition.wait_seconds
        shown = [OfferOutcome(offer_id, slot + 1, p, *per_offer[offer_id])
                 for slot, (offer_id, p) in enumerate(zip(chosen, record["chosen_probabilities"] or [],
                                                          strict=False))]
        return DecisionDetail(
            record=record,
            features=_features_decoder.decode(record.pop("features_json") or "{}"),
            candidates=list(zip(record["candidates"] or [], record["probabilities"] or [], strict=False)),
            events=[(at, ev, at <= closes_at) for at, ev in events],
            shown=shown, closes_at=closes_at, closed=now >= closes_at,
            reward=sum(o.reward for o in shown), events_cut_at=cut_at,
        )

    def recent(self, limit: int = 20) -> list[tuple[str, float, str, str, list[str]]]:
        """The newest decisions: (id, ts, placement, model version, shown offers)."""
        window = self.decision_window
        if window is not None:
            now = self.kassa.clock()
            self.kassa.decision_log.flush()
            held = window.rows(now - window.span_seconds, now)
            if held is not None and len(held) >= limit:  # the newest of the log: anything not held is older
                return [(r.decision_id, r.ts, r.placement, r.model_version, list(r.chosen)) for r in held[:limit]]
        rows = self._query_decisions("TRUE", [], "decision_id, ts, placement, model_version, chosen", limit)
        return [(r[0], r[1], r[2], r[3], list(r[4] or [])) for r in rows]


def _day(ts: float) -> str:
    """The decision log's date partition of a time (`decision_log._utc_date`)."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def _throughput(rows: list[DecisionRow], since: float, points: int, now: float
                ) -> tuple[float, list[tuple[float, float, float, float, float]]]:
    """`Outcomes.throughput` over held rows (newest first): the same buckets and numbers as its query."""
    import numpy as np

    if not rows:
        return 60.0, []
    bucket = next((b for b in _BUCKETS if b >= (now - rows[-1].ts) / points), _BUCKETS[-1])
    groups: dict[float, list[DecisionRow]] = {}
    for r in reversed(rows):
        groups.setdefault(math.floor(r.ts / bucket) * bucket, []).append(r)
    out = []
    for t, group in sorted(groups.items()):
        took = np.fromiter((r.took_ms for r in group), float, len(group))
        p50, p99 = np.quantile(took, [0.5, 0.99])  # linear interpolation, as DuckDB's quantile_cont
        n = len(group)
        out.append((float(t), n / max(min(t + bucket, now) - max(t, since), min(bucket, 1.0)),
                    sum(r.fallback for r in group) / n, float(p50), float(p99)))
    return bucket, out
