"""Bulk materialization into the online stores: 1,000,000 customer rows x 20 features.

Owns the materialization benchmark. Rows of one 20-feature customer view (ints, floats, strings, a bool,
lists) are written with `write_many` into Redis (`RedisOnlineStore`, target <= 60 s for 1M rows) and
into the embedded `InMemoryOnlineStore` (target <= 1 GiB RSS growth for 1M rows), plus the embedded
store's snapshot and restore times. Rows are generated in batches outside the timed calls (the time to
produce rows belongs to the source, Parquet or a stream, not to the store); the embedded store is filled
in a child process so its RSS growth is measured from a clean baseline. Redis keys are deleted at the end.
``--json`` ends the output with one JSON object; ``--write-docs`` rewrites this benchmark's section of
``docs/benchmarks.md``.

    REDIS_URL=redis://127.0.0.1:6379/0 python bench/materialize.py --rows 1000000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kassa.features.definitions import FeatureView, Field
from kassa.features.online.base import WriteItem
from kassa.features.online.memory import InMemoryOnlineStore
from kassa.features.online.redis import RedisOnlineStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feature_reads import CATEGORIES, DOCS, machine_info, versions, write_docs

START, END = "<!-- bench:materialize:start -->", "<!-- bench:materialize:end -->"
TARGET_REDIS_SECONDS = 60.0
TARGET_RSS_MB = 1024.0
BATCH = 10_000  # rows generated at a time, outside the timed writes

VIEW = FeatureView(
    name="customer_batch", kind="batch", entity="customer", ttl="30d",
    fields=[Field("orders_30d", "int"), Field("orders_365d", "int"), Field("spend_30d", "float"),
            Field("spend_365d", "float"), Field("aov", "float"), Field("days_since_order", "int"),
            Field("last_order_ts", "float"), Field("refund_rate", "float"), Field("discount_share", "float"),
            Field("accept_rate", "float"), Field("click_rate", "float"), Field("sessions_30d", "int"),
            Field("is_subscriber", "bool"), Field("loyalty_tier", "str"), Field("country", "str"),
            Field("device", "str"), Field("top_categories", "list[str]"), Field("recent_products", "list[str]"),
            Field("category_spend", "list[float]"), Field("clv_estimate", "float")],
)
TIERS = ["none", "bronze", "silver", "gold", "platinum"]
COUNTRIES = ["US", "CA", "GB", "DE", "FR", "AU", "NL", "SE"]
DEVICES = ["mobile", "desktop", "tablet"]


def batches(rows: int, seed: int, ts: float) -> Iterator[list[WriteItem]]:
    """Deterministic rows, ``BATCH`` at a time: plausible magnitudes, so encoded sizes are realistic."""
    rng = random.Random(seed)
    r, choice, sample = rng.random, rng.choice, rng.sample
    for start in range(0, rows, BATCH):
        out = []
        for i in range(start, min(start + BATCH, rows)):
            orders = int(r() * 40)
            out.append(WriteItem(f"c-{i:08d}", {
                "orders_30d": orders // 6, "orders_365d": orders, "spend_30d": round(r() * 300, 2),
                "spend_365d": round(r() * 3000, 2), "aov": round(20 + r() * 120, 2), "days_since_order": int(r() * 365),
                "last_order_ts": ts - r() * 3e7, "refund_rate": round(r() * 0.2, 4), "discount_share": round(r(), 4),
                "accept_rate": round(r() * 0.3, 4), "click_rate": round(r() * 0.5, 4), "sessions_30d": int(r() * 60),
                "is_subscriber": r() < 0.2, "loyalty_tier": choice(TIERS), "country": choice(COUNTRIES),
                "device": choice(DEVICES), "top_categories": sample(CATEGORIES, 3),
                "recent_products": [f"p-{int(r() * 50_000)}" for _ in range(4)],
                "category_spend": [round(r() * 500, 2) for _ in range(5)], "clv_estimate": round(r() * 5000, 2),
            }, ts))
        yield out


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


async def redis_phase(args: argparse.Namespace) -> dict[str, Any]:
    store = RedisOnlineStore(args.url, prefix=f"kassa-bench-{secrets.token_hex(4)}", chunk_size=args.chunk)
    ts = time.time()
    written = 0
    write_s = 0.0
    try:
        info = await store.client.info("memory")
        mem0 = int(info["used_memory"])
        server = str((await store.client.info("server")).get("redis_version"))
        t0 = time.perf_counter()
        for batch in batches(args.rows, args.seed, ts):
            t = time.perf_counter()
            written += await store.write_many(VIEW, batch)
            write_s += time.perf_counter() - t
            if not args.json and written % 100_000 == 0:
                print(f"redis: {written:,} rows, {write_s:.1f} s writing", file=sys.stderr)
        wall = time.perf_counter() - t0
        mem1 = int((await store.client.info("memory"))["used_memory"])
        (row,) = await store.read([("customer", f"c-{args.rows - 1:08d}")], [VIEW])
        if written != args.rows or row is None:
            raise RuntimeError(f"wrote {written} of {args.rows} rows; last row read back: {row}")
    finally:
        t = time.perf_counter()
        deleted = await store.clear()
        clear_s = time.perf_counter() - t
        await store.close()
    return {
        "redis_rows": written, "redis_seconds": round(write_s, 2), "redis_rows_per_s": round(written / write_s),
        "redis_wall_seconds": round(wall, 2), "redis_used_memory_mb": round((mem1 - mem0) / 2**20, 1),
        "redis_cleanup_seconds": round(clear_s, 2), "redis_keys_deleted": deleted, "redis_server": server,
        "chunk_size": args.chunk, "rows_per_script": store.rows_per_script,
    }


async def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in its own process: RSS growth of the embedded store from a clean baseline."""
    ts = time.time()
    gen = batches(args.rows, args.seed, ts)
    store = InMemoryOnlineStore()
    gc.collect()
    base = rss_mb()
    write_s = 0.0
    for batch in gen:
        t = time.perf_counter()
        await store.write_many(VIEW, batch)
        write_s += time.perf_counter() - t
    batch = []  # the last generated batch must not count as store memory
    gc.collect()
    grown = rss_mb() - base
    blobs = store._data["customer"][VIEW.name]
    payload = sum(map(len, blobs.values()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "online.msgpack"
        t = time.perf_counter()
        store.snapshot(path)
        snap_s = time.perf_counter() - t
        size = path.stat().st_size
        del store, blobs
        gc.collect()
        t = time.perf_counter()
        restored = InMemoryOnlineStore()
        rows = restored.restore(path)
        restore_s = time.perf_counter() - t
    (row,) = await restored.read([("customer", f"c-{args.rows - 1:08d}")], [VIEW])
    if rows != args.rows or row is None:
        raise RuntimeError(f"restored {rows} of {args.rows} rows")
    return {
        "memory_rows": args.rows, "memory_rss_mb": round(grown, 1),
        "memory_bytes_per_row": round(grown * 2**20 / args.rows), "memory_payload_mb": round(payload / 2**20, 1),
        "memory_write_seconds": round(write_s, 2), "memory_rows_per_s": round(args.rows / write_s),
        "snapshot_seconds": round(snap_s, 2), "snapshot_mb": round(size / 2**20, 1),
        "restore_seconds": round(restore_s, 2),
    }


def memory_phase(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--memory-child", "--rows", str(args.rows), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory phase failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def docs_section(res: dict[str, Any]) -> str:
    m, v = res["machine"], res["versions"]
    return f"""{START}
## Materialization (bulk `write_many`)

`python bench/materialize.py --rows {res["rows"]}` on {m["cpu"]} ({m["cores"]} cores), Python {v["python"]},
Redis {v["redis_server"]} on the same machine, redis-py {v["redis-py"]} + hiredis {v["hiredis"]}; load
average {res["load_avg_1m"]} at the end of the run; {res["date"]}.

{res["rows"]:,} customer rows of one 20-feature view (ints, floats, strings, a bool, string and float
lists; ~{res["memory_payload_mb"] * 2**20 / res["rows"]:.0f} bytes encoded per row). Rows are generated
outside the timed `write_many` calls.

| | measured | target |
|---|---:|---:|
| Redis: `write_many` time | **{res["redis_seconds"]:.1f} s** ({res["redis_rows_per_s"]:,} rows/s) | <= 60 s |
| Redis: memory used by the rows | {res["redis_used_memory_mb"]:.0f} MB | |
| embedded store: RSS growth | **{res["memory_rss_mb"]:.0f} MB** ({res["memory_bytes_per_row"]} B/row) | <= 1024 MB |
| embedded store: `write_many` time | {res["memory_write_seconds"]:.1f} s | |
| embedded store: snapshot / restore | {res["snapshot_seconds"]:.1f} s / {res["restore_seconds"]:.1f} s \
({res["snapshot_mb"]:.0f} MB file) | |

Redis writes go {res["chunk_size"]} rows per pipeline, {res["rows_per_script"]} rows per call of the
newer-wins write script, two pipelines in flight.
{END}"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=1_000, help="rows per Redis pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-redis", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite this benchmark's section of {DOCS.name}")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(asyncio.run(memory_child(args))))
        return 0
    result: dict[str, Any] = {"benchmark": "materialize", "rows": args.rows}
    if not args.skip_redis:
        result.update(asyncio.run(redis_phase(args)))
    if not args.skip_memory:
        if not args.json:
            print(f"embedded store: {args.rows:,} rows in a child process...", file=sys.stderr)
        result.update(memory_phase(args))
    result["meets_target"] = (result.get("redis_seconds", 0.0) <= TARGET_REDIS_SECONDS
                              and result.get("memory_rss_mb", 0.0) <= TARGET_RSS_MB)
    result.update({
        "target_redis_seconds": TARGET_REDIS_SECONDS, "target_rss_mb": TARGET_RSS_MB,
        "load_avg_1m": round(os.getloadavg()[0], 2), "machine": machine_info(),
        "versions": versions(result.get("redis_server", "?"), "asyncio"),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    })
    if args.write_docs:
        if args.skip_redis or args.skip_memory:
            print("--write-docs needs both phases; docs not written", file=sys.stderr)
        else:
            write_docs(docs_section(result), START, END)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
