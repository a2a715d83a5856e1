"""SQL metadata database (catalog, placements, API keys, feature and model registries, change counters):
SQLite embedded, PostgreSQL in production (``metadata.url``).

SQLAlchemy 2 Core only. Nothing here is on the decision hot path: the services keep in-memory copies.
The schema is owned by the Alembic migrations in ``kassa/migrations`` (`migrate`), not by ``create_all``:
`make_engine` brings a database to the newest revision before anything reads it. The tables below mirror
those migrations for the queries; ``tests/test_metadata_pg.py`` checks that the two agree.

`bump` is the one way a writer says "this topic changed": it increments the topic's row of
``change_versions`` in the writer's own transaction. On PostgreSQL a trigger (migration 0002) turns that
row change into ``NOTIFY kassa_changes`` at commit; on SQLite every process polls the few rows. Either
way `kassa.changes.ChangeFeed` sees it and reloads that topic (catalog, keys, features, models).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    inspect,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("kassa.db")
# Alembic 1.16+ logs seven "setup plugin ..." lines at INFO when its script module is first imported: in front
# of every CLI command's output (`kassa keys list`), under the root logger's INFO. Its migration lines stay.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

metadata = MetaData()

offers_table = Table(
    "offers",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("body", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)

placements_table = Table(
    "placements",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("body", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)

api_keys_table = Table(
    "api_keys",
    metadata,
    Column("key_hash", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("name", String(128), nullable=False),
    Column("origins", Text, nullable=False),  # JSON list; empty = any origin
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

# Change counters: a writer bumps its row in the same transaction as the change, so every process
# notices the change by polling one primary-key row (cheap) instead of re-reading the whole table.
change_versions_table = Table(
    "change_versions",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
)

# Model artifacts (and their serving sidecars) by registry-relative name, when ``metadata.artifacts`` puts
# them in the database (kassa.learn.artifacts; ADR 0007). The registry tables themselves are in
# kassa/learn/registry.py.
model_artifacts_table = Table(
    "model_artifacts",
    metadata,
    Column("name", String(300), primary_key=True),
    Column("body", LargeBinary, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
)

# What a file last applied to this database was (its SHA-256): the catalog file is upserted once per
# content, whichever process starts first (migration 0003).
applied_files_table = Table(
    "applied_files",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("applied_at", Float, nullable=False),
)

# The feature registry: the definitions last applied, one JSON body per entity / view. ``schema_hash``
# is what the stored values' encoding depends on, so backends can notice a change without parsing bodies.
feature_entities_table = Table(
    "feature_entities",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("body", Text, nullable=False),
    Column("schema_hash", String(64), nullable=False),
    Column("applied_at", Float, nullable=False),
)

feature_views_table = Table(
    "feature_views",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("body", Text, nullable=False),
    Column("schema_hash", String(64), nullable=False),
    Column("applied_at", Float, nullable=False),
)


# The topics of `bump`: what a process reloads when its counter moves.
CATALOG = "catalog"  # offers, placements, a catalog file or platform sync
KEYS = "api_keys"  # a key created or revoked
FEATURES = "features"  # feature definitions applied
MODELS = "models"  # a model version registered, promoted, rolled back
TOPICS = (CATALOG, KEYS, FEATURES, MODELS)


def bump(conn: Connection, topic: str) -> None:
    """Record, inside the caller's transaction, that ``topic`` changed (see the module docstring)."""
    t = change_versions_table
    if conn.execute(update(t).where(t.c.name == topic).values(version=t.c.version + 1)).rowcount == 0:
        conn.execute(insert(t).values(name=topic, version=1))


# Most a PostgreSQL connection waits for one answer (a statement, a fetch, a commit, the pool's pre-ping) before it
# is closed and the caller gets an OperationalError: a server that accepts TCP but never answers (SIGSTOPped,
# swapped out, a hung storage) stalled the learner for as long as it lasted, without a word (its status line every
# 10 s stopped too). Nothing here is on the hot path and every metadata statement is small: ~1 ms typical, 40 ms
# for the whole schema's migrations on an empty database; a concurrent migrator is waited for under the same bound.
ANSWER_TIMEOUT_SECONDS = 10.0
# Most a PostgreSQL session may sit idle inside a transaction before the server ends it (rolling it back, its row
# locks released): `metadata.idle_in_transaction_seconds`. A process paused (SIGSTOP, a VM freeze) in its registry
# write kept the placement's `learner_fences` row locked, so the standby's takeover, which bumps that row, waited
# until it resumed. Kassa's transactions are a few statements back to back (the longest gap: copying a snapshot file
# between two of them, milliseconds); 5 s stays under the lease's own takeover time (ADR 0009).
IDLE_IN_TRANSACTION_SECONDS = 5.0
_IDLE_IN_TRANSACTION_ENDED = "25P03"  # the SQLSTATE of the server ending such a session (psycopg: an InternalError)


def ended_idle_in_transaction(exc: BaseException) -> bool:
    """Whether ``exc`` is PostgreSQL ending this session because it sat idle inside a transaction past
    ``idle_in_transaction``: the transaction was rolled back, the connection is gone (the pool replaces it)."""
    return getattr(getattr(exc, "orig", None), "sqlstate", None) == _IDLE_IN_TRANSACTION_ENDED


class StartSessionEnded(SystemExit):
    """A start-up write's session ended by the server (`ended_idle_in_transaction`): one line, not a traceback."""

    def __init__(self, what: str, engine: Engine) -> None:
        shown = engine.url.render_as_string(hide_password=True)
        super().__init__(f"cannot start: the metadata database {shown} ended the session of {what}: this process sat "
                         "inside the transaction longer than metadata.idle_in_transaction_seconds (paused, or "
                         "starved of CPU); nothing of it was committed: start it again")


def _answering_connection_class(limit: float) -> type[psycopg.Connection[Any]]:
    """A psycopg ``Connection`` whose waits for the server end after ``limit`` seconds (psycopg's own waits have
    none): the connection, in an unknown state, is closed, so SQLAlchemy discards it and the next checkout connects
    afresh (``connect_timeout`` bounds that)."""
    import psycopg
    from psycopg.connection import _WAIT_INTERVAL
    from psycopg.errors import _WaitTimeout

    class AnsweringConnection(psycopg.Connection[Any]):
        def wait(self, gen: Any, interval: float = _WAIT_INTERVAL, timeout: float | None = None) -> Any:
            if timeout is not None:  # the caller's own bound (notifies): its business
                return super().wait(gen, interval, timeout)
            try:
                return super().wait(gen, interval, limit)
            except _WaitTimeout:
                self.pgconn.finish()
                raise psycopg.OperationalError(f"no answer from PostgreSQL within {limit:g} s (a hung or stopped "
                                               "server); the connection was closed") from None

    return AnsweringConnection


def make_engine(url_or_path: str | Path, migrate_schema: bool = True,
                answer_timeout: float = ANSWER_TIMEOUT_SECONDS,
                idle_in_transaction: float = IDLE_IN_TRANSACTION_SECONDS) -> Engine:
    """An engine for a database URL, or a SQLite file path (created, WAL mode), migrated to the newest
    schema revision (`migrate`) unless ``migrate_schema`` is False. On PostgreSQL no wait for the server lasts
    longer than ``answer_timeout`` seconds (`ANSWER_TIMEOUT_SECONDS`), and the server itself ends a statement
    running that long and a session idle inside a transaction for ``idle_in_transaction`` seconds (0: never;
    `IDLE_IN_TRANSACTION_SECONDS`), so a paused or gone client does not keep its locks."""
    url = str(url_or_path)
    if "://" not in url:
        url = f"sqlite:///{url}"
    database = make_url(url).database if url.startswith("sqlite") else None
    if database and database != ":memory:":  # a file: its folder is made (a data dir, or metadata.url's)
        folder = Path(database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file where the data dir should be: every CLI command was a traceback
            raise SystemExit(f"cannot use {folder} as the data dir ({exc.strerror or exc}); point "
                             "--data-dir (data_dir, KASSA_DATA_DIR) at a folder Kassa may write") from None
    if url.startswith("postgresql"):
        # pre_ping: after a PostgreSQL restart a pooled connection is dead; the next checkout notices and
        # reconnects instead of failing the caller's first query. connect_timeout bounds a dead server.
        engine = create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4, pool_timeout=5,
                               connect_args={"connect_timeout": 3})
        if engine.dialect.driver == "psycopg":
            connection_class = _answering_connection_class(answer_timeout)

            @event.listens_for(engine, "do_connect")
            def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
                return connection_class.connect(*cargs, **cparams)

        # Set per session, not as startup `options` (a PgBouncer in front refuses those). statement_timeout: the
        # server's side of ``answer_timeout``: a statement the client gave up on (waiting on a lock, say) no longer
        # runs on, holding the locks its transaction took, until it would next write to the closed socket.
        timeouts = (f"{round(idle_in_transaction * 1000)}", f"{round(answer_timeout * 1000)}")

        @event.listens_for(engine, "connect")
        def _session_timeouts(dbapi_conn: Any, _record: Any) -> None:
            autocommit = dbapi_conn.autocommit
            dbapi_conn.autocommit = True  # a SET outside any transaction: nothing left open on the new session
            try:
                cur = dbapi_conn.cursor()
                cur.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, false), "
                            "set_config('statement_timeout', %s, false)", timeouts)
                cur.close()
            finally:
                dbapi_conn.autocommit = autocommit

    else:
        engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.close()

    if migrate_schema:
        migrate(engine)
    return engine


def wait_for_database(url: str, stop: threading.Event | None = None, first_delay: float = 1.0,
                      max_delay: float = 10.0) -> bool:
    """Open and migrate the metadata database at ``url``, waiting while PostgreSQL cannot be reached (down, not
    answering, the database not created yet): a WARNING naming the database and the reason, at most one per 10 s,
    and tries after 1, 2, 4, 8 s, then every ``max_delay``. True once it answers; False when ``stop`` was set (or
    Ctrl-C) meanwhile. `kassa serve`, `kassa learn` and `kassa stream` call it before building anything: they
    exited with a ~60-line traceback, and under a supervisor were restarted into it until the database was back.
    A SQLite file returns at once: what is wrong with a local file does not heal by waiting (`make_engine` says
    it)."""
    if not url.startswith("postgresql"):
        return True
    import time

    from sqlalchemy.exc import InterfaceError, OperationalError

    from kassa.degraded import RateLimitedWarning

    shown = make_url(url).render_as_string(hide_password=True)
    warn = RateLimitedWarning(log, f"metadata database {shown}")
    stop = stop or threading.Event()
    delay, started, failed = first_delay, time.monotonic(), False
    while True:
        try:
            engine = make_engine(url)
        except (OperationalError, InterfaceError) as exc:
            reason = str(exc.orig or exc).strip().splitlines()[0]
            warn(f"unreachable ({reason}); waiting for it, next try in {delay:g} s")
            failed = True
        else:
            engine.dispose()
            if failed:
                log.info("metadata database %s answered after %.0f s", shown, time.monotonic() - started)
            return True
        try:
            if stop.wait(delay):
                return False
        except KeyboardInterrupt:
            return False
        delay = min(delay * 2, max_delay)


# ------------------------------------------------------------------ migrations
_MIGRATIONS = Path(__file__).parent / "migrations"
_head: list[str] = []  # the newest revision, read from the scripts once per process
_guard = threading.Lock()
_PG_LOCK = 0x6B61737361  # pg_advisory_xact_lock key ("kassa"): one migrator at a time per database


def head_revision() -> str:
    if not _head:
        from alembic.script import ScriptDirectory

        _head.append(ScriptDirectory(str(_MIGRATIONS)).get_current_head() or "")
    return _head[0]


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated, maybe made by an older Kassa's create_all)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: Engine) -> str:
    """Bring the database to the newest revision (``alembic upgrade head``); idempotent, safe when several
    processes start at once (a PostgreSQL advisory lock, a lock file beside a SQLite database).

    A database an older Kassa made with ``create_all`` has no ``alembic_version``: revision 0001 creates
    only the tables it lacks, so the upgrade adopts it (stamps 0001) and carries on to head. Returns the
    revision the database was at before (``"none"`` for a fresh or pre-Alembic one)."""
    # One transaction, which the server ends (rolled back) if this process pauses in it past idle_in_transaction:
    # run it again rather than exit with an InternalError traceback (`kassa serve|learn|stream` start with this).
    attempt = 1
    while True:
        try:
            return _migrate(engine)
        except DBAPIError as exc:
            if not ended_idle_in_transaction(exc):
                raise
            if attempt == _MIGRATION_TRIES:
                raise StartSessionEnded("its migration", engine) from None
            attempt += 1
            log.warning("metadata database %s ended the session of its migration (idle in its transaction past "
                        "idle_in_transaction_session_timeout: this process was paused); migrating again",
                        engine.url.render_as_string(hide_password=True))


_MIGRATION_TRIES = 3


def _migrate(engine: Engine) -> str:
    head = head_revision()
    before = current_revision(engine)  # the usual start: one small read, already at head
    if before == head:
        return before
    with _guard, _migration_lock(engine):
        before = current_revision(engine)
        if before != head:
            from alembic import command
            from alembic.config import Config

            cfg = Config()
            cfg.set_main_option("script_location", str(_MIGRATIONS))
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
            log.info("metadata database migrated from %s to %s", before or "none", head)
    return before or "none"


@contextlib.contextmanager
def start_writes_lock(engine: Engine) -> Iterator[None]:
    """One process at a time writes what its settings bring at start (the catalog file, the bootstrap keys, the
    feature definitions). Each of those reads, then inserts: processes that started at the same moment (every pod
    and learner once a PostgreSQL they waited for is up, `wait_for_database`) both inserted the same key and one
    exited with an IntegrityError. PostgreSQL: a session advisory lock; SQLite: the migration lock file. A write
    whose session the server ended (this process paused inside it, `ended_idle_in_transaction`) ends the start
    with one line (`StartSessionEnded`): a supervisor starts it again, and the writes are all idempotent."""
    if engine.dialect.name != "postgresql":
        with _migration_lock(engine):
            yield
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK + 1})
        conn.commit()
        try:
            yield
        except DBAPIError as exc:
            if ended_idle_in_transaction(exc):
                raise StartSessionEnded("its start-up writes", engine) from None
            raise
        finally:
            with contextlib.suppress(Exception):  # the database went away meanwhile: the session lock went with it
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK + 1})
                conn.commit()


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: one process per SQLite file there anyway
        yield
        return
    with open(f"{database}.migrate.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
