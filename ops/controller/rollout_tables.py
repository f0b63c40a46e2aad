"""The rollouts' tables: rollouts, their decisions, operator commands, and desired writes.

- ``rollouts``: one row per rollout; the plan (fixed) and the engine's state (JSON, the
  ``rollouts.RolloutState`` the last decision left), the signed release and rollback
  manifests the rollout publishes, and ``version``, raised by every write of the state
  (optimistic locking: a write names the version it read).
- ``rollout_decisions``: every ``DecisionRecord``, numbered per rollout (``seq``), with its
  reason.
- ``rollout_commands``: operator commands by id (pause, resume, halt, rollback), who and why;
  ``applied_at`` / ``refused`` once a decision took or refused it.
- ``desired_writes``: per rollout and device, the desired state the controller decided to
  write (step, target, manifest, revision, the exact payload) and ``written_at`` once the
  broker acknowledged it: a restarted controller publishes a row not yet written again,
  byte for byte, and never a different one for the same step.

Revision: ``migrations/versions/v0002_rollouts.py``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Double, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from .db import ID_LENGTH, NAME_LENGTH, Base

_ACTOR_LENGTH = 1_024
_RELEASE_ID_LENGTH = 2 * NAME_LENGTH + 16  # MODEL_ID@VERSION


class RolloutRow(Base):
    """One rollout: its plan, the engine's state, the manifests it sets, and a version."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    release_id: Mapped[str] = mapped_column(String(_RELEASE_ID_LENGTH), index=True)
    stream: Mapped[str] = mapped_column(String(ID_LENGTH))
    status: Mapped[str] = mapped_column(String(16), index=True)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    release_manifest: Mapped[dict[str, Any]] = mapped_column(JSON)  # SignedManifest
    rollback_manifest: Mapped[dict[str, Any]] = mapped_column(JSON)  # SignedManifest
    created_by: Mapped[str] = mapped_column(String(_ACTOR_LENGTH))
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    version: Mapped[int] = mapped_column(Integer)


class RolloutDecisionRow(Base):
    """One decision of a rollout, with its reason (the engine's ``DecisionRecord``)."""

    __tablename__ = "rollout_decisions"
    __table_args__ = (UniqueConstraint("rollout_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    seq: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per rollout, in decision order
    at: Mapped[float] = mapped_column(Double)
    kind: Mapped[str] = mapped_column(String(32))
    wave: Mapped[int | None] = mapped_column(Integer)
    devices: Mapped[list[str]] = mapped_column(JSON)
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(_ACTOR_LENGTH))


class RolloutCommandRow(Base):
    """An operator's command to a rollout, by id; applied (or refused) by the next step."""

    __tablename__ = "rollout_commands"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    rollout_id: Mapped[str] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(_ACTOR_LENGTH))
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[float] = mapped_column(Double)
    applied_at: Mapped[float | None] = mapped_column(Double)
    refused: Mapped[str | None] = mapped_column(Text)


class DesiredWriteRow(Base):
    """What a rollout decided to write to one device's retained desired state, and when the
    broker took it (``written_at``; None: decided, not yet acknowledged)."""

    __tablename__ = "desired_writes"

    rollout_id: Mapped[str] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, index=True)
    stream: Mapped[str] = mapped_column(String(ID_LENGTH))
    step: Mapped[int] = mapped_column(Integer)
    target: Mapped[str] = mapped_column(String(16))  # release or rollback
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    revision: Mapped[int] = mapped_column(Integer)
    payload: Mapped[str] = mapped_column(Text)  # the DesiredState JSON, exactly as published
    decided_at: Mapped[float] = mapped_column(Double)
    written_at: Mapped[float | None] = mapped_column(Double)
