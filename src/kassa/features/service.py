"""`FeatureService`: the feature views a process serves, and the injection path for proprietary signals.

Writes are validated against the view's fields before anything is stored: an unknown field, a wrong
type, an oversized value, an entity key over 128 characters or a timestamp outside the window around
now (which the offline store's Parquet cannot hold) is refused with the field named, and nothing of
that request is written, online or offline.
Accepted rows go to the online store and, when the view keeps an offline history, to the offline store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kassa import errors, schemas
from kassa.features.definitions import FeatureRepo, FeatureView, check_value
from kassa.features.online.base import OnlineStore, ViewValues, WriteItem

INJECTABLE = ("push", "batch")
MAX_KEY = 128  # the body's `Id` limit, also for keys in the path


class FeatureService:
    def __init__(self, repo: FeatureRepo, store: OnlineStore, offline: Any | None = None,
                 clock: Callable[[], float] = time.time, timestamp_window: float = 7 * 86_400.0) -> None:
        self.repo = repo
        self.timestamp_window = timestamp_window
        self.store = store
        self.offline = offline
        self.clock = clock
        self.views = {v.name: v for v in repo.views}

    def injectable_view(self, name: str) -> FeatureView:
        view = self.views.get(name)
        if view is None:
            raise errors.NotFound(f"unknown feature view {name!r}", "view")
        if view.kind not in INJECTABLE:
            raise errors.Invalid(f"view {name!r} is a {view.kind} view; only push and batch views take writes",
                                 "view")
        return view

    def validate(self, view: FeatureView, values: dict[str, Any], where: str = "values") -> dict[str, Any]:
        """The values normalised to the view's dtypes; raises `Invalid` naming the first bad field."""
        out: dict[str, Any] = {}
        for name, value in values.items():
            f = view.field(name)
            if f is None:
                raise errors.Invalid(f"view {view.name!r} has no field {name!r}", f"{where}.{name}")
            try:
                out[name] = check_value(f, value)
            except ValueError as exc:
                raise errors.Invalid(f"{view.name}.{name}: {exc}", f"{where}.{name}") from None
        if not out:
            raise errors.Invalid("no values given", where)
        return out

    async def get(self, view_name: str, key: str) -> tuple[FeatureView, ViewValues]:
        """A stored view's newest values for one entity key (404 when the view is unknown, computed per
        request, or has no live values for the key: a decision then serves the defaults)."""
        view = self.repo.view(view_name)
        if view is None:
            raise errors.NotFound(f"no feature view {view_name!r}", "view")
        if view.kind == "request":
            raise errors.NotFound(f"view {view_name!r} is computed per request; nothing is stored", "view")
        rows = await self.store.read([(view.entity, key)], [view])
        found = rows[0].get(view.name) if rows and rows[0] else None
        if found is None:
            raise errors.NotFound(f"no values of {view_name!r} for {view.entity} {key!r} (missing or expired: "
                                  "decisions serve the defaults)", "entity_key")
        return view, found

    def timestamp(self, ts: float | None, now: float, where: str) -> float:
        """The write's event time: ``ts`` when within the window around ``now``, else `Invalid`."""
        if ts is None:
            return now
        if not now - self.timestamp_window <= ts <= now + self.timestamp_window:
            raise errors.Invalid(f"timestamp {ts!r} is more than {self.timestamp_window:.0f} s from now; send unix "
                                 "seconds (server.timestamp_window_seconds sets the window)", where)
        return ts

    async def put(self, view_name: str, key: str, body: schemas.FeatureWrite) -> schemas.FeatureAck:
        view = self.injectable_view(view_name)
        if not 1 <= len(key) <= MAX_KEY:
            raise errors.Invalid(f"an entity key is 1 to {MAX_KEY} characters, got {len(key)}", "entity_key")
        values = self.validate(view, body.values)
        ts = self.timestamp(body.timestamp, self.clock(), "timestamp")
        await self.store.write(view, key, values, ts)
        if self.offline is not None and view.offline:
            self.offline.append(view, [WriteItem(key, values, ts)])
        return schemas.FeatureAck(view.name, 1)

    async def push(self, body: schemas.FeaturePush) -> schemas.FeatureAck:
        view = self.injectable_view(body.view)
        now = self.clock()
        items = [
            WriteItem(row.key, self.validate(view, row.values, f"rows[{i}].values"),
                      self.timestamp(row.timestamp, now, f"rows[{i}].timestamp"))
            for i, row in enumerate(body.rows)
        ]
        written = await self.store.write_many(view, items)
        if self.offline is not None and view.offline:
            self.offline.append(view, items)
        return schemas.FeatureAck(view.name, written)
