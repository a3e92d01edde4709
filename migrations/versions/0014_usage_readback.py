"""The read-back job: what it found for each period, and the meter events Stripe said it rejected.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01
"""

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_periods") as batch:
        batch.add_column(sa.Column("read_back_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("read_back_finding", sa.String(32), nullable=True))
        batch.add_column(sa.Column("read_back_note", sa.Text(), nullable=True))
    with op.batch_alter_table("usage_reports") as batch:
        batch.add_column(sa.Column("rejected_at", sa.DateTime(), nullable=True))
    # Final periods that ended days before this version have invoices that finalized long ago: a read-back could
    # change nothing there (`verify` still reads them on demand), so they count as read back and the upgrade does
    # not start with a burst of summary calls about the past. Recent ones are read back as usual.
    op.get_bind().execute(
        sa.text(
            "UPDATE usage_periods SET read_back_at = updated_at, read_back_finding = 'before_read_back' "
            "WHERE status = 'final' AND period_end < :cutoff"
        ),
        {"cutoff": datetime.now(UTC).replace(tzinfo=None) - timedelta(days=2)},  # naive UTC, as the ledger stores
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_reports") as batch:
        batch.drop_column("rejected_at")
    with op.batch_alter_table("usage_periods") as batch:
        batch.drop_column("read_back_note")
        batch.drop_column("read_back_finding")
        batch.drop_column("read_back_at")
