"""Streaming features: every aggregate against a brute-force recomputation, entity fan-out, the
processor's writes, checkpoint resume and read-after-write through `apply`."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kassa.events.log import SqliteEventLog
from kassa.features.definitions import DefinitionError, FeatureView, Field, Source, check_value, parse_duration
from kassa.features.online.base import ViewValues
from kassa.features.online.memory import InMemoryOnlineStore
from kassa.features.streaming.aggregator import StreamAggregator
from kassa.features.streaming.keys import extract_keys
from kassa.features.streaming.processor import StreamProcessor
from kassa.schemas import Customer, Event, Order, OrderItem

T0 = 1_699_999_200.0  # a whole number of hours, so "aligned" times are multiples of every width


# --------------------------------------------------------------------------------------------- fixtures
def make_store() -> InMemoryOnlineStore:
    return InMemoryOnlineStore(VIEWS)


async def stored_row(store: InMemoryOnlineStore, view: FeatureView, key: str) -> ViewValues | None:
    (row,) = await store.read([(view.entity, key)], [view])
    return None if row is None else row.get(view.name)


async def stored(store: InMemoryOnlineStore, view: FeatureView, key: str) -> dict[str, Any] | None:
    vv = await stored_row(store, view, key)
    return None if vv is None else dict(vv.values)


def f(name: str, dtype: str, agg: str, window: str, of: str | None = None, **kw: Any) -> Field:
    return Field(name=name, dtype=dtype, agg=agg, window=window, of=of, **kw)  # type: ignore[arg-type]


CUSTOMER = FeatureView(
    name="customer_activity",
    kind="stream",
    entity="customer",
    source=Source(events=["order", "accept", "impression"], allowed_lateness="10m"),
    fields=[
        f("events_10m", "int", "count", "10m"),
        f("orders_1h", "int", "count", "1h", of="order.id"),
        f("spend_1h", "float", "sum", "1h", of="order.total"),
        f("value_mean_10m", "float", "mean", "10m", of="value"),
        f("value_min_1h", "float", "min", "1h", of="value"),
        f("items_price_max_10m", "float", "max", "10m", of="order.items.price"),
        f("units_1h", "int", "sum", "1h", of="order.items.qty"),
        f("last_offer_1h", "str", "last", "1h", of="offer_id"),
        f("last_type_10m", "str", "last", "10m", of="type"),
        f("categories_1h", "list[str]", "last_n_distinct", "1h", of="order.items.category", n=3),
        f("category_lines_10m", "int", "count", "10m", of="order.items.category"),
    ],
)
PRODUCT = FeatureView(
    name="product_sales",
    kind="stream",
    entity="product",
    source=Source(events=["order"], allowed_lateness="10m"),
    fields=[
        f("orders_1h", "int", "count", "1h"),
        f("units_10m", "int", "sum", "10m", of="order.items.qty"),
        f("price_mean_1h", "float", "mean", "1h", of="order.items.price"),
        f("qty_max_1h", "int", "max", "1h", of="order.items.qty"),
        f("last_category_1h", "str", "last", "1h", of="order.items.category"),
        f("skus_10m", "list[str]", "last_n_distinct", "10m", of="order.items.sku", n=2),
    ],
)
OFFER = FeatureView(
    name="offer_perf",
    kind="stream",
    entity="offer",
    source=Source(events=["impression", "accept"], allowed_lateness="2m"),
    fields=[
        f("events_10m", "int", "count", "10m"),
        f("accepts_1h", "int", "sum", "1h", of="type=accept"),
        f("accept_rate_1h", "float", "mean", "1h", of="type=accept"),
        f("value_sum_10m", "float", "sum", "10m", of="value"),
        f("value_max_1h", "float", "max", "1h", of="value", default=-1.0),
        f("recent_values_1h", "list[float]", "last_n_distinct", "1h", of="value", n=4),
    ],
)
VIEWS = [CUSTOMER, PRODUCT, OFFER]


# --------------------------------------------------------------------------------------------- brute force
def bf_keys(view: FeatureView, ev: Event) -> list[tuple[str, list[OrderItem] | None]]:
    order = ev.order
    if view.entity == "customer":
        cid = (ev.customer.id if ev.customer else None) or (order.customer_id if order else None)
        return [(cid, list(order.items) if order else None)] if cid else []
    if view.entity == "offer":
        return [(ev.offer_id, list(order.items) if order else None)] if ev.offer_id else []
    if view.entity == "product":
        out: dict[str, list[OrderItem]] = {}
        for it in order.items if order else []:
            out.setdefault(it.product_id or it.sku, []).append(it)
        return list(out.items())
    raise AssertionError(view.entity)


def bf_value(path: str | None, ev: Event, items: list[OrderItem] | None) -> Any:
    if path is None:
        return "event"
    if path == "type=accept":
        return 1.0 if ev.type == "accept" else 0.0
    if path in ("value", "offer_id", "type"):
        return getattr(ev, path)
    if path.startswith("order.items."):
        attr = path.split(".")[-1]
        if not items:
            return None
        if attr in ("qty", "price"):
            return sum(getattr(it, attr) for it in items)
        vals = [getattr(it, attr) for it in items if getattr(it, attr) is not None]
        return vals or None
    if path.startswith("order."):
        return getattr(ev.order, path.split(".")[-1]) if ev.order else None
    raise AssertionError(path)


Accepted = dict[str, list[tuple[float, int, Event]]]


def bf_accept(views: list[FeatureView], stream: list[Event]) -> tuple[Accepted, int, int]:
    """Per view, the (time, ordinal, event) it must aggregate; plus duplicates and late events."""
    seen: set[str] = set()
    top = -math.inf
    accepted: Accepted = {v.name: [] for v in views}
    dups = late = 0
    for ordinal, ev in enumerate(stream):
        if ev.event_id in seen:
            dups += 1
            continue
        seen.add(ev.event_id)
        assert ev.timestamp is not None
        ts = ev.timestamp
        was_late = False
        for v in views:
            assert v.source is not None and v.source.events is not None
            if ev.type not in v.source.events:
                continue
            if ts < top - parse_duration(v.source.allowed_lateness):
                was_late = True
            else:
                accepted[v.name].append((ts, ordinal, ev))
        late += was_late
        top = max(top, ts)
    return accepted, dups, late


Updates = list[tuple[float, int, Event, list[OrderItem] | None]]


def bf_updates(view: FeatureView, accepted: list[tuple[float, int, Event]]) -> dict[str, Updates]:
    """Per entity key, the accepted updates of ``view``, each with the order items in its context."""
    out: dict[str, Updates] = {}
    for ts, ordinal, ev in accepted:
        for k, items in bf_keys(view, ev):
            out.setdefault(k, []).append((ts, ordinal, ev, items))
    return out


def bf_values(view: FeatureView, updates: Updates, t: float, res: int, sliding: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fl in view.fields:
        window = parse_duration(fl.window or "")
        w = window / res
        obs: list[tuple[float, int, Any]] = []
        for ts, ordinal, ev, items in updates:
            inside = (t - window < ts <= t) if sliding else (
                math.floor(t / w) - res < math.floor(ts / w) <= math.floor(t / w))
            if inside and (v := bf_value(fl.of, ev, items)) is not None:
                obs.append((ts, ordinal, v))
        nums = [v for _, _, v in obs]
        if fl.agg == "count":
            out[fl.name] = sum(len(v) if isinstance(v, list) else 1 for v in nums)
        elif fl.agg == "sum":
            out[fl.name] = math.fsum(nums)
        elif fl.agg == "mean":
            out[fl.name] = math.fsum(nums) / len(nums) if nums else fl.default
        elif fl.agg == "min":
            out[fl.name] = min(nums) if nums else fl.default
        elif fl.agg == "max":
            out[fl.name] = max(nums) if nums else fl.default
        else:
            stamped = []
            for ts, ordinal, v in obs:
                vs = v if isinstance(v, list) else [v]
                stamped += [((ts, ordinal, i), x) for i, x in enumerate(vs)]
            if fl.agg == "last":
                out[fl.name] = max(stamped)[1] if stamped else fl.default
            else:
                best: dict[Any, tuple[float, int, int]] = {}
                for stamp, x in stamped:
                    best[x] = max(best.get(x, stamp), stamp)
                out[fl.name] = sorted(best, key=best.__getitem__, reverse=True)[: fl.n]
    return out


def assert_same(got: dict[str, Any], want: dict[str, Any], view: FeatureView, where: str) -> None:
    assert list(got) == [fl.name for fl in view.fields]
    for fl in view.fields:
        g, w = got[fl.name], want[fl.name]
        assert check_value(fl, g) == g, (where, fl.name)
        if fl.dtype == "int" and w is not None:
            w = round(w)
        if isinstance(w, float) and fl.agg in ("sum", "mean"):
            assert isinstance(g, float) and math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-6), (where, fl.name, g, w)
        elif fl.dtype == "list[float]":
            assert [float(x) for x in w] == g, (where, fl.name, g, w)
        else:
            assert g == w, (where, fl.name, g, w)
            assert type(g) is type(w) or w is None, (where, fl.name, g, w)


# --------------------------------------------------------------------------------------------- streams
CUSTOMERS = ["c1", "c2", "c3"]
OFFERS = ["o1", "o2"]


@st.composite
def items_st(draw: st.DrawFn) -> list[OrderItem]:
    n = draw(st.integers(0, 4))
    out = []
    for _ in range(n):
        sku = draw(st.sampled_from(["A", "B", "C"]))
        out.append(OrderItem(
            sku=sku,
            product_id=draw(st.sampled_from([None, f"p-{sku}", "p-X"])),
            category=draw(st.sampled_from([None, "x", "y", "z", "w"])),
            qty=draw(st.integers(0, 5)),
            price=draw(st.one_of(st.integers(0, 50).map(float), st.floats(0, 100, allow_nan=False))),
        ))
    return out


@st.composite
def streams(draw: st.DrawFn, align: float | None = None) -> list[Event]:
    n = draw(st.integers(1, 40))
    clock = T0
    out: list[Event] = []
    for i in range(n):
        if out and draw(st.integers(0, 9)) == 0:
            out.append(out[draw(st.integers(0, len(out) - 1))])  # a retried delivery
            continue
        if align is None:
            clock += draw(st.one_of(st.integers(0, 40).map(lambda x: x * 10.0), st.floats(0, 400)))
            late = draw(st.one_of(st.just(0.0), st.floats(0, 900), st.integers(0, 90).map(lambda x: x * 10.0)))
            ts = clock - late
        else:
            clock += align * draw(st.integers(0, 8))
            ts = clock - align * draw(st.sampled_from([0, 0, 0, 1, 3, 9, 12]))
        kind = draw(st.sampled_from(["order", "impression", "accept"]))
        who = draw(st.sampled_from([*CUSTOMERS, None]))
        value = draw(st.one_of(st.none(), st.integers(-5, 5).map(float), st.floats(-100, 100)))
        if kind == "order":
            items = draw(items_st())
            total = math.fsum(it.price * it.qty for it in items)
            via_order = draw(st.booleans())
            order = Order(id=f"ord-{i}", total=total, items=items, customer_id=who if via_order else None)
            out.append(Event(event_id=f"e{i}", type="order", timestamp=ts, value=value, order=order,
                             customer=None if via_order or who is None else Customer(id=who)))
        else:
            out.append(Event(event_id=f"e{i}", type=kind,  # type: ignore[arg-type]
                             timestamp=ts, value=value, decision_id=f"d{i}",
                             offer_id=draw(st.sampled_from([*OFFERS, None])),
                             customer=Customer(id=who) if who else None))
    return out


def all_keys(views: list[FeatureView], stream: list[Event]) -> dict[str, set[str]]:
    return {v.name: {k for ev in stream for k, _ in bf_keys(v, ev)} for v in views}


def check_times(agg: StreamAggregator, stream: list[Event], extra: Iterable[float]) -> list[float]:
    floor_t = max(agg.watermark(v.name) for v in VIEWS)
    times = {agg.stream_time, floor_t, floor_t + 1e-3, agg.stream_time + 600, agg.stream_time + 3600, *extra}
    times |= {ev.timestamp for ev in stream if ev.timestamp is not None}
    return sorted(t for t in times if t >= floor_t)


# --------------------------------------------------------------------------------------------- properties
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams(), res=st.sampled_from([1, 3, 60]), extra=st.lists(st.floats(0, 5000), max_size=3))
def test_aggregates_match_brute_force(stream: list[Event], res: int, extra: list[float]) -> None:
    agg = StreamAggregator(VIEWS, resolution=res, max_future_skew=None)
    for ev in stream:
        agg.update(ev)
    accepted, dups, late = bf_accept(VIEWS, stream)
    # A copy arriving after its original fell behind every watermark is dropped as late, not as a copy.
    assert agg.duplicates <= dups
    assert agg.duplicates + agg.late_dropped == dups + late
    event("duplicates" if dups else "no duplicates")
    event("late events" if late else "no late events")
    keys = all_keys(VIEWS, stream)
    times = check_times(agg, stream, [agg.stream_time + x for x in extra])
    for v in VIEWS:
        updates = bf_updates(v, accepted[v.name])
        for key in sorted(keys[v.name]):
            for t in times:
                want = bf_values(v, updates.get(key, []), t, res)
                assert_same(agg.values_as_of(v.name, key, t), want, v, f"{v.name}/{key}@{t - T0}")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams(align=60.0), offsets=st.lists(st.floats(0, 7200), min_size=1, max_size=6))
def test_aligned_timestamps_give_the_exact_sliding_window(stream: list[Event], offsets: list[float]) -> None:
    # Timestamps on multiples of every bucket width (10 s for 10m, 60 s for 1h): no edge error at any t.
    agg = StreamAggregator(VIEWS, max_future_skew=None)
    for ev in stream:
        agg.update(ev)
    accepted, _, _ = bf_accept(VIEWS, stream)
    keys = all_keys(VIEWS, stream)
    floor_t = max(agg.watermark(v.name) for v in VIEWS)
    for v in VIEWS:
        updates = bf_updates(v, accepted[v.name])
        for key in sorted(keys[v.name]):
            for off in offsets:
                t = floor_t + off
                want = bf_values(v, updates.get(key, []), t, 60, sliding=True)
                assert_same(agg.values_as_of(v.name, key, t), want, v, f"{v.name}/{key}@{t - T0}")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams(), cuts=st.lists(st.integers(1, 10), max_size=6), idle=st.floats(0, 8000))
def test_store_rows_equal_values_as_of_stream_time(stream: list[Event], cuts: list[int], idle: float) -> None:
    """Whatever the batching, after the last batch every stored row holds its values as of stream time,
    including rows whose windows emptied without new events (expiry) and rows forgotten since."""
    store = make_store()
    proc = StreamProcessor(VIEWS, store, clock=lambda: T0 + 10**6, max_future_skew=None)

    async def main() -> None:
        i = 0
        for c in [*cuts, len(stream)]:
            if i < len(stream):
                await proc.process(stream[i : i + c])
                i += c
        # Time passes with nothing new: windows empty and rows are forgotten.
        proc.aggregator.expire(proc.aggregator.stream_time + idle)
        await proc.process([])

    asyncio.run(main())
    agg = proc.aggregator
    keys = all_keys(VIEWS, stream)
    accepted, _, _ = bf_accept(VIEWS, stream)
    for v in VIEWS:
        updates = bf_updates(v, accepted[v.name])
        for key in keys[v.name]:
            row = asyncio.run(stored_row(store, v, key))
            if key not in updates:  # nothing of it was ever accepted
                assert row is None
                continue
            assert row is not None
            assert row.values == agg.values_as_of(v.name, key, agg.stream_time), (v.name, key)
            assert row.ts == max(ts for ts, *_ in updates[key])
            assert_same(row.values, bf_values(v, updates[key], agg.stream_time, 60), v, f"{v.name}/{key}")


@pytest.mark.parametrize("res", [2, 60])
def test_long_stream_prunes_and_still_matches_brute_force(res: int) -> None:
    """Hours of busy keys: buckets are pruned, rows forgotten and re-created; values stay exact."""
    rng = random.Random(res)
    stream: list[Event] = []
    t = T0
    for i in range(3000):
        t += rng.expovariate(1 / 6.0)
        ts = t - (rng.uniform(0, 900) if rng.random() < 0.2 else 0.0)  # some beyond the 10-minute lateness
        if rng.random() < 0.02 and stream:
            stream.append(rng.choice(stream[-50:]))
            continue
        who = rng.choice(CUSTOMERS)
        if rng.random() < 0.4:
            items = [OrderItem(sku=rng.choice("ABCD"), category=rng.choice("xyzuvw"), qty=rng.randint(1, 3),
                               price=float(rng.randint(1, 40))) for _ in range(rng.randint(1, 3))]
            stream.append(Event(event_id=f"e{i}", type="order", timestamp=ts, value=float(rng.randint(-3, 3)),
                                order=Order(id=f"o{i}", total=float(rng.randint(1, 99)), items=items,
                                            customer_id=who)))
        else:
            stream.append(Event(event_id=f"e{i}", type=rng.choice(["impression", "accept"]), timestamp=ts,
                                offer_id=rng.choice(OFFERS), value=float(rng.randint(0, 9)),
                                customer=Customer(id=who)))
    agg = StreamAggregator(VIEWS, resolution=res, max_future_skew=None)
    accepted, dups, late = bf_accept(VIEWS, stream)
    checks = 0
    for i, ev in enumerate(stream):
        agg.update(ev)
        if i % 500 == 499:  # mid-stream, while buckets are being pruned
            for v in VIEWS:
                seen = [(ts, o, e) for ts, o, e in accepted[v.name] if o <= i]
                updates = bf_updates(v, seen)
                for key in sorted(updates):
                    for at in (agg.watermark(v.name), agg.stream_time, agg.stream_time + 1800):
                        want = bf_values(v, updates[key], at, res)
                        assert_same(agg.values_as_of(v.name, key, at), want, v, f"{v.name}/{key}@{i}")
                        checks += 1
    assert checks > 100 and late > 0 and dups > 0
    assert agg.duplicates + agg.late_dropped == dups + late


# --------------------------------------------------------------------------------------------- units
def order_event(eid: str, ts: float, customer: str = "c1", items: list[OrderItem] | None = None,
                total: float = 10.0) -> Event:
    items = items if items is not None else [OrderItem(sku="A", product_id="p-1", category="x", qty=1, price=10.0)]
    return Event(event_id=eid, type="order", timestamp=ts,
                 order=Order(id=f"o-{eid}", total=total, items=items, customer_id=customer))


def test_order_fans_out_to_products_and_sums_for_the_customer() -> None:
    items = [
        OrderItem(sku="A", product_id="p-1", category="x", qty=2, price=5.0),
        OrderItem(sku="B", category="y", qty=1, price=7.0),  # no product_id: keyed by sku
        OrderItem(sku="A2", product_id="p-1", category="z", qty=3, price=1.0),  # same product again
    ]
    ev = order_event("e1", T0, items=items, total=20.0)
    assert [k for k, _ in extract_keys("product", ev)] == ["p-1", "B"]
    assert [k for k, _ in extract_keys("customer", ev)] == ["c1"]
    assert extract_keys("customer", Event(event_id="x", type="click", customer=Customer(id="c9")))[0][0] == "c9"
    assert extract_keys("offer", Event(event_id="y", type="accept", offer_id="o7"))[0][0] == "o7"
    assert extract_keys("order", ev)[0][0] == "o-e1"
    assert extract_keys("offer", ev) == [] and extract_keys("product", Event(event_id="z", type="click")) == []

    agg = StreamAggregator(VIEWS, max_future_skew=None)
    assert agg.update(ev) == 1 + 2  # one customer row, two product rows
    p1 = agg.values("product_sales", "p-1")
    assert p1["orders_1h"] == 1 and p1["units_10m"] == 5 and p1["qty_max_1h"] == 5
    assert p1["price_mean_1h"] == 6.0 and p1["last_category_1h"] == "z" and p1["skus_10m"] == ["A2", "A"]
    assert agg.values("product_sales", "B")["units_10m"] == 1
    c1 = agg.values("customer_activity", "c1")
    assert c1["units_1h"] == 6 and c1["items_price_max_10m"] == 13.0 and c1["spend_1h"] == 20.0
    assert c1["categories_1h"] == ["z", "y", "x"] and c1["category_lines_10m"] == 3 and c1["orders_1h"] == 1
    assert c1["last_offer_1h"] is None and c1["last_type_10m"] == "order"


def test_late_duplicate_and_future_events() -> None:
    agg = StreamAggregator([CUSTOMER, OFFER], max_future_skew=60.0)
    agg.update(order_event("a", T0 + 1000))
    agg.update(order_event("a", T0 + 1000))  # duplicate
    agg.update(order_event("b", T0 + 1000 - 600))  # exactly at the watermark: kept
    agg.update(order_event("c", T0 + 1000 - 601))  # beyond the lateness: dropped
    acc = Event(event_id="d", type="accept", offer_id="o1", timestamp=T0 + 1000 - 200, customer=Customer(id="c1"))
    agg.update(acc)  # late for the offer view (2m), fine for the customer view (10m)
    assert (agg.duplicates, agg.late_dropped) == (1, 2)
    assert agg.late_dropped_by_view == {"customer_activity": 1, "offer_perf": 1}
    assert agg.values("customer_activity", "c1")["orders_1h"] == 2
    assert agg.values("offer_perf", "o1")["events_10m"] == 0
    # A client clock an hour ahead would move the watermark and drop everybody's events: clamp it.
    agg.update(order_event("f", T0 + 5000), received_at=T0 + 1100)
    assert agg.clamped == 1 and agg.stream_time == T0 + 1100
    with pytest.raises(ValueError, match="watermark"):
        agg.values_as_of("customer_activity", "c1", T0)


def test_dedupe_memory_is_bounded() -> None:
    agg = StreamAggregator([CUSTOMER], max_future_skew=None, dedupe_capacity=10)
    for i in range(100):
        agg.update(order_event(f"e{i}", T0 + i))
    assert len(agg._id_set) <= 10
    agg.update(order_event("e99", T0 + 99))
    assert agg.duplicates == 1
    # Ids behind every watermark are forgotten; a copy of one would be late anyway.
    agg.update(order_event("later", T0 + 10_000))
    assert len(agg._id_set) == 1
    agg.update(order_event("e98", T0 + 98))
    assert agg.late_dropped == 1 and agg.values("customer_activity", "c1")["orders_1h"] == 1


def test_rejects_views_it_cannot_compute() -> None:
    def view(entity: str = "customer", *fields: Field) -> FeatureView:
        return FeatureView(name="v", kind="stream", entity=entity, source=Source(events=["order"]),
                           fields=list(fields) or [f("n", "int", "count", "1h")])

    with pytest.raises(DefinitionError, match="session"):
        StreamAggregator([view("session")])
    with pytest.raises(DefinitionError, match="numeric"):
        StreamAggregator([view("customer", f("s", "float", "sum", "1h", of="type"))])
    with pytest.raises(DefinitionError, match="unknown event path"):
        StreamAggregator([view("customer", f("s", "float", "sum", "1h", of="order.nope"))])
    with pytest.raises(DefinitionError, match="list"):
        StreamAggregator([view("customer", f("s", "str", "last_n_distinct", "1h", of="type"))])
    # Views of other kinds are simply not the engine's business.
    batch = FeatureView(name="b", kind="batch", entity="customer", source=Source(path="x.parquet"),
                        fields=[Field(name="x", dtype="int")])
    assert StreamAggregator([batch, CUSTOMER]).views == [CUSTOMER]


def test_read_after_write_through_apply(tmp_path: Path) -> None:
    """The server appends, then applies: a decision 50 ms after an order sees it in the store."""
    log = SqliteEventLog(tmp_path / "events.db")
    store = make_store()
    now = [T0]
    proc = StreamProcessor(VIEWS, store, log, clock=lambda: now[0])

    async def main() -> None:
        ev = order_event("o1", T0, customer="c7")
        result = await log.append([ev], received_at=now[0])
        for stored_ev in result.new:
            assert await proc.apply(stored_ev) == 2  # customer and product rows
        now[0] += 0.05
        row = await stored(store, CUSTOMER, "c7")
        assert row is not None and row["orders_1h"] == 1 and row["spend_1h"] == 10.0
        assert proc.freshness["customer_activity"] == pytest.approx(0.05)
        # The log tail sees the same event again and applies it once.
        assert await proc.catch_up() == 1
        assert (proc.processed, proc.duplicates, proc.seq) == (1, 1, 1)
        assert (await stored(store, CUSTOMER, "c7") or {})["orders_1h"] == 1

    try:
        asyncio.run(main())
    finally:
        log.close()


def test_written_rows_expire_without_new_events() -> None:
    store = make_store()
    now = [T0]
    proc = StreamProcessor([CUSTOMER], store, clock=lambda: now[0])

    async def main() -> None:
        await proc.process([order_event("o1", T0)])
        assert (await stored(store, CUSTOMER, "c1") or {})["events_10m"] == 1
        proc.aggregator.expire(T0 + 601)  # the event leaves the 10-minute window
        await proc.process([])
        row = await stored(store, CUSTOMER, "c1") or {}
        assert row["events_10m"] == 0 and row["orders_1h"] == 1 and row["last_type_10m"] is None
        proc.aggregator.expire(T0 + 3601 + 600)  # out of every window and behind the watermark
        assert await proc.process([]) == 1
        assert (await stored(store, CUSTOMER, "c1") or {})["orders_1h"] == 0
        assert proc.aggregator.rows == 0  # forgotten

    asyncio.run(main())


def test_checkpoint_resume_after_restart(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.db")
    ckpt = tmp_path / "stream" / "checkpoint"
    now = [T0 + 10_000]

    def clock() -> float:
        return now[0]

    events = []
    for i in range(50):
        ts = T0 + i * 37.0 - (150.0 if i % 7 == 3 else 0.0)  # some out of order
        if i % 3:
            events.append(order_event(f"e{i}", ts, customer=CUSTOMERS[i % 3]))
        else:
            events.append(Event(event_id=f"e{i}", type="accept", offer_id=OFFERS[i % 2], decision_id="d",
                                value=float(i), timestamp=ts, customer=Customer(id=CUSTOMERS[i % 3])))

    async def main() -> None:
        await log.append(events, received_at=T0)
        first = StreamProcessor(VIEWS, make_store(), log, clock, checkpoint_path=ckpt, batch_size=10,
                                advance_when_idle=False)
        assert not first.restored
        assert await first.catch_up(max_batches=2) == 20
        assert first.lag_events == 30 and first.lag_seconds > 0
        await first.save_checkpoint()
        await first.catch_up(max_batches=1)  # progress after the checkpoint is lost with the process

        store = make_store()
        second = StreamProcessor(VIEWS, store, log, clock, checkpoint_path=ckpt, batch_size=10,
                                 advance_when_idle=False)
        assert second.restored and second.seq == 20 and second.processed == 20
        assert await second.catch_up() == 30
        assert second.processed == 50 and second.lag_events == 0 and second.lag_seconds == 0.0

        fresh = StreamProcessor(VIEWS, make_store(), log, clock, batch_size=10, advance_when_idle=False)
        assert await fresh.catch_up() == 50
        assert second.aggregator.stream_time == fresh.aggregator.stream_time
        for v in VIEWS:
            for key in all_keys(VIEWS, events)[v.name]:
                assert second.aggregator.values(v.name, key) == fresh.aggregator.values(v.name, key)
        # Rows the restarted worker touched are in its store, as of the same stream time.
        rows = 0
        for v in VIEWS:
            for key in all_keys(VIEWS, events)[v.name]:
                vv = await stored_row(store, v, key)
                if vv is not None:
                    assert vv.values == fresh.aggregator.values(v.name, key), (v.name, key)
                    rows += 1
        assert rows > 0

        # A checkpoint for other definitions is not reused: rebuild from the start of the log.
        other = StreamProcessor([CUSTOMER], make_store(), log, clock, checkpoint_path=ckpt)
        assert not other.restored and other.seq == 0

    try:
        asyncio.run(main())
    finally:
        log.close()


@pytest.mark.parametrize("own_process", [False, True])
def test_run_tails_the_log_and_stops_cleanly(tmp_path: Path, own_process: bool) -> None:
    log = SqliteEventLog(tmp_path / "events.db")
    ckpt = tmp_path / "ckpt"
    store = make_store()

    async def main() -> None:
        proc = StreamProcessor(VIEWS, store, log, checkpoint_path=ckpt)
        task = asyncio.create_task(proc.run(poll_interval=0.01, own_process=own_process))
        import time

        await log.append([order_event("live", time.time(), customer="c5")], received_at=time.time())
        for _ in range(200):
            if (await stored(store, CUSTOMER, "c5")) is not None:
                break
            await asyncio.sleep(0.01)
        assert (await stored(store, CUSTOMER, "c5") or {}).get("orders_1h") == 1
        assert proc.lag_seconds == 0.0 and proc.freshness["customer_activity"] is not None
        proc.stop()
        await asyncio.wait_for(task, 5)
        assert ckpt.exists()
        assert StreamProcessor(VIEWS, make_store(), log, checkpoint_path=ckpt).seq == 1

    try:
        asyncio.run(main())
    finally:
        log.close()


def test_a_checkpoint_saved_by_a_forked_child_restores_the_state_of_the_instant_it_was_taken(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.db")
    ckpt = tmp_path / "ckpt"
    events = [order_event(f"e{i}", T0 + i * 13.0, customer=CUSTOMERS[i % 3]) for i in range(40)]

    async def main() -> None:
        await log.append(events, received_at=T0)
        proc = StreamProcessor(VIEWS, make_store(), log, clock=lambda: T0 + 1_000, checkpoint_path=ckpt,
                               batch_size=10, checkpoint_interval=0.0, advance_when_idle=False)
        proc.fork_checkpoints = True
        assert await proc.catch_up(max_batches=1) == 10
        assert proc._child is not None  # forked, not saved on the loop
        assert await proc.catch_up(max_batches=2) == 20  # the parent goes on while the child writes
        proc._reap_child(block=True)  # the save due after batch 2 or 3 was skipped while the first child wrote
        restored = StreamProcessor(VIEWS, make_store(), log, clock=lambda: T0 + 1_000, checkpoint_path=ckpt,
                                   batch_size=10, advance_when_idle=False)
        assert restored.restored and restored.seq in (10, 20, 30)
        at = restored.seq
        same = StreamProcessor(VIEWS, make_store(), log, clock=lambda: T0 + 1_000, batch_size=10,
                               advance_when_idle=False)
        await same.catch_up(max_batches=at // 10)
        assert restored.processed == same.processed == at
        assert restored.aggregator.stream_time == same.aggregator.stream_time
        for v in VIEWS:
            for key in all_keys(VIEWS, events[:at])[v.name]:
                assert restored.aggregator.values(v.name, key) == same.aggregator.values(v.name, key)

    try:
        asyncio.run(main())
    finally:
        log.close()


class _FailsOnce:
    """A memory store whose ``nth`` bulk write raises once (an online-store hiccup mid-batch)."""

    def __init__(self, inner: InMemoryOnlineStore, nth: int) -> None:
        self.inner, self.nth, self.calls = inner, nth, 0

    async def write(self, view: FeatureView, key: str, values: dict[str, Any], ts: float) -> None:
        await self.inner.write(view, key, values, ts)

    async def write_many(self, view: FeatureView, items: Iterable[Any]) -> int:
        self.calls += 1
        if self.calls == self.nth:
            raise ConnectionError("store hiccup")
        return await self.inner.write_many(view, items)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_batch_that_fails_while_the_next_is_read_ahead_is_read_again_and_counted_once(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.db")
    events = [order_event(f"e{i}", T0 + i * 11.0, customer=CUSTOMERS[i % 3]) for i in range(95)]

    async def main() -> None:
        await log.append(events, received_at=T0)
        inner = make_store()
        proc = StreamProcessor(VIEWS, _FailsOnce(inner, nth=3), log, clock=lambda: T0 + 2_000,  # type: ignore[arg-type]
                               batch_size=10, advance_when_idle=False)
        with pytest.raises(ConnectionError):
            await proc.catch_up()  # fails in a later full batch, with the batch after it being read ahead
        failed_at = proc.seq
        assert 0 < failed_at < 95
        assert await proc.catch_up() == 95 - failed_at  # from the failed batch on, nothing skipped
        assert proc.processed == 95 and proc.lag_events == 0 and proc.pending_rows == 0
        fresh = StreamProcessor(VIEWS, make_store(), log, clock=lambda: T0 + 2_000, batch_size=95,
                                advance_when_idle=False)
        await fresh.catch_up()
        for v in VIEWS:
            for key in all_keys(VIEWS, events)[v.name]:
                assert await stored(inner, v, key) == fresh.aggregator.values(v.name, key), (v.name, key)

    try:
        asyncio.run(main())
    finally:
        log.close()


def test_the_tail_steps_over_the_ingests_own_events_and_still_reads_every_other_writers(tmp_path: Path) -> None:
    """A serving process hands `process` the positions of the events it appended; its log tail then skips
    them instead of reading each again as a duplicate, but reads what another writer appended between
    them, and ends in the state of a processor that read the whole log."""
    log = SqliteEventLog(tmp_path / "events.db")
    events = [order_event(f"e{i}", T0 + i * 7.0, customer=CUSTOMERS[i % 3], total=float(i)) for i in range(9)]
    read_back: list[int] = []

    def counting_read(after_seq: int = 0, limit: int = 1000) -> list[tuple[int, Event]]:
        rows = SqliteEventLog.read(log, after_seq, limit)
        read_back.extend(seq for seq, _ in rows)
        return rows

    async def main() -> None:
        store = make_store()
        proc = StreamProcessor(VIEWS, store, log, clock=lambda: T0 + 100)
        log.read = counting_read  # type: ignore[method-assign]
        mine = await log.append(events[0:3], received_at=T0)
        assert mine.seqs == [1, 2, 3]
        await proc.process(mine.new, seqs=mine.seqs)
        await proc.catch_up()
        assert proc.seq == 3 and read_back == []  # nothing read again
        other = await log.append(events[3:5], received_at=T0)  # another process's events: only in the log
        mine = await log.append(events[5:9], received_at=T0)
        await proc.process(mine.new, seqs=mine.seqs)
        await proc.catch_up()
        assert proc.seq == 9 and read_back[:2] == other.seqs == [4, 5]
        assert proc.aggregator.processed == 9

        reference = StreamProcessor(VIEWS, make_store(), log, clock=lambda: T0 + 100)
        await reference.catch_up()
        for key in CUSTOMERS:
            assert await stored(store, CUSTOMER, key) == await stored(reference.store, CUSTOMER, key)  # type: ignore[arg-type]
            assert proc.aggregator.values(CUSTOMER, key) == reference.aggregator.values(CUSTOMER, key)

    try:
        asyncio.run(main())
    finally:
        log.close()
