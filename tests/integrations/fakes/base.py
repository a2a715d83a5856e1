"""`FakeServer`: the shared base of the local fake commerce-platform servers used by the tests.

A fake is a stdlib ``ThreadingHTTPServer`` on 127.0.0.1, port 0 (a free port), speaking HTTP/1.1 with
keep-alive. A subclass implements ``handle(request) -> FakeResponse`` with the platform's public API
shape; this base adds what every platform test needs: a request log, injected faults served before the
normal handler (auth failures with the platform's error body, 429 with ``Retry-After``, 5xx, a malformed
page), and start/stop as a context manager. Platform fakes subclass it; they do not edit it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class FakeRequest:
    method: str
    path: str  # without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class FakeResponse:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> FakeResponse:
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass
class Fault:
    response: FakeResponse
    times: int = 1
    path_contains: str | None = None


def sign_b64(secret: str | bytes, body: bytes) -> str:
    """Base64 HMAC-SHA256 of ``body`` (the signature scheme of Shopify and WooCommerce webhooks)."""
    key = secret.encode() if isinstance(secret, str) else secret
    return base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-request (a killed sync, a closed pool) is not the fake's error.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class FakeServer:
    """Base class: subclass and implement ``handle``."""

    platform = "fake"

    def __init__(self) -> None:
        self.requests: list[FakeRequest] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ to override
    def handle(self, request: FakeRequest) -> FakeResponse:
        raise NotImplementedError

    # ------------------------------------------------------------------ fault injection
    def inject(self, status: int, body: bytes | str | dict[str, Any] = b"", headers: dict[str, str] | None = None,
               times: int = 1, path_contains: str | None = None) -> None:
        """Serve this response to the next ``times`` matching requests instead of the normal answer."""
        if isinstance(body, dict):
            response = FakeResponse.json(body, status, headers)
        else:
            raw = body.encode() if isinstance(body, str) else body
            response = FakeResponse(status, raw, dict(headers or {}))
        with self._lock:
            self._faults.append(Fault(response, times, path_contains))

    def throttle_next(self, retry_after: str | None = "2", times: int = 1, body: bytes | str = b"") -> None:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self.inject(429, body or b'{"errors":"Too many requests"}', {"Content-Type": "application/json", **headers},
                    times)

    def malformed_next(self, times: int = 1, path_contains: str | None = None) -> None:
        self.inject(200, b'{"data": {"products": [truncated', {"Content-Type": "application/json"}, times,
                    path_contains)

    def _take_fault(self, request: FakeRequest) -> FakeResponse | None:
        with self._lock:
            for fault in self._faults:
                if fault.path_contains is None or fault.path_contains in request.path:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault.response
        return None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes; with Nagle on, the second waits for the client's
            # delayed ACK (~40 ms per request on keep-alive connections).
            disable_nagle_algorithm = True

            def _serve(self) -> None:
                split = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = FakeRequest(self.command, split.path, parse_qs(split.query, keep_blank_values=True),
                                      {k.lower(): v for k, v in self.headers.items()}, body)
                with fake._lock:
                    fake.requests.append(request)
                response = fake._take_fault(request)
                if response is None:
                    try:
                        response = fake.handle(request)
                    except Exception as exc:  # a bug in a fake must show up as a 500, not a hung client
                        response = FakeResponse.json({"error": f"fake server error: {exc!r}"}, 500)
                self.send_response(response.status)
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(response.body)))
                self.end_headers()
                self.wfile.write(response.body)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name=f"fake-{self.platform}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
