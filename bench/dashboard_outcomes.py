"""CPU of one placement page's outcome read on ``events.backend: jetstream``: a full read of the events stream
per view (``Outcomes(incremental=False)``, as before) against the incremental window (`StreamEventWindow`).

Fills a stream of its own (prefix ``benchdash<random>``, deleted at the end) on the NATS at ``--nats`` with
``--events`` outcome events for ``--decisions`` decisions (written straight to the Parquet decision log), then
times ``Outcomes.placements`` (the placement page's read) alternately full and incremental, ``--rounds`` times
each, with ``--new`` fresh events appended before every view (traffic between two views). CPU is the process's
(every thread: the bus loop that receives the messages, the caller that decodes and tallies).

    PYTHONPATH=src python bench/dashboard_outcomes.py --events 100000 --decisions 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from kassa import schemas
from kassa.api.dashboard.outcomes import Outcomes
from kassa.app import Kassa
from kassa.config import load_settings
from kassa.events.decision_log import DecisionLogWriter, DecisionRecord

CATALOG = """
offers:
  - {id: a, kind: partner, title: A, value: 2}
  - {id: b, kind: partner, title: B, value: 3}
  - {id: c, kind: partner, title: C, value: 4}
  - {id: d, kind: discount, title: D, value: 1, content: {code: X}}
placements:
  - id: p
    slots: 2
    offers: [a, b, c, d]
    reward: {weights: {accept: 1.0, click: 0.1, conversion: value}, wait_seconds: 60, cap: 50}
    latency_budget_ms: 10000
"""


def _fill(kassa: Kassa, n_decisions: int, n_events: int, now: float) -> list[tuple[str, list[str]]]:
    rng = random.Random(7)
    writer = DecisionLogWriter(kassa.settings.data_path)
    shown: list[tuple[str, list[str]]] = []
    for i in range(n_decisions):
        chosen = rng.sample(["a", "b", "c", "d"], 2)
        did = f"bd-{i}"
        shown.append((did, chosen))
        writer.append(DecisionRecord(
            decision_id=did, ts=now - 3600 + 3000 * i / n_decisions, placement="p", model_version="v1",
            request_id=None, customer_id=f"c{i % 500}", features={"x": 1.0}, candidates=["a", "b", "c", "d"],
            probabilities=[0.25] * 4, chosen=chosen, chosen_probabilities=[0.25, 1 / 3], explored=False,
            fallback=False, took_ms=1.0))
    writer.close()
    _append(kassa, shown, n_events, rng)
    return shown


def _append(kassa: Kassa, shown: list[tuple[str, list[str]]], n: int, rng: random.Random) -> None:
    batch: list[schemas.Event] = []
    for _ in range(n):
        did, chosen = shown[rng.randrange(len(shown))]
        kind = rng.choice(("impression", "impression", "click", "accept", "conversion"))
        batch.append(schemas.Event(event_id=uuid.uuid4().hex, type=kind, decision_id=did,
                                   offer_id=rng.choice(chosen), value=9.5 if kind == "conversion" else None))
        if len(batch) == 1000:
            asyncio.run(kassa.event_log.append(batch, time.time()))
            batch = []
    if batch:
        asyncio.run(kassa.event_log.append(batch, time.time()))


PUB = "bench-publishable-key-0123456789"


def _latency(kassa: Kassa, shown: list[tuple[str, list[str]]], since: float, seconds: float,
             modes: list[tuple[str, Outcomes | None]], new: int, period: float) -> list[dict[str, Any]]:
    """Decisions served one after another on the app in process while another thread appends ``new`` events and
    shows the placement page's read every ``period`` s (back to back when a view takes longer), per mode; the
    decisions' latency as the client sees it (the same in-process client overhead in every mode)."""
    from starlette.testclient import TestClient

    from kassa.api.app import create_app

    figures: list[dict[str, Any]] = []

    body = {"placement": "p", "customer": {"id": "c-1"}, "context": {"device": "mobile"},
            "order": {"id": "1", "platform": "shopify", "currency": "USD", "total": 80.0, "ship_country": "US",
                      "items": [{"sku": "S", "category": "x", "qty": 1, "price": 80.0}]}}
    rng = random.Random(5)
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as client:
        for _ in range(200):  # warm up
            client.post("/v1/decisions", json=body)
        for name, outcomes in modes:
            stop = threading.Event()
            views: list[float] = []

            def viewer(outcomes: Outcomes | None = outcomes, views: list[float] = views,
                       stop: threading.Event = stop) -> None:
                while not stop.is_set():  # every `period` s (or back to back when a view takes longer)
                    started = time.perf_counter()
                    _append(kassa, shown, new, rng)
                    if outcomes is not None:
                        views.append(_view(outcomes, since)[0])
                    stop.wait(max(0.0, period - (time.perf_counter() - started)))

            th = threading.Thread(target=viewer)
            c0 = time.process_time()
            th.start()
            took: list[float] = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                r = client.post("/v1/decisions", json=body)
                took.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
            stop.set()
            th.join()
            took.sort()
            q = statistics.quantiles(took, n=100)
            print(f"decisions while {name:24s}: {len(took):5d} in {seconds:.0f} s, p50 {q[49] * 1000:6.2f} ms, "
                  f"p99 {q[98] * 1000:6.2f} ms, max {took[-1] * 1000:6.1f} ms; {len(views)} views; "
                  f"process cpu "
                  f"{time.process_time() - c0:.1f} s; load {os.getloadavg()[0]:.2f}")
            figures.append({"mode": name, "decisions": len(took), "p50_ms": round(q[49] * 1000, 2),
                            "p99_ms": round(q[98] * 1000, 2), "max_ms": round(took[-1] * 1000, 1),
                            "views": len(views)})


def _view(outcomes: Outcomes, since: float) -> tuple[float, float, Any]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = outcomes.placements(since)
    return time.process_time() - c0, time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nats", default="nats://127.0.0.1:4222")
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--new", type=int, default=500, help="events appended before each view")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--period", type=float, default=2.0, help="seconds between two views in --latency")
    ap.add_argument("--json", action="store_true", help="end with one JSON object of the figures")
    ap.add_argument("--latency", type=float, default=0.0,
                    help="seconds per mode of decisions served while the page is viewed in a loop (0: skip)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="benchdash-"))
    (tmp / "catalog.yaml").write_text(CATALOG)
    prefix = "benchdash" + uuid.uuid4().hex[:8]
    settings = load_settings(None, data_dir=str(tmp / "data"), catalog_file=str(tmp / "catalog.yaml"),
                             publishable_key=PUB, admin_key="bench-admin-key-0123456789abcdef",
                             secret_key="bench-secret-key-0123456789abcdef",
                             **{"events.backend": "jetstream", "events.nats_url": args.nats, "events.prefix": prefix,
                                "learn.guard.enabled": False})
    kassa = Kassa(settings, seed=7)
    try:
        now = time.time()
        t0 = time.perf_counter()
        shown = _fill(kassa, args.decisions, args.events, now)
        print(f"filled {args.events:,} events, {args.decisions:,} decisions in {time.perf_counter() - t0:.1f} s; "
              f"load {os.getloadavg()[0]:.2f}")
        rng = random.Random(11)
        since = now - 24 * 3600
        full = Outcomes(kassa, incremental=False)
        window = Outcomes(kassa, refresh_seconds=0.0)  # no reuse between views: every view reads what is new
        cpu, wall, _ = _view(window, since)
        print(f"incremental, first view (reads the whole window): cpu {cpu * 1000:.0f} ms, wall {wall * 1000:.0f} ms")
        results: dict[str, list[tuple[float, float]]] = {"full": [], "incremental": []}
        for r in range(args.rounds):
            for name, outcomes in (("full", full), ("incremental", window)):
                _append(kassa, shown, args.new, rng)
                cpu, wall, _ = _view(outcomes, since)
                results[name].append((cpu, wall))
                print(f"round {r} {name:12s} cpu {cpu * 1000:7.1f} ms  wall {wall * 1000:7.1f} ms  "
                      f"load {os.getloadavg()[0]:.2f}")
        c0 = time.process_time()
        rows = window._query_decisions("ts >= ?", [since], "decision_id, ts, placement, model_version, chosen",
                                       100_000)
        c1 = time.process_time()
        window._tally(rows, {}, None, 20, time.time())
        print(f"decision log side alone: query {(c1 - c0) * 1000:.0f} ms cpu, tally (no events) "
              f"{(time.process_time() - c1) * 1000:.0f} ms cpu")
        a, b = full.placements(since, now=now + 7200), window.placements(since, now=now + 7200)
        print("same numbers (full vs incremental):", a == b, "read by the window:",
              window._window.read_events if window._window else None)
        out: dict[str, Any] = {"events": args.events, "decisions": args.decisions, "new": args.new,
                               "same_numbers": a == b}
        for name, rows in results.items():
            print(f"{name:12s} median cpu {statistics.median(c for c, _ in rows) * 1000:.1f} ms, "
                  f"median wall {statistics.median(w for _, w in rows) * 1000:.1f} ms")
            out[name] = {"median_cpu_ms": round(statistics.median(c for c, _ in rows) * 1000, 1),
                         "median_wall_ms": round(statistics.median(w for _, w in rows) * 1000, 1)}
        if args.latency:
            modes: list[tuple[str, Outcomes | None]] = [("no page views", None)]
            for _ in range(2):
                modes += [("full read per view", full), ("incremental views", window)]
            # the app's lifespan stops Kassa
            out["latency"] = _latency(kassa, shown, since, args.latency, modes, args.new, args.period)
        out["load_avg"] = os.getloadavg()[0]
        if args.json:
            print(json.dumps(out))
    finally:
        cfg = kassa.bus.cfg if kassa.bus else None
        if not args.latency:
            kassa_close(kassa)
        if cfg is not None:
            _delete_streams(cfg)


def kassa_close(kassa: Kassa) -> None:
    kassa.decision_log.close()
    kassa.event_log.close()
    if kassa.bus is not None:
        kassa.bus.close()


def _delete_streams(cfg: Any) -> None:
    import nats

    async def go() -> None:
        nc = await nats.connect(cfg.url)
        js = nc.jetstream()
        for name in (cfg.events_stream, cfg.decisions_stream):
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
        await nc.close()

    asyncio.run(go())


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
