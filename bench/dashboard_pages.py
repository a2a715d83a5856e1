"""Every dashboard page's time with a day of decisions in many small decision-log files, over HTTP and in Chromium.

Writes ``--decisions`` decision records over the last 20 hours straight to the Parquet decision log, ``--per-file``
to a file (the writer flushes every 0.5 s, so a quiet store writes a file per decision or two), an accept event for
about half of them (with ``--impressions``, an impression per shown offer too), and a catalog of ``--offers``
offers all in one placement; then serves it on a port of its own and times each page ``--rounds`` times with
the admin key in the header (server side, as httpx sees it), and with ``--browser`` in Debian's Chromium
(Playwright) after logging in: a navigation to ``load``, and the last one's response start / end /
DOMContentLoaded / load from the Navigation Timing entry. The first view after start reads
the whole day of files (`DecisionLogWindow`); later views read only the files written since.

    PYTHONPATH=src python bench/dashboard_pages.py --decisions 30000 --offers 300 --per-file 3 --browser
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from kassa import schemas
from kassa.app import Kassa
from kassa.config import load_settings
from kassa.events.decision_log import DecisionLogWriter, DecisionRecord
from kassa.server import BackgroundServer

ADMIN = "ka_bench-dashboard-admin-key-0123456789"
PAGES = ("/dashboard", "/dashboard/placements", "/dashboard/placements/p", "/dashboard/placements/p?offers=6",
         "/dashboard/placements/p/edit", "/dashboard/features", "/dashboard/decisions",
         "/dashboard/decisions?id=d-100", "/dashboard/offers", "/dashboard/offers?page=6",
         "/dashboard/offers/offer-001", "/dashboard/keys")


def _fill(kassa: Kassa, offers: list[str], n: int, per_file: int, now: float, impressions: bool) -> int:
    rng = random.Random(1)
    writer = DecisionLogWriter(kassa.settings.data_path)
    events = []
    for i in range(n):
        chosen = rng.sample(offers, 3)
        candidates = rng.sample(offers, min(50, len(offers)))
        writer.append(DecisionRecord(
            decision_id=f"d-{i}", ts=now - 20 * 3600 + 20 * 3600 * i / n, placement="p", model_version="baseline",
            request_id=f"r{i}", customer_id=f"c{i % 500}", features={"x": 1.0, "device": "mobile"},
            candidates=candidates, probabilities=[1 / len(candidates)] * len(candidates), chosen=chosen,
            chosen_probabilities=[0.3, 0.3, 0.3], explored=False, fallback=False, took_ms=1.0 + rng.random()))
        if per_file and (i + 1) % per_file == 0:
            writer.flush()
        if impressions:
            events += [schemas.Event(event_id=uuid.uuid4().hex, type="impression", decision_id=f"d-{i}", offer_id=o)
                       for o in chosen]
        if rng.random() < 0.5:
            events.append(schemas.Event(event_id=uuid.uuid4().hex, type="accept", decision_id=f"d-{i}",
                                        offer_id=chosen[0]))
    writer.close()
    for i in range(0, len(events), 5000):
        asyncio.run(kassa.event_log.append(events[i:i + 5000], now - 3600))
    print(f"{len(events):,} events", flush=True)
    return len(list((kassa.settings.data_path / "decisions").rglob("*.parquet")))


def _browser(url: str, rounds: int) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    medians: dict[str, float] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--disable-gpu", "--no-first-run"])
        page = browser.new_context().new_page()
        page.goto(url + "/dashboard/login")
        page.fill("#key", ADMIN)
        page.click("form.login button")
        page.wait_for_url("**/dashboard")
        for path in PAGES:
            took = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                page.goto(url + path, wait_until="load")
                took.append(time.perf_counter() - t0)
            nav = page.evaluate("() => { const n = performance.getEntriesByType('navigation')[0]; return "
                                "[n.responseStart, n.responseEnd, n.domContentLoadedEventEnd, n.loadEventEnd]; }")
            print(f"chromium {path:36s} " + " ".join(f"{t * 1000:6.0f}" for t in took)
                  + " ms; last: response " + "/".join(f"{x:.0f}" for x in nav) + " ms", flush=True)
            medians[path] = round(statistics.median(took) * 1000, 1)
        browser.close()
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decisions", type=int, default=30_000)
    ap.add_argument("--offers", type=int, default=300)
    ap.add_argument("--per-file", type=int, default=3, help="decisions per Parquet file (0: one file)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--impressions", action="store_true", help="an impression event per shown offer too")
    ap.add_argument("--browser", action="store_true", help="also time the pages in Chromium")
    ap.add_argument("--json", action="store_true", help="end with one JSON object of the figures")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="benchdashpages-"))
    offers = [f"offer-{i:03d}" for i in range(args.offers)]
    catalog = {"offers": [{"id": o, "kind": "discount", "title": o, "value": 1 + i % 20,
                           "content": {"headline": "x", "cta": "y", "code": "C"}} for i, o in enumerate(offers)],
               "placements": [{"id": "p", "slots": 3, "offers": offers, "policy": "baseline", "exploration": 0.0}]}
    (tmp / "catalog.json").write_text(json.dumps(catalog))
    port = 18000 + random.randrange(1000)
    settings = load_settings(None, data_dir=str(tmp / "data"), catalog_file=str(tmp / "catalog.json"),
                             log_level="warning", admin_key=ADMIN,
                             **{"server.port": port, "server.host": "127.0.0.1"})
    kassa = Kassa(settings, seed=7)
    t0 = time.perf_counter()
    files = _fill(kassa, offers, args.decisions, args.per_file, time.time(), args.impressions)
    print(f"{args.decisions:,} decisions in {files:,} files, {args.offers} offers, filled in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    server = BackgroundServer(settings, kassa).start()
    out: dict[str, object] = {"decisions": args.decisions, "files": files, "offers": args.offers,
                              "impressions": args.impressions, "rounds": args.rounds, "cores": os.cpu_count(),
                              "server_median_ms": {}}
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120) as c:
            for path in PAGES:
                took = []
                for _ in range(args.rounds):
                    t = time.perf_counter()
                    r = c.get(path)
                    took.append(time.perf_counter() - t)
                print(f"server   {path:36s} {r.status_code} {len(r.content):7,d} B " +
                      " ".join(f"{x * 1000:6.0f}" for x in took) + " ms", flush=True)
                out["server_median_ms"][path] = round(statistics.median(took) * 1000, 1)  # type: ignore[index]
        if args.browser:
            out["chromium_median_ms"] = _browser(server.url, args.rounds)
    finally:
        server.stop()
    out["load_avg"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
