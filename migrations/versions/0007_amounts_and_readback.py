"""Usage periods: the price per unit (amounts at stake) and Stripe's read-back from `verify`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_periods") as batch:
        batch.add_column(sa.Column("unit_amount", sa.String(64), nullable=True))
        batch.add_column(sa.Column("currency", sa.String(8), nullable=True))
        batch.add_column(sa.Column("stripe_total", sa.String(64), nullable=True))
        batch.add_column(sa.Column("verified_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_periods") as batch:
        batch.drop_column("verified_at")
        batch.drop_column("stripe_total")
        batch.drop_column("unit_amount")
        batch.drop_column("currency")
