"""Usage ledger: periods, report intents, late drift, runs.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_periods",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("stream_key", sa.String(255), nullable=False),
        sa.Column("period_start", sa.DateTime(), nullable=False),
        sa.Column("period_end", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("customer_id", sa.String(255), nullable=False),
        sa.Column("subscription_id", sa.String(255), nullable=False),
        sa.Column("subscription_item_id", sa.String(255), nullable=False),
        sa.Column("stripe_target", sa.String(255), nullable=False),
        sa.Column("meter_id", sa.String(255), nullable=True),
        sa.Column("openmeter_meter", sa.String(255), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("target", sa.BigInteger(), nullable=True),
        sa.Column("reported_total", sa.BigInteger(), nullable=False),
        sa.Column("last_event_at", sa.DateTime(), nullable=True),
        sa.Column("next_sequence", sa.Integer(), nullable=False),
        sa.Column("late_total", sa.BigInteger(), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finalized_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("stream_key", "period_start", name="uq_usage_periods_stream_period"),
    )
    op.create_index("ix_usage_periods_customer_id", "usage_periods", ["customer_id"])
    op.create_index("ix_usage_periods_status_period_end", "usage_periods", ["status", "period_end"])
    op.create_table(
        "usage_reports",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "period_id",
            sa.Integer(),
            sa.ForeignKey("usage_periods.id", name="fk_usage_reports_period_id_usage_periods"),
            nullable=False,
        ),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("identifier", sa.String(100), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("total_after", sa.BigInteger(), nullable=False),
        sa.Column("event_timestamp", sa.DateTime(), nullable=False),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.UniqueConstraint("period_id", "sequence", name="uq_usage_reports_period_sequence"),
        sa.UniqueConstraint("identifier", name="uq_usage_reports_identifier"),
    )
    op.create_index("ix_usage_reports_period_id", "usage_reports", ["period_id"])
    op.create_index("ix_usage_reports_state", "usage_reports", ["state"])
    op.create_table(
        "late_drift",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "period_id",
            sa.Integer(),
            sa.ForeignKey("usage_periods.id", name="fk_late_drift_period_id_usage_periods"),
            nullable=False,
        ),
        sa.Column("observed_at", sa.DateTime(), nullable=False),
        sa.Column("reported_total", sa.BigInteger(), nullable=False),
        sa.Column("observed_total", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
    )
    op.create_index("ix_late_drift_period_id", "late_drift", ["period_id"])
    op.create_table(
        "runs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("job", sa.String(32), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("runs")
    op.drop_table("late_drift")
    op.drop_table("usage_reports")
    op.drop_table("usage_periods")
