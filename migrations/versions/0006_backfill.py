"""Backfill checkpoints.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backfill_runs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
    )
    op.create_index("ix_backfill_runs_key", "backfill_runs", ["key"])
    op.create_table(
        "backfill_items",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "run_id",
            sa.String(36),
            sa.ForeignKey("backfill_runs.id", name="fk_backfill_items_run_id_backfill_runs"),
            nullable=False,
        ),
        sa.Column("unit_key", sa.String(255), nullable=False),
        sa.Column("done_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("run_id", "unit_key", name="uq_backfill_items_run_unit"),
    )
    op.create_index("ix_backfill_items_run_id", "backfill_items", ["run_id"])


def downgrade() -> None:
    op.drop_table("backfill_items")
    op.drop_table("backfill_runs")
