"""When a Moesif transaction's first request may have left: a pending row without it was never sent.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("moesif_transactions") as batch:
        batch.add_column(sa.Column("attempted_at", sa.DateTime(), nullable=True))
    # Rows written before this column existed may have been sent: they keep the old, cautious treatment.
    op.execute("UPDATE moesif_transactions SET attempted_at = created_at")


def downgrade() -> None:
    with op.batch_alter_table("moesif_transactions") as batch:
        batch.drop_column("attempted_at")
