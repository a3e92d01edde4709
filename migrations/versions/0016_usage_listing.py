"""A running usage cycle's listing, kept in the ledger instead of memory (reconciler.ledger.listing).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_listing",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("listing_id", sa.String(36), nullable=False),
        sa.Column("stream_key", sa.String(255), nullable=False),
        sa.Column("period_start", sa.DateTime(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_listing")),
    )
    op.create_index(
        "ix_usage_listing_listing_stream", "usage_listing", ["listing_id", "stream_key", "period_start"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_usage_listing_listing_stream", table_name="usage_listing")
    op.drop_table("usage_listing")
