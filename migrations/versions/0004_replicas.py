"""Many replicas on PostgreSQL: replicas, cycle ticks, leased work items.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_replicas_heartbeat_at", "replicas", ["heartbeat_at"])
    op.create_table(
        "cycle_ticks",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job", sa.String(32), nullable=False),
        sa.Column("tick_key", sa.String(64), nullable=False),
        sa.Column("planned_by", sa.String(36), nullable=False),
        sa.Column("planned_at", sa.DateTime(), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("job", "tick_key", name="uq_cycle_ticks_job_tick"),
    )
    op.create_table(
        "work_items",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "tick_id",
            sa.Integer(),
            sa.ForeignKey("cycle_ticks.id", name="fk_work_items_tick_id_cycle_ticks"),
            nullable=False,
        ),
        sa.Column("job", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("lease_owner", sa.String(36), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("fencing_token", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_work_items_tick_id", "work_items", ["tick_id"])
    op.create_index("ix_work_items_state", "work_items", ["state"])


def downgrade() -> None:
    op.drop_table("work_items")
    op.drop_table("cycle_ticks")
    op.drop_table("replicas")
