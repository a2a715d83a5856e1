"""Streaming features: aggregation throughput per worker, and event-to-online-store freshness.

Owns the streaming benchmark. Three stream views like a store would define them — customer activity
(8 fields over 10m/1h/24h/7d/30d windows), offer performance (6 fields: 1h impressions, accepts, accept
rate, value) and product sales (6 fields over 24h) — fed with a realistic checkout mix: every checkout
places an order of 1–4 items and shows three offers (impressions); about 10 % of checkouts accept one.

1. Throughput (events/s, one worker, median of ``--repeats``): the same pre-decoded events through
   (a) a no-op loop that only touches each event's keys (the dispatch floor), (b) msgspec decoding of
   the stored JSON bodies (what tailing the log pays per event anyway), (c) `StreamAggregator` alone,
   and (d) `StreamProcessor.process` in batches of ``--batch`` writing changed rows to the in-memory
   online store. Event times span ``--span-hours`` of simulated time, so windows fill, expire and rows
   are rewritten as they decay, as in production. Target (issue "real-time feature store"): >= 5,000/s.
2. Freshness: events are appended to a real `SqliteEventLog` in a temp dir at ``--rate`` per second
   (open loop, one append per checkout's events, as the API does), while `StreamProcessor.run` tails the
   log and writes to the memory store. An event is visible once a written customer row counts it (the
   row's monotone ``events_10m``); freshness = visible time − append-ack time. Baseline: a bare tail
   loop with the same poll interval that only reads the log. Target: P99 <= 1 s.

    python bench/streaming.py --json
    python bench/streaming.py --write-docs
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from benchdocs import DOCS, write_section
from kassa.events.log import SqliteEventLog
from kassa.features.definitions import FeatureView, Field, Source
from kassa.features.online.memory import InMemoryOnlineStore
from kassa.features.streaming.aggregator import StreamAggregator
from kassa.features.streaming.processor import StreamProcessor
from kassa.schemas import Customer, Event, Order, OrderItem

START, END = "<!-- bench:streaming:start -->", "<!-- bench:streaming:end -->"
THROUGHPUT_TARGET = 5_000.0
FRESHNESS_TARGET_MS = 1_000.0


def fld(name: str, dtype: str, agg: str, window: str, of: str | None = None, **kw: Any) -> Field:
    return Field(name=name, dtype=dtype, agg=agg, window=window, of=of, **kw)  # type: ignore[arg-type]


VIEWS = [
    FeatureView(
        name="customer_activity", kind="stream", entity="customer",
        source=Source(events=["order", "impression", "accept"]),
        fields=[
            fld("events_10m", "int", "count", "10m"),
            fld("orders_1h", "int", "count", "1h", of="order.id"),
            fld("orders_24h", "int", "count", "24h", of="order.id"),
            fld("spend_7d", "float", "sum", "7d", of="order.total"),
            fld("spend_30d", "float", "sum", "30d", of="order.total"),
            fld("aov_30d", "float", "mean", "30d", of="order.total"),
            fld("accepts_7d", "int", "sum", "7d", of="type=accept"),
            fld("last_categories_30d", "list[str]", "last_n_distinct", "30d", of="order.items.category", n=5),
        ],
    ),
    FeatureView(
        name="offer_performance", kind="stream", entity="offer",
        source=Source(events=["impression", "accept"]),
        fields=[
            fld("impressions_1h", "int", "sum", "1h", of="type=impression"),
            fld("accepts_1h", "int", "sum", "1h", of="type=accept"),
            fld("accept_rate_1h", "float", "mean", "1h", of="type=accept"),
            fld("value_1h", "float", "sum", "1h", of="value"),
            fld("events_10m", "int", "count", "10m"),
            fld("max_value_1h", "float", "max", "1h", of="value"),
        ],
    ),
    FeatureView(
        name="product_sales", kind="stream", entity="product",
        source=Source(events=["order"]),
        fields=[
            fld("orders_24h", "int", "count", "24h"),
            fld("units_24h", "int", "sum", "24h", of="order.items.qty"),
            fld("revenue_24h", "float", "sum", "24h", of="order.items.price"),
            fld("price_mean_24h", "float", "mean", "24h", of="order.items.price"),
            fld("qty_max_24h", "int", "max", "24h", of="order.items.qty"),
            fld("last_category_24h", "str", "last", "24h", of="order.items.category"),
        ],
    ),
]


# ----------------------------------------------------------------------------------------- the event mix
class Mix:
    def __init__(self, seed: int, customers: int, products: int, offers: int) -> None:
        self.rng = random.Random(seed)
        self.customers = [f"c-{i}" for i in range(customers)]
        self.products = [(f"SKU-{i}", f"p-{i}", f"cat-{i % 40}", round(5 + (i % 90) * 1.1, 2)) for i in range(products)]
        # Popularity is skewed, as in a real store: a few products and offers carry most of the traffic.
        self.product_w = [1.0 / (i + 1) ** 0.8 for i in range(products)]
        self.offers = [f"offer-{i}" for i in range(offers)]
        self.offer_w = [1.0 / (i + 1) ** 0.6 for i in range(offers)]
        self.n = 0

    def checkout(self, ts: float) -> list[Event]:
        rng, self.n = self.rng, self.n + 1
        n = self.n
        cid = rng.choice(self.customers)
        picks = rng.choices(self.products, self.product_w, k=rng.choice((1, 1, 1, 2, 2, 3, 4)))
        items = [OrderItem(sku=s, product_id=p, category=c, qty=rng.choice((1, 1, 1, 2, 3)), price=pr)
                 for s, p, c, pr in picks]
        total = round(sum(it.price * it.qty for it in items), 2)
        cust = Customer(id=cid)
        out = [Event(event_id=f"o{n}", type="order", timestamp=ts, customer=cust,
                     order=Order(id=f"ord-{n}", total=total, items=items, customer_id=cid))]
        shown: set[str] = set()
        while len(shown) < 3:
            shown.add(rng.choices(self.offers, self.offer_w)[0])
        for j, oid in enumerate(sorted(shown)):
            out.append(Event(event_id=f"i{n}-{j}", type="impression", decision_id=f"d{n}", offer_id=oid,
                             timestamp=ts + 0.5, customer=cust))
        if rng.random() < 0.10:
            oid = rng.choice(sorted(shown))
            out.append(Event(event_id=f"a{n}", type="accept", decision_id=f"d{n}", offer_id=oid,
                             value=round(rng.uniform(2, 30), 2), timestamp=ts + rng.uniform(1, 60), customer=cust))
        return out


def make_stream(args: argparse.Namespace) -> list[Event]:
    """``--events`` events over ``--span-hours`` of event time, with a little arrival disorder."""
    mix = Mix(args.seed, args.customers, args.products, args.offers)
    rng = random.Random(args.seed + 1)
    per_checkout = 4.1
    step = args.span_hours * 3600 / (args.events / per_checkout)
    t0 = 1_750_000_000.0
    events: list[Event] = []
    t = t0
    while len(events) < args.events:
        events += mix.checkout(t)
        t += rng.expovariate(1 / step)
    events = events[: args.events]
    # Delivery disorder within seconds (beacons and webhooks race); the lateness allowance is 10 minutes.
    keyed = sorted(enumerate(events), key=lambda ie: ie[0] + rng.uniform(0, 20))
    return [e for _, e in keyed]


# ----------------------------------------------------------------------------------------- the store
def memory_store() -> InMemoryOnlineStore:
    return InMemoryOnlineStore(VIEWS)


class Recorder:
    """Wraps a store; notes when each customer's events become visible (counted by a written row)."""

    def __init__(self, inner: Any, acks: dict[str, list[float]]) -> None:
        self.inner = inner
        self.acks = acks  # customer -> ack time of its n-th event
        self.visible: dict[str, int] = {}
        self.latencies: list[float] = []
        self.early = 0

    async def write(self, view: FeatureView, key: str, values: dict[str, Any], ts: float) -> None:
        await self.inner.write(view, key, values, ts)
        if view.name != "customer_activity":
            return
        now = time.perf_counter()
        seen, count = self.visible.get(key, 0), values["events_10m"]
        acks = self.acks.get(key, [])
        for i in range(seen, min(count, len(acks))):
            lat = now - acks[i]
            if lat < 0 or acks[i] == 0.0:
                self.early += 1  # read and written before the appender was told: counts as 0
                lat = 0.0
            self.latencies.append(lat)
        self.visible[key] = max(seen, min(count, len(acks)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# ----------------------------------------------------------------------------------------- throughput
def rate(n: int, fn: Callable[[], Any], repeats: int) -> tuple[float, float, list[float]]:
    """Median events per wall second and per CPU second of this process (robust on a shared machine)."""
    runs, cpu_runs = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        runs.append(n / (time.perf_counter() - t))
        cpu_runs.append(n / max(1e-9, time.process_time() - c))
    return statistics.median(runs), statistics.median(cpu_runs), runs


def noop(events: list[Event]) -> int:
    touched: dict[str, int] = {}
    for ev in events:
        key = ev.customer.id if ev.customer is not None else None
        if key is not None:
            touched[key] = touched.get(key, 0) + 1
        if ev.order is not None:
            for it in ev.order.items:
                touched[it.product_id or it.sku] = 1
        if ev.offer_id is not None:
            touched[ev.offer_id] = 1
    return len(touched)


def aggregate_only(events: list[Event], batch: int) -> StreamAggregator:
    agg = StreamAggregator(VIEWS)
    now = events[-1].timestamp or 0.0
    for i in range(0, len(events), batch):
        for ev in events[i : i + batch]:
            agg.update(ev, now)
        agg.expire()
        for name, key in agg.drain_changed():
            agg.emit(name, key)
    return agg


def processor_run(events: list[Event], batch: int) -> StreamProcessor:
    end = (events[-1].timestamp or 0.0) + 1
    proc = StreamProcessor(VIEWS, memory_store(), clock=lambda: end)

    async def main() -> None:
        for i in range(0, len(events), batch):
            await proc.process(events[i : i + batch])

    asyncio.run(main())
    return proc


def throughput(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    events = make_stream(args)
    n = len(events)
    log(f"throughput: {n} events over {args.span_hours:g} h of event time")
    bodies = [msgspec.json.encode(e) for e in events]
    decoder = msgspec.json.Decoder(Event)
    noop_rate, noop_cpu, _ = rate(n, lambda: noop(events), args.repeats)
    decode_rate, decode_cpu, _ = rate(n, lambda: [decoder.decode(b) for b in bodies], args.repeats)
    agg_rate, agg_cpu, agg_runs = rate(n, lambda: aggregate_only(events, args.batch), args.repeats)
    holder: list[StreamProcessor] = []
    proc_rate, proc_cpu, proc_runs = rate(n, lambda: holder.append(processor_run(events, args.batch)), args.repeats)
    proc = holder[-1]
    out = {
        "events": n,
        "noop_events_per_s": round(noop_rate),
        "decode_events_per_s": round(decode_rate),
        "aggregate_events_per_s": round(agg_rate),
        "process_events_per_s": round(proc_rate),
        "noop_events_per_cpu_s": round(noop_cpu),
        "decode_events_per_cpu_s": round(decode_cpu),
        "aggregate_events_per_cpu_s": round(agg_cpu),
        "process_events_per_cpu_s": round(proc_cpu),
        "aggregate_runs": [round(r) for r in agg_runs],
        "process_runs": [round(r) for r in proc_runs],
        "rows_written": proc.writes,
        "writes_per_event": round(proc.writes / n, 3),
        "rows_in_state": proc.aggregator.rows,
        "late_dropped": proc.late_dropped,
    }
    log(f"  no-op {noop_rate:,.0f}/s, decode {decode_rate:,.0f}/s, aggregate {agg_rate:,.0f}/s, "
        f"process+write {proc_rate:,.0f}/s")
    return out


# ----------------------------------------------------------------------------------------- freshness
async def produce(log: SqliteEventLog, mix: Mix, rate_per_s: float, duration: float,
                  acks: dict[str, list[float]]) -> int:
    """Open loop: checkouts at their intended times; each append is one request's events."""
    per_checkout = 4.1
    interval = per_checkout / rate_per_s
    start = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    n = 0

    async def one(events: list[Event], slots: list[tuple[str, int]]) -> None:
        await log.append(events, time.time())
        t = time.perf_counter()
        for cid, idx in slots:
            acks[cid][idx] = t

    i = 0
    while True:
        due = start + i * interval
        if due - start >= duration:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        events = mix.checkout(time.time())
        slots = []
        for ev in events:
            assert ev.customer is not None and ev.customer.id is not None
            lst = acks.setdefault(ev.customer.id, [])
            slots.append((ev.customer.id, len(lst)))
            lst.append(0.0)  # filled at ack
        tasks.append(asyncio.create_task(one(events, slots)))
        n += len(events)
        i += 1
    await asyncio.gather(*tasks)
    return n


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs) * 1000, q)) if xs else None


async def freshness_phase(args: argparse.Namespace, tail_only: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kassa-bench-stream-") as tmp:
        log = SqliteEventLog(Path(tmp) / "events.db")
        mix = Mix(args.seed + 7, args.customers, args.products, args.offers)
        acks: dict[str, list[float]] = {}
        rec = Recorder(memory_store(), acks)
        proc = StreamProcessor(VIEWS, rec, log, checkpoint_path=Path(tmp) / "stream.ckpt", batch_size=args.batch)
        lat: list[float] = []
        stop = asyncio.Event()

        async def bare_tail() -> None:
            seq, counts = 0, dict[str, int]()
            while True:
                rows = await asyncio.to_thread(log.read, seq, args.batch)
                now = time.perf_counter()
                for s, ev in rows:
                    seq = s
                    assert ev.customer is not None and ev.customer.id is not None
                    c = counts[ev.customer.id] = counts.get(ev.customer.id, 0) + 1
                    ack = acks[ev.customer.id][c - 1]
                    lat.append(max(0.0, now - ack) if ack else 0.0)
                if stop.is_set() and not rows:
                    return
                if len(rows) < args.batch:
                    await asyncio.sleep(args.poll)

        cpu0 = time.process_time()
        task = asyncio.create_task(bare_tail() if tail_only else proc.run(poll_interval=args.poll))
        try:
            n = await produce(log, mix, args.rate, args.duration, acks)
            await asyncio.sleep(max(0.5, 3 * args.poll))  # let the tail drain
        finally:
            stop.set()
            proc.stop()
            await asyncio.wait_for(task, 30)
            log.close()
        cpu = time.process_time() - cpu0
        xs = lat if tail_only else rec.latencies
        return {
            "events": n,
            "measured": len(xs),
            "p50_ms": pct(xs, 50),
            "p99_ms": pct(xs, 99),
            "max_ms": pct(xs, 100),
            "visible_before_ack": 0 if tail_only else rec.early,
            "cpu_s": round(cpu, 2),
            "processed": 0 if tail_only else proc.processed,
        }


def freshness(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    try:
        import uvloop

        run: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    log(f"freshness: appending at {args.rate:g} events/s for {args.duration:g} s, poll {args.poll * 1000:g} ms")
    stream = run(freshness_phase(args, tail_only=False))
    log(f"  processor: p50 {stream['p50_ms']:.1f} ms, p99 {stream['p99_ms']:.1f} ms ({stream['measured']} events)")
    tail = run(freshness_phase(args, tail_only=True))
    log(f"  bare tail: p50 {tail['p50_ms']:.1f} ms, p99 {tail['p99_ms']:.1f} ms")
    return {"processor": stream, "bare_tail": tail}


# ----------------------------------------------------------------------------------------- report
def docs_section(res: dict[str, Any]) -> str:
    t, fr = res["throughput"], res["freshness"]
    p, b = fr["processor"], fr["bare_tail"]

    def ms(x: float | None) -> str:
        return "–" if x is None else f"{x:.1f}"

    a = res["args"]
    tp_target, fr_target = f"{THROUGHPUT_TARGET:,.0f}", f"{FRESHNESS_TARGET_MS:,.0f}"
    cmd = (f"python bench/streaming.py --events {a['events']} --span-hours {a['span_hours']:g} --rate {a['rate']:g} "
           f"--duration {a['duration']:g} --poll {a['poll']:g} --repeats {a['repeats']}")
    return f"""{START}
## Streaming features (`bench/streaming.py`)

{res["date"]}, {res["machine"]["cpus"]} CPUs, Python {res["machine"]["python"]}. `{cmd}`

Three stream views (customer: 8 fields over 10m/1h/24h/7d/30d; offer: 6 fields over 10m/1h; product: 6 fields
over 24h), a checkout mix (an order of 1–4 items, three impressions, an accept for ~10 %), {t["events"]:,}
events over {a["span_hours"]:g} h of event time, {res["args"]["customers"]:,} customers, {res["args"]["products"]:,}
products, {res["args"]["offers"]} offers; one worker, median of {a["repeats"]} runs.

| per worker | events/s | events per CPU-second |
|---|---:|---:|
| no-op loop over the events (dispatch floor) | {t["noop_events_per_s"]:,} | {t["noop_events_per_cpu_s"]:,} |
| msgspec decode of the stored bodies | {t["decode_events_per_s"]:,} | {t["decode_events_per_cpu_s"]:,} |
| `StreamAggregator` (update + compute changed rows) | {t["aggregate_events_per_s"]:,} | \
{t["aggregate_events_per_cpu_s"]:,} |
| `StreamProcessor.process` + memory-store writes | **{t["process_events_per_s"]:,}** (target ≥ {tp_target}) | \
{t["process_events_per_cpu_s"]:,} |

{t["rows_written"]:,} row writes ({t["writes_per_event"]} per event, expiry rewrites included), {t["rows_in_state"]:,}
rows in state at the end.

Freshness, append-ack → row visible in the memory store, appending to a SQLite event log at {a["rate"]:g} events/s
for {a["duration"]:g} s while `StreamProcessor.run` tails it (poll {a["poll"] * 1000:g} ms):

| | p50 ms | p99 ms | max ms |
|---|---:|---:|---:|
| stream processor | {ms(p["p50_ms"])} | **{ms(p["p99_ms"])}** (target ≤ {fr_target}) | {ms(p["max_ms"])} |
| bare log tail, same poll (baseline) | {ms(b["p50_ms"])} | {ms(b["p99_ms"])} | {ms(b["max_ms"])} |

In the embedded server, `StreamProcessor.apply` writes the rows before the event request returns, so
read-after-write does not wait for the poll.
{END}"""


def write_docs(res: dict[str, Any], path: Path = DOCS) -> None:
    write_section(docs_section(res), START, END, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000, help="events in the throughput stream")
    p.add_argument("--span-hours", type=float, default=48.0, help="event time the throughput stream covers")
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--products", type=int, default=2_000)
    p.add_argument("--offers", type=int, default=50)
    p.add_argument("--batch", type=int, default=1_000, help="events per processed batch / log read")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rate", type=float, default=2_000.0, help="append rate of the freshness phase, events/s")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of appending in the freshness phase")
    p.add_argument("--poll", type=float, default=0.05, help="log poll interval when caught up, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-freshness", action="store_true")
    p.add_argument("--json", action="store_true", help="end the output with one JSON object")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite the section in {DOCS.name}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    res: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "write_docs")},
        "throughput": throughput(args, log),
    }
    if not args.skip_freshness:
        res["freshness"] = freshness(args, log)
    t = res["throughput"]["process_events_per_s"]
    p99 = res.get("freshness", {}).get("processor", {}).get("p99_ms")
    res["targets"] = {
        "throughput_ok": t >= THROUGHPUT_TARGET,
        "freshness_p99_ok": None if p99 is None else p99 <= FRESHNESS_TARGET_MS,
    }
    log(f"process {t:,}/s (target >= {THROUGHPUT_TARGET:,.0f}); freshness p99 "
        f"{'-' if p99 is None else f'{p99:.1f}'} ms (target <= {FRESHNESS_TARGET_MS:,.0f})")
    if args.write_docs:
        if "freshness" not in res:
            raise SystemExit("--write-docs needs the freshness phase")
        write_docs(res)
        log(f"wrote {DOCS}")
    if args.json:
        print(json.dumps(res, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
