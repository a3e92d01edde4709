"""OpenMeter's meters as last listed (id and aggregation by slug), so a cycle need not list them every time.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "openmeter_meters",
        sa.Column("slug", sa.String(64), primary_key=True),
        sa.Column("meter_id", sa.String(64), nullable=False),
        sa.Column("aggregation", sa.String(32), nullable=False),
        sa.Column("listed_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("openmeter_meters")
