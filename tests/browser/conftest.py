"""Browser test harness: a real Kassa server, a separate "shop" origin, and headless Chromium (Playwright).

- Kassa runs on a thread (``kassa.server.BackgroundServer``) on a free port with a temp data dir and a
  small catalog; its ASGI app is wrapped by ``Faults`` (test-only): it can delay or fail
  ``POST /v1/decisions`` and records every response (path, status, Origin, CORS header).
- The shop pages come from their own tiny HTTP server on another port, so every call the snippet makes
  is cross-origin, as on a real store; a second one plays a disallowed origin.
- Chromium: ``KASSA_CHROMIUM``, else Debian's ``/usr/bin/chromium``, else ``apt-get install -y
  chromium`` when running as root, else the run fails with a clear message (never a skip).
  One browser for the package; every test gets a fresh context (no shared cache, storage or cookies).
  Package scope, not session: while Playwright's sync API is running it keeps an asyncio loop marked as
  running on the main thread, which would break every later test that calls asyncio.run().
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kassa import schemas
from kassa.api.demo_page import add_demo_page
from kassa.app import Kassa
from kassa.config import load_settings
from kassa.server import BackgroundServer

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/lib/chromium/chromium", "/usr/bin/chromium-browser")


def _svg(color: str, label: str) -> str:
    from urllib.parse import quote

    svg = (f"<svg xmlns='http://www.w3.org/2000/svg' width='64' height='64'><rect width='64' height='64' "
           f"fill='{color}'/><text x='32' y='40' font-size='22' text-anchor='middle' fill='white'>{label}</text></svg>")
    return "data:image/svg+xml," + quote(svg)


CATALOG: dict[str, Any] = {
    "offers": [
        {"id": "serum-sub", "kind": "subscription", "title": "Serum refills", "value": 30,
         "content": {"headline": "Never run out: serum every 6 weeks", "body": "15% off every delivery",
                     "cta": "Subscribe", "image_url": _svg("#b0643a", "S"), "image_alt": "Serum bottle"}},
        {"id": "warranty", "kind": "warranty", "title": "Protection", "value": 20,
         "content": {"headline": "Protect your purchase for 2 years", "cta": "Add cover",
                     "url": "https://shop.example/warranty"}},
        {"id": "thanks10", "kind": "discount", "title": "10% off", "value": 10,
         "content": {"headline": "10% off your next order", "cta": "Get my code", "code": "THANKS10",
                     "image_url": "http://127.0.0.1:9/broken.png"}},
        {"id": "hostile", "kind": "partner", "title": "Hostile content", "value": 1,
         "content": {"headline": "<img src=x onerror=\"window.__pwned=1\"><b>bold</b>",
                     "body": "<script>window.__pwned=2</script>", "cta": "<i>Click</i>",
                     "image_url": "javascript:window.__pwned=3", "url": "javascript:window.__pwned=4"}},
        {"id": "sponsored", "kind": "partner", "title": "Partner", "value": 1, "disclosure": "Sponsored",
         "content": {"headline": "3 free issues, on us", "cta": "Add for {price}"},
         "prices": {"USD": 9.99, "EUR": 9.49},
         "content_by_locale": {"nl": {"headline": "3 gratis nummers", "cta": "Toevoegen voor {price}",
                                      "disclosure": "Gesponsord"}}},
        {"id": "long", "kind": "discount", "title": "Long German text", "value": 1,
         "content": {"headline": "Versandkostenfreie Lieferung für alle Bestellungen der nächsten zwölf Monate",
                     "body": "Donaudampfschifffahrtsgesellschaftskapitänsmützenabonnementverlängerungsformular",
                     "cta": "Jetzt kostenlos hinzufügen und dabei sparen",
                     "code": "WINTERSCHLUSSVERKAUF-2026-VERSANDKOSTENFREI"}},
    ],
    "placements": [
        {"id": "order_confirmation", "slots": 3, "offers": ["serum-sub", "warranty", "thanks10"],
         "policy": "baseline", "baseline": "value", "exploration": 0.0, "latency_budget_ms": 10000},
        {"id": "empty", "slots": 3, "offers": [], "policy": "baseline", "exploration": 0.0},
        {"id": "hostile", "slots": 1, "offers": ["hostile"], "policy": "baseline", "exploration": 0.0,
         "latency_budget_ms": 10000},
        {"id": "sponsored", "slots": 1, "offers": ["sponsored"], "policy": "baseline", "exploration": 0.0,
         "latency_budget_ms": 10000},
        {"id": "long", "slots": 2, "offers": ["long", "serum-sub"], "policy": "baseline", "baseline": "value",
         "exploration": 0.0, "latency_budget_ms": 10000},
    ],
}

ORDER = {"id": "R-1001", "currency": "USD", "total": 64.0, "ship_country": "US",
         "items": [{"sku": "SERUM-C", "category": "skincare", "qty": 1, "price": 64.0}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- Chromium
def find_chromium() -> str:
    """A Chromium executable: the configured one, Debian's, or installed now (root); else a clear error."""
    configured = os.environ.get("KASSA_CHROMIUM")
    if configured:
        if os.access(configured, os.X_OK):
            return configured
        raise RuntimeError(f"KASSA_CHROMIUM={configured} is not an executable file")
    for path in (*CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if path and os.access(path, os.X_OK):
            return path
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True)
        done = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=False, env=env,
                              capture_output=True, text=True)
        for path in CHROMIUM_CANDIDATES:
            if os.access(path, os.X_OK):
                return path
        raise RuntimeError(f"`apt-get install -y chromium` did not provide Chromium:\n{done.stderr[-2000:]}")
    raise RuntimeError(
        "the browser tests need Chromium: install Debian's `chromium` package (apt-get install -y chromium, "
        "as root) or point KASSA_CHROMIUM at a Chromium/Chrome executable")


# --------------------------------------------------------------------------- the Kassa server
@dataclass
class Faults:
    """Test-only ASGI wrapper around the Kassa app: delays or fails decisions, records every response."""

    app: Any
    delay_s: float = 0.0
    fail_status: int | None = None
    responses: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def _recording(receive: Any, entry: dict[str, Any]) -> Any:
        entry["body"] = b""

        async def wrapped() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                entry["body"] += message.get("body", b"")
            return message

        return wrapped

    def requests(self, path: str, method: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.responses if r["path"] == path and (method is None or r["method"] == method)]

    def reset(self) -> None:
        self.delay_s, self.fail_status = 0.0, None
        self.responses.clear()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"").decode() or None
        entry: dict[str, Any] = {"method": scope["method"], "path": scope["path"], "origin": origin}
        self.responses.append(entry)
        if scope["method"] == "POST":
            receive = self._recording(receive, entry)
        if scope["path"] == "/v1/decisions" and scope["method"] == "POST":
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.fail_status:
                # A readable failure (CORS header present), so the page really sees an HTTP 500.
                entry.update(status=self.fail_status, allow_origin=origin)
                await send({"type": "http.response.start", "status": self.fail_status, "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"access-control-allow-origin", (origin or "*").encode())]})
                await send({"type": "http.response.body", "body": b'{"title":"injected failure"}'})
                return

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                out = dict(message.get("headers", []))
                entry.update(status=message["status"],
                             allow_origin=(out.get(b"access-control-allow-origin") or b"").decode() or None)
            await send(message)

        await self.app(scope, receive, recording_send)


@dataclass
class KassaUnderTest:
    url: str
    kassa: Kassa
    faults: Faults
    key: str  # publishable, bound to the shop origin only

    def events(self, decision_id: str | None = None) -> list[schemas.Event]:
        rows = [e for _, e in self.kassa.event_log.read(0, 10_000)]
        return [e for e in rows if decision_id is None or e.decision_id == decision_id]

    def wait_for_events(self, decision_id: str, n: int, timeout: float = 10.0, settle: float = 0.4
                        ) -> list[schemas.Event]:
        """Poll until at least ``n`` events of the decision are stored, then wait ``settle`` s for strays."""
        deadline = time.monotonic() + timeout
        while len(self.events(decision_id)) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {n} events for {decision_id}, got {self.events(decision_id)}")
            time.sleep(0.05)
        time.sleep(settle)
        return self.events(decision_id)


class ShopServer:
    """A store origin: serves the HTML pages tests register, from its own port."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        pages = self.pages

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.get(self.path.split("?")[0])
                data = (body or "not found").encode()
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8" if body else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.httpd.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="shop", daemon=True)
        self.thread.start()
        self._n = 0

    def add(self, html: str) -> str:
        """Register a page; returns its URL."""
        self._n += 1
        path = f"/p/{self._n}"
        self.pages[path] = html
        return self.origin + path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="package")
def shop() -> Iterator[ShopServer]:
    server = ShopServer()
    yield server
    server.close()


@pytest.fixture(scope="package")
def elsewhere() -> Iterator[ShopServer]:
    """Another origin, allowed by no key."""
    server = ShopServer()
    yield server
    server.close()


@pytest.fixture(scope="package")
def kassa_server(shop: ShopServer) -> Iterator[KassaUnderTest]:
    import msgspec

    with tempfile.TemporaryDirectory(prefix="kassa-browser-", ignore_cleanup_errors=True) as tmp:
        catalog = Path(tmp) / "catalog.json"
        catalog.write_bytes(msgspec.json.encode(CATALOG))
        port = free_port()
        settings = load_settings(None, data_dir=str(Path(tmp) / "data"), catalog_file=str(catalog),
                                 log_level="warning", **{"server.port": port, "server.host": "127.0.0.1"})
        kassa = Kassa(settings, seed=3)
        # The only publishable key is bound to the shop origin, so every other origin is refused,
        # preflights included.
        key = kassa.keys.create("publishable", "browser-tests", [shop.origin])
        server = BackgroundServer(settings, kassa)
        # The demo page, served by Kassa itself, with a key bound to Kassa's own origin.
        own_key = kassa.keys.create("publishable", "demo-page", [f"http://127.0.0.1:{port}"])
        add_demo_page(server.app, own_key, [{"placement": "order_confirmation", "order": ORDER,
                                             "customer": {"id": "c-demo"}}], timeout_ms=5000)
        faults = Faults(server.app)
        server.server.config.app = faults  # uvicorn loads config.app when it starts serving
        server.start()
        try:
            yield KassaUnderTest(server.url, kassa, faults, key)
        finally:
            server.stop()


# --------------------------------------------------------------------------- the browser
@pytest.fixture(scope="package")
def chromium() -> str:
    try:
        return find_chromium()
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="package")
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--disable-gpu", "--no-first-run"])
        yield b
        b.close()


@dataclass
class PageRun:
    """One test's page, plus what the page reported on its own."""

    page: Any
    errors: list[str]
    console: list[tuple[str, str]]

    def snippet_console(self, level: str) -> list[str]:
        return [text for kind, text in self.console if kind == level and "[kassa]" in text]


@pytest.fixture
def page(browser: Any, kassa_server: KassaUnderTest) -> Iterator[PageRun]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    run = PageRun(pg, [], [])
    pg.on("pageerror", lambda exc: run.errors.append(str(exc)))
    pg.on("console", lambda msg: run.console.append((msg.type, msg.text)))
    pg.set_default_timeout(10_000)
    kassa_server.faults.reset()
    try:
        yield run
    finally:
        with contextlib.suppress(Exception):
            context.close()
        kassa_server.faults.reset()


# --------------------------------------------------------------------------- pages
CLS_OBSERVER = """<script>
window.__cls = 0;
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) if (!e.hadRecentInput) window.__cls += e.value;
}).observe({type: 'layout-shift', buffered: true});
</script>"""

ARTICLE = "<p>" + "Thank you for shopping with us. Your parcel is being packed. " * 8 + "</p>"


def shop_page(kassa_url: str, body: str = "", head: str = "", script_attrs: str = "") -> str:
    """A store page that loads the snippet ``async`` from Kassa and does nothing else by itself."""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Order confirmed</title>
<link rel="icon" href="data:,">{CLS_OBSERVER}{head}
<script async src="{kassa_url}/v1/snippet.js" {script_attrs}></script></head>
<body><h1 id="thanks">Thank you!</h1>{ARTICLE}<div id="offers"></div>{ARTICLE}
<button id="page-button">A page button</button>{body}</body></html>"""


LoadPage = Callable[..., PageRun]


@pytest.fixture
def open_shop_page(page: PageRun, shop: ShopServer, kassa_server: KassaUnderTest) -> LoadPage:
    """Open a shop page with the snippet loaded, ``Kassa.init`` called with the shop's key."""

    def load(body: str = "", head: str = "", init: dict[str, Any] | None = None, origin: ShopServer | None = None,
             script_attrs: str = "") -> PageRun:
        url = (origin or shop).add(shop_page(kassa_server.url, body, head, script_attrs))
        page.page.goto(url)
        page.page.wait_for_function("window.Kassa && window.Kassa.version")
        options = {"key": kassa_server.key, **(init or {})}
        if not script_attrs:
            page.page.evaluate("(o) => Kassa.init(o)", options)
        return page

    return load


def show(run: PageRun, **opts: Any) -> dict[str, Any]:
    """Call ``Kassa.show`` in the page and return what its promise resolved to."""
    opts.setdefault("order", ORDER)
    opts.setdefault("customer", {"id": "c-1"})
    return run.page.evaluate("(o) => Kassa.show(o)", opts)  # type: ignore[no-any-return]
