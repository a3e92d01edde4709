"""Usage reports: which idempotency key a report is sent under (0 = the first; n after n 5xx answers).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every existing report was sent under key 0 (`reconciler-{identifier}`), so a pending one keeps its key.
    with op.batch_alter_table("usage_reports") as batch:
        batch.add_column(sa.Column("idempotency_key_number", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage_reports") as batch:
        batch.drop_column("idempotency_key_number")
