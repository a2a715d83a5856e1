"""API keys: publishable (browser: decisions and events, bound to origins), secret (servers: feature
pushes, webhooks) and admin (catalog, placements, models). Only SHA-256 hashes are stored.

Changes reach running processes through the change feed: `create`, `add` and `revoke` bump the ``api_keys``
change counter in the same transaction (`kassa.db.bump`), and every process reloads its in-memory map when it
moved (`kassa.changes.ChangeFeed`: LISTEN/NOTIFY on PostgreSQL, a polled counter on SQLite). A key created or
revoked with ``kassa keys`` therefore works, or stops working, in every process within a second.

A revoked key stays revoked. A bootstrap key from the settings (``KASSA_ADMIN_KEY`` ...) that was revoked
is not brought back at start: it is refused, with a warning naming the setting (see docs/security.md).

Each key has its own token bucket (`RateLimiter`): ``server.rate_limits`` gives requests per second by key
kind, with a burst of twice that; a request over it is refused with 429 and ``Retry-After``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Engine, insert, select, update

from kassa.db import KEYS, api_keys_table, bump

log = logging.getLogger("kassa.keys")

KeyKind = Literal["publishable", "secret", "admin"]
_RANK = {"publishable": 0, "secret": 1, "admin": 2}
_PREFIX = {"publishable": "kp_", "secret": "ks_", "admin": "ka_"}
ID_LENGTH = 12  # the hash prefix `kassa keys list` prints and `kassa keys revoke` takes
_HEX = re.compile(r"^[0-9a-f]{8,64}$")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    kind: KeyKind
    name: str
    origins: tuple[str, ...]
    digest: str = ""

    def allows(self, needed: KeyKind) -> bool:
        return _RANK[self.kind] >= _RANK[needed]


# What a browser sends as `Origin`: scheme://host[:port], lower case, no path and no trailing slash.
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s?#@]+$")


class InvalidOrigin(ValueError):
    """An origin a browser's ``Origin`` header can never equal."""


def browser_origins(origins: list[str]) -> list[str]:
    """``origins`` as browsers send them (``HTTPS://Shop.example.com/`` -> ``https://shop.example.com``);
    raises `InvalidOrigin` for one that names no scheme and host. ``shop.example.com`` (no scheme) or a path
    used to be stored as given, and the key then refused every request from the store (403)."""
    out = []
    for raw in origins:
        origin = raw.strip().lower()
        origin = origin[:-1] if origin.endswith("/") else origin
        if not _ORIGIN.match(origin):
            raise InvalidOrigin(f"origin {raw!r} is not scheme://host[:port] as browsers send it "
                                "(e.g. https://shop.example.com)")
        out.append(origin)
    return out


class AmbiguousKeyId(ValueError):
    """A hash prefix that matches more than one key."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Keys in the SQL database, with an in-memory map of hash -> KeyInfo for the request path."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cache: dict[str, KeyInfo] = {}
        self.limiter: RateLimiter | None = None  # set by the server; the CLI needs none
        self.reload()

    def reload(self) -> None:
        with self.engine.connect() as conn:
            rows = conn.execute(select(api_keys_table).where(api_keys_table.c.revoked_at.is_(None)))
            self._cache = {
                r.key_hash: KeyInfo(r.kind, r.name, tuple(json.loads(r.origins)), r.key_hash) for r in rows
            }

    def add(self, key: str, kind: KeyKind, name: str, origins: list[str] | None = None,
            setting: str | None = None) -> bool:
        """Store ``key`` unless it is there already; False when it is there and revoked (it stays so).

        ``setting`` names where a bootstrap key came from, for the warning when it was revoked.
        """
        digest = hash_key(key)
        if digest in self._cache:
            return True
        with self.engine.begin() as conn:
            row = conn.execute(
                select(api_keys_table.c.revoked_at).where(api_keys_table.c.key_hash == digest)
            ).first()
            if row is not None:
                revoked_at = row[0]
                if revoked_at is not None:
                    where = setting or "the key"
                    log.warning("%s holds a key revoked on %s (id %s): it is refused. Remove it from the "
                                "settings; create a new one with `kassa keys create %s`.", where,
                                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(revoked_at)),
                                digest[:ID_LENGTH], kind)
                    return False
                return True
            conn.execute(insert(api_keys_table).values(
                key_hash=digest, kind=kind, name=name, origins=json.dumps(origins or []),
                created_at=time.time(), revoked_at=None))
            bump(conn, KEYS)
        self.reload()
        return True

    def create(self, kind: KeyKind, name: str, origins: list[str] | None = None) -> str:
        """Make a new random key; the plaintext is returned once and never stored. Raises `InvalidOrigin`."""
        origins = browser_origins(origins or [])
        key = _PREFIX[kind] + secrets.token_urlsafe(24)
        self.add(key, kind, name, origins)
        return key

    def resolve(self, key_or_id: str) -> str | None:
        """The stored hash for a key, its full hash, or the id (hash prefix) `list` prints; None if unknown.

        Raises `AmbiguousKeyId` when a prefix matches several keys.
        """
        if _HEX.match(key_or_id):
            with self.engine.connect() as conn:
                matches = [r[0] for r in conn.execute(
                    select(api_keys_table.c.key_hash).where(api_keys_table.c.key_hash.startswith(key_or_id)))]
            if len(matches) > 1:
                raise AmbiguousKeyId(f"{key_or_id!r} matches {len(matches)} keys; give more of the id")
            if matches:
                return matches[0]
        digest = hash_key(key_or_id)
        with self.engine.connect() as conn:
            found = conn.execute(select(api_keys_table.c.key_hash).where(api_keys_table.c.key_hash == digest)).first()
        return digest if found else None

    def revoke(self, key_or_id: str) -> bool:
        """Revoke a key given as itself, its hash, or its id from `list`; False when there is no such key."""
        digest = self.resolve(key_or_id)
        if digest is None:
            return False
        with self.engine.begin() as conn:
            n = conn.execute(update(api_keys_table).where(api_keys_table.c.key_hash == digest)
                             .where(api_keys_table.c.revoked_at.is_(None))
                             .values(revoked_at=time.time())).rowcount
            bump(conn, KEYS)
        self.reload()
        return bool(n) or digest not in self._cache

    def list(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [
                {"id": r.key_hash[:ID_LENGTH], "kind": r.kind, "name": r.name, "origins": json.loads(r.origins),
                 "revoked": r.revoked_at is not None}
                for r in conn.execute(select(api_keys_table).order_by(api_keys_table.c.created_at))
            ]

    def lookup(self, key: str) -> KeyInfo | None:
        return self._cache.get(hash_key(key))

    def __len__(self) -> int:
        return len(self._cache)


class RateLimiter:
    """One token bucket per key: ``rates[kind]`` requests per second (0: unlimited), burst ``2 × rate``."""

    def __init__(self, rates: Mapping[str, float], clock: Callable[[], float] = time.monotonic,
                 burst_seconds: float = 2.0) -> None:
        self.rates = dict(rates)
        self.clock = clock
        self.burst_seconds = burst_seconds
        self._buckets: dict[str, list[float]] = {}  # digest -> [tokens, last refill time]

    def retry_after(self, info: KeyInfo) -> int:
        """0 when the request may go ahead (a token is taken), else whole seconds until one is free."""
        rate = self.rates.get(info.kind, 0.0)
        if rate <= 0:
            return 0
        now = self.clock()
        capacity = rate * self.burst_seconds
        bucket = self._buckets.get(info.digest)
        if bucket is None:
            if len(self._buckets) > 100_000:  # keys come from the DB, but stay bounded whatever happens
                self._buckets.clear()
            bucket = self._buckets[info.digest] = [capacity, now]
        tokens = min(capacity, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0
        bucket[0] = tokens
        return max(1, math.ceil((1.0 - tokens) / rate))
