"""The dashboard's first view after a restart: its reads' time, CPU and how long the event loop waited meanwhile.

Writes ``--hours`` of history at ``--rate`` decisions per second into a data dir, as a `kassa serve` with compaction
leaves it (each closed hour merged into one Parquet file, the current hour one small file per 0.5 s flush, two
offers shown per decision, an impression event per shown offer and an accept for one decision in ten, in the SQLite
event log), unless ``--data`` already holds it. Then, ``--rounds`` times per ``--src`` checkout (each round a fresh
process: a restart), runs in that process what the pages run on a worker thread (`Outcomes.throughput`: the
overview; `Outcomes.recent`: the decision explorer; `Outcomes.placements`: a placement page), first and again,
while the event loop runs a 1 ms ticker: the longest it waited is what a decision served meanwhile waited.

    PYTHONPATH=src python bench/dashboard_first_view.py --rate 1.2 --hours 30 --src /old/src src
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

CATALOG = {"offers": [{"id": o, "kind": "discount", "title": o, "value": 1 + i, "content": {"headline": "x"}}
                      for i, o in enumerate(("o-a", "o-b", "o-c", "o-d"))],
           "placements": [{"id": "p", "slots": 2, "offers": ["o-a", "o-b", "o-c", "o-d"], "policy": "baseline",
                           "reward": {"weights": {"accept": 1.0}, "wait_seconds": 600}}]}


def fill(data: Path, rate: float, hours: float) -> str:
    import msgspec
    import pyarrow.parquet as pq

    from kassa import schemas
    from kassa.events.decision_log import DecisionRecord, _utc_date, decision_id_base, records_to_table
    from kassa.events.log import SqliteEventLog

    rng = random.Random(1)
    now = time.time()
    start = now - hours * 3600
    offers = [o["id"] for o in CATALOG["offers"]]
    records = []
    for i in range(int(rate * hours * 3600)):
        ts = start + i / rate
        records.append(DecisionRecord(
            decision_id=hex(decision_id_base(ts) | rng.getrandbits(64))[3:], ts=ts, placement="p",
            model_version="baseline", request_id=None, customer_id=f"c{rng.randrange(5000)}",
            features={"order_total": rng.random() * 200, "device": "mobile"}, candidates=offers,
            probabilities=[0.25] * 4, chosen=rng.sample(offers, 2), chosen_probabilities=[0.5, 0.5], explored=False,
            fallback=False, took_ms=2 + rng.random() * 3))
    closed = int(now - 600) // 3600 * 3600  # hours that ended 10 min ago are compacted (`compaction`'s grace)
    hours_: dict[int, list[DecisionRecord]] = {}
    flushes: dict[int, list[DecisionRecord]] = {}
    for r in records:
        if r.ts < closed:
            hours_.setdefault(int(r.ts) // 3600 * 3600, []).append(r)
        else:
            flushes.setdefault(int(r.ts * 2), []).append(r)
    for hour, rs in hours_.items():
        part = data / "decisions" / f"date={_utc_date(hour)}"
        part.mkdir(parents=True, exist_ok=True)
        pq.write_table(records_to_table(rs), part / f"part-{hour * 1000}-c{(hour + 3600) * 1000}.parquet")
    for seq, rs in enumerate(flushes.values(), 1):
        part = data / "decisions" / f"date={_utc_date(rs[0].ts)}"
        part.mkdir(parents=True, exist_ok=True)
        pq.write_table(records_to_table(rs), part / f"part-{int(rs[-1].ts * 1000) + 5}-{seq}.parquet")
    SqliteEventLog(data / "events.db").close()
    encode = msgspec.json.Encoder().encode
    rows = []
    for r in records:
        events = [(schemas.Event(event_id=uuid.uuid4().hex, type="impression", decision_id=r.decision_id,
                                 offer_id=o), r.ts + 1.0) for o in r.chosen]
        if rng.random() < 0.1:
            events.append((schemas.Event(event_id=uuid.uuid4().hex, type="accept", decision_id=r.decision_id,
                                         offer_id=r.chosen[0]), r.ts + 20.0))
        rows += [(e.event_id, e.type, r.decision_id, at, encode(e)) for e, at in events]
    rows.sort(key=lambda x: x[3])
    con = sqlite3.connect(data / "events.db")
    con.executemany("INSERT INTO events (event_id, type, decision_id, received_at, body) VALUES (?, ?, ?, ?, ?)",
                    rows)
    con.commit()
    con.close()
    return (f"{len(records):,} decisions in {len(hours_)} merged hour files and {len(flushes):,} small files, "
            f"{len(rows):,} events")


def child(root: Path) -> None:
    """One restart: each read first and again, on a worker thread, with the event loop ticking."""
    from kassa.api.dashboard.outcomes import Outcomes
    from kassa.app import Kassa
    from kassa.config import load_settings

    kassa = Kassa(load_settings(None, data_dir=str(root / "data"), catalog_file=str(root / "catalog.json"),
                                log_level="warning"), seed=1)
    outcomes = Outcomes(kassa)
    full = [0]
    gc.callbacks.append(lambda phase, info: full.__setitem__(0, full[0] + (phase == "start"
                                                                             and info["generation"] == 2)))
    reads = {"overview": lambda now: outcomes.throughput(now - 3600, now=now),
             "explorer": lambda now: outcomes.recent(25),
             "placement": lambda now: outcomes.placements(now - 24 * 3600, now=now)}
    order = sys.argv[sys.argv.index("--child") + 2].split(",")
    out: dict[str, dict[str, float]] = {}

    async def main() -> None:
        lags: list[float] = []
        done = False

        async def ticker() -> None:
            while not done:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - t - 0.001)

        task = asyncio.create_task(ticker())
        for name in order:
            lags.clear()
            full[0] = 0
            cpu, t = time.process_time(), time.perf_counter()
            await asyncio.to_thread(reads[name.split("#")[0]], time.time())
            out[name] = {"wall_ms": round((time.perf_counter() - t) * 1000, 1),
                         "cpu_ms": round((time.process_time() - cpu) * 1000, 1),
                         "loop_max_wait_ms": round(max(lags, default=0.0) * 1000, 1), "full_gcs": full[0]}
        done = True
        await task

    asyncio.run(main())
    print(json.dumps(out))


def main() -> None:
    if "--child" in sys.argv:
        child(Path(sys.argv[sys.argv.index("--child") + 1]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1.2, help="decisions per second (1.2: ~100,000 a day)")
    ap.add_argument("--hours", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", help="a directory to keep the history in (reused when it holds one)")
    ap.add_argument("--order", default="overview,overview#2,explorer,placement,placement#2",
                    help="the reads, in order (#n: again)")
    ap.add_argument("--src", nargs="+", default=[str(Path(__file__).resolve().parent.parent / "src")])
    args = ap.parse_args()
    root = Path(args.data or tempfile.mkdtemp(prefix="benchfirstview-"))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data" / "decisions").exists():
        (root / "catalog.json").write_text(json.dumps(CATALOG))
        print(fill(root / "data", args.rate, args.hours), flush=True)
    results: dict[str, list[dict[str, dict[str, float]]]] = {s: [] for s in args.src}
    for _ in range(args.rounds):
        for src in args.src:  # alternated, so the machine's load falls on each alike
            env = {**os.environ, "PYTHONPATH": src}
            run = subprocess.run([sys.executable, __file__, "--child", str(root), args.order], env=env,
                                 capture_output=True, text=True, check=True)
            results[src].append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(src, run.stdout.strip().splitlines()[-1], flush=True)
    summary = {src: {name: {k: statistics.median(r[name][k] for r in runs) for k in runs[0][name]}
                     for name in runs[0]} for src, runs in results.items()}
    print(json.dumps({"medians": summary, "rounds": args.rounds, "cores": os.cpu_count(),
                      "load_avg": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
