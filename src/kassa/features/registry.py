"""The feature registry: which entity and view definitions are applied, kept in the metadata database.

`FeatureRegistry.plan` compares a repo of definitions with what is stored and says what would change
(views and entities added, changed, removed, unchanged; for a changed view, which fields were added,
removed or retyped). `apply` stores the repo, refusing a destructive change — removing a view, retyping
a field, moving a view to another entity — unless it is explicitly allowed: those orphan values already
in the online and offline stores. `load` gives back the applied repo, as the server and CLI use it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import msgspec
from msgspec import Struct, field
from sqlalchemy import Engine, Table, delete, insert, select, update

from kassa.db import FEATURES, bump, feature_entities_table, feature_views_table
from kassa.features.definitions import Entity, FeatureRepo, FeatureView, validate
from kassa.features.streaming.aggregator import DEFAULT_RESOLUTION
from kassa.features.streaming.plan import plan_view

_encode = msgspec.json.Encoder()


class Retype(Struct, frozen=True):
    field: str
    old: str
    new: str


class ViewChange(Struct):
    """What changed in one view; ``settings`` lists changed non-field attributes (ttl, source, ...)."""

    name: str
    added_fields: list[str] = field(default_factory=list)
    removed_fields: list[str] = field(default_factory=list)
    retyped_fields: list[Retype] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)
    entity: tuple[str, str] | None = None  # (old, new) when the view moved to another entity

    def describe(self) -> str:
        parts: list[str] = []
        if self.added_fields:
            parts.append("+" + ", +".join(self.added_fields))
        if self.removed_fields:
            parts.append("-" + ", -".join(self.removed_fields))
        parts += [f"{r.field}: {r.old} -> {r.new}" for r in self.retyped_fields]
        if self.entity is not None:
            parts.append(f"entity {self.entity[0]} -> {self.entity[1]}")
        if self.settings:
            parts.append("changed " + ", ".join(self.settings))
        return "; ".join(parts)


class Diff(Struct):
    added_entities: list[str] = field(default_factory=list)
    changed_entities: list[str] = field(default_factory=list)
    removed_entities: list[str] = field(default_factory=list)
    unchanged_entities: list[str] = field(default_factory=list)
    added_views: list[str] = field(default_factory=list)
    changed_views: list[ViewChange] = field(default_factory=list)
    removed_views: list[str] = field(default_factory=list)
    unchanged_views: list[str] = field(default_factory=list)

    @property
    def has_changes(self) -> bool:
        return bool(self.added_entities or self.changed_entities or self.removed_entities
                    or self.added_views or self.changed_views or self.removed_views)

    @property
    def destructive(self) -> list[str]:
        """Why applying would orphan stored values (empty when it would not)."""
        reasons = [f"view {name!r} would be removed" for name in self.removed_views]
        for change in self.changed_views:
            reasons += [f"view {change.name!r} field {r.field!r} would change type {r.old} -> {r.new}"
                        for r in change.retyped_fields]
            if change.entity is not None:
                reasons.append(f"view {change.name!r} would move from entity {change.entity[0]!r} "
                               f"to {change.entity[1]!r}")
        return reasons

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(kind, name, change, detail) rows for a table, changes first."""
        out: list[tuple[str, str, str, str]] = []
        out += [("entity", n, "add", "") for n in self.added_entities]
        out += [("entity", n, "change", "") for n in self.changed_entities]
        out += [("entity", n, "remove", "") for n in self.removed_entities]
        out += [("view", n, "add", "") for n in self.added_views]
        out += [("view", c.name, "change", c.describe()) for c in self.changed_views]
        out += [("view", n, "remove", "destructive") for n in self.removed_views]
        out += [("entity", n, "unchanged", "") for n in self.unchanged_entities]
        out += [("view", n, "unchanged", "") for n in self.unchanged_views]
        return out


class DestructiveChangeError(ValueError):
    """Applying would remove a view, retype a field or move a view to another entity; pass
    ``allow_destructive=True`` to do it anyway."""


def _entity_hash(entity: Entity) -> str:
    # Values are keyed by the join key's value, so that is the entity's "schema".
    return hashlib.sha256(_encode.encode([entity.name, entity.join_key])).hexdigest()[:12]


def _view_change(old: FeatureView, new: FeatureView) -> ViewChange | None:
    if old == new:
        return None
    change = ViewChange(new.name)
    old_fields = {f.name: f for f in old.fields}
    new_fields = {f.name: f for f in new.fields}
    change.added_fields = [n for n in new_fields if n not in old_fields]
    change.removed_fields = [n for n in old_fields if n not in new_fields]
    common = [n for n in new_fields if n in old_fields]
    change.retyped_fields = [Retype(n, old_fields[n].dtype, new_fields[n].dtype) for n in common
                             if old_fields[n].dtype != new_fields[n].dtype]
    if old.entity != new.entity:
        change.entity = (old.entity, new.entity)
    old_body, new_body = msgspec.to_builtins(old), msgspec.to_builtins(new)
    change.settings = sorted(k for k in old_body.keys() | new_body.keys()
                             if k not in ("name", "entity", "fields") and old_body.get(k) != new_body.get(k))
    if any(msgspec.structs.replace(old_fields[n], dtype=new_fields[n].dtype) != new_fields[n] for n in common):
        change.settings.append("field settings")  # defaults, windows, descriptions, ...
    if [n for n in old_fields if n in new_fields] != common:
        change.settings.append("field order")
    return change


class FeatureRegistry:
    """Applied feature definitions in the metadata database (SQLite embedded, PostgreSQL in production)."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock

    def load(self) -> FeatureRepo:
        """The applied definitions (empty repo when nothing was applied)."""
        with self.engine.connect() as conn:
            entities = [msgspec.json.decode(r.body, type=Entity) for r in conn.execute(
                select(feature_entities_table.c.body).order_by(feature_entities_table.c.name))]
            views = [msgspec.json.decode(r.body, type=FeatureView) for r in conn.execute(
                select(feature_views_table.c.body).order_by(feature_views_table.c.name))]
        return FeatureRepo(entities=entities, views=views)

    def plan(self, repo: FeatureRepo) -> Diff:
        """What applying ``repo`` would change; validates it first (`DefinitionError`), stream views as the
        stream processor will plan them: an unknown event path or type passed here and then stopped
        `kassa serve` at start with a traceback."""
        validate(repo)
        for i, view in enumerate(v for v in repo.views if v.kind == "stream"):
            plan_view(i, view, DEFAULT_RESOLUTION)
        return self._diff(self.load(), repo)

    @staticmethod
    def _diff(old: FeatureRepo, new: FeatureRepo) -> Diff:
        diff = Diff()
        old_entities = {e.name: e for e in old.entities}
        new_entities = {e.name: e for e in new.entities}
        for name, entity in new_entities.items():
            if name not in old_entities:
                diff.added_entities.append(name)
            elif old_entities[name] != entity:
                diff.changed_entities.append(name)
            else:
                diff.unchanged_entities.append(name)
        diff.removed_entities = [n for n in old_entities if n not in new_entities]
        old_views = {v.name: v for v in old.views}
        for view in new.views:
            before = old_views.get(view.name)
            if before is None:
                diff.added_views.append(view.name)
            elif (change := _view_change(before, view)) is not None:
                diff.changed_views.append(change)
            else:
                diff.unchanged_views.append(view.name)
        new_view_names = {v.name for v in new.views}
        diff.removed_views = [n for n in old_views if n not in new_view_names]
        return diff

    def apply(self, repo: FeatureRepo, allow_destructive: bool = False) -> Diff:
        """Store ``repo`` as the applied definitions (one transaction) and return what changed.

        Raises `DestructiveChangeError` naming every destructive change unless ``allow_destructive``.
        """
        diff = self.plan(repo)
        reasons = diff.destructive
        if reasons and not allow_destructive:
            raise DestructiveChangeError(
                "refusing a destructive change (values already stored would be orphaned): "
                + "; ".join(reasons) + ". Re-run with allow_destructive (--allow-destructive) to apply it.")
        if not diff.has_changes:
            return diff
        now = self.clock()
        entities = {e.name: e for e in repo.entities}
        views = {v.name: v for v in repo.views}
        changed_views = [c.name for c in diff.changed_views]
        with self.engine.begin() as conn:
            def put(table: Table, added: list[str], changed: list[str], removed: list[str],
                    body: Callable[[str], tuple[str, str]]) -> None:
                for name in added:
                    text, digest = body(name)
                    conn.execute(insert(table).values(name=name, body=text, schema_hash=digest, applied_at=now))
                for name in changed:
                    text, digest = body(name)
                    conn.execute(update(table).where(table.c.name == name)
                                 .values(body=text, schema_hash=digest, applied_at=now))
                if removed:
                    conn.execute(delete(table).where(table.c.name.in_(removed)))

            put(feature_entities_table, diff.added_entities, diff.changed_entities, diff.removed_entities,
                lambda n: (_encode.encode(entities[n]).decode(), _entity_hash(entities[n])))
            put(feature_views_table, diff.added_views, changed_views, diff.removed_views,
                lambda n: (_encode.encode(views[n]).decode(), views[n].schema_hash()))
            bump(conn, FEATURES)  # every process reloads the applied definitions (kassa.changes)
        return diff
