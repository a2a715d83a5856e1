"""CORS for browser calls with publishable keys: only ``/v1/decisions`` and ``/v1/events``, only from the
key's allowed origins.

Which origins a publishable key allows: the origins it was created with
(``kassa keys create publishable --origin …``); a key bound to none allows ``server.cors_origins`` when
that list is set, else any origin. Secret and admin keys get CORS headers on errors only, so a browser can
never read what they return.

- A request without an ``Origin`` header (servers, curl) passes straight through: on the decision hot
  path the only cost is one scan of the header list.
- A preflight (``OPTIONS`` + ``Access-Control-Request-Method``) carries no key, so it is answered for an
  origin that at least one publishable key allows, for ``POST`` with at most ``Authorization`` and
  ``Content-Type``; anything else gets a 403 problem and no CORS headers.
- An actual call from an origin its key does not allow gets a 403 problem; an allowed one goes through
  with ``Access-Control-Allow-Origin`` echoing the origin and ``Vary: Origin``.
- Every error on these two paths (the 403 above, an unknown or revoked key's 401, a 404, 413, 422, 429
  or 5xx) carries those two headers whatever the key, so the page can read the problem: without them the
  browser hides it and the snippet could only say "Failed to fetch". An error holds nothing but its own
  message; nothing was decided or stored. A success is readable only by the key's origins.

The key comes from ``Authorization: Bearer`` or, for publishable keys only, ``?key=`` (what the
snippet uses: a text/plain POST with the key in the URL is a CORS-simple request, so the browser sends
no preflight and the decision costs one round trip; see ``kassa.api.common.authorize``).
"""

from __future__ import annotations

from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kassa import errors
from kassa.api.common import bearer, problem_response
from kassa.app import Kassa
from kassa.keys import KeyInfo

CORS_PATHS = frozenset({"/v1/decisions", "/v1/events"})
ALLOWED_HEADERS = frozenset({"authorization", "content-type"})
MAX_AGE = "7200"  # seconds; Chromium caps a cached preflight at two hours
_ANY = "*"


class CorsMiddleware:
    """Pure ASGI middleware; see the module docstring for the rules."""

    def __init__(self, app: ASGIApp, kassa: Kassa) -> None:
        self.app = app
        self.kassa = kassa
        self._union_for: object = None
        self._union: frozenset[str] = frozenset()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value.decode("latin-1")
                break
        if origin is None:
            await self.app(scope, receive, send)
            return
        await self._cross_origin(scope, receive, send, origin)

    async def _cross_origin(self, scope: Scope, receive: Receive, send: Send, origin: str) -> None:
        headers = {k: v for k, v in scope["headers"]}
        path: str = scope["path"]
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            await self._preflight(scope, receive, send, origin, path, headers)
            return
        if path not in CORS_PATHS:
            await self.app(scope, receive, send)
            return
        extra = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        info = self._key(scope, headers)
        if info is None or info.kind != "publishable":
            # Unknown key: the route answers 401, readable. Secret/admin key: it works, but a browser can
            # read only its errors.
            await self.app(scope, receive, _with_headers(send, extra, errors_only=True))
            return
        allowed = info.origins or tuple(self.kassa.settings.server.cors_origins)
        if allowed and origin not in allowed and _ANY not in allowed:
            await self._refuse(scope, receive, _with_headers(send, extra, errors_only=True),
                               f"origin {origin!r} is not allowed for this key", "Origin")
            return
        await self.app(scope, receive, _with_headers(send, extra, errors_only=False))

    async def _preflight(self, scope: Scope, receive: Receive, send: Send, origin: str, path: str,
                         headers: dict[bytes, bytes]) -> None:
        if path not in CORS_PATHS:
            await self._refuse(scope, receive, send, f"cross-origin calls are allowed only on "
                               f"{' and '.join(sorted(CORS_PATHS))}, not {path}", None)
            return
        method = headers[b"access-control-request-method"].decode("latin-1").strip().upper()
        if method != "POST":
            await self._refuse(scope, receive, send, f"{path} accepts cross-origin POST only, not {method}",
                               "Access-Control-Request-Method")
            return
        asked = headers.get(b"access-control-request-headers", b"").decode("latin-1")
        extra = sorted({h.strip().lower() for h in asked.split(",") if h.strip()} - ALLOWED_HEADERS)
        if extra:
            await self._refuse(scope, receive, send, f"header(s) {', '.join(extra)} not allowed; send only "
                               "Authorization and Content-Type", "Access-Control-Request-Headers")
            return
        union = self._publishable_origins()
        if _ANY not in union and origin not in union:
            await self._refuse(scope, receive, send, f"origin {origin!r} is not allowed for any publishable key",
                               "Origin")
            return
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", b"POST"),
            (b"access-control-allow-headers", b"Authorization, Content-Type"),
            (b"access-control-max-age", MAX_AGE.encode()),
            (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        ]})
        await send({"type": "http.response.body", "body": b""})

    def _key(self, scope: Scope, headers: dict[bytes, bytes]) -> KeyInfo | None:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        token = bearer(auth) if auth else None
        if token is not None:
            return self.kassa.keys.lookup(token)
        if auth:
            return None
        keys = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key")
        return self.kassa.keys.lookup(keys[0]) if keys else None

    def _publishable_origins(self) -> frozenset[str]:
        # Recomputed only when the key store reloads (it swaps in a new dict). Reading its private map
        # keeps preflights free of SQL; KeyStore has no public "all keys" view on the request path.
        cache = self.kassa.keys._cache
        if cache is not self._union_for:
            fallback = set(self.kassa.settings.server.cors_origins) or {_ANY}
            union: set[str] = set()
            for info in cache.values():
                if info.kind == "publishable":
                    union |= set(info.origins) if info.origins else fallback
            self._union, self._union_for = frozenset(union), cache
        return self._union

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, detail: str, field: str | None) -> None:
        self.kassa.metrics.errors.labels("403").inc()
        await problem_response(errors.Forbidden(detail, field), scope["path"])(scope, receive, send)


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]], errors_only: bool) -> Send:
    """``send`` adding ``extra`` to the response's headers (only to an error response when ``errors_only``)."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and (not errors_only or message["status"] >= 400):
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending
