"""Metered items the usage sync will not report (unmapped or refused), as last seen: money at risk in `report`.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "unbilled_items",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("customer_id", sa.String(255), nullable=False),
        sa.Column("subscription_item_id", sa.String(255), nullable=False),
        sa.Column("stripe_target", sa.String(255), nullable=False),
        sa.Column("unmapped", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("period_start", sa.DateTime(), nullable=True),
        sa.Column("period_end", sa.DateTime(), nullable=True),
        sa.Column("measured", sa.BigInteger(), nullable=True),
        sa.Column("unit_amount", sa.String(64), nullable=True),
        sa.Column("currency", sa.String(8), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_unbilled_items")),
        sa.UniqueConstraint("subscription_item_id", "stripe_target", name="uq_unbilled_items_item_target"),
    )
    op.create_index(op.f("ix_unbilled_items_customer_id"), "unbilled_items", ["customer_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_unbilled_items_customer_id"), table_name="unbilled_items")
    op.drop_table("unbilled_items")
