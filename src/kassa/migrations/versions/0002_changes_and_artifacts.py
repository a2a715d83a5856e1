"""Change counters for cross-process change notification, and model artifacts in the database.

``change_versions``: one row per topic (catalog, api_keys, features, models) that every writer bumps in its
own transaction (`kassa.db.bump`). On PostgreSQL a row trigger turns each bump into
``NOTIFY kassa_changes, '<topic>'``, delivered at commit to every listening process; SQLite processes
poll the rows. ``model_artifacts``: a model file (or its serving sidecar) by registry-relative name, for
``metadata.artifacts: database`` (docs/adr/0007-metadata-on-postgresql.md).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TOPICS = ("catalog", "api_keys", "features", "models")


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    if "change_versions" not in existing:  # a build with the key counter alone may have made it already
        op.create_table(
            "change_versions",
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("version", sa.Integer, nullable=False),
        )
    # Seeded, so a bump is always an UPDATE: two first writers never race on the INSERT.
    have = {r[0] for r in bind.execute(sa.text("SELECT name FROM change_versions"))}
    for topic in TOPICS:
        if topic not in have:
            bind.execute(sa.text("INSERT INTO change_versions (name, version) VALUES (:n, 0)"), {"n": topic})
    op.create_table(
        "model_artifacts",
        sa.Column("name", sa.String(300), primary_key=True),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    if bind.dialect.name == "postgresql":
        op.execute("""
            CREATE OR REPLACE FUNCTION kassa_change_notify() RETURNS trigger AS $$
            BEGIN
                PERFORM pg_notify('kassa_changes', NEW.name);
                RETURN NEW;
            END;
            $$ LANGUAGE plpgsql
        """)
        op.execute("""
            CREATE TRIGGER kassa_change_notify AFTER INSERT OR UPDATE ON change_versions
            FOR EACH ROW EXECUTE FUNCTION kassa_change_notify()
        """)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS kassa_change_notify ON change_versions")
        op.execute("DROP FUNCTION IF EXISTS kassa_change_notify()")
    op.drop_table("model_artifacts")
    op.drop_table("change_versions")
