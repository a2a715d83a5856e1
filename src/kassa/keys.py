"""API keys: publishable (browser: decisions and events, bound to origins), secret (servers: feature
pushes, webhooks) and admin (catalog, placements, models). Only SHA-256 hashes are stored.

A create or revoke bumps the ``api_keys`` change counter in its transaction (`kassa.db.bump`); every other
process reloads its map within a second (kassa.changes.ChangeFeed, wired in app.py)."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Engine, insert, select, update

from kassa.db import KEYS, api_keys_table, bump

KeyKind = Literal["publishable", "secret", "admin"]
_RANK = {"publishable": 0, "secret": 1, "admin": 2}
_PREFIX = {"publishable": "kp_", "secret": "ks_", "admin": "ka_"}


@dataclass(frozen=True, slots=True)
class KeyInfo:
    kind: KeyKind
    name: str
    origins: tuple[str, ...]

    def allows(self, needed: KeyKind) -> bool:
        return _RANK[self.kind] >= _RANK[needed]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Keys in the SQL database, with an in-memory map of hash -> KeyInfo for the request path."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cache: dict[str, KeyInfo] = {}
        self.reload()

    def reload(self) -> None:
        with self.engine.connect() as conn:
            rows = conn.execute(select(api_keys_table).where(api_keys_table.c.revoked_at.is_(None)))
            self._cache = {
                r.key_hash: KeyInfo(r.kind, r.name, tuple(json.loads(r.origins))) for r in rows
            }

    def add(self, key: str, kind: KeyKind, name: str, origins: list[str] | None = None) -> None:
        digest = hash_key(key)
        if digest in self._cache:
            return
        with self.engine.begin() as conn:
            exists = conn.execute(
                select(api_keys_table.c.key_hash).where(api_keys_table.c.key_hash == digest)
            ).first()
            if exists:
                conn.execute(update(api_keys_table).where(api_keys_table.c.key_hash == digest)
                             .values(revoked_at=None, kind=kind))
                bump(conn, KEYS)
            else:
                conn.execute(insert(api_keys_table).values(
                    key_hash=digest, kind=kind, name=name, origins=json.dumps(origins or []),
                    created_at=time.time(), revoked_at=None))
                bump(conn, KEYS)
        self.reload()

    def create(self, kind: KeyKind, name: str, origins: list[str] | None = None) -> str:
        """Make a new random key; the plaintext is returned once and never stored."""
        key = _PREFIX[kind] + secrets.token_urlsafe(24)
        self.add(key, kind, name, origins)
        return key

    def revoke(self, key_or_hash: str) -> bool:
        digest = key_or_hash if len(key_or_hash) == 64 and key_or_hash in self._cache else hash_key(key_or_hash)
        with self.engine.begin() as conn:
            n = conn.execute(update(api_keys_table).where(api_keys_table.c.key_hash == digest)
                             .values(revoked_at=time.time())).rowcount
            bump(conn, KEYS)
        self.reload()
        return bool(n)

    def list(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [
                {"hash": r.key_hash[:12], "kind": r.kind, "name": r.name, "origins": json.loads(r.origins),
                 "revoked": r.revoked_at is not None}
                for r in conn.execute(select(api_keys_table).order_by(api_keys_table.c.created_at))
            ]

    def lookup(self, key: str) -> KeyInfo | None:
        return self._cache.get(hash_key(key))
