"""Start-up and memory of `kassa serve` with a large catalog.

Writes a catalog of N offers (product offers with features and rules, plus partner offers), starts
`kassa serve` as a subprocess on a fresh data dir, measures the time from process start to the first
200 of GET /readyz, then sends decisions so every offer line and model path is warm, and reads the
server's RSS. Repeats and reports medians. A second start on the same data dir (catalog already in
SQLite) is measured too. Ends with one JSON object when --json is given.

Target (issue 2): ready in <= 3 s; RSS <= 300 MB with 10,000 offers loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from benchdocs import write_section

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_catalog(path: Path, n: int) -> None:
    offers = []
    for i in range(n):
        offers.append({
            "id": f"prod-{i}", "kind": "product", "title": f"Product {i}", "value": float(i % 50) + 1,
            "sku": f"SKU-{i}", "product_id": f"p-{i}", "category": f"cat-{i % 40}", "stock": 100,
            "content": {"headline": f"Product {i}", "image": f"https://img.example/{i}.jpg", "price": 9.99},
            "features": {"brand": f"b{i % 200}", "price_band": i % 6, "margin": round((i % 10) / 10, 2)},
        })
    for i in range(50):
        offers.append({"id": f"partner-{i}", "kind": "partner", "title": f"Partner {i}", "value": float(i),
                       "content": {"headline": f"Partner {i}"}, "eligibility": {"countries": ["US", "CA"]}})
    placements = [
        {"id": "order_confirmation", "slots": 3, "offers": [f"partner-{i}" for i in range(50)],
         "retrieval": {"co_purchase": 20, "history": 10, "popular": 20, "max_candidates": 50}},
    ]
    tree = {"offers": offers, "placements": placements}
    if path.suffix == ".json":
        path.write_text(json.dumps(tree))
    else:
        path.write_text(yaml.safe_dump(tree, sort_keys=False))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(data_dir: Path, catalog: Path | None, port: int) -> tuple[subprocess.Popen, float]:
    cmd = [sys.executable, "-m", "kassa", "serve", "--data-dir", str(data_dir), "--port", str(port)]
    if catalog is not None:
        cmd += ["--catalog", str(catalog)]
    env = {**os.environ, "KASSA_PUBLISHABLE_KEY": "bench-pub", "KASSA_LOG_LEVEL": "warning"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/readyz"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return proc, time.perf_counter() - t0
        except OSError:
            pass
        if time.perf_counter() - t0 > 60:
            proc.kill()
            raise SystemExit("server not ready after 60 s")
        time.sleep(0.01)


def warm(port: int, n: int) -> None:
    body = json.dumps({
        "placement": "order_confirmation", "customer": {"id": "c-1"},
        "order": {"id": "1", "total": 80.0, "ship_country": "US",
                  "items": [{"sku": "SKU-1", "product_id": "p-1", "category": "cat-1", "price": 80.0}]},
    }).encode()
    for _ in range(n):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/decisions", body,
                                     {"Authorization": "Bearer bench-pub", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--offers", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--format", choices=["json", "yaml"], default="json", help="catalog file format")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-docs", action="store_true", help="rewrite this bench's section of docs/benchmarks.md")
    args = ap.parse_args()
    cold, warm_starts, rss = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / f"catalog.{args.format}"
        write_catalog(catalog, args.offers)
        for r in range(args.repeats):
            data = Path(tmp) / f"data-{r}"
            port = free_port()
            proc, ready = start(data, catalog, port)
            cold.append(ready)
            warm(port, 200)
            rss.append(rss_mb(proc.pid))
            stop(proc)
            port = free_port()
            proc, ready = start(data, None, port)  # restart: catalog already stored
            warm_starts.append(ready)
            stop(proc)
            print(f"run {r + 1}: ready {cold[-1]:.2f} s (first start, catalog file), "
                  f"{warm_starts[-1]:.2f} s (restart); RSS {rss[-1]:.0f} MB", file=sys.stderr)
    result = {
        "offers": args.offers + 50,
        "catalog_format": args.format,
        "ready_s_median": round(statistics.median(cold), 3),
        "restart_ready_s_median": round(statistics.median(warm_starts), 3),
        "rss_mb_median": round(statistics.median(rss), 1),
        "runs": {"ready_s": [round(x, 3) for x in cold], "restart_ready_s": [round(x, 3) for x in warm_starts],
                 "rss_mb": [round(x, 1) for x in rss]},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
    }
    print(f"ready in {result['ready_s_median']} s (median), restart {result['restart_ready_s_median']} s, "
          f"RSS {result['rss_mb_median']} MB with {result['offers']} offers", file=sys.stderr)
    if args.write_docs:
        write_section(docs_section(result), START, END)
    if args.json:
        print(json.dumps(result))


START, END = "<!-- bench:startup:start -->", "<!-- bench:startup:end -->"


def docs_section(r: dict) -> str:
    m, runs = r["machine"], r["runs"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"""{START}
## Start-up and memory of `kassa serve`

`python bench/startup.py --repeats {len(runs["ready_s"])}` on {m["cpu"]} ({m["cores"]} cores), Python {m["python"]},
{when}: {r["offers"]:,} offers from a {r["catalog_format"].upper()} catalog file; time from process start
to the first 200 of `GET /readyz`, and RSS after 200 decisions (targets: ready <= 3 s, RSS <= 300 MB).

| | median | runs |
|---|---:|---|
| ready, first start (catalog file parsed and stored) | **{r["ready_s_median"]} s** | {runs["ready_s"]} |
| ready, restart (catalog stored, file unchanged) | {r["restart_ready_s_median"]} s | {runs["restart_ready_s"]} |
| RSS with the catalog loaded | **{r["rss_mb_median"]} MB** | {runs["rss_mb"]} |

A 10,000-offer YAML catalog takes several seconds more to parse (PyYAML with libyaml); JSON is parsed
by msgspec. A restart skips an unchanged file.
{END}"""


if __name__ == "__main__":
    main()
