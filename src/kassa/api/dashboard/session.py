"""Who may use the dashboard: an admin key, entered once on the login form or sent as a header.

- **Login form → session cookie.** ``POST /dashboard/login`` checks the admin key and sets
  ``kassa_session``: a random token, ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other
  site's page sends it), ``Path=/dashboard``, ``Secure`` behind HTTPS. The server keeps only the
  token's SHA-256, the key's hash and a CSRF token; sessions live in this process (a restart logs
  everyone out) and expire after ``SESSION_SECONDS`` or as soon as the key behind them is revoked.
- **CSRF.** Every mutating request of a cookie session must carry the session's CSRF token (hidden
  form field ``csrf`` or header ``X-CSRF-Token``) and, when the browser sends one, an ``Origin`` equal
  to the dashboard's own. SameSite=Strict already stops cross-site posts in current browsers; the token
  is the check that does not depend on the browser.
- **Header.** ``Authorization: Bearer <admin key>`` works on every dashboard URL without a session
  (scripts, curl); a browser never attaches it on its own, so it needs no CSRF token.

**Login throttle.** Wrong keys on the login form or in the header are limited per client address, together
(`LoginThrottle`): a burst of ``LOGIN_BURST`` attempts, then one every ``60 / LOGIN_PER_MINUTE`` s; over it the form
(or the page asked for with the header) answers 429 with ``Retry-After`` without checking the key. A right key gives
its attempt back. The address is the connection's (uvicorn takes ``X-Forwarded-For`` only from
``FORWARDED_ALLOW_IPS``, the local host by default). At most ``MAX_CLIENTS`` addresses are tracked: past that, the
ones whose allowance has refilled are forgotten first, then the least recently seen.

A **flash** is a message for the next page of one session, held here, read once: a key created from the form
answers with a redirect (POST-redirect-GET, so reloading the page does not post the form again) and its
plaintext waits server-side for the keys page to show it once, never in a URL. It expires after
``FLASH_SECONDS`` if that page is not loaded, and with its session.

With ``auth: false`` in the settings (local development only) the dashboard opens without a key but
still issues a session, so the CSRF check is the same.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import Response

from kassa import errors
from kassa.api.common import bearer
from kassa.app import Kassa
from kassa.db import api_keys_table
from kassa.keys import hash_key

COOKIE = "kassa_session"
SESSION_SECONDS = 8 * 3600.0
MAX_SESSIONS = 1000  # oldest dropped first: a flood of logins cannot grow the map without bound
LOGIN_BURST = 10  # wrong keys a client may try at once on the login form
LOGIN_PER_MINUTE = 10.0  # then this many a minute
MAX_CLIENTS = 10_000  # addresses the login throttle tracks (~100 bytes each)
FLASH_SECONDS = 300.0  # an unclaimed flash (a new key's plaintext) is dropped after this long


@dataclass(frozen=True, slots=True)
class Session:
    key_hash: str | None  # None: a header-authenticated request or auth disabled
    csrf: str
    expires_at: float
    via_header: bool = False


class LoginRequired(Exception):
    """No valid session or admin key: the page handler answers with the login form (or 401)."""


class LoginThrottle:
    """A token bucket per client address for login attempts: ``burst`` at once, ``per_minute`` after that."""

    def __init__(self, burst: int = LOGIN_BURST, per_minute: float = LOGIN_PER_MINUTE,
                 max_clients: int = MAX_CLIENTS, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = float(burst)
        self.rate = per_minute / 60.0
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: collections.OrderedDict[str, list[float]] = collections.OrderedDict()  # [tokens, at]
        self._lock = threading.Lock()

    def attempt(self, client: str) -> int:
        """0 when ``client`` may try a key now (an attempt is taken), else whole seconds until it may."""
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None:
                if len(self._buckets) >= self.max_clients:
                    self._forget(now)
                bucket = self._buckets[client] = [self.burst, now]
            self._buckets.move_to_end(client)
            tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
            if tokens >= 1.0:
                bucket[0] = tokens - 1.0
                return 0
            bucket[0] = tokens
            return max(1, math.ceil((1.0 - tokens) / self.rate))

    def succeeded(self, client: str) -> None:
        """Give back the attempt of a login that worked: only wrong keys count."""
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is not None:
                bucket[0] = min(self.burst, bucket[0] + 1.0)

    def _forget(self, now: float) -> None:
        full = [c for c, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for c in full:
            del self._buckets[c]
        while len(self._buckets) >= self.max_clients:
            self._buckets.popitem(last=False)  # least recently seen


class SessionStore:
    def __init__(self, kassa: Kassa) -> None:
        self.kassa = kassa
        self.throttle = LoginThrottle()
        self._sessions: dict[str, Session] = {}  # sha256(token) -> session
        self._flashes: dict[str, tuple[float, Any]] = {}  # session's csrf token -> (expires at, message)
        self._lock = threading.Lock()

    def _admin_hash(self, key: str) -> str | None:
        info = self.kassa.keys.lookup(key)
        return hash_key(key) if info is not None and info.allows("admin") else None

    def login(self, key: str, now: float | None = None) -> tuple[str, Session] | None:
        """A new session for a valid admin key: (cookie token, session); None for any other key."""
        now = time.time() if now is None else now
        key_hash = self._admin_hash(key) if self.kassa.settings.auth else None
        if self.kassa.settings.auth and key_hash is None:
            return None
        token = secrets.token_urlsafe(32)
        session = Session(key_hash, secrets.token_urlsafe(32), now + SESSION_SECONDS)
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions, key=lambda k: self._sessions[k].expires_at)
                self._flashes.pop(self._sessions.pop(oldest).csrf, None)
            self._sessions[_digest(token)] = session
        return token, session

    def logout(self, request: Request) -> None:
        token = request.cookies.get(COOKIE)
        if token:
            with self._lock:
                session = self._sessions.pop(_digest(token), None)
                if session is not None:
                    self._flashes.pop(session.csrf, None)

    def flash(self, session: Session, message: Any, now: float | None = None) -> bool:
        """Hold ``message`` for this session's next `take_flash` (replacing an unread one); False for a header
        request, which has no session to hold it."""
        if session.via_header:
            return False
        now = time.time() if now is None else now
        with self._lock:
            for k in [k for k, (expires_at, _) in self._flashes.items() if expires_at <= now]:
                del self._flashes[k]
            self._flashes.pop(session.csrf, None)
            self._flashes[session.csrf] = (now + FLASH_SECONDS, message)
            while len(self._flashes) > MAX_SESSIONS:  # one per session at most; never more than sessions
                del self._flashes[next(iter(self._flashes))]
        return True

    def take_flash(self, session: Session, now: float | None = None) -> Any:
        """This session's flash, once (None when there is none or it expired)."""
        now = time.time() if now is None else now
        with self._lock:
            held = self._flashes.pop(session.csrf, None) if session.csrf else None
        return held[1] if held is not None and held[0] > now else None

    def _key_active(self, key_hash: str) -> bool:
        """True while the key behind a session is not revoked (one indexed SQLite read per page)."""
        t = api_keys_table
        with self.kassa.db.connect() as conn:
            row = conn.execute(sa.select(t.c.revoked_at, t.c.kind).where(t.c.key_hash == key_hash)).first()
        return row is not None and row.revoked_at is None and row.kind == "admin"

    def current(self, request: Request, now: float | None = None) -> Session:
        """The request's session (cookie) or header key; raises `LoginRequired` without either."""
        now = time.time() if now is None else now
        header = request.headers.get("authorization")
        if header:
            token = bearer(header)
            if token is None:
                raise errors.Unauthorized("send `Authorization: Bearer <admin key>`", "Authorization")
            client = request.client.host if request.client else ""
            wait = self.throttle.attempt(client)  # the login form's limit: the header must not bypass it
            if wait:
                raise errors.TooManyRequests(f"too many wrong keys from {client}: try again in {wait} s",
                                             "Authorization", {"Retry-After": str(wait)})
            key_hash = self._admin_hash(token)
            if key_hash is None:
                raise errors.Unauthorized("unknown, revoked or non-admin key", "Authorization")
            self.throttle.succeeded(client)
            return Session(key_hash, "", now + SESSION_SECONDS, via_header=True)
        token = request.cookies.get(COOKIE)
        if token:
            digest = _digest(token)
            with self._lock:
                session = self._sessions.get(digest)
                if session is not None and (session.expires_at <= now or (
                        session.key_hash is not None and not self._key_active(session.key_hash))):
                    del self._sessions[digest]
                    self._flashes.pop(session.csrf, None)
                    session = None
            if session is not None:
                return session
        if not self.kassa.settings.auth:
            made = self.login("", now)
            assert made is not None
            request.state.new_session_token = made[0]
            return made[1]
        raise LoginRequired

    def check_csrf(self, request: Request, session: Session, form_token: str | None) -> None:
        """Refuse a mutating cookie-session request without the session's CSRF token or from another origin."""
        if session.via_header:
            return
        origin = request.headers.get("origin")
        if origin is not None and origin != own_origin(request):
            raise errors.Forbidden(f"cross-origin request from {origin!r} refused", "Origin")
        sent = form_token or request.headers.get("x-csrf-token") or ""
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise errors.Forbidden("missing or wrong CSRF token; reload the page and try again", "csrf")


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"


def set_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(COOKIE, token, max_age=int(SESSION_SECONDS), path="/dashboard", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


def clear_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="strict")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
