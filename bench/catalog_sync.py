"""Catalog sync of a 100,000-product fake Shopify catalog: time, and resume after a kill.

Owns the catalog-sync benchmark. It runs the fake Shopify GraphQL Admin API (``tests/integrations/fakes``,
products generated on the fly) in its own process, then:

1. baseline: pages through every product with the connector and discards them (what the fake server, HTTP
   and parsing cost on their own, with no catalog writes);
2. ``kassa integrations sync shopify`` as a subprocess, SIGKILLed once its saved cursor says ``--kill-at``
   of the products are in (a real ``kill -9``: no cleanup runs);
3. the same command again, which resumes from the saved cursor and finishes;

and then checks the catalog database: every product exactly once (100,000 distinct offer ids, each the SKU
the fake generated), nothing else. Sync time is phase 2 + phase 3 wall time, process start included.

    python bench/catalog_sync.py --products 100000 --json --write-docs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdocs import DOCS, write_section  # noqa: E402
from decision_latency import machine_info, versions  # noqa: E402

START, END = "<!-- bench:catalog_sync:start -->", "<!-- bench:catalog_sync:end -->"
TOKEN = "shpat_bench"


def serve_fake(products: int, port_file: Path) -> None:
    """Child-process mode: run the fake Shopify API until killed."""
    from tests.integrations.fakes.shopify import ShopifyFake

    fake = ShopifyFake(generated=products, token=TOKEN)
    fake.start()
    port_file.write_text(fake.url)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


@contextlib.contextmanager
def fake_shopify(products: int, root: Path) -> Iterator[str]:
    port_file = root / "fake.url"
    proc = subprocess.Popen([sys.executable, __file__, "--serve-fake", str(products), "--port-file", str(port_file)],
                            cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the fake Shopify server did not start")
            time.sleep(0.05)
        yield port_file.read_text()
    finally:
        proc.terminate()
        proc.wait(10)


def baseline(url: str, page_size: int) -> dict[str, Any]:
    from kassa.integrations.shopify import ShopifyConnector

    conn = ShopifyConnector({"shop": url, "access_token": TOKEN, "page_size": page_size})
    t0 = time.perf_counter()
    n = pages = 0
    for products, _ in conn.iter_products():
        n += len(products)
        pages += 1
    conn.close()
    return {"products": n, "pages": pages, "seconds": round(time.perf_counter() - t0, 2)}


def cursor_products(path: Path) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(json.loads(path.read_text()).get("products", 0))
    return 0


def run_sync(config: Path, data: Path, kill_at: int | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "kassa", "integrations", "sync", "shopify", "--credentials", str(config),
           "--data-dir", str(data), "--json"]
    cursor = data / "integrations" / "shopify.cursor.json"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    if kill_at is not None:
        while proc.poll() is None and cursor_products(cursor) < kill_at:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        return {"seconds": round(time.perf_counter() - t0, 2), "killed": proc.returncode == -signal.SIGKILL,
                "products_at_kill": cursor_products(cursor)}
    out, _ = proc.communicate()
    seconds = round(time.perf_counter() - t0, 2)
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"sync failed with exit code {proc.returncode}: {out.decode()[-500:]}")
    return {"seconds": seconds, "report": json.loads(lines[-1])}


def check_catalog(db: Path, expected: int) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT count(*), count(DISTINCT id) FROM offers").fetchone()
        ids = {r[0] for r in conn.execute("SELECT id FROM offers")}
    wanted = {f"SKU-{i:06d}" for i in range(expected)}
    return {"rows": rows[0], "distinct": rows[1], "missing": len(wanted - ids), "unexpected": len(ids - wanted),
            "each_once": rows[0] == rows[1] == expected and ids == wanted}


def bench(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kassa-bench-sync-") as tmp:
        root = Path(tmp)
        with fake_shopify(args.products, root) as url:
            log(f"fake Shopify with {args.products:,} products at {url}")
            log("baseline: page through the fake without writing")
            base = baseline(url, args.page_size)
            config = root / "shopify.yaml"
            config.write_text(yaml.safe_dump({"shopify": {"shop": url, "access_token": TOKEN,
                                                          "page_size": args.page_size}}))
            data = root / "data"
            kill_at = int(args.products * args.kill_at)
            log(f"sync, SIGKILL once {kill_at:,} products are in")
            first = run_sync(config, data, kill_at)
            log(f"killed after {first['seconds']} s with {first['products_at_kill']:,} products saved; resuming")
            second = run_sync(config, data, None)
            check = check_catalog(data / "kassa.db", args.products)
    total = round(first["seconds"] + second["seconds"], 2)
    report = second["report"]
    return {
        "benchmark": "catalog_sync",
        "products": args.products,
        "page_size": args.page_size,
        "baseline_fetch_seconds": base["seconds"],
        "baseline_products": base["products"],
        "killed": first["killed"],
        "killed_after_seconds": first["seconds"],
        "products_at_kill": first["products_at_kill"],
        "resume_seconds": second["seconds"],
        "resumed": report["resumed"],
        "resumed_products": report["products"],
        "total_seconds": total,
        "products_per_second": round(args.products / total, 1),
        "target_seconds": 120.0,
        "target_met": total <= 120.0 and check["each_once"],
        "catalog": check,
        "machine": machine_info(),
        "versions": versions(),
        "load_average": os.getloadavg()[0],
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def docs_section(res: dict[str, Any]) -> str:
    m, c = res["machine"], res["catalog"]
    verdict = "met" if res["target_met"] else "**not met**"
    return f"""{START}
## Catalog sync (Shopify, 100,000 products)

`python bench/catalog_sync.py --products {res['products']} --page-size {res['page_size']}` on {m['cpu']}
({m['cores']} cores), kassa {res['versions']['kassa']}; fake Shopify GraphQL Admin API (products generated
on the fly, `products` connection with cursors) in its own process on the same machine (load average
{res['load_average']:.2f} at the end); {res['date']}.

| phase | seconds | products |
|---|---:|---:|
| baseline: page through the fake, no writes | {res['baseline_fetch_seconds']} | {res['baseline_products']:,} |
| `kassa integrations sync shopify`, SIGKILLed | {res['killed_after_seconds']} | {res['products_at_kill']:,} saved |
| the same command again (resumes from the cursor) | {res['resume_seconds']} | {res['resumed_products']:,} |
| **sync total** (both runs, process start included) | **{res['total_seconds']}** | {res['products']:,} |

Target ≤ 120 s for 100,000 products, resumable after a kill: {verdict}
({res['products_per_second']:,} products/s). After the resume the catalog held {c['rows']:,} offer rows,
{c['distinct']:,} distinct ids, {c['missing']} missing and {c['unexpected']} unexpected: every product
exactly once. Against a real store the time is bounded by Shopify's query-cost budget instead: each
250-product page asks ~500 points, so 400 pages need ~200,000 points, about 200 s at Shopify Plus's
1,000 points/s and ~33 min on a Standard plan's 100 points/s (the connector waits the bucket out).
{END}"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--products", type=int, default=100_000)
    p.add_argument("--page-size", type=int, default=250)
    p.add_argument("--kill-at", type=float, default=0.4, help="SIGKILL the first sync at this fraction")
    p.add_argument("--json", action="store_true", help="end the output with one JSON object")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite the section in {DOCS.name}")
    p.add_argument("--serve-fake", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_fake is not None:
        serve_fake(args.serve_fake, args.port_file)
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()

    def log(msg: str) -> None:
        console.print(f"[dim]{msg}[/dim]")

    res = bench(args, log)
    table = Table(title=f"Catalog sync, {res['products']:,} products")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_row("baseline fetch (no writes)", str(res["baseline_fetch_seconds"]))
    table.add_row(f"sync until SIGKILL ({res['products_at_kill']:,} saved)", str(res["killed_after_seconds"]))
    table.add_row(f"resume ({res['resumed_products']:,} products)", str(res["resume_seconds"]))
    table.add_row("total", str(res["total_seconds"]))
    table.caption = (f"each product once: {res['catalog']['each_once']}; target ≤ 120 s: "
                     f"{'met' if res['target_met'] else 'not met'}")
    console.print(table)
    if args.write_docs:
        write_section(docs_section(res), START, END)
        log(f"wrote {DOCS}")
    if args.json:
        print(json.dumps(res, separators=(",", ":")), flush=True)
    return 0 if res["catalog"]["each_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
