"""The fencing token of `kassa learn`'s leases: each placement's newest lease epoch.

A learner takes the placement's next epoch (``learner_fences``) when it takes the placement over, and each
snapshot it registers carries it; the registry refuses, in the registering transaction, one lower than the
newest, so a learner paused past its lease cannot publish over its successor (ADR 0009, addendum of
2026-12-07 evening).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "learner_fences",
        sa.Column("placement", sa.String(128), primary_key=True),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("taken_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("learner_fences")
