"""When a usage report's latest resend may have left: Stripe's summary is not read for it before stripe.summary_lag.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_reports") as batch:
        batch.add_column(sa.Column("attempted_at", sa.DateTime(), nullable=True))
    # A pending report may have been resent moments before the upgrade, unrecorded: it counts as resent now, so its
    # summary waits out the lag once more (naive UTC, as the ledger stores datetimes).
    op.get_bind().execute(
        sa.text("UPDATE usage_reports SET attempted_at = :now WHERE state = 'pending'"),
        {"now": datetime.now(UTC).replace(tzinfo=None)},
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_reports") as batch:
        batch.drop_column("attempted_at")
