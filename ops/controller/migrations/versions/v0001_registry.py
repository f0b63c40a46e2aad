"""The device registry: devices, their streams, groups, tags, and the audit log.

Revision ID: 0001_registry
Revises: (none; the first)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_registry"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create the registry's tables."""
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("actor", sa.String(length=1024), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=1024), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"], unique=False)
    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("first_seen", sa.Double(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("status_ts", sa.Double(), nullable=True),
        sa.Column("online_since", sa.Double(), nullable=True),
        sa.Column("offline_since", sa.Double(), nullable=True),
        sa.Column("agent_version", sa.String(length=64), nullable=True),
        sa.Column("backends", sa.JSON(), nullable=True),
        sa.Column("capabilities", sa.JSON(), nullable=True),
        sa.Column("health_ts", sa.Double(), nullable=True),
        sa.Column("started_at", sa.Double(), nullable=True),
        sa.Column("uptime_s", sa.Double(), nullable=True),
        sa.Column("cpu_percent", sa.Double(), nullable=True),
        sa.Column("rss_mb", sa.Double(), nullable=True),
        sa.Column("load_1m", sa.Double(), nullable=True),
        sa.Column("temperature_c", sa.Double(), nullable=True),
        sa.Column("throttled", sa.Boolean(), nullable=True),
        sa.Column("throttled_flags", sa.JSON(), nullable=True),
        sa.Column("outbox_depth", sa.Integer(), nullable=True),
        sa.Column("events_dropped", sa.Integer(), nullable=True),
        sa.Column("events_lost", sa.Integer(), nullable=True),
        sa.Column("outbox_problem", sa.Text(), nullable=True),
        sa.Column("mqtt_reconnects", sa.Integer(), nullable=True),
        sa.Column("mqtt_problem", sa.Text(), nullable=True),
        sa.Column("clock_synchronised", sa.Boolean(), nullable=True),
        sa.Column("parts_failing", sa.JSON(), nullable=True),
        sa.Column("certificate_days_left", sa.Double(), nullable=True),
        sa.Column("reported_ts", sa.Double(), nullable=True),
        sa.Column("desired_revision", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    op.create_index(op.f("ix_devices_last_seen"), "devices", ["last_seen"], unique=False)
    op.create_index(op.f("ix_devices_status"), "devices", ["status"], unique=False)
    op.create_table(
        "groups",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_groups")),
        sa.UniqueConstraint("name", name=op.f("uq_groups_name")),
    )
    op.create_table(
        "device_streams",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("stream", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=64), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("model_sha256", sa.String(length=64), nullable=True),
        sa.Column("task", sa.String(length=32), nullable=True),
        sa.Column("backend", sa.String(length=64), nullable=True),
        sa.Column("delegate", sa.String(length=64), nullable=True),
        sa.Column("update_state", sa.String(length=16), nullable=True),
        sa.Column("update_reason", sa.Text(), nullable=True),
        sa.Column("update_model_id", sa.String(length=64), nullable=True),
        sa.Column("update_version", sa.Integer(), nullable=True),
        sa.Column("update_sha256", sa.String(length=64), nullable=True),
        sa.Column("update_ts", sa.Double(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=True),
        sa.Column("fps", sa.Double(), nullable=True),
        sa.Column("latency_p50_ms", sa.Double(), nullable=True),
        sa.Column("latency_p99_ms", sa.Double(), nullable=True),
        sa.Column("inference_p50_ms", sa.Double(), nullable=True),
        sa.Column("inference_p99_ms", sa.Double(), nullable=True),
        sa.Column("processed", sa.Integer(), nullable=True),
        sa.Column("failed", sa.Integer(), nullable=True),
        sa.Column("skipped", sa.Integer(), nullable=True),
        sa.Column("events_lost", sa.Integer(), nullable=True),
        sa.Column("source_failures", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("desired_model_id", sa.String(length=64), nullable=True),
        sa.Column("desired_version", sa.Integer(), nullable=True),
        sa.Column("desired_sha256", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_streams_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "stream", name=op.f("pk_device_streams")),
    )
    op.create_index(
        op.f("ix_device_streams_model_sha256"), "device_streams", ["model_sha256"], unique=False
    )
    op.create_index(
        op.f("ix_device_streams_update_state"), "device_streams", ["update_state"], unique=False
    )
    op.create_table(
        "device_tags",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_tags_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "key", name=op.f("pk_device_tags")),
    )
    op.create_index(op.f("ix_device_tags_value"), "device_tags", ["value"], unique=False)
    op.create_table(
        "group_members",
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_group_members_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
            name=op.f("fk_group_members_group_id_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", "device_id", name=op.f("pk_group_members")),
    )
    op.create_index(
        op.f("ix_group_members_device_id"), "group_members", ["device_id"], unique=False
    )


def downgrade() -> None:
    """Drop them."""
    op.drop_index(op.f("ix_group_members_device_id"), table_name="group_members")
    op.drop_table("group_members")
    op.drop_index(op.f("ix_device_tags_value"), table_name="device_tags")
    op.drop_table("device_tags")
    op.drop_index(op.f("ix_device_streams_update_state"), table_name="device_streams")
    op.drop_index(op.f("ix_device_streams_model_sha256"), table_name="device_streams")
    op.drop_table("device_streams")
    op.drop_table("groups")
    op.drop_index(op.f("ix_devices_status"), table_name="devices")
    op.drop_index(op.f("ix_devices_last_seen"), table_name="devices")
    op.drop_table("devices")
    op.drop_index(op.f("ix_audit_log_at"), table_name="audit_log")
    op.drop_table("audit_log")
