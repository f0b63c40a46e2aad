"""A stream's health counters when its model last changed, so its error rate counts the
running model's frames only (the agent's counters run from its start, across swaps).

Revision ID: 0003_model_counters
Revises: 0002_rollouts
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_model_counters"
down_revision: str | None = "0002_rollouts"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add the counters' base columns to device_streams."""
    with op.batch_alter_table("device_streams") as batch:
        batch.add_column(sa.Column("model_processed_base", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("model_failed_base", sa.Integer(), nullable=True))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("device_streams") as batch:
        batch.drop_column("model_failed_base")
        batch.drop_column("model_processed_base")
