"""Metadata on PostgreSQL (issue 13): migrations, round trips, changes reaching other processes, an outage.

Every test talks to a real PostgreSQL (tests/services.py: the shared server when it answers, else a
throwaway one) in a database of its own; the outage test stops and starts a throwaway server it owns.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

import kassa.learn.registry  # noqa: F401  (its tables join kassa.db.metadata)
from kassa import schemas
from kassa.api.app import create_app
from kassa.app import Kassa
from kassa.catalog import Catalog, SqlCatalogStore
from kassa.changes import ChangeFeed
from kassa.config import Settings, load_settings
from kassa.db import (
    api_keys_table,
    current_revision,
    head_revision,
    make_engine,
    metadata,
    migrate,
    offers_table,
    wait_for_database,
)
from kassa.features.definitions import load_repo
from kassa.features.registry import FeatureRegistry
from kassa.keys import KeyStore, hash_key
from kassa.learn.artifacts import DatabaseArtifacts
from kassa.learn.online.learner import OnlineLearner
from kassa.learn.registry import ModelRegistry
from tests.conftest import ADMIN, FEATURES, PUB, SECRET, decision_body
from tests.services import PostgresServer, ensure_postgres, fresh_database
from tests.test_registry import check_a_stale_lease_epoch_is_refused

# The tables Kassa 0.2.0 made with create_all (before Alembic): what an existing data dir holds.
LEGACY = ("offers", "placements", "api_keys", "feature_entities", "feature_views", "model_versions",
          "model_stage_events", "model_verdicts")


@pytest.fixture(scope="module")
def pg_server() -> str:
    return ensure_postgres()


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    url, drop = fresh_database(pg_server)
    yield url
    drop()


def _columns(engine: sa.Engine) -> dict[str, set[str]]:
    inspector = sa.inspect(engine)
    return {t: {c["name"] for c in inspector.get_columns(t)} for t in inspector.get_table_names()
            if t != "alembic_version"}


def _model_columns() -> dict[str, set[str]]:
    return {t.name: {c.name for c in t.columns} for t in metadata.sorted_tables}


# ------------------------------------------------------------------ migrations
def test_migrations_build_the_whole_schema_on_an_empty_postgres_database_and_rerun_as_a_no_op(pg_url):
    engine = make_engine(pg_url)
    assert current_revision(engine) == head_revision() == "0004"
    assert _columns(engine) == _model_columns()  # the migrations and the Core tables agree, column by column
    assert migrate(engine) == "0004"  # idempotent: already at head
    with engine.connect() as conn:
        topics = dict(conn.execute(sa.text("SELECT name, version FROM change_versions")).all())
        triggers = conn.execute(sa.text("SELECT tgname FROM pg_trigger WHERE tgname = 'kassa_change_notify'")).all()
    assert topics == {"catalog": 0, "api_keys": 0, "features": 0, "models": 0}
    assert len(triggers) == 1
    engine.dispose()


def test_migrations_build_the_same_schema_on_sqlite(tmp_path):
    engine = make_engine(tmp_path / "kassa.db")
    assert current_revision(engine) == head_revision()
    assert _columns(engine) == _model_columns()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_processes_starting_together_migrate_one_database_once_without_errors(backend, pg_server, tmp_path):
    url, drop = fresh_database(pg_server) if backend == "postgresql" else (str(tmp_path / "kassa.db"), lambda: None)
    try:
        code = f"from kassa.db import make_engine, current_revision; print(current_revision(make_engine({url!r})))"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=env) for _ in range(4)]
        results = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, [err.decode()[-500:] for _, err in results]
        assert {out.decode().strip() for out, _ in results} == {head_revision()}
    finally:
        drop()


def test_a_data_dir_made_before_alembic_is_adopted_with_its_data(tmp_path):
    # What Kassa 0.2.0 left behind: create_all's tables (one newer table still missing), no alembic_version.
    path = tmp_path / "data" / "kassa.db"
    path.parent.mkdir()
    old = sa.create_engine(f"sqlite:///{path}")
    metadata.create_all(old, tables=[metadata.tables[t] for t in LEGACY if t != "model_verdicts"])
    with old.begin() as conn:  # rows as 0.2.0 wrote them (today's writers would bump a counter it lacks)
        offer = schemas.Offer(id="warranty", kind="warranty", title="Warranty", value=12)
        conn.execute(sa.insert(offers_table).values(id="warranty", body=msgspec.json.encode(offer).decode(),
                                                    updated_at=1.0))
        conn.execute(sa.insert(api_keys_table).values(key_hash=hash_key("old-admin-key"), kind="admin",
                                                      name="from 0.2.0", origins="[]", created_at=1.0))
    old.dispose()

    engine = make_engine(path)
    assert current_revision(engine) == head_revision()
    assert _columns(engine) == _model_columns()  # model_verdicts and the 0002 tables added
    assert "warranty" in Catalog(SqlCatalogStore(engine)).snapshot.offers
    assert KeyStore(engine).lookup("old-admin-key") is not None
    assert migrate(engine) == head_revision()


def test_a_catalog_stamp_in_an_old_data_dir_is_adopted_so_api_changes_survive_the_upgrade(tmp_path, catalog_file):
    data = tmp_path / "data"
    data.mkdir()
    old = sa.create_engine(f"sqlite:///{data / 'kassa.db'}")
    metadata.create_all(old, tables=[metadata.tables[t] for t in LEGACY])
    changed = schemas.Offer(id="discount", kind="discount", title="Changed over the API", value=9)
    with old.begin() as conn:  # the file was loaded once (its stamp below), then an offer was changed
        conn.execute(sa.insert(offers_table).values(id="discount", body=msgspec.json.encode(changed).decode(),
                                                    updated_at=2.0))
    old.dispose()
    (data / "catalog_file.sha256").write_text(hashlib.sha256(catalog_file.read_bytes()).hexdigest())
    catalog = Catalog(SqlCatalogStore(make_engine(data / "kassa.db")))
    assert catalog.load_file(catalog_file, stamp_dir=data) == 0
    assert catalog.snapshot.offers["discount"].title == "Changed over the API"
    assert catalog.store.file_stamp() is not None  # from now on the stamp lives in the database


# ------------------------------------------------------------------ round trips
def test_catalog_keys_features_and_models_round_trip_on_postgres(pg_url, tmp_path, catalog_file, features_file):
    engine = make_engine(pg_url)
    catalog = Catalog(SqlCatalogStore(engine))
    assert catalog.load_file(catalog_file) == 13
    offer = catalog.snapshot.offers["discount"]
    assert catalog.put_offer(schemas.Offer(id="new", kind="discount", title="New", value=1.5)) is True
    assert catalog.delete_offer("discount") is True
    again = Catalog(SqlCatalogStore(engine)).snapshot
    assert "new" in again.offers and "discount" not in again.offers
    assert again.offers["warranty"] == catalog.snapshot.offers["warranty"]
    assert again.placements.keys() == catalog.snapshot.placements.keys()
    assert offer.title == "10% off"

    keys = KeyStore(engine)
    key = keys.create("secret", "server", ["https://shop.example"])
    info = KeyStore(engine).lookup(key)
    assert info is not None and info.kind == "secret" and info.origins == ("https://shop.example",)
    assert keys.revoke(key) and KeyStore(engine).lookup(key) is None

    features = FeatureRegistry(engine)
    repo = load_repo(features_file)
    assert features.apply(repo).has_changes
    loaded = FeatureRegistry(engine).load()  # in name order
    assert {v.name: v for v in loaded.views} == {v.name: v for v in repo.views}
    assert {e.name: e for e in loaded.entities} == {e.name: e for e in repo.entities}

    # The model registry with artifacts in the database: a second registry (another process, its own data
    # dir) fetches the artifact on first use and verifies it.
    artifact = tmp_path / "model.vw"
    artifact.write_bytes(b"not really a VW model, but bytes with a checksum" * 100)
    writer = ModelRegistry(engine, tmp_path / "a" / "models", store=DatabaseArtifacts(engine))
    v1 = writer.register("order_confirmation", artifact, schema_hash="h", learner_args="--cb_explore_adf",
                         source="batch", stage="production")
    v2 = writer.register("order_confirmation", artifact, schema_hash="h", learner_args="--cb_explore_adf",
                         source="batch", parent=v1.version)
    writer.promote(v2.version, "production", reason="better")
    reader = ModelRegistry(engine, tmp_path / "b" / "models", store=DatabaseArtifacts(engine))
    serving = reader.serving()["order_confirmation"]
    assert serving.production is not None and serving.production.version == v2.version
    assert not (reader.artifacts / serving.production.artifact).exists()  # not fetched yet
    path = reader.verify(serving.production, "h")
    assert path.read_bytes() == artifact.read_bytes() and path.is_relative_to(tmp_path / "b")
    restored = reader.rollback("order_confirmation", reason="test")
    assert restored.version == v1.version
    assert [e.to_stage for e in writer.history(version=v2.version)][:2] == ["archived", "production"]
    engine.dispose()


def test_a_snapshot_carrying_a_stale_lease_epoch_is_refused_on_postgres(pg_url, tmp_path):
    engine = make_engine(pg_url)
    check_a_stale_lease_epoch_is_refused(ModelRegistry(engine, tmp_path / "models"), tmp_path)
    engine.dispose()


def test_a_session_idle_inside_its_registry_write_is_ended_by_the_server_so_a_takeover_gets_the_fence_row(
        pg_url, tmp_path, catalog_file, features_file):
    # A learner paused inside its registration (the fence row locked) kept the lock until it resumed: the successor's
    # `take_fence` waited for it, past the 10 s takeover target. The server now ends such a session.
    paused = make_engine(pg_url, idle_in_transaction=0.5)
    successor = make_engine(pg_url)
    with successor.connect() as conn:  # every session: the settings' bound and the answer bound, server-side
        assert conn.execute(sa.text("SHOW idle_in_transaction_session_timeout")).scalar() == "5s"
        assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "10s"
    registry = ModelRegistry(successor, tmp_path / "models")
    assert registry.take_fence("order_confirmation") == 1
    with paused.connect() as conn:
        conn.execute(sa.text("UPDATE learner_fences SET epoch = 1 WHERE placement = 'order_confirmation'"))
        t0 = time.monotonic()  # the fence row locked; nothing more is sent: a paused process
        assert registry.take_fence("order_confirmation") == 2
        waited = time.monotonic() - t0
        with pytest.raises(sa.exc.DBAPIError, match="terminating connection due to idle-in-transaction timeout"):
            conn.execute(sa.text("SELECT 1"))  # its transaction is gone: nothing of it commits
    assert 0.4 < waited < 3.0, waited
    with paused.connect() as conn:  # the pool hands out a live session again
        assert conn.execute(sa.text("SELECT epoch FROM learner_fences")).scalar() == 2
    paused.dispose()
    successor.dispose()
    settings = load_settings(None, data_dir=str(tmp_path / "data"), catalog_file=str(catalog_file), admin_key=ADMIN,
                             publishable_key=PUB, **{"features.definitions_file": str(features_file),
                                                     "metadata.url": pg_url, "metadata.idle_in_transaction_seconds": 0})
    kassa = Kassa(settings)  # what `kassa serve` and `kassa learn` open: the setting, 0 turning it off
    try:
        with kassa.db.connect() as conn:
            assert conn.execute(sa.text("SHOW idle_in_transaction_session_timeout")).scalar() == "0"
    finally:
        kassa.db.dispose()


def test_a_migration_paused_past_the_idle_in_transaction_bound_is_run_again(pg_url, monkeypatch, caplog):
    # The migration is one transaction: a process paused in it (SIGSTOP, a VM freeze) past
    # idle_in_transaction_session_timeout had its session ended by the server, and `kassa serve|learn|stream`
    # (`wait_for_database`, which retried only OperationalError/InterfaceError) exited with an InternalError traceback.
    from alembic import command

    real_upgrade, paused = command.upgrade, []

    def paused_once(cfg, revision):  # inside the transaction, after the advisory lock: the session idles in it
        if not paused:
            paused.append(True)
            time.sleep(0.8)
        return real_upgrade(cfg, revision)

    monkeypatch.setattr(command, "upgrade", paused_once)
    caplog.set_level(logging.WARNING, logger="kassa.db")
    engine = make_engine(pg_url, idle_in_transaction=0.3)
    assert paused and current_revision(engine) == head_revision()
    assert _columns(engine) == _model_columns()
    assert any("ended the session of its migration" in r.getMessage() and "migrating again" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    engine.dispose()


def test_start_writes_paused_past_the_idle_in_transaction_bound_end_the_start_with_one_line(
        pg_url, tmp_path, catalog_file, features_file, monkeypatch):
    # `Kassa` writes its settings' catalog, keys and features at start under `start_writes_lock`: a process paused
    # inside one of those transactions exited with a ~60-line InternalError traceback.
    import kassa.catalog.store

    real_bump = kassa.catalog.store.bump

    def paused_bump(conn, topic):  # the transaction's first statement, then a pause inside it
        real_bump(conn, topic)
        time.sleep(0.8)

    monkeypatch.setattr(kassa.catalog.store, "bump", paused_bump)
    settings = load_settings(None, data_dir=str(tmp_path / "data"), catalog_file=str(catalog_file), admin_key=ADMIN,
                             publishable_key=PUB, **{"features.definitions_file": str(features_file),
                                                     "metadata.url": pg_url,
                                                     "metadata.idle_in_transaction_seconds": 0.3})
    with pytest.raises(SystemExit) as ended:
        Kassa(settings)
    message = str(ended.value.code)
    assert message.startswith("cannot start: the metadata database ") and "\n" not in message, message
    assert "metadata.idle_in_transaction_seconds" in message and "start it again" in message
    monkeypatch.setattr(kassa.catalog.store, "bump", real_bump)
    kassa_ = Kassa(settings)  # nothing of it was committed: a new start writes the catalog
    try:
        assert set(kassa_.catalog.snapshot.placements) == {"order_confirmation", "cross_sell"}
    finally:
        kassa_.db.dispose()


def test_a_statement_its_client_gave_up_on_stops_holding_the_fence_row(pg_url, tmp_path):
    # The client stops waiting for an answer after its bound (`AnsweringConnection`) and closes the connection, but the
    # server ran the statement on (here: waiting on a lock) with its transaction's locks held, the fence row among
    # them, until it next wrote to the closed socket. The session's statement_timeout is that same bound now.
    import psycopg
    from sqlalchemy.engine import make_url

    successor = make_engine(pg_url)
    registry = ModelRegistry(successor, tmp_path / "models")
    assert registry.take_fence("order_confirmation") == 1
    impatient = make_engine(pg_url, migrate_schema=False, answer_timeout=1.0)
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as blocker:
        blocker.execute("INSERT INTO change_versions (name, version) VALUES ('models', 1) ON CONFLICT DO NOTHING")
        blocker.commit()
        blocker.execute("SELECT version FROM change_versions WHERE name = 'models' FOR UPDATE")
        with impatient.connect() as conn:  # a registration: the fence row, then the counter, held by someone else
            conn.execute(sa.text("UPDATE learner_fences SET epoch = 1 WHERE placement = 'order_confirmation'"))
            with pytest.raises(sa.exc.OperationalError, match="no answer from PostgreSQL within 1 s"):
                conn.execute(sa.text("UPDATE change_versions SET version = version + 1 WHERE name = 'models'"))
        t0 = time.monotonic()
        assert registry.take_fence("order_confirmation") == 2  # while the counter is still held
        waited = time.monotonic() - t0
        blocker.rollback()
    assert waited < 3.0, waited
    impatient.dispose()
    successor.dispose()


def test_every_metadata_write_bumps_its_topic_once_per_transaction(pg_url, catalog_file, features_file, tmp_path):
    engine = make_engine(pg_url)
    feed = ChangeFeed(engine)
    feed.prime()
    catalog = Catalog(SqlCatalogStore(engine))
    catalog.load_file(catalog_file)
    KeyStore(engine).create("admin", "ops")
    FeatureRegistry(engine).apply(load_repo(features_file))
    artifact = tmp_path / "m.vw"
    artifact.write_bytes(b"x" * 100)
    ModelRegistry(engine, tmp_path / "models").register("order_confirmation", artifact, schema_hash="h",
                                                        learner_args="", source="batch")
    seen: list[str] = []
    for topic in ("catalog", "api_keys", "features", "models"):
        feed.on(topic, lambda t=topic: seen.append(t))
    assert sorted(feed.check()) == ["api_keys", "catalog", "features", "models"]
    assert sorted(seen) == ["api_keys", "catalog", "features", "models"]
    assert feed.check() == []  # nothing moved since
    engine.dispose()


# ------------------------------------------------------------------ two processes, one metadata database
def _settings(tmp_path: Path, name: str, url: str, catalog_file: Path, features_file: Path) -> Settings:
    return load_settings(
        None, data_dir=str(tmp_path / name), catalog_file=str(catalog_file), admin_key=ADMIN,
        publishable_key=PUB, secret_key=SECRET,
        **{"features.definitions_file": str(features_file), "metadata.url": url},
    )


def _until(check, timeout: float = 3.0) -> float:
    """Seconds until ``check()`` is true (fails the test after ``timeout``)."""
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > timeout:
            pytest.fail(f"not seen within {timeout} s")
        time.sleep(0.005)
    return time.perf_counter() - t0


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_an_offer_change_and_a_key_revocation_through_one_process_are_in_force_in_another_within_1s(
        backend, pg_server, tmp_path, catalog_file, features_file):
    if backend == "postgresql":
        url, drop = fresh_database(pg_server)
    else:
        url, drop = f"sqlite:///{tmp_path / 'shared' / 'kassa.db'}", lambda: None  # its folder is made
    try:
        one = Kassa(_settings(tmp_path, "one", url, catalog_file, features_file), seed=1)
        two = Kassa(_settings(tmp_path, "two", url, catalog_file, features_file), seed=2)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        with TestClient(create_app(one), headers=admin) as a, TestClient(create_app(two), headers=admin) as b:
            assert b.get("/v1/offers/discount").json()["value"] == 4
            offer_lag, key_lag, placement_lag = [], [], []
            for i in range(5):
                body = a.get("/v1/offers/discount").json()
                body["value"] = 10 + i
                assert a.put("/v1/offers/discount", json=body).status_code == 200
                offer_lag.append(_until(lambda v=10 + i: b.get("/v1/offers/discount").json()["value"] == v))

                key = one.keys.create("publishable", f"shop-{i}")  # what `kassa keys create` does elsewhere
                headers = {"Authorization": f"Bearer {key}"}
                _until(lambda h=headers: b.post("/v1/decisions", json=decision_body(), headers=h).status_code == 200)
                one.keys.revoke(key)
                key_lag.append(_until(
                    lambda h=headers: b.post("/v1/decisions", json=decision_body(), headers=h).status_code == 401))

                placement = a.get("/v1/placements/order_confirmation").json()["placement"]
                placement["slots"] = 1 + i % 3
                assert a.put("/v1/placements/order_confirmation", json=placement).status_code == 200
                placement_lag.append(_until(
                    lambda s=placement["slots"]: two.catalog.snapshot.placements["order_confirmation"]
                    .placement.slots == s))
            print(f"\n{backend}: offer change seen by the other process after "
                  f"{', '.join(f'{x * 1000:.0f}' for x in offer_lag)} ms; key revocation "
                  f"{', '.join(f'{x * 1000:.0f}' for x in key_lag)} ms; placement "
                  f"{', '.join(f'{x * 1000:.0f}' for x in placement_lag)} ms")
            assert max(offer_lag) < 1.0 and max(key_lag) < 1.0 and max(placement_lag) < 1.0
    finally:
        drop()


def test_a_process_started_later_with_a_new_data_dir_does_not_revert_api_changes_to_the_catalog_file(
        pg_url, tmp_path, catalog_file, features_file):
    one = Kassa(_settings(tmp_path, "one", pg_url, catalog_file, features_file), seed=1)
    with TestClient(create_app(one), headers={"Authorization": f"Bearer {ADMIN}"}) as a:
        body = a.get("/v1/offers/discount").json()
        body["value"] = 99
        assert a.put("/v1/offers/discount", json=body).status_code == 200
    later = Kassa(_settings(tmp_path, "later", pg_url, catalog_file, features_file), seed=2)
    assert later.catalog.snapshot.offers["discount"].value == 99
    # A changed file is applied once, by whoever starts first.
    catalog_file.write_text(catalog_file.read_text().replace("title: Magazine", "title: Magazine v2"))
    third = Kassa(_settings(tmp_path, "third", pg_url, catalog_file, features_file), seed=3)
    assert third.catalog.snapshot.offers["partner-us"].title == "Magazine v2"
    assert third.catalog.snapshot.offers["discount"].value == 4  # the file's value: it was applied again
    for k in (one, later, third):
        k.db.dispose()


def test_applied_feature_definitions_and_a_promoted_model_reach_the_other_process_within_1s(
        pg_url, tmp_path, catalog_file, features_file):
    one = Kassa(_settings(tmp_path, "one", pg_url, catalog_file, features_file), seed=1)
    two = Kassa(_settings(tmp_path, "two", pg_url, catalog_file, features_file), seed=2)
    with TestClient(create_app(one)), TestClient(create_app(two)):
        extra = FEATURES + """
  - name: loyalty
    kind: push
    entity: customer
    ttl: 30d
    fields:
      - {name: tier, dtype: str, default: none, max_length: 16}
"""
        path = tmp_path / "features2.yaml"
        path.write_text(extra)
        one.registry.apply(load_repo(path))
        lag = _until(lambda: "loyalty" in two.features.views)
        print(f"\nfeature definitions applied through one seen by the other after {lag * 1000:.0f} ms")
        assert lag < 1.0
        _until(lambda: "loyalty" in one.features.views)  # one hears its own change through the feed too

        # A model registered and promoted through one serves in the other (artifact fetched from PostgreSQL).
        placement = one.catalog.snapshot.placements["order_confirmation"].placement
        learner = OnlineLearner(placement, tmp_path / "learner")
        for i in range(200):
            learner.learn("shared |c country=US", f" |o id={'ab'[i % 2]}", float(i % 2), 0.5)
        path, _ = learner.snapshot()
        mv = one.model_registry.register("order_confirmation", path, schema_hash=one.schema_hash(placement.id) or "",
                                         learner_args=learner.args, source="batch")
        one.model_registry.promote(mv.version, "production", reason="test")

        def serving_in_two() -> bool:
            s = two.models.serving("order_confirmation")
            return s is not None and s.production is not None and s.production.version == mv.version

        lag = _until(serving_in_two)
        print(f"model promoted through one serving in the other after {lag * 1000:.0f} ms")
        assert lag < 1.0
        assert (tmp_path / "two" / "models" / "artifacts" / mv.artifact).exists()


# ------------------------------------------------------------------ PostgreSQL restarted under load
def test_postgres_restarted_under_load_serving_continues_from_caches_with_zero_5xx(tmp_path, catalog_file,
                                                                                    features_file):
    server = PostgresServer()
    server.start()
    try:
        url, _ = fresh_database(server.url)
        app = Kassa(_settings(tmp_path, "one", url, catalog_file, features_file), seed=1)
        statuses: dict[int, int] = {}
        stop = threading.Event()
        with TestClient(create_app(app), headers={"Authorization": f"Bearer {PUB}"}) as client:
            def load() -> None:
                while not stop.is_set():
                    response = client.post("/v1/decisions", json=decision_body())
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code != 200 or not response.json()["offers"]:
                        continue
                    decision = response.json()
                    events = {"events": [{"event_id": f"e-{time.perf_counter_ns()}", "type": "impression",
                                          "decision_id": decision["decision_id"],
                                          "offer_id": decision["offers"][0]["offer_id"]}]}
                    response = client.post("/v1/events", json=events)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    assert response.status_code == 200, response.text

            worker = threading.Thread(target=load)
            worker.start()
            time.sleep(1.0)
            server.stop("fast")
            down = dict(statuses)
            time.sleep(1.5)  # the feed's checks and the registry poll fail meanwhile; requests must not
            # An admin write cannot be stored now: it says so (503 problem+json, Retry-After), not 500.
            refused = client.put("/v1/offers/discount", headers={"Authorization": f"Bearer {ADMIN}"},
                                 json={"id": "discount", "kind": "discount", "title": "Later", "value": 4})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert client.get("/readyz").status_code == 200  # on purpose: docs/deploy.md
            time.sleep(1.0)
            during = {k: v - down.get(k, 0) for k, v in statuses.items()}
            server.start()
            # After the restart the listener reconnects and a change made elsewhere still arrives.
            other = make_engine(url)
            Catalog(SqlCatalogStore(other)).put_offer(schemas.Offer(id="after-restart", kind="partner",
                                                                    title="Back", value=1.0))
            lag = _until(lambda: "after-restart" in app.catalog.snapshot.offers, timeout=15.0)
            time.sleep(0.5)
            stop.set()
            worker.join()
            other.dispose()
        print(f"\nserving requests by status: {statuses} (while PostgreSQL was down: {during}); a change after the "
              f"restart reached the process {lag:.2f} s after it was committed")
        assert not any(status >= 500 for status in statuses)
        assert during.get(200, 0) > 20  # served while PostgreSQL was down
    finally:
        server.destroy()
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_nul_character_in_an_admin_path_or_reason_is_422_naming_it_not_a_500(
        pg_url, tmp_path, catalog_file, features_file):
    # PostgreSQL text cannot hold NUL: `%00` in an offer, placement or model path was a psycopg DataError (a 500)
    one = Kassa(_settings(tmp_path, "one", pg_url, catalog_file, features_file), seed=1)
    with TestClient(create_app(one), headers={"Authorization": f"Bearer {ADMIN}"}) as a:
        offer = {"id": "a\x00b", "kind": "partner", "title": "NUL"}
        for response, field in [
            (a.put("/v1/offers/a%00b", json=offer), "offer_id"),
            (a.delete("/v1/offers/a%00b"), "offer_id"),
            (a.put("/v1/placements/p%00", json={"id": "p\x00", "offers": ["discount"]}), "placement_id"),
            (a.get("/v1/models", params={"placement": "p\x00"}), "placement"),
            (a.get("/v1/models/v%00"), "version"),
            (a.post("/v1/models/v%00/stage", json={"stage": "production"}), "version"),
            (a.post("/v1/placements/order_confirmation/rollback", json={"reason": "a\x00b"}), "reason"),
        ]:
            assert response.status_code == 422, response.text
            assert response.json()["field"] == field
        assert "a\x00b" not in one.catalog.snapshot.offers
        assert a.get("/v1/offers/discount").status_code == 200  # the database is still fine
        # the dashboard's editors (the header's admin key stands in for a session and its CSRF token)
        offer_doc = msgspec.json.encode(offer).decode()
        assert a.post("/dashboard/offers/a%00b", data={"document": offer_doc}).status_code == 422
        refused = a.post("/dashboard/keys", data={"kind": "publishable", "name": "shop\x00"})
        assert refused.status_code == 422 and "no NUL" in refused.text
        assert all(k["name"] != "shop\x00" for k in one.keys.list())
    one.db.dispose()


def test_a_serving_worker_with_postgres_down_logs_its_registry_poll_once_per_10_s_not_a_traceback_a_second(
        tmp_path, catalog_file, features_file, caplog):
    # `kassa serve --workers N`: each worker polls the registry every second; with PostgreSQL down each poll
    # logged ERROR with a ~120-line traceback (2,200 lines in a 9 s outage from two workers).
    server = PostgresServer()
    server.start()
    try:
        url, _ = fresh_database(server.url)
        app = Kassa(_settings(tmp_path, "w", url, catalog_file, features_file), role="serve")
        caplog.set_level(logging.WARNING, logger="kassa")
        with TestClient(create_app(app), headers={"Authorization": f"Bearer {PUB}"}) as client:
            server.stop("immediate")
            t0 = time.monotonic()
            while time.monotonic() - t0 < 4.5:
                assert client.post("/v1/decisions", json=decision_body()).status_code == 200
                time.sleep(0.05)
            polls = [r for r in caplog.records if "registry" in r.getMessage()]
            assert 1 <= len(polls) <= 2, [r.getMessage()[:200] for r in polls]
            assert sum(r.exc_info is not None for r in polls) <= 1
    finally:
        server.destroy()


def test_the_in_process_learner_with_postgres_down_warns_once_and_learns_on_not_a_traceback_a_second(
        tmp_path, catalog_file, features_file, caplog, clock):
    # `kassa serve` (learner in process) on PostgreSQL: while it was down every registry poll (one a second) and
    # every snapshot logged an ERROR with a traceback ("learning step failed", "snapshot of ... failed").
    server = PostgresServer()
    server.start()
    try:
        url, _ = fresh_database(server.url)
        settings = load_settings(None, data_dir=str(tmp_path / "d"), catalog_file=str(catalog_file),
                                 publishable_key=PUB, **{
                                     "features.definitions_file": str(features_file), "metadata.url": url,
                                     "learn.snapshot_every_seconds": 1, "learn.snapshot_min_learns": 1,
                                     "learn.guard.enabled": False})
        kassa = Kassa(settings, clock=clock)
        with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as client:
            for i in range(5):
                decision = client.post("/v1/decisions", json=decision_body(customer=f"c-{i}")).json()
                event = {"event_id": f"a-{i}", "type": "accept", "decision_id": decision["decision_id"],
                         "offer_id": decision["offers"][0]["offer_id"]}
                assert client.post("/v1/events", json={"events": [event]}).status_code == 200
            server.stop("immediate")
            caplog.set_level(logging.WARNING, logger="kassa")
            clock.advance(61)  # the rewards' window closes: examples to learn, a snapshot due, the registry polled
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3.0:
                clock.advance(1.5)
                time.sleep(0.25)
            assert kassa.learning.learned >= 5
            lines = [r for r in caplog.records if r.name.startswith("kassa.learn")]
            assert not [r for r in lines if r.levelno >= logging.ERROR], [r.getMessage()[:200] for r in lines]
            warned = [r.getMessage() for r in lines if r.getMessage().startswith("learner metadata: ")]
            assert len(warned) == 1 and "learning on in memory and retrying" in warned[0], warned
            assert all(r.exc_info is None for r in lines)
    finally:
        server.destroy()

def test_a_hung_postgres_is_a_timeout_within_the_answer_bound_and_the_engine_reconnects_after_it(tmp_path):
    # SIGSTOPped (connections open, nothing answers): every query waited for as long as it lasted, and `kassa
    # learn` stalled without a line (its status every 10 s stopped too) until SIGCONT.
    server = PostgresServer()
    server.start()
    try:
        url, _ = fresh_database(server.url)
        engine = make_engine(url, answer_timeout=0.5)
        with engine.connect() as held:
            assert held.execute(sa.text("SELECT 1")).scalar() == 1
            server.pause()
            t0 = time.monotonic()
            with pytest.raises(sa.exc.OperationalError, match=r"no answer from PostgreSQL within 0.5 s"):
                held.execute(sa.text("SELECT 1"))
            waited = time.monotonic() - t0
        t0 = time.monotonic()
        with pytest.raises(sa.exc.OperationalError), engine.connect():  # a new connection: connect_timeout
            pass
        reconnect = time.monotonic() - t0
        server.resume()
        with engine.connect() as conn:  # the closed connection was discarded, not handed out again
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        print(f"\nhung PostgreSQL: a query on an open connection failed after {waited:.2f} s, a new connection "
              f"after {reconnect:.2f} s")
        assert waited < 2.0 and reconnect < 6.0
        engine.dispose()
    finally:
        server.destroy()


def test_waiting_for_a_metadata_database_not_created_yet_names_it_without_its_password_then_migrates_it(
        pg_server, caplog):
    # what `kassa serve|learn|stream` do at start (tests/test_roles.py runs them against a server not started yet)
    import psycopg

    name = f"kassa_wait_{os.getpid()}_{time.monotonic_ns() % 10**6}"
    url = sa.engine.make_url(pg_server).set(database=name, password="s3cret")
    admin = sa.engine.make_url(pg_server).set(drivername="postgresql").render_as_string(hide_password=False)
    shown = url.render_as_string(hide_password=True)

    def create_later() -> None:
        time.sleep(0.3)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    caplog.set_level(logging.INFO, logger="kassa.db")
    creator = threading.Thread(target=create_later)
    creator.start()
    try:
        t0 = time.monotonic()
        assert wait_for_database(url.render_as_string(hide_password=False))
        waited = time.monotonic() - t0
        creator.join()
        lines = [r.getMessage() for r in caplog.records]
        assert any(line.startswith(f"metadata database {shown}: unreachable (") and f'"{name}" does not exist' in line
                   and "waiting for it, next try in 1 s" in line for line in lines), lines
        assert not any("s3cret" in line for line in lines)
        assert any(f"metadata database {shown} answered after" in line for line in lines), lines
        assert 0.9 < waited < 3.0
        engine = make_engine(url.render_as_string(hide_password=False), migrate_schema=False)
        assert current_revision(engine) == head_revision()  # migrated by the wait
        engine.dispose()
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_waiting_for_a_metadata_database_ends_when_told_to_stop():
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    assert not wait_for_database("postgresql+psycopg://kassa@127.0.0.1:9/kassa", stop)
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("command", [["models", "list"], ["keys", "list"], ["train", "--placement", "checkout"]])
def test_a_command_with_its_postgres_unreachable_says_so_in_one_line(tmp_path, command):
    # `kassa serve|learn|stream` wait for the database; a one-shot command (models, keys, train, evaluate, features,
    # integrations sync) printed a ~300-line traceback ending in psycopg's OperationalError.
    env = {**os.environ, "KASSA_METADATA__URL": "postgresql+psycopg://kassa:s3cret@127.0.0.1:9/kassa",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src"), "COLUMNS": "300"}
    out = subprocess.run([sys.executable, "-m", "kassa", *command, "--data-dir", str(tmp_path / "data")], env=env,
                         capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip() and "nanobind" not in ln
             and "leaked" not in ln and "See https://nanobind" not in ln]
    assert out.returncode == 1, out.stderr[-2000:]
    assert len(lines) == 1, lines[:5]
    assert lines[0].startswith("cannot reach the metadata database postgresql+psycopg://kassa:***@127.0.0.1:9/kassa: ")
    assert "Connection refused" in lines[0] and "s3cret" not in lines[0], lines[0]


def test_processes_starting_at_one_moment_on_a_new_database_all_start(pg_server, tmp_path, catalog_file,
                                                                      features_file):
    # Pods and learners that waited for PostgreSQL start when it does: each read "no such key", then inserted
    # it, and all but one exited with an IntegrityError (api_keys_pkey) in 7 of 8 such starts of three.
    for trial in range(2):
        url, drop = fresh_database(pg_server)
        settings = [_settings(tmp_path, f"{trial}-{n}", url, catalog_file, features_file) for n in range(3)]
        barrier = threading.Barrier(len(settings))
        built: list[Kassa] = []
        failed: list[BaseException] = []

        def start(s: Settings, barrier: threading.Barrier, built: list[Kassa], failed: list[BaseException]) -> None:
            barrier.wait()
            try:
                built.append(Kassa(s))
            except Exception as exc:
                failed.append(exc)

        threads = [threading.Thread(target=start, args=(s, barrier, built, failed)) for s in settings]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            assert not failed, failed
            assert len(built) == 3 and all(k.keys.list() for k in built)
            # the file applied by whichever came first: the others skipped it and kept the empty catalog they read
            # before it (a learner "standby for -" with no placement, for good)
            assert all(set(k.catalog.snapshot.placements) == {"order_confirmation", "cross_sell"} for k in built)
        finally:
            for kassa in built:
                kassa.db.dispose()
            drop()
