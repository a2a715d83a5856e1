"""The embedded online store: entity rows in process memory, snapshotted to a local file.

A row is keyed by ``(entity, key)`` and holds ``{view: {feature: value}}`` plus each view's event time,
so a decision reads every view of the buyer with one dict lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

import msgspec

Row = dict[str, dict[str, Any]]


class OnlineStore(Protocol):
    async def get(self, entity: str, key: str) -> Row | None: ...
    def put(self, entity: str, key: str, view: str, values: dict[str, Any], ts: float | None = None) -> None: ...
    def snapshot(self, path: Path) -> int: ...
    def restore(self, path: Path) -> int: ...


class InMemoryOnlineStore:
    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], Row] = {}
        self._ts: dict[tuple[str, str], dict[str, float]] = {}

    async def get(self, entity: str, key: str) -> Row | None:
        return self._rows.get((entity, key))

    def get_now(self, entity: str, key: str) -> Row | None:
        return self._rows.get((entity, key))

    def put(self, entity: str, key: str, view: str, values: dict[str, Any], ts: float | None = None) -> None:
        k = (entity, key)
        row = self._rows.get(k)
        if row is None:
            row = self._rows[k] = {}
            self._ts[k] = {}
        row[view] = values
        self._ts[k][view] = ts if ts is not None else time.time()

    def event_time(self, entity: str, key: str, view: str) -> float | None:
        return self._ts.get((entity, key), {}).get(view)

    def __len__(self) -> int:
        return len(self._rows)

    def snapshot(self, path: Path) -> int:
        """Write every row to ``path`` atomically (write a temp file, then rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = [[e, k, row, self._ts[(e, k)]] for (e, k), row in self._rows.items()]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(msgspec.msgpack.encode(payload))
        os.replace(tmp, path)
        return len(payload)

    def restore(self, path: Path) -> int:
        if not path.exists():
            return 0
        payload = msgspec.msgpack.decode(path.read_bytes())
        for entity, key, row, ts in payload:
            self._rows[(entity, key)] = row
            self._ts[(entity, key)] = ts
        return len(payload)
