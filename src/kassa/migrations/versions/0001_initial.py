"""The metadata schema as Kassa 0.2.0 made it with ``create_all``: catalog, keys, feature and model registry.

Each table is created only when it is missing, so a data dir an older Kassa made (no ``alembic_version``;
some of these tables, the newer ones possibly not yet) is adopted by this revision as it is.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _body_table(name: str) -> Callable[[], object]:
    return lambda: op.create_table(
        name,
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def _api_keys() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_hash", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("origins", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )


def _feature_table(name: str) -> Callable[[], object]:
    return lambda: op.create_table(
        name,
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("schema_hash", sa.String(64), nullable=False),
        sa.Column("applied_at", sa.Float, nullable=False),
    )


def _model_versions() -> None:
    op.create_table(
        "model_versions",
        sa.Column("version", sa.String(160), primary_key=True),
        sa.Column("placement", sa.String(128), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("canary_share", sa.Float, nullable=True),
        sa.Column("artifact", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("schema_hash", sa.String(64), nullable=False),
        sa.Column("learner_args", sa.Text, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("parent", sa.String(160), nullable=True),
        sa.Column("train_since", sa.Float, nullable=True),
        sa.Column("train_until", sa.Float, nullable=True),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("stage_changed_at", sa.Float, nullable=False),
        sa.Column("artifact_deleted", sa.Boolean, nullable=False),
    )
    op.create_index("ix_model_versions_placement", "model_versions", ["placement"])


def _model_stage_events() -> None:
    op.create_table(
        "model_stage_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("version", sa.String(160), nullable=False),
        sa.Column("placement", sa.String(128), nullable=False),
        sa.Column("from_stage", sa.String(16), nullable=True),
        sa.Column("to_stage", sa.String(16), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
    )
    op.create_index("ix_model_stage_events_version", "model_stage_events", ["version"])
    op.create_index("ix_model_stage_events_placement", "model_stage_events", ["placement"])


def _model_verdicts() -> None:
    op.create_table(
        "model_verdicts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("version", sa.String(160), nullable=False),
        sa.Column("placement", sa.String(128), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
    )
    op.create_index("ix_model_verdicts_version", "model_verdicts", ["version"])
    op.create_index("ix_model_verdicts_placement", "model_verdicts", ["placement"])


TABLES: dict[str, Callable[[], object]] = {
    "offers": _body_table("offers"),
    "placements": _body_table("placements"),
    "api_keys": _api_keys,
    "feature_entities": _feature_table("feature_entities"),
    "feature_views": _feature_table("feature_views"),
    "model_versions": _model_versions,
    "model_stage_events": _model_stage_events,
    "model_verdicts": _model_verdicts,
}


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for name, create in TABLES.items():
        if name not in existing:
            create()


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
