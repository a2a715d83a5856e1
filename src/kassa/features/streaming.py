"""The streaming-feature engine: windowed aggregates of the event log per entity, kept fresh in the online store.

This module owns the ``stream`` feature views at run time: how an event becomes updates of entity rows
(`StreamAggregator`), and the worker that tails the durable event log, applies events, writes the
changed rows to the online store and checkpoints its position (`StreamProcessor`).

Entities and values
-------------------
An event updates one row per entity key it names (`extract_keys`): ``customer`` ← ``customer.id`` or
``order.customer_id``; ``offer`` ← ``offer_id``; ``order`` ← ``order.id``; ``product`` ← each distinct
``product_id or sku`` among the order's items (an order fans out to one update per product; several lines
of the same product are one update whose item values are summed). Events carry no session id, so a
``session`` stream view is rejected when the engine is built.

A field's ``of`` path is read from the event *in the context of the key*: item paths see only the key's
items on product views and every item elsewhere. Paths: ``value``, ``type``, ``offer_id``,
``decision_id``, ``event_id``, ``customer.id``, ``order.{id,platform,currency,ship_country,customer_id,
total}``, ``order.items.{qty,price}`` (numbers, summed over the items in context),
``order.items.{sku,product_id,category}`` (a list of strings, one per item), and the indicator
``<string path>=<literal>`` (1.0 when equal, else 0.0), e.g. ``type=accept``, whose mean over impressions
and accepts is an accept rate. ``count`` without ``of`` counts events; with ``of`` it counts present values
(a list counts its elements). ``last`` of a list is its last element; ``last_n_distinct`` takes every element.

Event time is ``order.created_at`` when set (the business time of a delayed webhook), else
``event.timestamp``, else the receive time; a time more than ``max_future_skew`` ahead of the receive time
is clamped to it, so one client with a wrong clock cannot push the watermark forward and drop everybody
else's events as late.

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

import asyncio
import contextlib
import gc
import hashlib
import heapq
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from kassa import schemas
from kassa.degraded import RateLimitedWarning
from kassa.events.log import EventLog
from kassa.features.definitions import DefinitionError, FeatureView, Field, check_value, parse_duration
from kassa.features.online.base import OnlineStore

log = logging.getLogger("kassa.streaming")

DEFAULT_RESOLUTION = 60
INF = math.inf

Items = Sequence[schemas.OrderItem]
PathFn = Callable[[schemas.Event, Items | None], Any]

# -------------------------------------------------------------------------------------------- value paths
_EVENT_STR = ("type", "offer_id", "decision_id", "event_id")
_ORDER_STR = ("id", "platform", "currency", "ship_country", "customer_id")
_ITEM_NUM = ("qty", "price")
_ITEM_STR = ("sku", "product_id", "category")


def _event_attr(name: str) -> PathFn:
    def get(ev: schemas.Event, items: Items | None) -> Any:
        return getattr(ev, name)

    return get


def _order_attr(name: str) -> PathFn:
    def get(ev: schemas.Event, items: Items | None) -> Any:
        return getattr(ev.order, name) if ev.order is not None else None

    return get


def _item_sum(name: str) -> PathFn:
    def get(ev: schemas.Event, items: Items | None) -> Any:
        if not items:
            return None
        return sum(getattr(it, name) for it in items)

    return get


def _item_list(name: str) -> PathFn:
    def get(ev: schemas.Event, items: Items | None) -> Any:
        if not items:
            return None
        out = [v for it in items if (v := getattr(it, name)) is not None]
        return out or None

    return get


def _customer_id(ev: schemas.Event, items: Items | None) -> Any:
    return ev.customer.id if ev.customer is not None else None


def _indicator(base: PathFn, literal: str) -> PathFn:
    def get(ev: schemas.Event, items: Items | None) -> Any:
        return 1.0 if base(ev, items) == literal else 0.0

    return get


def compile_path(path: str) -> tuple[PathFn, str]:
    """The extractor of one ``of`` path and its kind: ``num``, ``str`` or ``list`` (of strings)."""
    if "=" in path:
        base, literal = path.split("=", 1)
        fn, kind = compile_path(base.strip())
        if kind != "str":
            raise ValueError(f"indicator {path!r}: {base!r} is not a string path")
        return _indicator(fn, literal.strip()), "num"
    if path == "value":
        return _event_attr("value"), "num"
    if path in _EVENT_STR:
        return _event_attr(path), "str"
    if path == "customer.id":
        return _customer_id, "str"
    if path == "order.total":
        return _order_attr("total"), "num"
    if path.startswith("order.items."):
        name = path.removeprefix("order.items.")
        if name in _ITEM_NUM:
            return _item_sum(name), "num"
        if name in _ITEM_STR:
            return _item_list(name), "list"
    elif path.startswith("order."):
        name = path.removeprefix("order.")
        if name in _ORDER_STR:
            return _order_attr(name), "str"
    raise ValueError(f"unknown event path {path!r}")


# -------------------------------------------------------------------------------------------- entity keys
def _customer_keys(ev: schemas.Event) -> list[tuple[str, Items | None]]:
    order = ev.order
    cid = ev.customer.id if ev.customer is not None else None
    if cid is None and order is not None:
        cid = order.customer_id
    if cid is None:
        return []
    return [(cid, order.items if order is not None else None)]


def _offer_keys(ev: schemas.Event) -> list[tuple[str, Items | None]]:
    if ev.offer_id is None:
        return []
    return [(ev.offer_id, ev.order.items if ev.order is not None else None)]


def _order_keys(ev: schemas.Event) -> list[tuple[str, Items | None]]:
    if ev.order is None:
        return []
    return [(ev.order.id, ev.order.items)]


def _product_keys(ev: schemas.Event) -> list[tuple[str, Items | None]]:
    if ev.order is None or not ev.order.items:
        return []
    groups: dict[str, list[schemas.OrderItem]] = {}
    for it in ev.order.items:
        groups.setdefault(it.product_id or it.sku, []).append(it)
    return list(groups.items())


KEY_EXTRACTORS: dict[str, Callable[[schemas.Event], list[tuple[str, Items | None]]]] = {
    "customer": _customer_keys,
    "offer": _offer_keys,
    "order": _order_keys,
    "product": _product_keys,
}


def extract_keys(entity: str, event: schemas.Event) -> list[tuple[str, Items | None]]:
    """The entity keys ``event`` updates, each with the order items in its context."""
    return KEY_EXTRACTORS[entity](event)


def event_time(event: schemas.Event, received_at: float | None = None) -> float:
    if event.order is not None and event.order.created_at is not None:
        return event.order.created_at
    if event.timestamp is not None:
        return event.timestamp
    return received_at if received_at is not None else time.time()


# -------------------------------------------------------------------------------------------- plans
# Bucket operations; a bucket is a flat list, each op owns a slot range.
_EVCOUNT, _NUM, _CNT, _LAST, _LND = range(5)
_AGGS_NUMERIC = ("sum", "mean", "min", "max")
# Initial slots: event count | count, sum, min, max | value count | (stamp, value) | {value: stamp}
_SLOTS: dict[int, list[Any]] = {_EVCOUNT: [0], _NUM: [0, 0, INF, -INF], _CNT: [0], _LAST: [None], _LND: [None]}


@dataclass(slots=True)
class _FieldPlan:
    name: str
    agg: str
    off: int  # first slot of its statistic in the bucket
    n: int
    coerce: Callable[[Any], Any]
    empty: Any  # value of an empty window
    read: Callable[[_FieldPlan, list[list[Any]], dict[int, tuple[int, float, float, float]]], Any] = field(
        init=False
    )

    def __post_init__(self) -> None:
        self.read = _READERS[self.agg]


@dataclass(slots=True)
class _SeriesPlan:
    window: float
    width: float
    limit: int = 0  # prune when a row holds this many buckets
    reach: int = 0  # buckets the lateness spans (+1 for float rounding at the edges)
    ops: list[tuple[int, int, int, int]] = field(default_factory=list)  # (op, path index, slot, cap)
    template: list[Any] = field(default_factory=list)
    fields: list[_FieldPlan] = field(default_factory=list)
    lnd_slots: list[int] = field(default_factory=list)
    last_slots: list[int] = field(default_factory=list)

    @property
    def ordered(self) -> bool:
        """Whether its readers need the live buckets newest first."""
        return bool(self.lnd_slots or self.last_slots)


@dataclass(slots=True)
class _ViewPlan:
    index: int
    view: FeatureView
    entity: str
    keys: Callable[[schemas.Event], list[tuple[str, Items | None]]]
    lateness: float
    paths: list[PathFn]
    series: list[_SeriesPlan]
    field_order: list[str]


def _coercer(f: Field, agg: str, kind: str | None) -> Callable[[Any], Any]:
    dt = f.dtype
    where = f"field {f.name!r}"
    if agg == "last_n_distinct":
        if kind == "num" and dt == "list[int]":
            return lambda v: [round(x) for x in v]
        if kind == "num" and dt == "list[float]":
            return lambda v: [float(x) for x in v]
        if kind != "num" and dt == "list[str]":
            return lambda v: [s[: f.max_length] for s in v]
        want = "list[float] or list[int]" if kind == "num" else "list[str]"
        raise DefinitionError(f"{where}: last_n_distinct of {f.of!r} needs dtype {want}")
    if agg == "last" and kind in ("str", "list"):
        if dt != "str":
            raise DefinitionError(f"{where}: last of {f.of!r} needs dtype str")
        return lambda v: v[: f.max_length]
    if dt == "int":
        return lambda v: v if type(v) is int else round(v)
    if dt == "float":
        return float
    raise DefinitionError(f"{where}: {agg} needs dtype int or float")


def _plan(index: int, view: FeatureView, resolution: int) -> _ViewPlan:
    where = f"view {view.name!r}"
    if view.entity not in KEY_EXTRACTORS:
        raise DefinitionError(f"{where}: events carry no {view.entity} key; stream views need one of "
                              f"{', '.join(KEY_EXTRACTORS)}")
    if view.source is None or not view.source.events:
        raise DefinitionError(f"{where}: stream views need `source: {{events: [...]}}`")
    lateness = parse_duration(view.source.allowed_lateness)
    path_index: dict[str, int] = {}
    paths: list[PathFn] = []
    kinds: list[str] = []
    series: dict[float, _SeriesPlan] = {}
    stats: dict[tuple[float, int, int], tuple[int, int]] = {}  # (window, op, path) -> (slot, op index)
    for f in view.fields:
        fw = f"{where} field {f.name!r}"
        if f.agg is None or not f.window:
            raise DefinitionError(f"{fw}: stream fields need `agg` and `window`")
        window = parse_duration(f.window)
        if window <= 0:
            raise DefinitionError(f"{fw}: window must be positive")
        pi, kind = -1, None
        if f.of:
            if f.of not in path_index:
                try:
                    fn, k = compile_path(f.of)
                except ValueError as exc:
                    raise DefinitionError(f"{fw}: {exc}") from None
                path_index[f.of] = len(paths)
                paths.append(fn)
                kinds.append(k)
            pi = path_index[f.of]
            kind = kinds[pi]
        elif f.agg != "count":
            raise DefinitionError(f"{fw}: `{f.agg}` needs `of`")
        if f.agg in _AGGS_NUMERIC and kind != "num":
            raise DefinitionError(f"{fw}: {f.agg} of {f.of!r} needs a numeric path")
        try:
            coerce = _coercer(f, f.agg, kind)
        except DefinitionError as exc:
            raise DefinitionError(f"{where} {exc}") from None
        if f.agg == "count":
            op = _EVCOUNT if pi < 0 else (_NUM if kind == "num" else _CNT)
        elif f.agg in _AGGS_NUMERIC:
            op = _NUM
        else:
            op = _LAST if f.agg == "last" else _LND
        sp = series.setdefault(window, _SeriesPlan(window, window / resolution))
        skey = (window, op, pi)
        n = min(f.n, f.max_length)
        if skey not in stats:
            off = len(sp.template)
            sp.template.extend(_SLOTS[op])
            stats[skey] = (off, len(sp.ops))
            sp.ops.append((op, pi, off, n))
            (sp.lnd_slots if op == _LND else sp.last_slots if op == _LAST else []).append(off)
        off, oi = stats[skey]
        if op == _LND and n > sp.ops[oi][3]:
            o = sp.ops[oi]
            sp.ops[oi] = (o[0], o[1], o[2], n)
        if f.agg in ("count", "sum"):
            empty: Any = coerce(0)
        elif f.agg == "last_n_distinct":
            empty = [] if f.default is None else f.default
        else:
            empty = f.default
        try:
            empty = check_value(f, empty)
        except ValueError as exc:
            raise DefinitionError(f"{fw}: default {exc}") from None
        sp.fields.append(_FieldPlan(f.name, f.agg, off, n, coerce, empty))
    for sp in series.values():
        # Live and not-yet-prunable buckets: R + lateness / w + 1; half a window of slack amortises pruning.
        sp.reach = math.ceil(lateness / sp.width) + 1
        sp.limit = resolution + sp.reach + 1 + resolution // 2
    return _ViewPlan(
        index=index,
        view=view,
        entity=view.entity,
        keys=KEY_EXTRACTORS[view.entity],
        lateness=lateness,
        paths=paths,
        series=sorted(series.values(), key=lambda s: s.window),
        field_order=[f.name for f in view.fields],
    )


# -------------------------------------------------------------------------------------------- state
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
        self._plans = [_plan(i, v, resolution) for i, v in enumerate(self.views)]
        self._by_name = {p.view.name: p for p in self._plans}
        self._by_type: dict[str, list[_ViewPlan]] = {}
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

    def _apply(self, vp: _ViewPlan, key: str, vals: list[Any], ts: float, ordinal: int, wm: float) -> None:
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
                if op == _EVCOUNT:
                    b[off] += 1
                    continue
                v = vals[pi]
                if v is None:
                    continue
                if op == _NUM:
                    b[off] += 1
                    b[off + 1] += v
                    if v < b[off + 2]:
                        b[off + 2] = v
                    if v > b[off + 3]:
                        b[off + 3] = v
                elif op == _CNT:
                    b[off] += len(v) if type(v) is list else 1
                elif op == _LAST:
                    if type(v) is list:
                        stamp = (ts, ordinal, len(v) - 1)
                        v = v[-1]
                    else:
                        stamp = (ts, ordinal, 0)
                    cur = b[off]
                    if cur is None or stamp > cur[0]:
                        b[off] = (stamp, v)
                else:  # _LND
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
    def _compute(self, vp: _ViewPlan, row: _Row | None, t: float) -> tuple[dict[str, Any], float, bool]:
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

    def _prunable(self, vp: _ViewPlan, row: _Row) -> bool:
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


# Readers of one field over the live buckets of its window, newest bucket first (one function per
# aggregate: this runs for every field of every written row). Fields of one numeric statistic share one
# pass over the buckets through ``stats``.
Stats = dict[int, tuple[int, float, float, float]]


def _first(kb: tuple[int, list[Any]]) -> int:
    return kb[0]


def _num(off: int, live: list[list[Any]], stats: Stats) -> tuple[int, float, float, float]:
    st = stats.get(off)
    if st is None:
        if len(live) == 1:
            b = live[0]
            st = (b[off], b[off + 1], b[off + 2], b[off + 3])
        else:
            c, parts, lo, hi = 0, [], INF, -INF
            for b in live:
                n = b[off]
                if n:
                    c += n
                    parts.append(b[off + 1])
                    if b[off + 2] < lo:
                        lo = b[off + 2]
                    if b[off + 3] > hi:
                        hi = b[off + 3]
            st = (c, math.fsum(parts), lo, hi)
        stats[off] = st
    return st


def _read_count(fp: _FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    off = fp.off
    c = live[0][off] if len(live) == 1 else sum(b[off] for b in live)
    return fp.coerce(c) if c else fp.empty


def _read_sum(fp: _FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    return fp.coerce(_num(fp.off, live, stats)[1]) if live else fp.empty


def _read_mean(fp: _FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    c, total, _, _ = _num(fp.off, live, stats)
    return fp.coerce(total / c) if c else fp.empty


def _read_min(fp: _FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    c, _, lo, _ = _num(fp.off, live, stats)
    return fp.coerce(lo) if c else fp.empty


def _read_max(fp: _FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    c, _, _, hi = _num(fp.off, live, stats)
    return fp.coerce(hi) if c else fp.empty


def _read_last(fp: _FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    # Bucket k only holds times in [k w, (k + 1) w): the newest bucket with a value has the latest one.
    off = fp.off
    for b in live:
        cur = b[off]
        if cur is not None:
            return fp.coerce(cur[1])
    return fp.empty


def _read_lnd(fp: _FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    off, n = fp.off, fp.n
    merged: dict[Any, tuple[float, int, int]] = {}
    for b in live:
        d = b[off]
        if d:
            if len(merged) >= n:
                break  # an older bucket can only add values older than the n already found
            for x, stamp in d.items():
                prev = merged.get(x)
                if prev is None or stamp > prev:
                    merged[x] = stamp
    if not merged:
        return fp.empty
    return fp.coerce(sorted(merged, key=merged.__getitem__, reverse=True)[:n])


_READERS: dict[str, Callable[[_FieldPlan, list[list[Any]], Stats], Any]] = {
    "count": _read_count,
    "sum": _read_sum,
    "mean": _read_mean,
    "min": _read_min,
    "max": _read_max,
    "last": _read_last,
    "last_n_distinct": _read_lnd,
}


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


# -------------------------------------------------------------------------------------------- processor
class StreamProcessor:
    """Applies events to a `StreamAggregator` and keeps the online store in step with it.

    Two ways in: `run` tails the durable event log from a checkpoint (the ``kassa stream`` worker and the
    embedded background task), and `apply` takes one event right after the server appended it, so a
    decision 50 ms after an order already sees it. Both may run together: the log tail skips events
    `apply` already took (by ``event_id``).

    The checkpoint file holds the log position *and* the aggregator state taken at that position: a
    30-day window cannot be rebuilt from a position alone without replaying 30 days of log. On restart
    the state is restored and the tail resumes after the saved position; a missing, unreadable or stale
    checkpoint (views changed) rebuilds everything from the start of the log. Events `apply` took beyond
    the saved position are in the saved state *and* its remembered ids, so the replay does not count
    them twice. A checkpoint encodes the whole state on the event loop (~15 µs per row: 0.3 s for 20k
    rows), which is why it is taken once a minute by default, not per batch.

    Rows are written with `OnlineStore.write`, one per changed row per batch, values computed right
    before each write under a lock, so concurrent `apply` and `run` never leave an older value last.
    The store must accept a write whose ``ts`` equals the stored one: a late event or a window expiring
    changes a row's values without changing its newest event time.
    """

    def __init__(
        self,
        views: Iterable[FeatureView],
        store: OnlineStore,
        event_log: EventLog | None = None,
        clock: Callable[[], float] = time.time,
        *,
        checkpoint_path: str | Path | None = None,
        checkpoint_interval: float = 60.0,
        batch_size: int = 1000,
        resolution: int = DEFAULT_RESOLUTION,
        max_future_skew: float | None = 300.0,
        dedupe_capacity: int = 100_000,
        advance_when_idle: bool = True,
    ) -> None:
        self.aggregator = StreamAggregator(
            views, resolution=resolution, max_future_skew=max_future_skew, dedupe_capacity=dedupe_capacity
        )
        self.views = {v.name: v for v in self.aggregator.views}
        self.store = store
        self.log = event_log
        self.clock = clock
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.checkpoint_interval = checkpoint_interval
        self.batch_size = batch_size
        self.advance_when_idle = advance_when_idle
        self.seq = 0  # last log position applied
        self.consumed = 0  # log rows read so far (for lag_events without a max-seq query)
        self.lag_events = 0
        self.writes = 0
        self.last_event_time: float | None = None
        self._caught_up = False
        self._newest_written: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._last_checkpoint = 0.0
        self._warn = RateLimitedWarning(log, "stream processor")
        self.restored = self._restore()

    # ------------------------------------------------------------------ metrics
    @property
    def processed(self) -> int:
        return self.aggregator.processed

    @property
    def late_dropped(self) -> int:
        return self.aggregator.late_dropped

    @property
    def duplicates(self) -> int:
        return self.aggregator.duplicates

    @property
    def pending_rows(self) -> int:
        """Changed rows not yet written to the online store (grows while it is down)."""
        return self.aggregator.pending

    @property
    def lag_seconds(self) -> float:
        """Clock minus the event time of the last processed event; 0 when caught up with the log."""
        if self.last_event_time is None or (self._caught_up and self.lag_events == 0):
            return 0.0
        return max(0.0, self.clock() - self.last_event_time)

    @property
    def freshness(self) -> dict[str, float | None]:
        """Per view: age of its newest written value (clock minus that value's event time)."""
        now = self.clock()
        return {name: (now - ts if (ts := self._newest_written.get(name)) is not None else None)
                for name in self.views}

    # ------------------------------------------------------------------ applying events
    async def process(self, events: Iterable[schemas.Event], received_at: float | None = None) -> int:
        """Apply a batch and write each changed row once; returns the number of rows written."""
        now = self.clock() if received_at is None else received_at
        update = self.aggregator.update
        for ev in events:
            update(ev, now)
            self.last_event_time = event_time(ev, now)
        self.aggregator.expire()
        return await self._flush()

    async def apply(self, event: schemas.Event) -> int:
        """The embedded path: apply one just-appended event and write its rows before returning."""
        return await self.process((event,))

    async def _flush(self) -> int:
        agg = self.aggregator
        # Serialised so two flushes never interleave writes of one row; values are computed right before
        # each write, so the last write of a row always carries its latest state.
        async with self._lock:
            n = 0
            changed = agg.drain_changed()
            for i, (name, key) in enumerate(changed):
                out = agg.emit(name, key)
                if out is None:
                    continue
                values, ts = out
                try:
                    await self.store.write(self.views[name], key, values, ts)
                except BaseException:
                    # Keep the unwritten rows pending so the next flush writes them.
                    for rest in changed[i:]:
                        agg.mark_changed(*rest)
                    self.writes += n
                    raise
                if ts > self._newest_written.get(name, -INF):
                    self._newest_written[name] = ts
                n += 1
            self.writes += n
            return n

    async def resync(self) -> int:
        """Write every row again (after the online store lost its data)."""
        for view, key in self.aggregator.all_keys():
            self.aggregator.mark_changed(view, key)
        return await self._flush()

    # ------------------------------------------------------------------ tailing the log
    async def catch_up(self, max_batches: int | None = None) -> int:
        """Read and apply log events until none are left (or ``max_batches``); returns events read."""
        if self.log is None:
            raise RuntimeError("no event log to tail")
        total, batches = 0, 0
        while max_batches is None or batches < max_batches:
            rows = await asyncio.to_thread(self.log.read, self.seq, self.batch_size)
            batches += 1
            if not rows:
                self._caught_up, self.lag_events = True, 0
                if self.advance_when_idle:
                    # Nothing is pending, so nothing older than now minus the lateness can still come.
                    self.aggregator.expire(self.clock())
                if self.aggregator.pending:  # also rows an `apply` could not write (store was down)
                    await self._flush()
                break
            await self.process([ev for _, ev in rows])
            self.seq = rows[-1][0]
            self.consumed += len(rows)
            total += len(rows)
            full = len(rows) == self.batch_size
            self._caught_up = not full
            self.lag_events = await asyncio.to_thread(self._lag) if full else 0
            if self.checkpoint_path is not None and self.clock() - self._last_checkpoint >= self.checkpoint_interval:
                await self.save_checkpoint()
            if not full:
                break
        return total

    def _lag(self) -> int:
        assert self.log is not None
        max_seq = getattr(self.log, "max_seq", None)
        if callable(max_seq):
            return max(0, int(max_seq()) - self.seq)
        return max(0, self.log.count() - self.consumed)

    async def run(self, poll_interval: float = 0.05) -> None:
        """Tail the log until `stop` (or cancellation); saves a checkpoint on the way out."""
        self._stop.clear()
        try:
            while not self._stop.is_set():
                try:
                    await self.catch_up()
                except Exception as exc:
                    # A store or log hiccup must not kill the worker. The failed batch is read again; its
                    # events are already in the state (and skipped as duplicates), its rows still pending.
                    self._warn("batch failed; retrying from the log", exc)
                    self._caught_up = True  # back off for one poll interval
                if self._caught_up:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), poll_interval)
        finally:
            if self.checkpoint_path is not None:
                await self.save_checkpoint()

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ checkpoints
    async def save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        # Encode on the loop (the state must not change underneath), write the file off it.
        payload = msgspec.msgpack.encode(
            {"seq": self.seq, "consumed": self.consumed, "state": self.aggregator.dump()}
        )
        await asyncio.to_thread(_atomic_write, self.checkpoint_path, payload)
        self._last_checkpoint = self.clock()

    def _restore(self) -> bool:
        path = self.checkpoint_path
        if path is None or not path.exists():
            return False
        try:
            # Millions of small containers: without the collector scanning them over and over as they
            # are created this is several times faster.
            with _gc_paused():
                saved = msgspec.msgpack.decode(path.read_bytes())
                self.aggregator.load(saved["state"])
        except Exception as exc:
            log.warning("stream checkpoint %s not usable (%s); rebuilding from the start of the log", path, exc)
            self.aggregator = StreamAggregator(
                self.aggregator.views,
                resolution=self.aggregator.resolution,
                max_future_skew=self.aggregator.max_future_skew,
                dedupe_capacity=self.aggregator.dedupe_capacity,
            )
            return False
        self.seq = int(saved["seq"])
        self.consumed = int(saved["consumed"])
        return True


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_TMP_IDS = itertools.count()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp name: a shutdown save may overlap the tail task's last periodic save.
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.{next(_TMP_IDS)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
