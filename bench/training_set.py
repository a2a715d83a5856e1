"""Point-in-time training sets: 1,000,000 entity rows joined with two batch views' full history.

Owns the training-set benchmark. Two batch views of a customer entity (``customer_daily``, refreshed
about daily, and ``customer_weekly``, about weekly; three fields each: int, float, string) have their
history in Parquet files (~100k rows in all, with a ``created_timestamp`` column) and 1,000,000 entity
rows (customer, timestamp over the same 90 days; a sixth of the customers have no feature rows) in
another. It times, each repeat in a fresh child process (so peak RSS is that run's own):

- ``kassa``: `OfflineStore.training_set` on those files, as ``kassa features training-set`` runs it
  (ASOF + TTL, created-timestamp tie-break, column checks, defaults; output is an Arrow table);
- ``kassa_filter``: the same with ``filter_by_created_timestamp`` (versions created after the entity
  time ignored);
- ``duckdb_floor``: the same join written directly as DuckDB ``ASOF LEFT JOIN``s with the TTL on the
  same files, into Arrow: no tie-break, checks or defaults. The floor of any DuckDB-based join.

The data has no two versions of a key at one event time, so the floor's answer must equal Kassa's
(checked on every row, defaults aside). ``--json`` ends the output with one JSON object; ``--write-docs``
rewrites this benchmark's section of ``docs/benchmarks.md``.

    python bench/training_set.py --rows 1000000 --history 100000 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdocs import DOCS, write_section

START, END = "<!-- bench:training_set:start -->", "<!-- bench:training_set:end -->"
DAY_US = 86_400 * 1_000_000
SPAN_DAYS = 90
T0_US = 1_735_689_600 * 1_000_000  # 2025-01-01T00:00:00Z
VIEWS = {"customer_daily": ("1d", "2d"), "customer_weekly": ("7d", "14d")}  # view: (refresh period, TTL)
SEGMENTS = ["new", "active", "lapsing", "vip", "churned"]


def generate(folder: Path, rows: int, history: int, customers: int, seed: int) -> dict[str, int]:
    """Write the two sources and the entity rows under ``folder``; returns row counts."""
    rng = np.random.default_rng(seed)
    with_rows = customers * 5 // 6
    counts = {}
    # Split the history between the views by refresh rate: a daily view has ~7x the rows of a weekly one.
    shares = {"customer_daily": 7 / 8, "customer_weekly": 1 / 8}
    for view, (period, _) in VIEWS.items():
        n = round(history * shares[view])
        period_us = (1 if period == "1d" else 7) * DAY_US
        slots = SPAN_DAYS * DAY_US // period_us
        # Unique (customer, slot) pairs: no two versions of a key share an event time.
        pairs = rng.choice(with_rows * slots, size=min(n, with_rows * slots), replace=False)
        cust, slot = pairs // slots, pairs % slots
        ts = T0_US + slot * period_us + rng.integers(0, period_us // 2, len(pairs))
        created = ts + rng.choice([0, 60_000_000, 3_600_000_000, 2 * DAY_US], len(pairs), p=[0.5, 0.3, 0.15, 0.05])
        seg = rng.integers(0, len(SEGMENTS), len(pairs))
        table = pa.table({
            "customer_id": pa.array([f"c-{c:07d}" for c in cust]),
            "event_timestamp": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "created_timestamp": pa.array(created, pa.timestamp("us", tz="UTC")),
            "orders": pa.array(rng.integers(0, 50, len(pairs))),
            "spend": pa.array(np.round(rng.random(len(pairs)) * 500, 2)),
            "segment": pa.array(np.array(SEGMENTS)[seg]),
        })
        pq.write_table(table, folder / f"{view}.parquet")
        counts[view] = table.num_rows
    ents = pa.table({
        "customer_id": pa.array([f"c-{c:07d}" for c in rng.integers(0, customers, rows)]),
        "event_timestamp": pa.array(T0_US + rng.integers(0, SPAN_DAYS * DAY_US, rows), pa.timestamp("us", tz="UTC")),
        "label": pa.array(rng.random(rows) < 0.1),
    })
    pq.write_table(ents, folder / "entities.parquet")
    counts["entity_rows"] = rows
    return counts


def views(folder: Path) -> list[Any]:
    from kassa.features.definitions import FeatureView, Field, Source

    return [FeatureView(name=name, kind="batch", entity="customer", ttl=ttl,
                        source=Source(path=str(folder / f"{name}.parquet")),
                        fields=[Field(name="orders", dtype="int", default=0),
                                Field(name="spend", dtype="float", default=0.0),
                                Field(name="segment", dtype="str", default="unknown")])
            for name, (_, ttl) in VIEWS.items()]


def run_kassa(folder: Path, filter_created: bool) -> pa.Table:
    from kassa.features.definitions import Entity
    from kassa.features.offline import OfflineStore

    store = OfflineStore(folder / "offline")
    return store.training_set(folder / "entities.parquet", [(v, ["orders", "spend", "segment"]) for v in views(folder)],
                              entities=[Entity(name="customer", join_key="customer_id")], full_names=True,
                              filter_by_created_timestamp=filter_created)


def run_floor(folder: Path) -> pa.Table:
    import duckdb

    def src(name: str) -> str:
        return f"read_parquet('{folder / name}.parquet')"

    selects, joins = [], []
    for i, (name, (_, ttl)) in enumerate(VIEWS.items()):
        ttl_us = (2 if ttl == "2d" else 14) * DAY_US
        joins.append(f"ASOF LEFT JOIN {src(name)} AS f{i} ON e.customer_id = f{i}.customer_id "
                     f"AND f{i}.event_timestamp <= e.event_timestamp")
        fresh = f"f{i}.event_timestamp >= e.event_timestamp - INTERVAL {ttl_us} MICROSECONDS"
        selects += [f"CASE WHEN {fresh} THEN f{i}.{c} END AS {name}__{c}" for c in ("orders", "spend", "segment")]
    sql = (f"SELECT e.*, {', '.join(selects)} FROM (SELECT *, row_number() OVER () AS __row "
           f"FROM read_parquet('{folder / 'entities.parquet'}')) AS e {' '.join(joins)} ORDER BY e.__row")
    with duckdb.connect() as con:
        return con.sql(sql).to_arrow_table().drop_columns(["__row"])


def child(folder: Path, what: str) -> dict[str, Any]:
    """One timed run in this (fresh) process."""
    import duckdb  # noqa: F401  imported before timing, as the CLI has it loaded

    import kassa.features.offline  # noqa: F401

    t = time.perf_counter()
    table = run_floor(folder) if what == "duckdb_floor" else run_kassa(folder, what == "kassa_filter")
    seconds = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if what != "kassa_filter":
        pq.write_table(table, folder / f"out-{what}.parquet")
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "rows": table.num_rows}


def spawn(folder: Path, what: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", what, "--folder", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def agree(folder: Path) -> int:
    """Rows where Kassa and the floor differ (the floor leaves missing values null: compare those as such)."""
    kassa = pq.read_table(folder / "out-kassa.parquet")
    floor = pq.read_table(folder / "out-duckdb_floor.parquet")
    differ = 0
    for name in VIEWS:
        hit = floor.column(f"{name}__orders").is_valid()
        for c in ("orders", "spend", "segment"):
            k = kassa.column(f"{name}__{c}").filter(hit)
            f = floor.column(f"{name}__{c}").filter(hit).cast(k.type)
            differ += len(k) - (pc.sum(pc.fill_null(pc.equal(k, f), False)).as_py() or 0)
    return differ


def machine() -> dict[str, Any]:
    model = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform()}


def versions() -> dict[str, str]:
    return {"python": platform.python_version(),
            **{d: importlib.metadata.version(d) for d in ("duckdb", "pyarrow", "numpy")}}


def docs_section(res: dict[str, Any]) -> str:
    m, v, r = res["machine"], res["versions"], res["results"]

    def row(label: str, key: str) -> str:
        x = r[key]
        spread = f"{min(x['all_seconds']):.2f}–{max(x['all_seconds']):.2f}"
        return (f"| {label} | **{x['seconds']:.2f} s** ({spread}) | {x['ratio_to_floor']:.2f}× | "
                f"{x['peak_rss_mb']:.0f} MB |")

    return f"""{START}
## Point-in-time training sets (`bench/training_set.py`)

`python bench/training_set.py --rows {res["rows"]} --history {res["history"]} --repeats {res["repeats"]}` on
{m["cpu"]} ({m["cores"]} cores, shared), Python {v["python"]}, DuckDB {v["duckdb"]}, pyarrow {v["pyarrow"]};
load average {res["load_avg_1m"]} at the end of the run; {res["date"]}.

{res["rows"]:,} entity rows (customer, time over {SPAN_DAYS} days; a sixth of the customers have no
feature rows) joined with two batch views read from their source files' full history: `customer_daily`
({res["counts"]["customer_daily"]:,} rows, TTL 2d) and `customer_weekly` ({res["counts"]["customer_weekly"]:,}
rows, TTL 14d), three fields each. Each run is a fresh process reading Parquet and ending with an Arrow
table; medians of {res["repeats"]} runs (range in brackets; the variants run interleaved), the ratio is the
median of each run's ratio to the floor's run of the same repeat, peak RSS is the process's maximum.

| | wall time | vs DuckDB floor | peak RSS |
|---|---:|---:|---:|
{row("`OfflineStore.training_set` (`kassa features training-set`)", "kassa")}
{row("the same with `--filter-by-created-timestamp`", "kassa_filter")}
{row("floor: DuckDB `ASOF LEFT JOIN` × 2 with the TTL, same files", "duckdb_floor")}

The floor is the bare join: no created-timestamp tie-break, no column checks, no defaults. On this data
(no two versions of a key at one event time) its values equal Kassa's on every matched row
({res["differing_values"]} differing values).
{END}"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="entity rows")
    p.add_argument("--history", type=int, default=100_000, help="feature rows over both views")
    p.add_argument("--customers", type=int, default=12_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite this benchmark's section of {DOCS.name}")
    p.add_argument("--child", choices=["kassa", "kassa_filter", "duckdb_floor"], help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.folder, args.child)))
        return 0
    with tempfile.TemporaryDirectory(prefix="kassa-bench-ts-") as tmp:
        folder = Path(tmp)
        counts = generate(folder, args.rows, args.history, args.customers, args.seed)
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ("duckdb_floor", "kassa", "kassa_filter")}
        for i in range(args.repeats):
            for what, done in runs.items():  # interleaved, so a busy moment hits every variant alike
                done.append(spawn(folder, what))
                if not args.json:
                    print(f"repeat {i + 1}/{args.repeats} {what}: {done[-1]['seconds']:.2f} s, "
                          f"{done[-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
        differing = agree(folder)
    results = {what: {"seconds": round(statistics.median(r["seconds"] for r in done), 3),
                      "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in done), 1),
                      "all_seconds": [round(r["seconds"], 3) for r in done]}
               for what, done in runs.items()}
    for what, r in results.items():
        # Paired: each repeat's run against the floor's run of the same repeat (the machine is shared).
        r["ratio_to_floor"] = round(statistics.median(
            x["seconds"] / f["seconds"] for x, f in zip(runs[what], runs["duckdb_floor"], strict=True)), 2)
    result = {
        "benchmark": "training_set", "rows": args.rows, "history": args.history, "repeats": args.repeats,
        "counts": counts, "results": results, "differing_values": differing,
        "load_avg_1m": round(os.getloadavg()[0], 2), "machine": machine(), "versions": versions(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if args.write_docs:
        write_section(docs_section(result), START, END)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
