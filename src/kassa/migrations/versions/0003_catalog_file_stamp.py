"""The catalog file's stamp moves from the data dir into the metadata database.

``applied_files`` holds the SHA-256 of the catalog file last upserted into this database. With several
processes on one PostgreSQL, each with its own data dir, a stamp in the data dir made every new or wiped
data dir upsert the file again, reverting offers changed over the API since; in the database, the file is
applied once per content, whoever starts. (A data dir's old ``catalog_file.sha256`` is adopted once by
`kassa.catalog.Catalog.load_file`.)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "applied_files",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("applied_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("applied_files")
