"""Feature-read latency from Redis through `RedisOnlineStore`, against raw redis-py reads in the same run.

Owns the feature-read benchmark. The read a decision makes: one customer row (40 features in 3 views)
plus a session row, one `RedisOnlineStore.read` call, timed against a raw redis-py ``HGETALL`` of one
20-field hash; and a 50-row batch read (the 3 customer views of 50 customers) against a raw pipelined
``HGETALL`` x 50. Both sides use the same client (same pool and settings, async, hiredis parser) and run
interleaved, alternating which goes first, so machine noise lands on both equally. Each repeat times
``--reads`` single and ``--batch-reads`` batch pairs after a warm-up; medians of the repeats' P50/P99
and of their P99 ratios are reported (target: ratios <= 1.5). ``--json`` ends the output with one JSON
object; ``--write-docs`` rewrites this benchmark's section of ``docs/benchmarks.md``.

    REDIS_URL=redis://127.0.0.1:6379/0 python bench/feature_reads.py --repeats 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import importlib.metadata
import json
import os
import platform
import random
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchdocs import DOCS, write_section
from kassa.features.definitions import FeatureView, Field
from kassa.features.online.base import WriteItem
from kassa.features.online.redis import RedisOnlineStore

START, END = "<!-- bench:feature_reads:start -->", "<!-- bench:feature_reads:end -->"
TARGET_RATIO = 1.5
BATCH = 50

CATEGORIES = ["skincare", "beauty", "electronics", "home", "garden", "toys", "books", "sports", "pets", "food"]

PROFILE = FeatureView(
    name="customer_profile", kind="batch", entity="customer", ttl="30d",
    fields=[Field("orders_365d", "int"), Field("spend_365d", "float"), Field("aov", "float"),
            Field("first_order_ts", "float"), Field("last_order_ts", "float"), Field("days_since_order", "int"),
            Field("refund_rate", "float"), Field("discount_share", "float"), Field("is_subscriber", "bool"),
            Field("loyalty_tier", "str"), Field("country", "str"), Field("preferred_device", "str"),
            Field("email_opt_in", "bool"), Field("clv_estimate", "float"), Field("churn_risk", "float"),
            Field("segment", "str")],
)
ORDERS = FeatureView(
    name="customer_orders", kind="push", entity="customer", ttl="7d",
    fields=[Field("orders_30d", "int"), Field("orders_7d", "int"), Field("spend_30d", "float"),
            Field("spend_7d", "float"), Field("items_30d", "int"), Field("max_order_30d", "float"),
            Field("offers_seen_7d", "int"), Field("offers_accepted_7d", "int"), Field("accept_rate_30d", "float"),
            Field("click_rate_30d", "float"), Field("dismiss_rate_30d", "float"), Field("last_offer_id", "str"),
            Field("last_accept_ts", "float"), Field("sessions_7d", "int")],
)
AFFINITY = FeatureView(
    name="customer_affinity", kind="push", entity="customer", ttl="30d",
    fields=[Field("recent_categories", "list[str]"), Field("recent_products", "list[str]"),
            Field("category_spend", "list[float]"), Field("price_band", "list[float]"),
            Field("brand_counts", "list[int]"), Field("top_category", "str"), Field("affinity_score", "float"),
            Field("novelty_score", "float"), Field("bundle_propensity", "float"), Field("upsell_propensity", "float")],
)
SESSION = FeatureView(
    name="session_context", kind="push", entity="session", ttl="1d",
    fields=[Field("pages", "int"), Field("cart_value", "float"), Field("referrer", "str"), Field("device", "str"),
            Field("landing_category", "str"), Field("seconds_on_site", "float")],
)
CUSTOMER_VIEWS = [PROFILE, ORDERS, AFFINITY]
DECISION_VIEWS = [*CUSTOMER_VIEWS, SESSION]


def _value(f: Field, rng: random.Random) -> Any:
    if f.dtype == "int":
        return rng.randrange(0, 500)
    if f.dtype == "float":
        return round(rng.uniform(0, 1000), 4)
    if f.dtype == "bool":
        return rng.random() < 0.5
    if f.dtype == "str":
        return rng.choice(CATEGORIES) + f"-{rng.randrange(100)}"
    if f.dtype == "list[str]":
        return rng.sample(CATEGORIES, 5)
    if f.dtype == "list[float]":
        return [round(rng.uniform(0, 100), 2) for _ in range(5)]
    return [rng.randrange(100) for _ in range(5)]


def _row(view: FeatureView, rng: random.Random) -> dict[str, Any]:
    return {f.name: _value(f, rng) for f in view.fields}


def _pct(samples: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q)) / 1e6  # ns -> ms


async def populate(store: RedisOnlineStore, customers: int, rng: random.Random) -> None:
    now = time.time()
    for view in CUSTOMER_VIEWS:
        await store.write_many(view, (WriteItem(f"c-{i}", _row(view, rng), now) for i in range(customers)))
    await store.write_many(SESSION, (WriteItem(f"s-{i}", _row(SESSION, rng), now) for i in range(customers)))
    client = store.client
    for start in range(0, customers, 1_000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + 1_000, customers)):
            # The baseline: a plain 20-field hash of strings, the way features are often kept in Redis.
            pipe.hset(raw_key(store, i), mapping={f"f{j:02d}": str(round(rng.uniform(0, 1000), 4)) for j in range(20)})
        await pipe.execute()


def raw_key(store: RedisOnlineStore, i: int) -> str:
    return f"{store.prefix}:raw:{{{i}}}"


async def run_repeat(store: RedisOnlineStore, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    client = store.client
    n = args.customers

    async def single_store(i: int) -> None:
        rows = await store.read([("customer", f"c-{i}"), ("session", f"s-{i}")], DECISION_VIEWS)
        if rows[0] is None or len(rows[0]) != 3 or rows[1] is None:
            raise RuntimeError(f"incomplete row for c-{i}: {rows}")

    async def single_raw(i: int) -> None:
        if len(await client.hgetall(raw_key(store, i))) != 20:
            raise RuntimeError("incomplete raw hash")

    async def batch_store(ids: list[int]) -> None:
        rows = await store.read([("customer", f"c-{i}") for i in ids], CUSTOMER_VIEWS)
        if any(r is None for r in rows):
            raise RuntimeError("missing row in batch")

    async def batch_raw(ids: list[int]) -> None:
        pipe = client.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(raw_key(store, i))
        if len(await pipe.execute()) != len(ids):
            raise RuntimeError("short raw batch")

    async def pairs(count: int, warmup: int, measured: Any, baseline: Any, arg: Any) -> tuple[list[int], list[int]]:
        a: list[int] = []
        b: list[int] = []
        clock = time.perf_counter_ns
        for k in range(warmup + count):
            x = arg()
            order = ((measured, a), (baseline, b)) if k % 2 == 0 else ((baseline, b), (measured, a))
            for fn, out in order:
                t0 = clock()
                await fn(x)
                t1 = clock()
                if k >= warmup:
                    out.append(t1 - t0)
        return a, b

    gc.collect()
    s, r = await pairs(args.reads, args.warmup, single_store, single_raw, lambda: rng.randrange(n))
    bs, br = await pairs(args.batch_reads, args.warmup // 5, batch_store, batch_raw,
                         lambda: rng.sample(range(n), BATCH))
    out = {
        "single_p50_ms": _pct(s, 50), "single_p99_ms": _pct(s, 99),
        "raw_hgetall_p50_ms": _pct(r, 50), "raw_hgetall_p99_ms": _pct(r, 99),
        "batch50_p50_ms": _pct(bs, 50), "batch50_p99_ms": _pct(bs, 99),
        "raw_batch50_p50_ms": _pct(br, 50), "raw_batch50_p99_ms": _pct(br, 99),
    }
    out["single_p99_ratio"] = out["single_p99_ms"] / out["raw_hgetall_p99_ms"]
    out["single_p50_ratio"] = out["single_p50_ms"] / out["raw_hgetall_p50_ms"]
    out["batch50_p99_ratio"] = out["batch50_p99_ms"] / out["raw_batch50_p99_ms"]
    out["batch50_p50_ratio"] = out["batch50_p50_ms"] / out["raw_batch50_p50_ms"]
    return {k: round(v, 4) for k, v in out.items()}


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform()}


def versions(redis_server: str, loop: str) -> dict[str, str | None]:
    def v(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "kassa": v("kassa"), "redis-py": v("redis"),
            "hiredis": v("hiredis"), "msgspec": v("msgspec"), "redis_server": redis_server, "event_loop": loop}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    store = RedisOnlineStore(args.url, prefix=f"kassa-bench-{secrets.token_hex(4)}")
    try:
        info = await store.client.info("server")
        pool = store.client.connection_pool  # type: ignore[union-attr]
        conn = await pool.get_connection()
        parser = type(conn._parser).__name__
        await pool.release(conn)
        await populate(store, args.customers, rng)
        repeats = []
        for i in range(args.repeats):
            res = await run_repeat(store, args, rng)
            repeats.append(res)
            if not args.json:
                print(f"repeat {i + 1}/{args.repeats}: single p99 {res['single_p99_ms']:.3f} ms vs raw "
                      f"{res['raw_hgetall_p99_ms']:.3f} ms (x{res['single_p99_ratio']:.2f}); batch50 p99 "
                      f"{res['batch50_p99_ms']:.3f} ms vs raw {res['raw_batch50_p99_ms']:.3f} ms "
                      f"(x{res['batch50_p99_ratio']:.2f})", file=sys.stderr)
    finally:
        await store.clear()
        await store.close()

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in repeats), 4)

    keys = list(repeats[0])
    result: dict[str, Any] = {"benchmark": "feature_reads", **{k: med(k) for k in keys}}
    result.update({
        "target_ratio": TARGET_RATIO,
        "meets_target": result["single_p99_ratio"] <= TARGET_RATIO and result["batch50_p99_ratio"] <= TARGET_RATIO,
        "reads": args.reads, "batch_reads": args.batch_reads, "warmup": args.warmup, "repeats": args.repeats,
        "customers": args.customers, "features_per_decision_read": sum(len(v.fields) for v in DECISION_VIEWS),
        "redis_url_host": args.url.split("@")[-1], "parser": parser,
        # Other work on the machine widens both sides' tails; the ratio is what the pairing protects.
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "machine": machine_info(), "versions": versions(str(info.get("redis_version")), args.loop),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "per_repeat": repeats,
    })
    return result


def docs_section(res: dict[str, Any]) -> str:
    m, v = res["machine"], res["versions"]
    rows = "\n".join(
        f"| {i + 1} | {r['single_p99_ms']:.3f} | {r['raw_hgetall_p99_ms']:.3f} | {r['single_p99_ratio']:.2f} "
        f"| {r['batch50_p99_ms']:.3f} | {r['raw_batch50_p99_ms']:.3f} | {r['batch50_p99_ratio']:.2f} |"
        for i, r in enumerate(res["per_repeat"])
    )

    def line(label: str, p50: str, p99: str, ratio: str | None = None) -> str:
        shown = f"**{res[ratio]:.2f}**" if ratio else ""
        return f"| {label} | {res[p50]:.3f} | {res[p99]:.3f} | {shown} |"

    table = "\n".join([
        line("`read`: customer (3 views) + session", "single_p50_ms", "single_p99_ms", "single_p99_ratio"),
        line("raw `HGETALL`, 20 fields", "raw_hgetall_p50_ms", "raw_hgetall_p99_ms"),
        line("`read`: 50 customers (3 views each)", "batch50_p50_ms", "batch50_p99_ms", "batch50_p99_ratio"),
        line("raw pipelined `HGETALL` x 50", "raw_batch50_p50_ms", "raw_batch50_p99_ms"),
    ])
    return f"""{START}
## Feature reads (Redis)

`python bench/feature_reads.py --reads {res["reads"]} --batch-reads {res["batch_reads"]} --repeats {res["repeats"]}`
on {m["cpu"]} ({m["cores"]} cores), Python {v["python"]}, Redis {v["redis_server"]} on the same machine,
redis-py {v["redis-py"]} + hiredis {v["hiredis"]} ({res["parser"]}), {v["event_loop"]}; load average
{res["load_avg_1m"]} at the end of the run; {res["date"]}.

A decision's read is one `RedisOnlineStore.read` of a customer row (40 features in 3 views) plus a
session row: {res["features_per_decision_read"]} features, one round trip. It is timed against a raw
redis-py `HGETALL` of one 20-field hash, and a 50-customer batch read against a raw pipelined `HGETALL`
x 50; same client, interleaved pairs, medians of {res["repeats"]} repeats (target: P99 ratio <=
{res["target_ratio"]}).

| | P50 (ms) | P99 (ms) | P99 ratio |
|---|---:|---:|---:|
{table}

| repeat | single p99 | raw p99 | ratio | batch50 p99 | raw batch50 p99 | ratio |
|---:|---:|---:|---:|---:|---:|---:|
{rows}
{END}"""


def write_docs(section: str, start: str = START, end: str = END, path: Path = DOCS) -> None:
    write_section(section, start, end, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--reads", type=int, default=5_000, help="timed single reads per repeat (each paired with a raw)")
    p.add_argument("--batch-reads", type=int, default=1_000, help="timed 50-row batch reads per repeat")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--customers", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                   help="event loop (uvloop, as `kassa serve` runs)")
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite this benchmark's section of {DOCS.name}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            args.loop = "asyncio"
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    result = asyncio.run(main_async(args))
    if args.write_docs:
        write_docs(docs_section(result))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"single read P99 {result['single_p99_ms']:.3f} ms vs raw HGETALL {result['raw_hgetall_p99_ms']:.3f} ms: "
              f"x{result['single_p99_ratio']:.2f}; batch of 50 P99 {result['batch50_p99_ms']:.3f} ms vs raw "
              f"{result['raw_batch50_p99_ms']:.3f} ms: x{result['batch50_p99_ratio']:.2f} (target <= {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
