"""Decision latency while the dashboard reads the decision log in the same serving process, and the pages' time.

Owns the measurement behind DuckDB's thread limit in serving processes (`kassa.events.decision_log.serving_duckdb`).
Writes ``--decisions`` decisions to the Parquet decision log (``--per-file`` to a file, as `bench/dashboard_pages.py`
does), starts ``kassa serve`` (one process, its learner in process) with ``--src`` first on its PYTHONPATH (so two
checkouts can be compared on one data set), then sends ``POST /v1/decisions`` at ``--rate`` per second for
``--duration`` seconds twice: alone, then while a client loads dashboard pages that query the decision log with
DuckDB back to back (the explorer's recent decisions and a decision by id). Latency is from each request's
scheduled send time (open loop), so a stalled server is not hidden by a slower sender.

    PYTHONPATH=src python bench/dashboard_contention.py --decisions 200000 --per-file 200 --rate 100 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from dashboard_pages import _fill  # the same decision log as the dashboard pages bench
from kassa.app import Kassa
from kassa.config import load_settings

ADMIN, PUB = "ka_bench-contention-admin-key-0123456789", "kp_bench-contention-pub-key-0123456789"
PAGES = ("/dashboard/decisions", "/dashboard/decisions?id=d-{n}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _decisions(url: str, rate: float, duration: float) -> list[float]:
    latencies: list[float] = []
    body = {"placement": "p", "customer": {"id": "c1"}}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {PUB}"}, timeout=30,
                                 limits=httpx.Limits(max_connections=64)) as client:
        start = time.perf_counter()

        async def one(due: float, i: int) -> None:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            r = await client.post("/v1/decisions", json={**body, "request_id": f"r{i}"})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - due)

        await asyncio.gather(*(one(start + i / rate, i) for i in range(int(rate * duration))))
    return latencies


def _dashboard(url: str, stop: threading.Event, took: list[float], decisions: int) -> None:
    rng = random.Random(2)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120) as c:
        i = 0
        while not stop.is_set():
            path = PAGES[i % len(PAGES)].format(n=rng.randrange(decisions))
            t = time.perf_counter()
            r = c.get(path)
            r.raise_for_status()
            took.append(time.perf_counter() - t)
            i += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decisions", type=int, default=200_000)
    ap.add_argument("--per-file", type=int, default=200)
    ap.add_argument("--rate", type=float, default=100.0, help="decisions per second")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    ap.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"),
                    help="the Kassa source the server runs (first on its PYTHONPATH)")
    ap.add_argument("--json", action="store_true", help="accepted: the run always ends with one JSON object")
    ap.add_argument("--data", help="reuse this directory's decision log (written there if empty)")
    args = ap.parse_args()
    root = Path(args.data or tempfile.mkdtemp(prefix="benchcontention-"))
    root.mkdir(parents=True, exist_ok=True)
    offers = [f"offer-{i:03d}" for i in range(50)]
    catalog = {"offers": [{"id": o, "kind": "discount", "title": o, "value": 1 + i % 20,
                           "content": {"headline": "x", "cta": "y", "code": "C"}} for i, o in enumerate(offers)],
               "placements": [{"id": "p", "slots": 3, "offers": offers, "policy": "baseline", "exploration": 0.0}]}
    (root / "catalog.json").write_text(json.dumps(catalog))
    written = root / "decisions.json"  # what a reused --data holds
    if not (root / "data" / "decisions").exists():
        settings = load_settings(None, data_dir=str(root / "data"), catalog_file=str(root / "catalog.json"))
        kassa = Kassa(settings, seed=7)
        _fill(kassa, offers, args.decisions, args.per_file, time.time(), False)
        asyncio.run(kassa.stop())
        written.write_text(json.dumps({"decisions": args.decisions, "per_file": args.per_file}))
    logged = json.loads(written.read_text()) if written.exists() else {"decisions": args.decisions,
                                                                         "per_file": args.per_file}
    cfg = root / "kassa.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(root / "data"), "catalog_file": str(root / "catalog.json"),
                                   "log_level": "warning"}))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": args.src + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "KASSA_ADMIN_KEY": ADMIN, "KASSA_PUBLISHABLE_KEY": PUB}
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "kassa", "serve", "--settings", str(cfg), "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"kassa serve did not start (see {root / 'server.log'})")
            time.sleep(0.2)
        httpx.get(url + "/dashboard/decisions", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
        asyncio.run(_decisions(url, args.rate, 3.0))  # warm-up
        alone = asyncio.run(_decisions(url, args.rate, args.duration))
        stop, pages = threading.Event(), []
        loader = threading.Thread(target=_dashboard, args=(url, stop, pages, logged["decisions"]))
        loader.start()
        try:
            loaded = asyncio.run(_decisions(url, args.rate, args.duration))
        finally:
            stop.set()
            loader.join()
        out = {"src": args.src, "decisions_logged": logged["decisions"], "per_file": logged["per_file"],
               "rate": args.rate, "cores": os.cpu_count(), "load_avg": os.getloadavg()[0]}
        for name, lat in (("alone", alone), ("with_dashboard", loaded)):
            out[name] = {"n": len(lat), "p50_ms": round(_pct(lat, 0.5) * 1000, 1),
                         "p99_ms": round(_pct(lat, 0.99) * 1000, 1), "max_ms": round(max(lat) * 1000, 1)}
        out["pages"] = {"n": len(pages), "median_ms": round(statistics.median(pages) * 1000, 1),
                        "p90_ms": round(_pct(pages, 0.9) * 1000, 1)}
        print(json.dumps(out))
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


if __name__ == "__main__":
    main()
