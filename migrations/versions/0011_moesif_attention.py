"""Why a person must look at a Moesif transaction the job cannot settle itself (an invoice payment once forwarded
as a top-up, say).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("moesif_transactions") as batch:
        batch.add_column(sa.Column("attention", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("moesif_transactions") as batch:
        batch.drop_column("attention")
