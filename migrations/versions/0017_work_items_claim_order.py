"""Claiming work items walks (job, state, id) in order (reconciler.ledger.coordination.claim_batch): with only an
index on state, every claim read and sorted every pending item of the plan.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-02
"""

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_work_items_job_state_id", "work_items", ["job", "state", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_work_items_job_state_id", table_name="work_items")
