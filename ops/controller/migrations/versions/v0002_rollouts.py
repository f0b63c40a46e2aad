"""Rollouts: their plans and states, decisions, operator commands and desired writes; the
figures of a stream's previous model, kept when its model changes.

Revision ID: 0002_rollouts
Revises: 0001_registry
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_rollouts"
down_revision: str | None = "0001_registry"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create the rollouts' tables; add the previous model's columns to device_streams."""
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("release_id", sa.String(length=144), nullable=False),
        sa.Column("stream", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("release_manifest", sa.JSON(), nullable=False),
        sa.Column("rollback_manifest", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=1024), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
    )
    op.create_index(op.f("ix_rollouts_release_id"), "rollouts", ["release_id"], unique=False)
    op.create_index(op.f("ix_rollouts_status"), "rollouts", ["status"], unique=False)
    op.create_table(
        "rollout_decisions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("devices", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(length=1024), nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_rollout_decisions_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_decisions")),
        sa.UniqueConstraint("rollout_id", "seq", name=op.f("uq_rollout_decisions_rollout_id")),
    )
    op.create_index(
        op.f("ix_rollout_decisions_rollout_id"), "rollout_decisions", ["rollout_id"], unique=False
    )
    op.create_table(
        "rollout_commands",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=1024), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("applied_at", sa.Double(), nullable=True),
        sa.Column("refused", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_rollout_commands_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_commands")),
    )
    op.create_index(
        op.f("ix_rollout_commands_rollout_id"), "rollout_commands", ["rollout_id"], unique=False
    )
    op.create_table(
        "desired_writes",
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("stream", sa.String(length=64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(length=16), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("decided_at", sa.Double(), nullable=False),
        sa.Column("written_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_desired_writes_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name=op.f("pk_desired_writes")),
    )
    op.create_index(
        op.f("ix_desired_writes_device_id"), "desired_writes", ["device_id"], unique=False
    )
    with op.batch_alter_table("device_streams") as batch:
        batch.add_column(sa.Column("previous_model_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("previous_error_rate", sa.Double(), nullable=True))
        batch.add_column(sa.Column("previous_latency_p99_ms", sa.Double(), nullable=True))
        batch.add_column(sa.Column("model_since", sa.Double(), nullable=True))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("device_streams") as batch:
        batch.drop_column("model_since")
        batch.drop_column("previous_latency_p99_ms")
        batch.drop_column("previous_error_rate")
        batch.drop_column("previous_model_sha256")
    op.drop_index(op.f("ix_desired_writes_device_id"), table_name="desired_writes")
    op.drop_table("desired_writes")
    op.drop_index(op.f("ix_rollout_commands_rollout_id"), table_name="rollout_commands")
    op.drop_table("rollout_commands")
    op.drop_index(op.f("ix_rollout_decisions_rollout_id"), table_name="rollout_decisions")
    op.drop_table("rollout_decisions")
    op.drop_index(op.f("ix_rollouts_status"), table_name="rollouts")
    op.drop_index(op.f("ix_rollouts_release_id"), table_name="rollouts")
    op.drop_table("rollouts")
