"""From ``Kassa.show()`` to offers painted, measured in headless Chromium, against a no-op baseline.

Owns the snippet paint benchmark and the documentation screenshots. It starts ``kassa serve`` in a
subprocess (bench endpoints on) with a small catalog, serves a store's confirmation page from another
local origin (so every call is cross-origin, as on a real store) and loads it ``--loads`` times per
variant in one Chromium (a fresh page per load, after ``--warmup`` loads that are not counted), the whole
run ``--repeats`` times; the reported figures are the medians over the repeats:

- ``overlay`` and ``inline``: the real snippet; ``show()`` runs once the page has loaded and painted
  (so the store page's own first frame is not counted), and the figure is
  the snippet's own User Timing measure ``kassa:show-to-paint`` (from the call to the task right after
  the frame that shows the offers);
- ``noop`` (baseline): the same page with a do-nothing script in the snippet's place: at the same moment
  it POSTs the same body to ``/_bench/noop`` and appends an empty element, timed the same way. The
  ratio is what the decision, the JSON and the rendering add to one round trip and one frame.

Target (issue 6): P95 <= 100 ms. ``--json`` ends with one JSON object; ``--write-docs`` rewrites this
bench's section of ``docs/benchmarks.md``; ``--screenshots`` (re)writes ``docs/img/snippet-overlay.png``
and ``docs/img/snippet-inline.png`` from the same page.

    python bench/snippet_paint.py --loads 50 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

from benchdocs import write_section
from kassa.api.demo_page import confirmation_page
from kassa.snippet.build import built

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
PUB_KEY = "bench-pub"
START, END = "<!-- bench:snippet_paint:start -->", "<!-- bench:snippet_paint:end -->"
CHROMIUM = ("/usr/bin/chromium", "/usr/lib/chromium/chromium", "/usr/bin/chromium-browser")


def _svg(body: str, bg: str) -> str:
    svg = (f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 64 64'><rect width='64' height='64' rx='10' "
           f"fill='{bg}'/>{body}</svg>")
    return "data:image/svg+xml," + quote(svg)


SERUM = _svg("<rect x='26' y='10' width='12' height='9' rx='2' fill='#6b4a2f'/><rect x='22' y='18' width='20' "
             "height='34' rx='6' fill='#d98f4e'/><rect x='25' y='28' width='14' height='12' rx='2' fill='#fff6ec'/>",
             "#f6e7d6")
SHIELD = _svg("<path d='M32 10l17 6v13c0 11-7.5 19-17 24-9.5-5-17-13-17-24V16z' fill='#3f6fb5'/>"
              "<path d='M24 32l6 6 11-12' stroke='#fff' stroke-width='4' fill='none' stroke-linecap='round' "
              "stroke-linejoin='round'/>", "#e3ecf8")
TAG = _svg("<path d='M14 30V16a2 2 0 012-2h14l20 20-16 16z' fill='#2f7d4f'/><circle cx='22' cy='22' r='3.5' "
           "fill='#e6f2ea'/>", "#e6f2ea")

CATALOG: dict[str, Any] = {
    "offers": [
        {"id": "serum-refills", "kind": "subscription", "title": "Serum refills", "value": 20.0,
         "content": {"headline": "Never run out: vitamin C serum every 6 weeks",
                     "body": "15% off every delivery · skip or cancel anytime", "cta": "Subscribe",
                     "image_url": SERUM, "image_alt": "Vitamin C serum bottle"}},
        {"id": "protect-2y", "kind": "warranty", "title": "2-year protection", "value": 12.0,
         "content": {"headline": "Protect your new kettle for 2 years",
                     "body": "Repairs or a replacement, no questions asked", "cta": "Add for $9.99",
                     "image_url": SHIELD, "image_alt": ""}},
        {"id": "next-order-10", "kind": "discount", "title": "10% off next order", "value": 4.0,
         "content": {"headline": "10% off your next order", "body": "Your code works on everything for 30 days",
                     "cta": "Get my code", "code": "THANKS10", "image_url": TAG, "image_alt": ""}},
    ],
    "placements": [{"id": "order_confirmation", "slots": 3, "policy": "baseline", "exploration": 0.0,
                    "offers": ["serum-refills", "protect-2y", "next-order-10"]}],
}
PAYLOAD = {
    "placement": "order_confirmation", "customer": {"id": "c-2041"},
    "order": {"id": "R-20417", "currency": "USD", "total": 86.0, "ship_country": "US",
              "items": [{"sku": "SERUM-C", "category": "skincare", "qty": 1, "price": 38.0},
                        {"sku": "KETTLE-GOOSE", "category": "kitchen", "qty": 1, "price": 48.0}]},
}
NAMES = {"SERUM-C": "Vitamin C Serum, 30 ml", "KETTLE-GOOSE": "Gooseneck Pour-over Kettle"}

# The baseline: the snippet's queue API, doing nothing but one POST to /_bench/noop and one frame.
NOOP_JS = """(() => {
  let endpoint = '';
  const show = (o) => {
    performance.mark('kassa:show');
    fetch(endpoint + '/_bench/noop', {method: 'POST', body: JSON.stringify(o), mode: 'no-cors', credentials: 'omit'})
      .then(() => {
        (document.querySelector(o.target) || document.body).append(document.createElement('div'));
        requestAnimationFrame(() => {
          const ch = new MessageChannel();
          ch.port1.onmessage = () => {
            performance.mark('kassa:painted');
            performance.measure('kassa:show-to-paint', 'kassa:show', 'kassa:painted');
          };
          ch.port2.postMessage(0);
        });
      });
  };
  const run = (c) => { if (c[0] === 'init') endpoint = c[1].endpoint; if (c[0] === 'show') show(c[1]); };
  const prior = window.Kassa;
  window.Kassa = {version: 'noop', q: {push: (...c) => c.forEach(run)}};
  if (prior && prior.q) prior.q.forEach(run);
})();"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chromium() -> str:
    for path in (os.environ.get("KASSA_CHROMIUM"), *CHROMIUM):
        if path and os.access(path, os.X_OK):
            return path
    raise SystemExit("Chromium not found: apt-get install -y chromium, or set KASSA_CHROMIUM")


@contextlib.contextmanager
def kassa_server(tmp: Path) -> Iterator[str]:
    catalog = tmp / "catalog.json"
    catalog.write_text(json.dumps(CATALOG))
    port = free_port()
    env = {**os.environ, "KASSA_PUBLISHABLE_KEY": PUB_KEY, "KASSA_SERVER__BENCH_ENDPOINTS": "true",
           "KASSA_LOG_LEVEL": "warning"}
    log_path = tmp / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kassa", "serve", "--data-dir", str(tmp / "data"),
                                 "--catalog", str(catalog), "--port", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"kassa serve exited:\n{log_path.read_text(errors='replace')}")
                with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit("kassa serve not ready after 60 s")
                time.sleep(0.05)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def shop_server(pages: dict[str, tuple[str, bytes]]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            kind, body = pages.get(self.path.split("?")[0], ("text/plain", b"not found"))
            self.send_response(200 if self.path.split("?")[0] in pages else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


REPORT = "kassa-measure"
OBSERVER = (f"<script>new PerformanceObserver((l) => l.getEntries().forEach((e) => e.name === 'kassa:show-to-paint'"
            f" && console.log('{REPORT} ' + e.duration))).observe({{type: 'measure'}});</script>")


def pages_for(kassa_url: str) -> dict[str, tuple[str, bytes]]:
    html = "text/html; charset=utf-8"
    src = f"{kassa_url}/v1/snippet.js?v={built().version}"
    out = {f"/{layout}": (html, confirmation_page(PAYLOAD, key=PUB_KEY, layout=layout, script_src=src, names=NAMES,
                                                  timeout_ms=5000, show_on_load=True, extra_head=OBSERVER).encode())
           for layout in ("overlay", "inline")}
    out["/noop"] = (html, confirmation_page(PAYLOAD, key=PUB_KEY, layout="inline", script_src="/noop.js",
                                            script_integrity=None, endpoint=kassa_url, names=NAMES,
                                            show_on_load=True, extra_head=OBSERVER).encode())
    out["/noop.js"] = ("text/javascript", NOOP_JS.encode())
    return out


def measure(context: Any, url: str) -> float:
    """One page load; the page reports the measure on the console, so nothing is injected or polled in
    it while it works (Playwright's wait_for_function would evaluate its helper script every frame)."""
    page = context.new_page()
    try:
        with page.expect_console_message(lambda m: m.text.startswith(REPORT), timeout=15_000) as message:
            page.goto(url, wait_until="commit")
        return float(message.value.text.split()[1])
    finally:
        page.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))  # nearest rank
    return ordered[k]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(values), 1), "p95_ms": round(pct(values, 95), 1),
            "max_ms": round(max(values), 1), "mean_ms": round(statistics.fmean(values), 1)}


def screenshots(browser: Any, shop: str) -> list[str]:
    IMG.mkdir(parents=True, exist_ok=True)
    written = []
    for layout, height in (("overlay", 820), ("inline", 1020)):
        context = browser.new_context(viewport={"width": 1280, "height": height}, device_scale_factor=1)
        page = context.new_page()
        page.goto(f"{shop}/{layout}")
        page.wait_for_selector("kassa-offers .offer")
        page.wait_for_timeout(400)  # the opening animation and the images
        path = IMG / f"snippet-{layout}.png"
        page.screenshot(path=str(path))
        written.append(str(path.relative_to(ROOT)))
        context.close()
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=int, default=50, help="measured page loads per variant and repeat")
    ap.add_argument("--warmup", type=int, default=5, help="page loads per variant before measuring")
    ap.add_argument("--repeats", type=int, default=3, help="whole runs; the figures are their medians")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-docs", action="store_true", help="rewrite this bench's section of docs/benchmarks.md")
    ap.add_argument("--screenshots", action="store_true", help="rewrite docs/img/snippet-{overlay,inline}.png")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    variants = ("overlay", "inline", "noop")
    repeats: list[dict[str, list[float]]] = []
    shots: list[str] = []
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kassa-paint-") as tmp, kassa_server(Path(tmp)) as kassa_url, \
            shop_server(pages_for(kassa_url)) as shop, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium())
        for r in range(args.repeats):
            runs: dict[str, list[float]] = {v: [] for v in variants}
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            for i in range(args.warmup + args.loads):
                for v in variants:  # interleaved, so drift on the machine hits every variant alike
                    ms = measure(context, f"{shop}/{v}")
                    if i >= args.warmup:
                        runs[v].append(ms)
            context.close()
            repeats.append(runs)
            print(f"repeat {r + 1}: " + "  ".join(
                f"{v} P50 {statistics.median(runs[v]):.1f} / P95 {pct(runs[v], 95):.1f} ms" for v in variants),
                file=sys.stderr)
        if args.screenshots:
            shots = screenshots(browser, shop)
        version = browser.version
        browser.close()
    snippet = built()

    def med(v: str, key: str) -> float:
        return round(statistics.median(summary(run[v])[key] for run in repeats), 1)

    result: dict[str, Any] = {
        "loads": args.loads, "warmup": args.warmup, "repeats": args.repeats, "target_p95_ms": 100,
        **{v: {"p50_ms": med(v, "p50_ms"), "p95_ms": med(v, "p95_ms"), "max_ms": med(v, "max_ms"),
               "p95_ms_per_repeat": [summary(run[v])["p95_ms"] for run in repeats]} for v in variants},
        "snippet": {"version": snippet.version, "bytes": len(snippet.body), "gzip_bytes": len(snippet.gzipped)},
        "runs_ms": [{v: [round(x, 1) for x in run[v]] for v in variants} for run in repeats],
        "screenshots": shots,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "chromium": version,
                    "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)]},
    }
    result["ratio_p50"] = {v: round(result[v]["p50_ms"] / result["noop"]["p50_ms"], 2) for v in ("overlay", "inline")}
    result["ratio_p95"] = {v: round(result[v]["p95_ms"] / result["noop"]["p95_ms"], 2) for v in ("overlay", "inline")}
    for v in variants:
        s = result[v]
        print(f"{v:8} P50 {s['p50_ms']:6.1f} ms  P95 {s['p95_ms']:6.1f} ms  (median of {args.repeats})",
              file=sys.stderr)
    if args.write_docs:
        write_section(docs_section(result), START, END)
    if args.json:
        print(json.dumps(result))


def docs_section(r: dict[str, Any]) -> str:
    m = r["machine"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    def row(name: str, key: str) -> str:
        s = r[key]
        base = r["noop"]
        ratios = f"{s['p50_ms'] / base['p50_ms']:.2f}× / {s['p95_ms'] / base['p95_ms']:.2f}×"
        return (f"| {name} | {s['p50_ms']} ms | **{s['p95_ms']} ms** | {s['p95_ms_per_repeat']} | {s['max_ms']} ms "
                f"| {ratios} |")

    return f"""{START}
## Confirmation-page snippet: from `show()` to offers painted

`python bench/snippet_paint.py --loads {r["loads"]} --repeats {r["repeats"]}` on {m["cpu"]} ({m["cores"]} cores),
Python {m["python"]}, headless Chromium {m["chromium"]}, {when}; 1-minute load average {m["load_avg_1m"][0]} at
the start and {m["load_avg_1m"][1]} at the end (the VM is shared). `kassa serve` and a store page on two local
origins (every call cross-origin); {r["loads"]} page loads per variant and repeat after {r["warmup"]} unmeasured
ones, interleaved. Timed in the browser with the Performance API, from `Kassa.show()` (called once the
page has loaded and painted its first frame) to the task after the frame that shows the offers
(`performance.measure('kassa:show-to-paint')`). Baseline: the same page with a do-nothing script that
POSTs the same body to `/_bench/noop` and paints one empty element. Figures are medians over the repeats.
Target: P95 <= {r["target_p95_ms"]} ms. At P95 the machine's noise (other jobs on the 2 cores) dominates
both the snippet and the baseline; the P50 ratio is what parsing and rendering the offers add.

| variant | P50 | P95 | P95 per repeat | max | ÷ baseline (P50 / P95) |
|---|---:|---:|---|---:|---:|
{row("overlay (3 offers)", "overlay")}
{row("inline (3 offers)", "inline")}
{row("baseline: `/_bench/noop` + one frame", "noop")}

The served script is {r["snippet"]["bytes"]:,} bytes, {r["snippet"]["gzip_bytes"]:,} gzipped (budget 10,240).
Local numbers: on a real store add the network round trip to the Kassa server, once.
{END}"""


if __name__ == "__main__":
    main()
