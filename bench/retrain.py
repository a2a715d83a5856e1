"""Batch retraining and off-policy evaluation at 1,000,000 logged decisions.

Builds a data directory the way a busy deployment would have it: the demo store's catalog, N logged
decisions of its ``order_confirmation`` placement (the demo simulator's buyers; contexts featurized by the
same ``request_features`` the engine uses; an epsilon-greedy logging policy with 3 slots and its exact
slot probabilities) written to the Parquet decision log, and their impression/accept events in the
SQLite event log. Then it times:

- ``train``: `train_placement` — join rewards, write examples, VW learns, register the candidate
  (target <= 300 s at 1M decisions);
- ``evaluate``: join rewards, re-score every held-out row with the candidate, IPS/SNIPS/DR with intervals
  for the candidate, uniform-random and the logged policy (target <= 60 s at 1M rows);
- baselines on the same data: reading the decision log with DuckDB (the floor of any pass over it) and
  the estimators alone on precomputed probabilities.

    python bench/retrain.py --decisions 1000000 --json
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import pyarrow.parquet as pq

from benchdocs import write_section
from kassa import schemas
from kassa.catalog import Catalog, SqlCatalogStore
from kassa.db import make_engine
from kassa.decide.policy import GreedyEpsilonPolicy, fill_slots
from kassa.demo.simulator import World, decision_request
from kassa.demo.store import POLICY, DemoStore
from kassa.events.decision_log import DecisionRecord, loggable_features, records_to_table
from kassa.events.log import SqliteEventLog
from kassa.features.request import request_features
from kassa.learn.offline import ope
from kassa.learn.offline.dataset import load_logged
from kassa.learn.offline.evaluate import evaluate_models
from kassa.learn.offline.train import train_placement
from kassa.learn.registry import ModelRegistry, feature_schema_hash

START = "<!-- bench:retrain:start -->"
END = "<!-- bench:retrain:end -->"


def build(data: Path, n: int, seed: int) -> tuple[Catalog, schemas.Placement, float]:
    store = DemoStore.build(seed)
    static_order = list(store.offer_ids)
    cat_file = store.catalog(static_order)
    engine = make_engine(data / "kassa.db")
    catalog = Catalog(SqlCatalogStore(engine))
    for offer in cat_file.offers:
        catalog.put_offer(offer)
    for p in cat_file.placements:
        catalog.put_placement(p)
    placement = catalog.snapshot.placements[POLICY].placement
    offers = [o for o in catalog.snapshot.placements[POLICY].static_offers]
    values = [catalog.snapshot.offers[o].value for o in offers]
    world = World(store, seed)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    ts0 = time.time() - n * 0.01 - 7200
    log = SqliteEventLog(data / "events.db")
    log.close()
    conn = sqlite3.connect(data / "events.db")
    encode = msgspec.json.Encoder().encode
    records: list[DecisionRecord] = []
    events: list[tuple] = []
    part = 0

    def flush() -> None:
        nonlocal records, events, part
        if records:
            date = dt.datetime.fromtimestamp(records[0].ts, dt.UTC).strftime("%Y-%m-%d")
            folder = data / "decisions" / f"date={date}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(records_to_table(records), folder / f"part-{part:06d}.parquet")
            part += 1
            records = []
        if events:
            conn.executemany("INSERT INTO events (event_id, type, decision_id, received_at, body) "
                             "VALUES (?, ?, ?, ?, ?)", events)
            conn.commit()
            events = []

    policy = GreedyEpsilonPolicy(values, 0.2)
    for written, c in enumerate(world.checkouts(n)):
        ts = ts0 + written * 0.01
        req = decision_request(c, POLICY)
        features = request_features(req, ts, "UTC", None)
        ranking = fill_slots(policy, len(offers), 3, rng)
        shown = [offers[i] for i in ranking.chosen]
        did = f"{written:024x}"
        records.append(DecisionRecord(
            decision_id=did, ts=ts, placement=POLICY, model_version="logging-eps", request_id=None,
            customer_id=req.customer.id if req.customer else None, features=loggable_features(features),
            candidates=offers, probabilities=policy.slot_pmf(list(range(len(offers)))), chosen=shown,
            chosen_probabilities=ranking.probabilities, explored=ranking.explored, fallback=False, took_ms=0.1))
        for offer_id, yes in zip(shown, world.accepts(c, shown), strict=True):
            if yes:
                ev = schemas.Event(event_id=f"acc-{did}-{offer_id}", type="accept", decision_id=did,
                                   offer_id=offer_id, timestamp=ts + 0.5)
                events.append((ev.event_id, ev.type, did, ts + 0.5, encode(ev)))
        if len(records) >= 100_000:
            flush()
    flush()
    conn.close()
    return catalog, placement, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decisions", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None, help="scoring processes for evaluate")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kassa-retrain-") as tmp:
        data = Path(tmp)
        catalog, placement, gen_s = build(data, args.decisions, args.seed)
        print(f"generated {args.decisions:,} decisions in {gen_s:.1f} s", file=sys.stderr)
        registry = ModelRegistry(make_engine(data / "kassa.db"), data / "models")
        schema = feature_schema_hash(placement, None)
        snap = catalog.snapshot

        t0 = time.perf_counter()
        import duckdb

        glob = f"{data}/decisions/*/*.parquet"
        rows = duckdb.sql(f"SELECT count(*), avg(took_ms) FROM read_parquet('{glob}')").fetchall()[0]
        floor_s = time.perf_counter() - t0

        result = train_placement(data, registry, snap, placement, schema)
        assert result.version is not None
        print(f"train: {result.to_dict()}", file=sys.stderr)

        def product_key(offer_id: str) -> str | None:
            offer = snap.offers.get(offer_id)
            return (offer.product_id or offer.sku) if offer is not None else None

        t0 = time.perf_counter()
        logged = load_logged(data, placement, product_key)
        join_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        evaluation, _ = evaluate_models(logged, snap, (result.version.version, registry.path(result.version)), None,
                                        workers=args.workers)
        score_s = time.perf_counter() - t1
        evaluate_s = time.perf_counter() - t0
        reward, prob, n_c = logged.top_slot()
        est_times = []
        for _ in range(5):
            t2 = time.perf_counter()
            ope.evaluate_policies(reward, prob, {"x": prob}, num_candidates=n_c)
            est_times.append(time.perf_counter() - t2)
        cand = evaluation.estimate(result.version.version, "snips")
    figures = {
        "decisions": args.decisions, "rows_read": int(rows[0]) if rows else 0,
        "generate_seconds": round(gen_s, 1), "duckdb_scan_seconds": round(floor_s, 2),
        "train_seconds": round(result.seconds, 1), "train_examples": result.examples,
        "train_decisions": result.decisions, "evaluate_seconds": round(evaluate_s, 1),
        "evaluate_join_seconds": round(join_s, 1), "evaluate_score_and_estimate_seconds": round(score_s, 1),
        "estimators_only_seconds": round(statistics.median(est_times), 3), "evaluated_rows": len(logged),
        "candidate_snips": round(cand.value, 4), "candidate_snips_ci": [round(cand.ci_low, 4), round(cand.ci_high, 4)],
        "logged_mean": round(evaluation.estimate(ope.LOGGED, ope.ON_POLICY).value, 4),
        "train_target_seconds": 300, "evaluate_target_seconds": 60,
    }
    if args.write_docs:
        write_docs(figures)
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:>38}: {v}")


def write_docs(f: dict) -> None:
    version = importlib.metadata.version
    versions = f"vowpalwabbit {version('vowpalwabbit')}, duckdb {version('duckdb')}"
    machine = f"{platform.machine()}, {os.cpu_count()} vCPU, Python {platform.python_version()}, {versions}"
    text = f"""{START}
## Batch retraining and off-policy evaluation (`bench/retrain.py`)

{f['decisions']:,} logged decisions of the demo store's `order_confirmation` placement (simulated buyers,
epsilon-greedy logging policy, 3 slots, accept events in the SQLite event log). One run; {machine}.
Measured {dt.date.today().isoformat()}.

| step | seconds | target | note |
|---|---:|---:|---|
| DuckDB scan of the decision log (floor) | {f['duckdb_scan_seconds']} | | count + avg over every row |
| `kassa train` (join rewards, write examples, VW learns, register) | {f['train_seconds']} | ≤ 300 | \
{f['train_examples']:,} examples from {f['train_decisions']:,} decisions |
| `kassa evaluate`: join rewards | {f['evaluate_join_seconds']} | | |
| `kassa evaluate`: re-score + IPS/SNIPS/DR | {f['evaluate_score_and_estimate_seconds']} | | \
{f['evaluated_rows']:,} rows, one candidate |
| `kassa evaluate` total | {f['evaluate_seconds']} | ≤ 60 | |
| estimators alone (median of 5) | {f['estimators_only_seconds']} | | |

Candidate SNIPS estimate {f['candidate_snips']} (95% CI {f['candidate_snips_ci']}) vs the logged policy's
{f['logged_mean']}.
{END}"""
    write_section(text, START, END)


if __name__ == "__main__":
    main()
