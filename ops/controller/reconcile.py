"""Rollouts made durable and applied: the loop between the engine, the database and the broker.

``rollouts.decide`` decides; this module stores what it decided and writes it to devices.

- :func:`start_rollout` stores a plan with the signed release and the pre-signed rollback
  (the controller holds no key), and an audit entry.
- :func:`command` stores an operator's command (pause, resume, halt, rollback) by its id,
  checked against the rollout's status at once (:class:`~.rollouts.CommandRefused`), and an
  audit entry; the next step applies it.
- :func:`decide_step` (in the caller's transaction): lock the rollout, load its plan, state
  and pending commands, build every device's :class:`~.rollouts.DeviceFacts` from the
  registry (:func:`device_facts`), call ``decide``, and write the next state, the new
  decision records and the *desired writes* (one row per device whose target or step
  changed: the exact ``DesiredState`` payload and its revision, not yet written).
- :class:`RolloutRunner` ``.step``: publish what an earlier step left unwritten, decide
  and commit, publish the rows not yet written (retained, QoS 1, through a
  :class:`Publisher`), and mark them written.

Order and crashes: the intent is committed before anything is published, and a row is
marked written only after the broker acknowledged it. A crash between commit and mark
publishes the same payload (same revision, same bytes) again on restart, never another
one for that step; a crash before the commit decided nothing. So a device never sees two
different desired states for one step of a rollout.

Locking: a step holds the rollout while it decides: the row is read ``FOR UPDATE`` on
PostgreSQL, and on SQLite the step's transaction begins ``BEGIN IMMEDIATE`` (the
database's write lock; the busy timeout is how long a second controller waits for it).
Either way a second controller waits, then decides on what the first wrote. The state is
also written only if its ``version`` is the one read; a write that finds another version
(a caller's transaction that began before the step on SQLite) raises :class:`RolloutBusy`
and nothing is written.

A device's desired state names every stream's model the controller wants there: the
rollout's stream, and the other streams' latest writes by other rollouts. Its revision is
one above both the highest the controller wrote to that device and the one the device
reports seeing (a device ignores an older revision).

Facts, and their gaps: a device is online when its status is online or degraded; its
update report and running model come from its reported state; the error rate is the
health counters' failed over processed frames (counted since the agent started, so after a
model swap without a restart they mix both models); the previous model's figures are the
ones the registry kept when the stream's model changed (``previous_error_rate``,
``previous_latency_p99_ms``), None before any change was seen.

Errors::

    EdgefleetError
    ├── SettingError
    │   ├── UnknownRollout       no rollout with that id                        exit 2
    │   └── RolloutManifestError a manifest that is not the plan's              exit 2
    ├── Refused
    │   ├── RolloutOverlaps      another active rollout has a device's stream   exit 3
    │   └── CommandRefused       (rollouts.py) the status does not allow it     exit 3
    └── EnvironmentProblem
        └── RolloutBusy          another controller stepped it at the same time exit 1

Threads: none of its own; a runner is used by one thread at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, selectinload

from edgefleet.agent.protocol import (
    TOPIC_ROOT,
    DesiredState,
    Manifest,
    SignedManifest,
    Topics,
    UpdateReport,
    UpdateState,
)
from edgefleet.ops.connection import BrokerConnection
from edgefleet.ops.errors import Refused
from edgefleet.ops.profile import ResolvedProfile
from edgefleet.runtime import EnvironmentProblem, SettingError

from . import registry
from .db import Database, Device
from .rollout_tables import DesiredWriteRow, RolloutCommandRow, RolloutDecisionRow, RolloutRow
from .rollouts import (
    CommandRefused,
    Decision,
    DecisionRecord,
    DesiredTarget,
    DeviceDesired,
    DeviceFacts,
    ManifestRef,
    OperatorCommand,
    OperatorCommandKind,
    RolloutPlan,
    RolloutState,
    RolloutStatus,
    decide,
)

__all__ = [
    "BrokerPublisher",
    "DecisionView",
    "DesiredWriteView",
    "Publisher",
    "RolloutBusy",
    "RolloutManifestError",
    "RolloutOverlaps",
    "RolloutRunner",
    "RolloutView",
    "Stepped",
    "UnknownRollout",
    "Unwritten",
    "command",
    "decide_step",
    "device_facts",
    "list_rollouts",
    "load_plan",
    "load_state",
    "mark_written",
    "needs_steps",
    "show_rollout",
    "start_rollout",
    "unwritten",
]

log = logging.getLogger(__name__)

ACTIVE = (RolloutStatus.RUNNING.value, RolloutStatus.PAUSED.value)


class UnknownRollout(SettingError):
    """No rollout with that id is stored."""


class RolloutManifestError(SettingError):
    """A signed manifest given with a plan is not the one the plan names."""


class RolloutOverlaps(Refused):
    """Another running or paused rollout already sets the stream on one of the devices."""


class RolloutBusy(EnvironmentProblem):
    """Another controller wrote the rollout's state between this one's read and write."""


# -- publishing ---------------------------------------------------------------------------


class Publisher(Protocol):
    """Where desired states go: retained, QoS 1, returning once the broker acknowledged all."""

    topic_root: str

    def publish_retained(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish each (topic, payload) retained; raise if any is not acknowledged."""


class BrokerPublisher:
    """A :class:`Publisher` over one operator-profile MQTT connection per batch (paho)."""

    def __init__(self, resolved: ResolvedProfile) -> None:
        self.resolved = resolved
        self.topic_root = resolved.profile.topic_root

    def publish_retained(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Connect, publish every message retained at QoS 1, wait for every PUBACK."""
        if not messages:
            return
        with BrokerConnection(self.resolved) as broker:
            broker.publish_all(messages, retain=True)


# -- starting and commanding ----------------------------------------------------------------


def start_rollout(
    session: Session,
    plan: RolloutPlan,
    created_by: str,
    *,
    release: SignedManifest,
    rollback: SignedManifest,
    now: float | None = None,
) -> None:
    """Store a new rollout (running, no wave yet: the first step starts wave 1) and audit it.

    ``release`` and ``rollback`` are the signed manifests ``plan.release`` and
    ``plan.rollback`` name. Refuses a plan whose devices' stream another active rollout sets.
    """
    at = time.time() if now is None else now
    _check_manifest(plan.release, release, "release")
    _check_manifest(plan.rollback, rollback, "rollback")
    if session.get(RolloutRow, plan.rollout_id) is not None:
        raise RolloutOverlaps(
            f"a rollout {plan.rollout_id} exists already", hint="give the rollout another id"
        )
    _refuse_overlap(session, plan)
    session.add(
        RolloutRow(
            id=plan.rollout_id,
            release_id=plan.release_id,
            stream=plan.stream,
            status=RolloutStatus.RUNNING.value,
            plan=plan.model_dump(mode="json"),
            state=RolloutState().model_dump(mode="json"),
            release_manifest=release.model_dump(mode="json"),
            rollback_manifest=rollback.model_dump(mode="json"),
            created_by=created_by,
            created_at=at,
            updated_at=at,
            version=1,
        )
    )
    registry.record_audit(
        session,
        actor=created_by,
        action="rollout.start",
        target=f"rollout:{plan.rollout_id}",
        reason=f"release {plan.release_id} to {len(plan.devices)} devices, stream {plan.stream}",
        details={"waves": plan.waves, "devices": list(plan.devices)},
        at=at,
    )


def _check_manifest(ref: ManifestRef, signed: SignedManifest, what: str) -> None:
    try:
        terms = Manifest.model_validate_json(signed.payload)
    except ValueError as exc:
        raise RolloutManifestError(
            f"the {what} manifest does not parse ({exc})", hint="give the signed manifest itself"
        ) from exc
    if (terms.model_id, terms.version, terms.sha256) != (ref.model_id, ref.version, ref.sha256):
        raise RolloutManifestError(
            f"the {what} manifest names {terms.model_id} v{terms.version} "
            f"{terms.sha256[:12]}, the plan {ref.model_id} v{ref.version} {ref.sha256[:12]}",
            hint=f"give the {what} manifest the plan was made from",
        )


def _refuse_overlap(session: Session, plan: RolloutPlan) -> None:
    query = select(RolloutRow).where(
        RolloutRow.status.in_(ACTIVE), RolloutRow.stream == plan.stream
    )
    wanted = set(plan.devices)
    for other in session.scalars(query):
        shared = sorted(wanted & set(other.plan["devices"]))
        if shared:
            raise RolloutOverlaps(
                f"rollout {other.id} ({other.status}) already sets stream {plan.stream} on "
                f"{', '.join(shared[:5])}",
                hint=f"halt or roll back rollout {other.id} first, or leave those devices out",
            )


def command(
    session: Session, rollout_id: str, order: OperatorCommand, *, now: float | None = None
) -> bool:
    """Store an operator's command for the next step, and audit it; False if its id is known.

    Raises :class:`~.rollouts.CommandRefused` when the rollout's status does not allow it.
    """
    at = time.time() if now is None else now
    row = _rollout(session, rollout_id)
    if session.get(RolloutCommandRow, order.id) is not None:
        return False
    plan, state = load_plan(row), load_state(row)
    facts = device_facts(session, plan)
    for earlier in _pending_commands(session, rollout_id):  # as the next step applies them
        try:
            state = decide(plan, state, facts, at, earlier).state
        except CommandRefused:
            continue
    decide(plan, state, facts, at, order)  # raises CommandRefused; nothing is stored
    session.add(
        RolloutCommandRow(
            id=order.id,
            rollout_id=rollout_id,
            kind=order.kind.value,
            actor=order.actor,
            reason=order.reason,
            at=at,
        )
    )
    registry.record_audit(
        session,
        actor=order.actor,
        action=f"rollout.{order.kind.value}",
        target=f"rollout:{rollout_id}",
        reason=order.reason,
        details={"command_id": order.id},
        at=at,
    )
    return True


# -- loading -------------------------------------------------------------------------------


def _rollout(session: Session, rollout_id: str, *, lock: bool = False) -> RolloutRow:
    query = select(RolloutRow).where(RolloutRow.id == rollout_id)
    if lock:
        query = query.with_for_update()  # PostgreSQL: a row lock; SQLite: nothing
    row = session.scalars(query).one_or_none()
    if row is None:
        raise UnknownRollout(
            f"no rollout {rollout_id}", hint="'edgefleet rollout status' lists the rollouts"
        )
    return row


def load_plan(row: RolloutRow) -> RolloutPlan:
    """The plan a rollout row holds."""
    return RolloutPlan.model_validate(row.plan)


def load_state(row: RolloutRow) -> RolloutState:
    """The engine's state a rollout row holds."""
    return RolloutState.model_validate(row.state)


def _pending_commands(session: Session, rollout_id: str) -> list[OperatorCommand]:
    query = (
        select(RolloutCommandRow)
        .where(
            RolloutCommandRow.rollout_id == rollout_id,
            RolloutCommandRow.applied_at.is_(None),
            RolloutCommandRow.refused.is_(None),
        )
        .order_by(RolloutCommandRow.at, RolloutCommandRow.id)
    )
    return [
        OperatorCommand(id=c.id, kind=OperatorCommandKind(c.kind), actor=c.actor, reason=c.reason)
        for c in session.scalars(query)
    ]


def device_facts(session: Session, plan: RolloutPlan) -> dict[str, DeviceFacts]:
    """What the registry knows of the plan's devices, for its stream (unknown ones left out)."""
    query = (
        select(Device)
        .where(Device.id.in_(list(plan.devices)))
        .options(selectinload(Device.streams))
    )
    return {device.id: _facts(device, plan.stream) for device in session.scalars(query)}


def _facts(device: Device, stream: str) -> DeviceFacts:
    online = device.status in ("online", "degraded")
    row = device.streams.get(stream)
    if row is None:
        return DeviceFacts(device_id=device.id, online=online)
    report = None
    if row.update_state is not None and row.update_model_id is not None:
        report = UpdateReport(
            state=UpdateState(row.update_state),
            model_id=row.update_model_id,
            version=row.update_version or 0,
            sha256=row.update_sha256 or "",
            reason=row.update_reason,
            ts=row.update_ts or 0.0,
        )
    return DeviceFacts(
        device_id=device.id,
        online=online,
        update=report,
        running_sha256=row.model_sha256,
        running_version=row.model_version,
        running_since=row.model_since,
        error_rate=registry.error_rate(row),
        latency_p99_ms=row.latency_p99_ms,
        previous_error_rate=row.previous_error_rate,
        previous_latency_p99_ms=row.previous_latency_p99_ms,
    )


# -- one step ------------------------------------------------------------------------------


def decide_step(session: Session, rollout_id: str, now: float) -> Decision:
    """Decide once and store it, in the caller's transaction (commit before publishing).

    Applies the pending operator commands in order (one refused by then is marked so),
    then decides on the registry's facts; writes the next state, the new records, and a
    desired write for every device whose target or step changed.
    """
    _begin_immediate(session)
    row = _rollout(session, rollout_id, lock=True)
    plan, state = load_plan(row), load_state(row)
    facts = device_facts(session, plan)
    records: list[DecisionRecord] = []
    decision: Decision | None = None
    for order in _pending_commands(session, rollout_id):
        try:
            decision = decide(plan, state, facts, now, order)
        except CommandRefused as exc:
            _settle_command(session, order.id, now, refused=exc.message)
            continue
        _settle_command(session, order.id, now)
        state, records = decision.state, [*records, *decision.records]
    if decision is None:  # no command: one decision on the facts alone
        decision = decide(plan, state, facts, now)
        records = list(decision.records)
    if decision.state != load_state(row):
        _write_state(session, row, decision.state, now)
    _write_records(session, rollout_id, records)
    _write_desired(session, row, plan, decision.desired, now)
    return decision.model_copy(update={"records": tuple(records)})


def _begin_immediate(session: Session) -> None:
    """On SQLite, take the write lock now (``BEGIN IMMEDIATE``), unless the caller's
    transaction began already: a second controller then waits for this step to commit and
    reads what it wrote, instead of failing on a stale read when it writes."""
    connection = session.connection()
    if connection.dialect.name != "sqlite":
        return
    raw = connection.connection.driver_connection
    if raw is not None and not raw.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _settle_command(
    session: Session, command_id: str, now: float, *, refused: str | None = None
) -> None:
    row = session.get(RolloutCommandRow, command_id)
    assert row is not None
    if refused is None:
        row.applied_at = now
    else:
        row.refused = refused


def _write_state(session: Session, row: RolloutRow, state: RolloutState, now: float) -> None:
    result = session.execute(
        update(RolloutRow)
        .where(RolloutRow.id == row.id, RolloutRow.version == row.version)
        .values(
            state=state.model_dump(mode="json"),
            status=state.status.value,
            updated_at=now,
            version=row.version + 1,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise RolloutBusy(
            f"rollout {row.id} was stepped by another controller at the same time; "
            "nothing was written",
            hint="run one controller per database, or step again (it decides afresh)",
        )
    session.expire(row)


def _write_records(session: Session, rollout_id: str, records: Sequence[DecisionRecord]) -> None:
    if not records:
        return
    last = session.scalar(
        select(func.max(RolloutDecisionRow.seq)).where(RolloutDecisionRow.rollout_id == rollout_id)
    )
    for seq, record in enumerate(records, start=(last or 0) + 1):
        session.add(
            RolloutDecisionRow(
                rollout_id=rollout_id,
                seq=seq,
                at=record.at,
                kind=record.kind.value,
                wave=record.wave,
                devices=list(record.devices),
                reason=record.reason,
                actor=record.actor,
            )
        )


def _write_desired(
    session: Session,
    row: RolloutRow,
    plan: RolloutPlan,
    desired: Mapping[str, DeviceDesired],
    now: float,
) -> None:
    manifests = {
        DesiredTarget.RELEASE: SignedManifest.model_validate(row.release_manifest),
        DesiredTarget.ROLLBACK: SignedManifest.model_validate(row.rollback_manifest),
    }
    written = {
        w.device_id: w
        for w in session.scalars(
            select(DesiredWriteRow).where(DesiredWriteRow.rollout_id == row.id)
        )
    }
    for device_id, wanted in desired.items():
        if wanted.target is DesiredTarget.UNTOUCHED or wanted.manifest is None:
            continue
        last = written.get(device_id)
        if last is not None and (last.target, last.step) == (wanted.target.value, wanted.step):
            continue
        signed = manifests[wanted.target]
        revision = _next_revision(session, device_id)
        others = _other_streams(session, device_id, plan.stream, row.id)
        payload = DesiredState(revision=revision, models={**others, plan.stream: signed})
        values = {
            "stream": plan.stream,
            "step": wanted.step,
            "target": wanted.target.value,
            "manifest_sha256": wanted.manifest.sha256,
            "revision": revision,
            "payload": payload.model_dump_json(),
            "decided_at": now,
            "written_at": None,
        }
        if last is None:
            session.add(DesiredWriteRow(rollout_id=row.id, device_id=device_id, **values))
        else:
            for name, value in values.items():
                setattr(last, name, value)
        session.flush()  # the next device's revision query sees this one
        if session.get(Device, device_id) is not None:
            registry.set_desired_model(
                session,
                device_id,
                plan.stream,
                model_id=wanted.manifest.model_id,
                version=wanted.manifest.version,
                sha256=wanted.manifest.sha256,
            )


def _next_revision(session: Session, device_id: str) -> int:
    ours = session.scalar(
        select(func.max(DesiredWriteRow.revision)).where(DesiredWriteRow.device_id == device_id)
    )
    seen = session.scalar(select(Device.desired_revision).where(Device.id == device_id))
    return max(ours or 0, seen or 0) + 1


def _other_streams(
    session: Session, device_id: str, stream: str, rollout_id: str
) -> dict[str, SignedManifest]:
    """The other streams' models the controller last wrote to ``device_id`` (other rollouts)."""
    query = (
        select(DesiredWriteRow)
        .where(
            DesiredWriteRow.device_id == device_id,
            DesiredWriteRow.stream != stream,
            DesiredWriteRow.rollout_id != rollout_id,
        )
        .order_by(DesiredWriteRow.revision)
    )
    models: dict[str, SignedManifest] = {}
    for write in session.scalars(query):
        models[write.stream] = DesiredState.model_validate_json(write.payload).models[write.stream]
    return models


# -- writing to the broker ------------------------------------------------------------------


@dataclass(frozen=True)
class Unwritten:
    """A desired write decided but not yet acknowledged by the broker."""

    device_id: str
    revision: int
    payload: str


def unwritten(session: Session, rollout_id: str) -> list[Unwritten]:
    """The rollout's desired writes the broker has not acknowledged yet, by device."""
    query = (
        select(DesiredWriteRow)
        .where(DesiredWriteRow.rollout_id == rollout_id, DesiredWriteRow.written_at.is_(None))
        .order_by(DesiredWriteRow.device_id)
    )
    return [Unwritten(w.device_id, w.revision, w.payload) for w in session.scalars(query)]


def mark_written(session: Session, rollout_id: str, writes: Sequence[Unwritten], at: float) -> None:
    """Mark writes acknowledged (a row a newer step replaced meanwhile stays unwritten)."""
    for write in writes:
        session.execute(
            update(DesiredWriteRow)
            .where(
                DesiredWriteRow.rollout_id == rollout_id,
                DesiredWriteRow.device_id == write.device_id,
                DesiredWriteRow.revision == write.revision,
            )
            .values(written_at=at)
            .execution_options(synchronize_session=False)
        )


@dataclass(frozen=True)
class Stepped:
    """What one :meth:`RolloutRunner.step` did: the decision, and the devices written to."""

    decision: Decision
    published: tuple[str, ...]


class RolloutRunner:
    """Steps rollouts: decide and commit, then publish and mark written (module docstring)."""

    def __init__(self, database: Database, publisher: Publisher) -> None:
        self.database = database
        self.publisher = publisher

    def step(self, rollout_id: str, now: float) -> Stepped:
        """One step of a rollout: what an earlier one left unwritten, a decision, its writes."""
        published = list(self.flush(rollout_id, now))
        with self.database.session() as session:
            decision = decide_step(session, rollout_id, now)
        for device in self.flush(rollout_id, now):
            if device not in published:
                published.append(device)
        for record in decision.records:
            log.info("rollout %s %s: %s", rollout_id, record.kind.value, record.reason)
        return Stepped(decision, tuple(published))

    def decide(self, rollout_id: str, now: float) -> Decision:
        """Decide and commit, without publishing (:meth:`flush` writes it)."""
        with self.database.session() as session:
            return decide_step(session, rollout_id, now)

    def flush(self, rollout_id: str, now: float) -> tuple[str, ...]:
        """Publish the rollout's unwritten desired states, then mark them; the devices."""
        with self.database.session() as session:
            writes = unwritten(session, rollout_id)
        if not writes:
            return ()
        root = self.publisher.topic_root or TOPIC_ROOT
        self.publisher.publish_retained(
            [(Topics(w.device_id, root).desired, w.payload.encode()) for w in writes]
        )
        with self.database.session() as session:
            mark_written(session, rollout_id, writes, now)
        return tuple(w.device_id for w in writes)

    def due(self) -> list[str]:
        """The rollouts that still have something to decide or record (:func:`needs_steps`)."""
        with self.database.session() as session:
            return [r.id for r in list_rollouts(session) if r.needs_steps]

    def step_all(self, now: float) -> dict[str, Stepped]:
        """Step every rollout that is :meth:`due`."""
        return {rollout_id: self.step(rollout_id, now) for rollout_id in self.due()}


# -- what is stored, for people ----------------------------------------------------------------


def needs_steps(state: RolloutState) -> bool:
    """Whether stepping may still decide or record something: running or paused, a pending
    device not yet recorded, or (rolled back) a device not yet recorded back."""
    if state.status in (RolloutStatus.RUNNING, RolloutStatus.PAUSED) or state.pending:
        return True
    if state.status is RolloutStatus.ROLLED_BACK:
        return len(state.rollback_converged) < len(state.assigned)
    return False


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DecisionView(_View):
    """One stored decision of a rollout."""

    seq: int = Field(description="Its number in the rollout, from 1.")
    at: float = Field(description="Unix seconds of the decision.")
    kind: str = Field(description="What was decided (rollouts.DecisionKind).")
    wave: int | None = Field(description="The wave (1-based) it concerns.")
    devices: list[str] = Field(description="The devices it concerns.")
    reason: str = Field(description="Why, in words.")
    actor: str | None = Field(description="The operator, for an operator's command.")


class DesiredWriteView(_View):
    """What the rollout last wrote (or is about to write) to one device."""

    device_id: str = Field(description="Device id.")
    step: int = Field(description="The rollout step it belongs to.")
    target: str = Field(description="release or rollback.")
    manifest_sha256: str = Field(description="sha256 of the model it names.")
    revision: int = Field(description="The desired state's revision.")
    written_at: float | None = Field(description="When the broker took it; null: not yet.")


class RolloutView(_View):
    """A rollout as stored (``edgefleet rollout status``)."""

    id: str = Field(description="Rollout id.")
    release_id: str = Field(description="The release rolled out.")
    stream: str = Field(description="The stream whose model it replaces.")
    status: RolloutStatus = Field(description="Where it stands.")
    devices: int = Field(description="How many devices it targets.")
    waves: str = Field(description="The wave spec it was started with.")
    waves_started: int = Field(description="How many waves have started.")
    pending: list[str] = Field(description="Devices pending (offline), not yet converged.")
    created_by: str = Field(description="Who started it.")
    created_at: float = Field(description="When, Unix seconds.")
    updated_at: float = Field(description="When its state last changed.")
    needs_steps: bool = Field(description="Whether stepping may still decide something.")
    decisions: list[DecisionView] = Field(description="Every decision, oldest first (show).")
    writes: list[DesiredWriteView] = Field(description="Per device, the last write (show).")


def list_rollouts(session: Session, *, status: RolloutStatus | None = None) -> list[RolloutView]:
    """Every rollout (of ``status``, if given), newest first, without decisions or writes."""
    query = select(RolloutRow).order_by(RolloutRow.created_at.desc(), RolloutRow.id)
    if status is not None:
        query = query.where(RolloutRow.status == status.value)
    return [_rollout_view(row, [], []) for row in session.scalars(query)]


def show_rollout(session: Session, rollout_id: str) -> RolloutView:
    """One rollout with every decision and its last write per device."""
    row = _rollout(session, rollout_id)
    decisions = session.scalars(
        select(RolloutDecisionRow)
        .where(RolloutDecisionRow.rollout_id == rollout_id)
        .order_by(RolloutDecisionRow.seq)
    )
    writes = session.scalars(
        select(DesiredWriteRow)
        .where(DesiredWriteRow.rollout_id == rollout_id)
        .order_by(DesiredWriteRow.device_id)
    )
    return _rollout_view(
        row,
        [
            DecisionView(
                seq=d.seq, at=d.at, kind=d.kind, wave=d.wave, devices=list(d.devices),
                reason=d.reason, actor=d.actor,
            )
            for d in decisions
        ],
        [
            DesiredWriteView(
                device_id=w.device_id, step=w.step, target=w.target,
                manifest_sha256=w.manifest_sha256, revision=w.revision, written_at=w.written_at,
            )
            for w in writes
        ],
    )  # fmt: skip


def _rollout_view(
    row: RolloutRow, decisions: list[DecisionView], writes: list[DesiredWriteView]
) -> RolloutView:
    plan, state = load_plan(row), load_state(row)
    return RolloutView(
        id=row.id,
        release_id=row.release_id,
        stream=row.stream,
        status=state.status,
        devices=len(plan.devices),
        waves=plan.waves,
        waves_started=len(state.waves),
        pending=list(state.pending),
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
        needs_steps=needs_steps(state),
        decisions=decisions,
        writes=writes,
    )
