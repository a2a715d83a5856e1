"""`ModelRegistry`: every model version a placement has had, its artifact, its stage and its history.

A version is an immutable artifact (a Vowpal Wabbit model file, checksummed with SHA-256) plus what it
was made from: the placement it serves, the feature-schema hash it expects, the learner settings, the
training data range and row count, metrics and its parent version. Metadata lives in the SQL database
(SQLite embedded, PostgreSQL in production); artifacts in ``<data_dir>/models/artifacts/<placement>/``, and,
with a shared `ArtifactStore` (kassa.learn.artifacts), also in the metadata database, from which a process
that lacks a file fetches it. Every write that changes what serves bumps the ``models`` change counter
(`kassa.db.bump`) in its transaction, so every process's model sync runs within a second.

Stages move ``candidate`` -> ``shadow`` -> ``canary`` (with a traffic share) -> ``production`` ->
``archived``. Each placement has at most one production, one canary and one shadow version; promoting a
version into an occupied stage moves the occupant on (a replaced production is archived, a replaced
canary or shadow goes back to candidate). Every stage change is recorded with its reason in
``model_stage_events``. Loading verifies the checksum and the schema hash and refuses a version that fails
either, so the caller keeps serving what it had.

Rollback (issue 17) undoes a *release*: the current production together with the chain of snapshots the
online learner auto-published on top of it, back to the version someone put in production (a promotion,
a forced model, an earlier rollback's restore). It restores the last version that served before that
release and does not descend from it, and records the verdict in ``model_verdicts``. A version rolled
back, and everything descended from it, is never auto-published again (``register(..., auto=True)``
keeps it a candidate) until someone promotes it, or a descendant, by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import Engine

from kassa import errors, schemas
from kassa.db import MODELS, bump, metadata
from kassa.features.definitions import FeatureRepo
from kassa.learn.artifacts import ArtifactStore, LocalArtifacts
from kassa.learn.serving.sidecar import UnsupportedModel, export, sha256_file, sidecar_path

log = logging.getLogger("kassa.learn")

Stage = Literal["candidate", "shadow", "canary", "production", "archived"]
STAGES: tuple[Stage, ...] = ("candidate", "shadow", "canary", "production", "archived")
# Which moves are allowed. Anything can be archived; archived versions come back only as candidates
# (rollback is the one path from archived straight to production, and it says so in the history).
_ALLOWED: dict[str, set[str]] = {
    "candidate": {"shadow", "canary", "production", "archived"},
    "shadow": {"candidate", "canary", "production", "archived"},
    "canary": {"candidate", "production", "archived"},
    "production": {"archived"},
    "archived": {"candidate"},
}
_SINGLE = ("production", "canary", "shadow")
# Bumped whenever featurize.py changes how features become learner tokens: older artifacts then no
# longer match and are refused instead of silently scoring garbage.
FEATURIZER_VERSION = "2"  # 2: a product's category in |k, the basket's categories in |b (-q bk)
# (Not bumped for the log compression of numbers past ±100, `featurize.learner_value`: values within it are
# unchanged, and a model that learned from larger ones keeps its other weights and relearns those; refusing
# every stored model over it would put every placement back on its baseline.)

model_versions_table = sa.Table(
    "model_versions",
    metadata,
    sa.Column("version", sa.String(160), primary_key=True),
    sa.Column("placement", sa.String(128), nullable=False, index=True),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("canary_share", sa.Float, nullable=True),
    sa.Column("artifact", sa.Text, nullable=False),  # path relative to the artifacts folder
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.Integer, nullable=False),
    sa.Column("schema_hash", sa.String(64), nullable=False),
    sa.Column("learner_args", sa.Text, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),  # online | batch | import
    sa.Column("parent", sa.String(160), nullable=True),
    sa.Column("train_since", sa.Float, nullable=True),
    sa.Column("train_until", sa.Float, nullable=True),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),  # JSON object
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("stage_changed_at", sa.Float, nullable=False),
    sa.Column("artifact_deleted", sa.Boolean, nullable=False, default=False),
)

model_stage_events_table = sa.Table(
    "model_stage_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("version", sa.String(160), nullable=False, index=True),
    sa.Column("placement", sa.String(128), nullable=False, index=True),
    sa.Column("from_stage", sa.String(16), nullable=True),
    sa.Column("to_stage", sa.String(16), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
)


# The lineage verdicts: "rolled_back" taints a version and its descendants for auto-publishing; a later
# "promoted" (a production promotion by hand, or a rollback's restore) on a version clears it from there down.
model_verdicts_table = sa.Table(
    "model_verdicts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("version", sa.String(160), nullable=False, index=True),
    sa.Column("placement", sa.String(128), nullable=False, index=True),
    sa.Column("verdict", sa.String(16), nullable=False),  # rolled_back | promoted
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
)
# The fencing token of `kassa learn`'s leases (ADR 0009, addendum of 2026-12-07 evening): the epoch a learner took
# when it took a placement over. A snapshot registered with a lower one is refused in the registering transaction,
# so a learner paused past its lease between its lease check and its write never publishes over its successor.
learner_fences_table = sa.Table(
    "learner_fences",
    metadata,
    sa.Column("placement", sa.String(128), primary_key=True),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("taken_at", sa.Float, nullable=False),
)
LEARNER = "learner"  # the actor of the online learner's own registrations and auto-publishes


class ArtifactError(errors.KassaError):
    status, title, slug = 409, "Model artifact refused", "artifact-refused"


class StaleFence(errors.KassaError):
    """A registration carried a lease epoch lower than the placement's newest: another learner took it over."""

    status, title, slug = 409, "Lease taken over", "stale-fence"

    def __init__(self, placement: str, detail: str) -> None:
        super().__init__(detail, "fence")
        self.placement = placement


class StageError(errors.KassaError):
    status, title, slug = 409, "Stage change refused", "stage-refused"


class InvalidShare(StageError):
    """A canary's traffic share out of (0, 1), missing, or given for another stage: an invalid field (422, as the
    README lists), not a refused stage change."""

    status, title, slug = errors.Invalid.status, errors.Invalid.title, errors.Invalid.slug


def check_share(stage: str, share: float | None) -> None:
    """Refuse a traffic share that does not fit ``stage`` (`InvalidShare`)."""
    if stage == "canary":
        if share is None or not 0.0 < share < 1.0:
            raise InvalidShare("a canary needs a traffic share between 0 and 1 (exclusive)", "share")
    elif share is not None:
        raise InvalidShare("only a canary takes a traffic share", "share")


@dataclass(frozen=True, slots=True)
class ModelVersion:
    version: str
    placement: str
    seq: int
    stage: Stage
    canary_share: float | None
    artifact: str
    sha256: str
    size_bytes: int
    schema_hash: str
    learner_args: str
    source: str
    parent: str | None
    train_since: float | None
    train_until: float | None
    rows: int
    metrics: dict[str, Any]
    created_at: float
    stage_changed_at: float
    artifact_deleted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "placement": self.placement, "stage": self.stage,
            "canary_share": self.canary_share, "sha256": self.sha256, "size_bytes": self.size_bytes,
            "schema_hash": self.schema_hash, "learner_args": self.learner_args, "source": self.source,
            "parent": self.parent, "train_since": self.train_since, "train_until": self.train_until,
            "rows": self.rows, "metrics": self.metrics, "created_at": self.created_at,
            "stage_changed_at": self.stage_changed_at, "artifact_deleted": self.artifact_deleted,
        }


@dataclass(frozen=True, slots=True)
class StageEvent:
    version: str
    placement: str
    from_stage: str | None
    to_stage: str
    at: float
    reason: str
    actor: str

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "from": self.from_stage, "to": self.to_stage, "at": self.at,
                "reason": self.reason, "actor": self.actor}


@dataclass(slots=True)
class Serving:
    """The versions a placement serves: production, an optional canary with its share, an optional shadow."""

    production: ModelVersion | None = None
    canary: ModelVersion | None = None
    shadow: ModelVersion | None = None
    key: tuple = field(default=())  # changes whenever any of the above (or the canary share) changes


def placement_views(placement: schemas.Placement, repo: FeatureRepo | None) -> list[Any]:
    """The feature views whose values reach a placement's learner."""
    if repo is None:
        return []
    return repo.buyer_views(placement.features) + repo.offer_views()


def feature_schema_hash(placement: schemas.Placement, repo: FeatureRepo | None) -> str:
    """What a model for ``placement`` expects of its inputs: the featurizer, the learner's namespaces and
    interactions, and the schema of every feature view it reads. Learning rate and exploration are not
    part of it: a model trained with other settings still reads the same features."""
    body = {
        "featurizer": FEATURIZER_VERSION,
        "namespaces": "c,o,f,g,b,k;-q co -q bk --ignore_linear b;-b 20",
        "views": sorted((v.name, v.schema_hash()) for v in placement_views(placement, repo)),
    }
    if placement.context_features is not None:  # absent when unset: the hashes of existing models stand
        body["context_features"] = sorted(placement.context_features)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_move(mv: ModelVersion, stage: str) -> None:
    """Refuse (`StageError`) a stage change the lifecycle does not allow: to the stage it is in (a canary may
    change its share), or out of a stage that does not lead there."""
    if mv.stage == stage and stage != "canary":
        raise StageError(f"{mv.version} is already {stage}", "stage")
    if stage not in _ALLOWED[mv.stage] and not (mv.stage == stage == "canary"):
        raise StageError(f"{mv.version} is {mv.stage}; it cannot move to {stage} "
                         f"(allowed: {', '.join(sorted(_ALLOWED[mv.stage])) or 'none'})", "stage")


class ModelRegistry:
    def __init__(self, engine: Engine, models_dir: Path, clock: Any = time.time,
                 store: ArtifactStore | None = None) -> None:
        # The tables come from the migrations (kassa.db.make_engine), like every other metadata table.
        self.engine = engine
        self.artifacts = Path(models_dir) / "artifacts"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.store: ArtifactStore = store or LocalArtifacts()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ reads
    def get(self, version: str) -> ModelVersion:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(model_versions_table).where(
                model_versions_table.c.version == version)).first()
        if row is None:
            raise errors.NotFound(f"unknown model version {version!r}", "version")
        return _row(row)

    def versions(self, placement: str | None = None, stages: Iterable[str] | None = None,
             limit: int | None = None) -> list[ModelVersion]:
        t = model_versions_table
        stmt = sa.select(t).order_by(t.c.placement, t.c.seq.desc())
        if placement is not None:
            stmt = stmt.where(t.c.placement == placement)
        if stages is not None:
            stmt = stmt.where(t.c.stage.in_(list(stages)))
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(stmt)]

    def serving(self) -> dict[str, Serving]:
        """Production, canary and shadow of every placement, in one query (the watcher's poll)."""
        out: dict[str, Serving] = {}
        for mv in self.versions(stages=_SINGLE):
            s = out.setdefault(mv.placement, Serving())
            setattr(s, mv.stage, mv)
        for s in out.values():
            s.key = tuple((m.version, m.canary_share) if m else None for m in (s.production, s.canary, s.shadow))
        return out

    def history(self, placement: str | None = None, version: str | None = None,
                limit: int = 50) -> list[StageEvent]:
        t = model_stage_events_table
        stmt = sa.select(t).order_by(t.c.id.desc()).limit(limit)
        if placement is not None:
            stmt = stmt.where(t.c.placement == placement)
        if version is not None:
            stmt = stmt.where(t.c.version == version)
        with self.engine.connect() as conn:
            return [StageEvent(r.version, r.placement, r.from_stage, r.to_stage, r.at, r.reason, r.actor)
                    for r in conn.execute(stmt)]

    def path(self, mv: ModelVersion) -> Path:
        """The artifact's local path; a version another process registered is fetched from the shared
        store first (with its serving sidecar), once."""
        path = self.artifacts / mv.artifact
        if not path.exists() and not mv.artifact_deleted and self.store.shared:
            sidecar = sidecar_path(path)
            self.store.fetch(str(sidecar.relative_to(self.artifacts)), sidecar)
            self.store.fetch(mv.artifact, path)  # last: the artifact's presence means the pair is complete
        return path

    # ------------------------------------------------------------------ writes
    def register(
        self,
        placement: str,
        artifact: Path,
        *,
        schema_hash: str,
        learner_args: str,
        source: str,
        stage: Stage = "candidate",
        parent: str | None = None,
        train_since: float | None = None,
        train_until: float | None = None,
        rows: int = 0,
        metrics: dict[str, Any] | None = None,
        reason: str = "registered",
        actor: str = "kassa",
        link: bool = False,
        auto: bool = False,
        fence: int | None = None,
    ) -> ModelVersion:
        """Store ``artifact`` as a new version of ``placement`` (copied, or hard-linked when ``link``;
        the source file is left alone) and put it in ``stage``. With ``auto`` (the learner's auto-publish)
        a version that descends from a rolled-back one stays a candidate instead; the check and the
        registration are one transaction, so a rollback committed a moment earlier is always seen. With ``fence``
        (the lease epoch `take_fence` gave this learner) the registration is refused with `StaleFence`, in that
        same transaction, unless it is still the placement's newest epoch."""
        folder = self.artifacts / placement
        folder.mkdir(parents=True, exist_ok=True)
        # Two writers may pick the same next number (the learner's thread and an API call here, or
        # `kassa train` in another process): the primary key refuses the second, which then retries.
        for attempt in range(5):
            try:
                with self._lock:
                    return self._register(placement, artifact, schema_hash, learner_args, source, stage, parent,
                                          train_since, train_until, rows, metrics, reason, actor, link, auto, fence)
            except sa.exc.IntegrityError:
                if attempt == 4:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _register(self, placement: str, artifact: Path, schema_hash: str, learner_args: str, source: str,
                  stage: Stage, parent: str | None, train_since: float | None, train_until: float | None,
                  rows: int, metrics: dict[str, Any] | None, reason: str, actor: str, link: bool,
                  auto: bool = False, fence: int | None = None) -> ModelVersion:
        now = self.clock()
        # The file gets a name no other writer can pick, so a writer that loses the race for the version
        # number can never have replaced the winner's artifact; it deletes its own file and retries.
        token = secrets.token_hex(4)
        dest: Path | None = None
        try:
            with self.engine.begin() as conn:
                if fence is not None:
                    self._check_fence(conn, placement, fence)
                t = model_versions_table
                seq = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(t.c.seq), 0)).where(
                    t.c.placement == placement)).scalar_one()) + 1
                version = f"{placement}@{seq}"
                rel = f"{placement}/{seq:08d}-{token}.vw"
                dest = self.artifacts / rel
                self._store_file(artifact, dest, link)
                if self.store.shared:
                    self.store.put(conn, rel, dest)
                    if sidecar_path(dest).exists():
                        self.store.put(conn, str(sidecar_path(dest).relative_to(self.artifacts)), sidecar_path(dest))
                self._insert(conn, t, version, placement, seq, rel, dest, schema_hash, learner_args, source, parent,
                             train_since, train_until, rows, metrics, now)
                self._event(conn, version, placement, None, "candidate", reason, actor, now)
                if auto and stage == "production" and parent is not None:
                    tainted = self._rolled_back_ancestor(conn, placement, parent)
                    if tainted is not None:
                        log.warning("%s stays a candidate: it descends from %s, which was rolled back",
                                    version, tainted)
                        stage = "candidate"
                if stage != "candidate":
                    self._move(conn, self._get(conn, version), stage, None, reason, actor, now)
                bump(conn, MODELS)
        except BaseException:
            if dest is not None:
                dest.unlink(missing_ok=True)
                sidecar_path(dest).unlink(missing_ok=True)
            raise
        return self.get(version)

    def take_fence(self, placement: str) -> int:
        """The next lease epoch of ``placement``, for a learner that has just taken its lease: from this commit on,
        a registration carrying an older epoch is refused. Called before the learner reads what its predecessor
        published, so whatever the predecessor committed before is read and whatever it commits after is refused."""
        t = learner_fences_table
        for attempt in range(5):
            try:
                with self._lock, self.engine.begin() as conn:
                    bumped = conn.execute(sa.update(t).where(t.c.placement == placement).values(
                        epoch=t.c.epoch + 1, taken_at=self.clock())).rowcount
                    if not bumped:  # the placement's first fenced learner; a racing insert retries as an update
                        conn.execute(sa.insert(t).values(placement=placement, epoch=1, taken_at=self.clock()))
                    return int(conn.execute(sa.select(t.c.epoch).where(t.c.placement == placement)).scalar_one())
            except sa.exc.IntegrityError:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _check_fence(conn: sa.Connection, placement: str, fence: int) -> None:
        # A write, not a read: it takes the row's lock (PostgreSQL) or the database's write lock (SQLite) until the
        # registration commits, so a successor's `take_fence` is ordered wholly before or wholly after it. A learner
        # paused before that commit holds the successor back until PostgreSQL ends its idle session
        # (`metadata.idle_in_transaction_seconds`, `kassa.db.make_engine`).
        t = learner_fences_table
        if conn.execute(sa.update(t).where(t.c.placement == placement, t.c.epoch == fence).values(
                epoch=fence)).rowcount == 1:
            return
        newest = conn.execute(sa.select(t.c.epoch).where(t.c.placement == placement)).scalar()
        raise StaleFence(placement, f"the registry refused a snapshot of {placement} with lease epoch {fence}: "
                                    f"another learner took the placement over since (epoch {newest})")

    @staticmethod
    def _store_file(artifact: Path, dest: Path, link: bool) -> None:
        def store(src: Path, to: Path) -> None:
            tmp = to.with_name(to.name + ".tmp")
            try:
                if link:
                    try:
                        os.link(src, tmp)
                    except OSError:
                        shutil.copyfile(src, tmp)
                else:
                    shutil.copyfile(src, tmp)
                os.replace(tmp, to)
            except BaseException:  # a Ctrl-C or SIGTERM mid-copy: no (half-)copied file stays (`_register`)
                tmp.unlink(missing_ok=True)
                raise

        store(artifact, dest)
        # The serving copy (linear.py): the learner writes one beside its snapshot; otherwise export it now,
        # so the first load of this version does not have to. Loading re-checks it against the artifact.
        sidecar = sidecar_path(artifact)
        if sidecar.exists():
            store(sidecar, sidecar_path(dest))
        else:
            try:
                export(dest)
            except UnsupportedModel as why:
                log.info("%s will be served by VW itself: %s", dest.name, why)
            except Exception as exc:  # an unreadable file is refused when it is loaded, with the reason
                log.warning("could not export %s for serving: %s", dest.name, exc)

    def _insert(self, conn: sa.Connection, t: sa.Table, version: str, placement: str, seq: int, rel: str, dest: Path,
                schema_hash: str, learner_args: str, source: str, parent: str | None, train_since: float | None,
                train_until: float | None, rows: int, metrics: dict[str, Any] | None, now: float) -> None:
        digest = sha256_file(dest)
        conn.execute(sa.insert(t).values(
            version=version, placement=placement, seq=seq, stage="candidate", canary_share=None,
            artifact=rel, sha256=digest, size_bytes=dest.stat().st_size, schema_hash=schema_hash,
            learner_args=learner_args, source=source, parent=parent, train_since=train_since,
            train_until=train_until, rows=rows, metrics=json.dumps(metrics or {}), created_at=now,
            stage_changed_at=now, artifact_deleted=False,
        ))

    def promote(self, version: str, stage: Stage, *, share: float | None = None, reason: str = "",
                actor: str = "cli", rolled_back: bool = False) -> ModelVersion:
        """Move ``version`` to ``stage``, moving any occupant of a single-holder stage on. A production
        promotion by anyone but the learner clears rollback verdicts from ``version`` down; ``rolled_back``
        (a guardrail archiving a canary) records one."""
        if stage not in STAGES:
            raise StageError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}", "stage")
        check_share(stage, share)
        now = self.clock()
        with self._lock, self.engine.begin() as conn:
            mv = self._get(conn, version)
            check_move(mv, stage)
            if stage in ("shadow", "canary", "production") and mv.artifact_deleted:
                raise StageError(f"{version}'s artifact was pruned; it cannot serve again", "version")
            self._move(conn, mv, stage, share, reason or f"promoted to {stage}", actor, now)
            if stage == "production" and actor != LEARNER:
                self._verdict(conn, mv, "promoted", reason or "promoted to production", actor, now)
            if rolled_back:
                self._verdict(conn, mv, "rolled_back", reason or "rolled back", actor, now)
            bump(conn, MODELS)
        return self.get(version)

    def rollback(self, placement: str, reason: str = "rollback", actor: str = "cli") -> ModelVersion:
        """Undo the current production release and restore what served before it.

        The release is the current production plus the learner snapshots auto-published on top of it,
        back to its root: the first version up the parent chain that someone (not the learner's
        auto-publish) put in production. The restored version is the last one that served production
        before the root did, does not descend from the root and is not itself tainted by an earlier
        rollback; with no such version (a placement that only ever served its learner's snapshots) it is
        the last one before the current production on the same terms. The root and the current version
        are recorded as rolled back, so neither they nor their descendants are auto-published again."""
        now = self.clock()
        with self._lock, self.engine.begin() as conn:
            current = self._current(conn, placement, "production")
            if current is None:
                raise StageError(f"placement {placement!r} has no production model to roll back", "placement")
            lineage = _Lineage.load(conn, placement)
            root = lineage.release_root(current.version)
            target = lineage.restore_target(root)
            if target is None and root != current.version:
                target = lineage.restore_target(current.version)
            if target is None:
                raise StageError(f"{placement!r} has no earlier production version with an artifact to "
                                 "restore that does not descend from the one rolled back", "placement")
            previous = self._get(conn, target)
            why = f"rolled back: {reason}"
            for bad in dict.fromkeys((root, current.version)):
                self._verdict(conn, self._get(conn, bad), "rolled_back", why, actor, now)
            self._set_stage(conn, current, "archived", None, why, actor, now)
            note = f" (the release of {root})" if root != current.version else ""
            self._set_stage(conn, previous, "production", None,
                            f"restored by rollback of {current.version}{note}: {reason}", actor, now)
            self._verdict(conn, previous, "promoted", f"restored by rollback: {reason}", actor, now)
            bump(conn, MODELS)
        return self.get(previous.version)

    def rolled_back_ancestor(self, version: str) -> str | None:
        """The rolled-back version ``version`` descends from (or is), unless a hand promotion cleared it."""
        with self.engine.connect() as conn:
            mv = self._get(conn, version)
            return self._rolled_back_ancestor(conn, mv.placement, version)

    def descends_from(self, version: str, ancestor: str) -> bool:
        """Whether ``ancestor`` is ``version`` or one of its parents, grandparents, ..."""
        with self.engine.connect() as conn:
            lineage = _Lineage.load(conn, self._get(conn, version).placement)
        return lineage.descends(version, ancestor)

    def update_metrics(self, version: str, metrics: dict[str, Any]) -> ModelVersion:
        """Merge ``metrics`` into a version's metrics (evaluation results are recorded this way)."""
        with self.engine.begin() as conn:
            mv = self._get(conn, version)
            merged = {**mv.metrics, **metrics}
            conn.execute(sa.update(model_versions_table).where(model_versions_table.c.version == version)
                         .values(metrics=json.dumps(merged)))
        return self.get(version)

    def prune(self, placement: str, keep: int = 20) -> int:
        """Delete the artifacts of archived/candidate online snapshots beyond the newest ``keep``; their
        metadata stays. Batch-trained versions and anything serving are never pruned."""
        t = model_versions_table
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(t.c.version, t.c.artifact).where(
                (t.c.placement == placement) & (t.c.source == "online") & t.c.stage.in_(["archived", "candidate"])
                & (t.c.artifact_deleted == sa.false())
            ).order_by(t.c.seq.desc()).offset(keep)).all()
            for version, rel in rows:
                (self.artifacts / rel).unlink(missing_ok=True)
                sidecar_path(self.artifacts / rel).unlink(missing_ok=True)
                conn.execute(sa.update(t).where(t.c.version == version).values(artifact_deleted=True))
                self.store.delete(conn, [rel, str(sidecar_path(self.artifacts / rel).relative_to(self.artifacts))])
        return len(rows)

    # ------------------------------------------------------------------ loading
    def verify(self, mv: ModelVersion, expected_schema: str | None) -> Path:
        """The artifact's path after checking it exists, matches its checksum and the schema expected;
        raises `ArtifactError` saying which check failed."""
        path = self.path(mv)
        if mv.artifact_deleted or not path.exists():
            raise ArtifactError(f"{mv.version}: artifact {path} is missing")
        digest = sha256_file(path)
        if digest != mv.sha256:
            raise ArtifactError(f"{mv.version}: artifact checksum {digest[:12]}… does not match the registered "
                                f"{mv.sha256[:12]}… (corrupt or replaced file)")
        if expected_schema is not None and mv.schema_hash != expected_schema:
            raise ArtifactError(f"{mv.version}: expects feature schema {mv.schema_hash[:12]}… but the placement "
                                f"now has {expected_schema[:12]}…; retrain it on the current features")
        return path

    # ------------------------------------------------------------------ internals
    def _verdict(self, conn: sa.Connection, mv: ModelVersion, verdict: str, reason: str, actor: str,
                 now: float) -> None:
        conn.execute(sa.insert(model_verdicts_table).values(version=mv.version, placement=mv.placement,
                                                            verdict=verdict, at=now, reason=reason, actor=actor))

    def _rolled_back_ancestor(self, conn: sa.Connection, placement: str, version: str) -> str | None:
        t = model_verdicts_table
        rows = conn.execute(sa.select(t.c.version, t.c.verdict).where(t.c.placement == placement)
                            .order_by(t.c.id)).all()
        if not rows:
            return None  # the usual case: one small indexed query per snapshot
        latest = {v: verdict for v, verdict in rows}  # each version's newest verdict
        lineage = _Lineage.load(conn, placement)
        for ancestor in lineage.ancestors(version):
            verdict = latest.get(ancestor)
            if verdict == "rolled_back":
                return ancestor
            if verdict == "promoted":
                return None
        return None

    def _get(self, conn: sa.Connection, version: str) -> ModelVersion:
        row = conn.execute(sa.select(model_versions_table).where(
            model_versions_table.c.version == version)).first()
        if row is None:
            raise errors.NotFound(f"unknown model version {version!r}", "version")
        return _row(row)

    def _current(self, conn: sa.Connection, placement: str, stage: str) -> ModelVersion | None:
        t = model_versions_table
        row = conn.execute(sa.select(t).where((t.c.placement == placement) & (t.c.stage == stage))).first()
        return _row(row) if row is not None else None

    def _move(self, conn: sa.Connection, mv: ModelVersion, stage: str, share: float | None, reason: str,
              actor: str, now: float) -> None:
        if stage in _SINGLE:
            occupant = self._current(conn, mv.placement, stage)
            if occupant is not None and occupant.version != mv.version:
                to = "archived" if stage == "production" else "candidate"
                self._set_stage(conn, occupant, to, None, f"replaced by {mv.version}", actor, now)
        self._set_stage(conn, mv, stage, share, reason, actor, now)

    def _set_stage(self, conn: sa.Connection, mv: ModelVersion, stage: str, share: float | None, reason: str,
                   actor: str, now: float) -> None:
        conn.execute(sa.update(model_versions_table).where(model_versions_table.c.version == mv.version).values(
            stage=stage, canary_share=share if stage == "canary" else None, stage_changed_at=now))
        self._event(conn, mv.version, mv.placement, mv.stage if mv.stage != stage else None, stage, reason,
                    actor, now)

    @staticmethod
    def _event(conn: sa.Connection, version: str, placement: str, from_stage: str | None, to_stage: str,
               reason: str, actor: str, now: float) -> None:
        conn.execute(sa.insert(model_stage_events_table).values(
            version=version, placement=placement, from_stage=from_stage, to_stage=to_stage, at=now,
            reason=reason, actor=actor))


@dataclass(slots=True)
class _Lineage:
    """A placement's parent links, production history and verdicts, read once for a rollback."""

    parent: dict[str, str | None]
    artifact_deleted: dict[str, bool]
    productions: list[tuple[str, str]]  # (version, actor) of every move into production, oldest first
    verdicts: dict[str, str]  # version -> newest verdict

    @classmethod
    def load(cls, conn: sa.Connection, placement: str) -> _Lineage:
        v, e, d = model_versions_table, model_stage_events_table, model_verdicts_table
        rows = conn.execute(sa.select(v.c.version, v.c.parent, v.c.artifact_deleted).where(v.c.placement == placement))
        parent, deleted = {}, {}
        for version, par, gone in rows:
            parent[version], deleted[version] = par, bool(gone)
        productions = [(r.version, r.actor) for r in conn.execute(
            sa.select(e.c.version, e.c.actor).where((e.c.placement == placement) & (e.c.to_stage == "production"))
            .order_by(e.c.id))]
        verdicts = {r.version: r.verdict for r in conn.execute(
            sa.select(d.c.version, d.c.verdict).where(d.c.placement == placement).order_by(d.c.id))}
        return cls(parent, deleted, productions, verdicts)

    def ancestors(self, version: str) -> Iterable[str]:
        """``version``, its parent, its grandparent, ... (a cycle, which registration cannot make, stops)."""
        seen: set[str] = set()
        node: str | None = version
        while node is not None and node not in seen:
            seen.add(node)
            yield node
            node = self.parent.get(node)

    def descends(self, version: str, ancestor: str) -> bool:
        return ancestor in self.ancestors(version)

    def _last_production_actor(self, version: str) -> str | None:
        actor = None
        for v, a in self.productions:
            if v == version:
                actor = a
        return actor

    def release_root(self, version: str) -> str:
        """Walk up from ``version`` while each step was auto-published by the learner on top of a parent
        that served production; the version where that stops is the release's root."""
        served = {v for v, _ in self.productions}
        node = version
        while self._last_production_actor(node) == LEARNER:
            parent = self.parent.get(node)
            if parent is None or parent not in served:
                break
            node = parent
        return node

    def tainted(self, version: str) -> bool:
        for ancestor in self.ancestors(version):
            verdict = self.verdicts.get(ancestor)
            if verdict is not None:
                return verdict == "rolled_back"
        return False

    def restore_target(self, bad: str) -> str | None:
        """The last version that served production before ``bad`` last started to, is not ``bad`` nor
        descended from it, is not tainted by an earlier rollback, and still has its artifact."""
        last_start = max((i for i, (v, _) in enumerate(self.productions) if v == bad), default=None)
        if last_start is None:
            return None
        for version, _ in reversed(self.productions[:last_start]):
            if (version != bad and not self.descends(version, bad) and not self.tainted(version)
                    and not self.artifact_deleted.get(version, True)):
                return version
        return None


def _row(r: Any) -> ModelVersion:
    return ModelVersion(
        version=r.version, placement=r.placement, seq=r.seq, stage=r.stage, canary_share=r.canary_share,
        artifact=r.artifact, sha256=r.sha256, size_bytes=r.size_bytes, schema_hash=r.schema_hash,
        learner_args=r.learner_args, source=r.source, parent=r.parent, train_since=r.train_since,
        train_until=r.train_until, rows=r.rows, metrics=json.loads(r.metrics), created_at=r.created_at,
        stage_changed_at=r.stage_changed_at, artifact_deleted=bool(r.artifact_deleted),
    )
