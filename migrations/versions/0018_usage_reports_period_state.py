"""A period's pending intent found by (period_id, state) (reconciler.ledger.usage_ledger): on a ledger whose
statistics lag behind (a big first cycle, or autovacuum off), PostgreSQL answered "period_id = ? AND state =
'pending'" by intersecting the state index, whose 'pending' entries grow with every intent ever written, with the
period's: a cost per item that grew with the ledger.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-02
"""

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_usage_reports_period_state", "usage_reports", ["period_id", "state"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_usage_reports_period_state", table_name="usage_reports")
