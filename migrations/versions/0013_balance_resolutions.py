"""A person's decisions on Moesif transactions the balance job could not settle (`reconciler balances resolve`).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "balance_resolutions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("transaction_id", sa.String(255), nullable=False),
        sa.Column("customer_id", sa.String(255), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("was", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("resolved_by", sa.String(255), nullable=False),
        sa.Column("resolved_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_balance_resolutions")),
    )
    op.create_index(
        op.f("ix_balance_resolutions_transaction_id"), "balance_resolutions", ["transaction_id"], unique=False
    )
    op.create_index(op.f("ix_balance_resolutions_resolved_at"), "balance_resolutions", ["resolved_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_balance_resolutions_resolved_at"), table_name="balance_resolutions")
    op.drop_index(op.f("ix_balance_resolutions_transaction_id"), table_name="balance_resolutions")
    op.drop_table("balance_resolutions")
