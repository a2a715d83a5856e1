"""SQL metadata database (catalog, placements, API keys): SQLite embedded, PostgreSQL in production.

SQLAlchemy 2 Core only. Nothing here is on the decision hot path: the services keep in-memory copies.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Column, Engine, Float, Integer, MetaData, String, Table, Text, create_engine, event

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


def make_engine(url_or_path: str | Path) -> Engine:
    """An engine for a database URL, or a SQLite file path (created, WAL mode)."""
    url = str(url_or_path)
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{url}"
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.close()

    metadata.create_all(engine)
    return engine
