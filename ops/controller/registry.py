"""The device registry: every device's latest facts, its groups and tags, and selectors.

Facts come from the three messages a device publishes (``agent/protocol.py``), each recorded
by device id and ordered by the message's own ``ts``: a message older than the one a fact
group came from is ignored, so a late or replayed message never moves a device backwards.

- ``status`` (retained): online / degraded / offline, the agent version and capabilities.
  The last will is the exception: the agent builds it when it starts, so its ``ts`` is older
  than the birth it follows. An offline status older than the stored one is therefore taken
  as the will when the device is online and the status is not older than the agent run the
  registry knows (``started_at``, from health: ``ts - uptime_s``, less
  :data:`WILL_CLOCK_SLACK_S`); ``offline_since`` is then the controller's receive time.
- ``health`` (periodic): board metrics, outbox and link counters, per-stream fps,
  latencies and error counters.
- ``reported`` (retained): the model each stream runs and its latest update.

States a device can be listed by (:class:`DeviceState`; a device can be in several):
online (status online or degraded), offline (status offline, or no status yet), degraded
(status degraded, or a stream's health says degraded), updating (a stream's update is
between verifying and probation), stale (a stream runs another model than the one the
controller wants there: :func:`set_desired_model` is the hook releases and rollouts call).

Selectors (:func:`parse_selector`): ``device:ID``, ``group:NAME``, ``tag:K=V`` and ``all``,
joined by commas. **A comma intersects**: ``group:shops,tag:hw=pi5`` is the Pi 5 boards in
the shops. Narrowing is what a rollout wave needs ("these, but only those"), and a union is
already at hand by naming a group or a tag; several selectors given separately are united
(:func:`select_device_ids` takes a sequence). A group or device that does not exist is an
error, not an empty set: a typo must not roll out to nothing, or report an empty fleet.

Errors (bad input, exit 2): :class:`BadSelector`, :class:`BadName`, :class:`UnknownDevice`,
:class:`UnknownGroup`, all :class:`~edgefleet.runtime.SettingError`.

Pure over a :class:`~sqlalchemy.orm.Session`: no threads, no commits (the caller's
transaction decides), no I/O but the session's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    ColumnElement,
    and_,
    delete,
    exists,
    false,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session, selectinload

from edgefleet.agent.protocol import (
    TOPIC_LEVEL_PATTERN,
    HealthMessage,
    ModelRef,
    ReportedState,
    StatusMessage,
    StreamHealth,
    UpdateState,
)
from edgefleet.runtime import SettingError

from .db import AuditEntry, Device, DeviceStream, DeviceTag, Group, GroupMember

WILL_CLOCK_SLACK_S = 5.0
"""How much older than the agent run's start (health ``ts - uptime_s``) a last will may be
and still be taken for that run's (the will is built just after the run starts)."""

ACTIVE_UPDATE_STATES = frozenset(
    {
        UpdateState.VERIFYING,
        UpdateState.DOWNLOADING,
        UpdateState.VALIDATING,
        UpdateState.ACTIVATING,
        UpdateState.PROBATION,
    }
)
"""Update states between a manifest's arrival and its commit, refusal or rollback."""
_ACTIVE_VALUES = frozenset(s.value for s in ACTIVE_UPDATE_STATES)

TAG_VALUE_PATTERN = r"^[A-Za-z0-9_.:/@+-]{1,128}$"
_NAME = re.compile(TOPIC_LEVEL_PATTERN)
_TAG_VALUE = re.compile(TAG_VALUE_PATTERN)
_SELECTOR_HINT = (
    "give device:ID, group:NAME, tag:KEY=VALUE or all, joined by commas for devices that "
    "match every part (e.g. group:shops,tag:hw=pi5)"
)

Fact = StatusMessage | HealthMessage | ReportedState


class BadSelector(SettingError):
    """A selector that does not parse."""


class BadName(SettingError):
    """A group name, tag key or tag value that cannot be stored or selected."""


class UnknownDevice(SettingError):
    """A device id the registry has never heard from."""


class UnknownGroup(SettingError):
    """A group name that does not exist."""


class DeviceState(str, Enum):
    """States devices can be listed by; one device can be in several."""

    ONLINE = "online"
    OFFLINE = "offline"
    DEGRADED = "degraded"
    UPDATING = "updating"
    STALE = "stale"


# -- recording facts ------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A parsed message and when the controller received it (its wall clock, Unix seconds)."""

    message: Fact
    received_at: float


def record(session: Session, received: Sequence[Received]) -> int:
    """Record messages in order, in the caller's transaction; how many were applied.

    Heartbeats of known devices with nothing else in the batch take the bulk path (only the
    newest per device is written, with one UPDATE per table for all of them); everything else
    is applied in order through the ORM, its devices loaded in one query.
    """
    beats, others = _split(session, received)
    applied, unknown = _record_heartbeats(session, beats)
    return applied + _record_each(session, [*others, *unknown])


def _split(session: Session, received: Sequence[Received]) -> tuple[list[Received], list[Received]]:
    mixed = {r.message.device_id for r in received if not isinstance(r.message, HealthMessage)}
    beats: list[Received] = []
    others: list[Received] = []
    for item in received:
        device_id = item.message.device_id
        loaded = session.identity_key(Device, device_id) in session.identity_map
        if isinstance(item.message, HealthMessage) and device_id not in mixed and not loaded:
            beats.append(item)
        else:
            others.append(item)
    return beats, others


def _record_each(session: Session, received: Sequence[Received]) -> int:
    devices = _load_devices(session, {r.message.device_id for r in received})
    applied = 0
    for item in received:
        device = devices.get(item.message.device_id)
        if device is None:
            device = devices[item.message.device_id] = _new_device(session, item.message)
        applied += _apply(device, item.message, item.received_at)
    return applied


def _record_heartbeats(session: Session, received: list[Received]) -> tuple[int, list[Received]]:
    """Heartbeats of known devices in bulk; those of devices not in the registry yet are
    handed back, to be made through the ORM."""
    beats = [r.message for r in received if isinstance(r.message, HealthMessage)]
    if not beats:
        return 0, []
    ids = sorted({m.device_id for m in beats})
    query = select(Device.id, Device.health_ts, Device.first_seen, Device.last_seen)
    known = {row.id: row for row in session.execute(query.where(Device.id.in_(ids)))}
    newest: dict[str, HealthMessage] = {}
    first: dict[str, float] = {}
    applied = 0
    for message in beats:
        row = known.get(message.device_id)
        if row is None:
            continue
        floor = newest[row.id].ts if row.id in newest else row.health_ts
        if floor is None or message.ts > floor:
            newest[row.id] = message
            first.setdefault(row.id, message.ts)
            applied += 1
    _write_heartbeats(
        session, newest, {i: (known[i].first_seen, known[i].last_seen) for i in newest}, first
    )
    return applied, [r for r in received if r.message.device_id not in known]


def _write_heartbeats(
    session: Session,
    newest: dict[str, HealthMessage],
    seen: dict[str, tuple[float, float]],
    first: dict[str, float],
) -> None:
    if not newest:
        return
    devices = [
        {
            "id": device_id,
            "first_seen": min(seen[device_id][0], first[device_id]),
            "last_seen": max(seen[device_id][1], message.ts),
            **_health_values(message),
        }
        for device_id, message in newest.items()
    ]
    session.execute(update(Device), devices)
    query = select(
        DeviceStream.device_id,
        DeviceStream.stream,
        DeviceStream.processed,
        DeviceStream.model_processed_base,
        DeviceStream.model_failed_base,
    )
    existing = {
        (row.device_id, row.stream): row
        for row in session.execute(query.where(DeviceStream.device_id.in_(list(newest))))
    }
    updates: list[dict[str, Any]] = []
    inserts: list[dict[str, Any]] = []
    for device_id, message in newest.items():
        for stream, health in message.streams.items():
            values = {"device_id": device_id, "stream": stream, **_stream_health_values(health)}
            row = existing.get((device_id, stream))
            if row is None:
                inserts.append(values)
                continue
            restarted = row.processed is not None and health.processed < row.processed
            values["model_processed_base"] = None if restarted else row.model_processed_base
            values["model_failed_base"] = None if restarted else row.model_failed_base
            updates.append(values)
    if updates:
        session.execute(update(DeviceStream), updates)
    if inserts:
        session.execute(insert(DeviceStream), inserts)


def record_status(
    session: Session, message: StatusMessage, *, received_at: float | None = None
) -> bool:
    """Record a status message; False when an older one than the stored status was ignored."""
    return record(session, [Received(message, _now(received_at))]) == 1


def record_health(
    session: Session, message: HealthMessage, *, received_at: float | None = None
) -> bool:
    """Record a health message; False when it was not newer than the stored health."""
    return record(session, [Received(message, _now(received_at))]) == 1


def record_reported(
    session: Session, message: ReportedState, *, received_at: float | None = None
) -> bool:
    """Record a reported state; False when it was not newer than the stored one."""
    return record(session, [Received(message, _now(received_at))]) == 1


def mark_offline(session: Session, device_id: str, *, at: float, reason: str) -> None:
    """Mark a known device offline now (the controller's own finding, e.g. it went silent)."""
    device = _device(session, device_id)
    if device.status != "offline":
        device.status, device.status_reason, device.offline_since = "offline", reason, at


def _now(received_at: float | None) -> float:
    return time.time() if received_at is None else received_at


def _load_devices(session: Session, ids: Iterable[str]) -> dict[str, Device]:
    query = select(Device).where(Device.id.in_(list(ids))).options(selectinload(Device.streams))
    return {d.id: d for d in session.scalars(query)}


def _new_device(session: Session, message: Fact) -> Device:
    device = Device(id=message.device_id, first_seen=message.ts, last_seen=message.ts)
    device.streams = {}
    session.add(device)
    return device


def _apply(device: Device, message: Fact, received_at: float) -> bool:
    if isinstance(message, StatusMessage):
        return _apply_status(device, message, received_at)
    if isinstance(message, HealthMessage):
        return _apply_health(device, message)
    return _apply_reported(device, message)


def _seen(device: Device, ts: float) -> None:
    device.first_seen = min(device.first_seen, ts)
    device.last_seen = max(device.last_seen, ts)


def _apply_status(device: Device, message: StatusMessage, received_at: float) -> bool:
    newer = device.status_ts is None or message.ts > device.status_ts
    if not newer:
        if message.state != "offline" or not _takes_will(device, message):
            return False
        device.status, device.status_reason = "offline", message.reason
        device.offline_since = received_at  # the will's own ts is the agent's start
        return True  # and says nothing of when the device was last heard from
    _seen(device, message.ts)
    was_online = device.status in ("online", "degraded")
    device.status, device.status_reason, device.status_ts = (
        message.state,
        message.reason,
        message.ts,
    )
    if message.state == "offline":
        device.offline_since = (
            message.ts if was_online or device.offline_since is None else (device.offline_since)
        )
        return True
    if not was_online:
        device.online_since = message.ts
    device.agent_version = message.agent_version or device.agent_version
    if message.capabilities is not None:
        device.backends = list(message.capabilities.backends)
        device.capabilities = message.capabilities.model_dump(mode="json")
    if len(message.models) == len(message.streams) and _models_from_status(device, message):
        for name, model in zip(message.streams, message.models, strict=True):
            _set_model(_stream(device, name), model, message.ts)
    return True


def _takes_will(device: Device, message: StatusMessage) -> bool:
    if device.status not in ("online", "degraded"):
        return False
    return device.started_at is None or message.ts >= device.started_at - WILL_CLOCK_SLACK_S


def _models_from_status(device: Device, message: StatusMessage) -> bool:
    return device.reported_ts is None or message.ts >= device.reported_ts


def _apply_health(device: Device, message: HealthMessage) -> bool:
    if device.health_ts is not None and message.ts <= device.health_ts:
        return False
    _seen(device, message.ts)
    for name, value in _health_values(message).items():
        setattr(device, name, value)
    for stream, health in message.streams.items():
        row = _stream(device, stream)
        if row.processed is not None and health.processed < row.processed:
            row.model_processed_base = row.model_failed_base = None  # the agent restarted
            # (the bulk path, _write_heartbeats, does the same)
        for name, value in _stream_health_values(health).items():
            setattr(row, name, value)
    return True


def _health_values(message: HealthMessage) -> dict[str, Any]:
    """The device columns a health message sets."""
    system, outbox, mqtt, throttled = message.system, message.outbox, message.mqtt, None
    if message.system.throttled is not None:
        throttled = any(message.system.throttled.values())
    return {
        "health_ts": message.ts,
        "uptime_s": message.uptime_s,
        "started_at": message.ts - message.uptime_s,
        "cpu_percent": system.cpu_percent,
        "rss_mb": system.rss_mb,
        "load_1m": system.load_1m,
        "temperature_c": system.cpu_temperature_c,
        "throttled": throttled,
        "throttled_flags": dict(system.throttled) if system.throttled is not None else None,
        "outbox_depth": outbox.depth,
        "events_dropped": outbox.dropped,
        "events_lost": outbox.not_stored + outbox.lost,
        "outbox_problem": outbox.problem,
        "mqtt_reconnects": mqtt.reconnects,
        "mqtt_problem": mqtt.problem,
        "clock_synchronised": message.clock.synchronised,
        "parts_failing": sorted(n for n, p in message.parts.items() if p.state != "running"),
        "certificate_days_left": message.certificate_days_left,
    }


def _stream_health_values(health: StreamHealth) -> dict[str, Any]:
    """The stream columns a stream's health sets."""
    return {
        "state": health.state,
        "fps": health.fps,
        "latency_p50_ms": health.latency_p50_ms,
        "latency_p99_ms": health.latency_p99_ms,
        "inference_p50_ms": health.inference_p50_ms,
        "inference_p99_ms": health.inference_p99_ms,
        "processed": health.processed,
        "failed": health.failed,
        "skipped": health.skipped,
        "events_lost": health.events_lost,
        "source_failures": health.source_failures,
        "last_error": health.last_error,
    }


def _apply_reported(device: Device, message: ReportedState) -> bool:
    if device.reported_ts is not None and message.ts <= device.reported_ts:
        return False
    _seen(device, message.ts)
    device.reported_ts, device.desired_revision = message.ts, message.desired_revision
    device.agent_version = message.agent_version
    for name, model in message.models.items():
        _set_model(_stream(device, name), model, message.ts)
    for name, report in message.updates.items():
        row = _stream(device, name)
        row.update_state, row.update_reason = report.state.value, report.reason
        row.update_model_id, row.update_version = report.model_id, report.version
        row.update_sha256, row.update_ts = report.sha256, report.ts
    return True


def _stream(device: Device, name: str) -> DeviceStream:
    row = device.streams.get(name)
    if row is None:
        row = device.streams[name] = DeviceStream(device_id=device.id, stream=name)
    return row


def _set_model(row: DeviceStream, model: ModelRef, at: float) -> None:
    if row.model_sha256 != model.sha256:
        if row.model_sha256 is not None:  # keep the replaced model's figures (rollout gates)
            row.previous_model_sha256 = row.model_sha256
            row.previous_error_rate = error_rate(row)
            row.previous_latency_p99_ms = row.latency_p99_ms
        row.model_since = at
        # The new model's frames are those the counters add from here (the last health
        # before the swap is the nearest reading; the frames since are few).
        row.model_processed_base, row.model_failed_base = row.processed, row.failed
    row.model_id, row.model_version, row.model_sha256 = model.id, model.version, model.sha256
    row.task, row.backend, row.delegate = model.task, model.backend, model.delegate


def error_rate(row: DeviceStream) -> float | None:
    """Failed frames over processed ones, of the running model only.

    The agent's counters run from its start, across live swaps: the frames counted before
    the model changed (``model_*_base``) are left out. Counters that went down mean the
    agent restarted, and then every frame counted is the running model's (the base is
    cleared, :func:`_apply_health`).
    """
    processed, failed = row.processed, row.failed
    if processed is None or failed is None:
        return None
    base_processed, base_failed = row.model_processed_base, row.model_failed_base
    if base_processed is not None and base_failed is not None:
        processed, failed = processed - base_processed, failed - base_failed
    return failed / processed if processed > 0 else None


def set_desired_model(
    session: Session, device_id: str, stream: str, *, model_id: str, version: int, sha256: str
) -> None:
    """Say which model the controller wants on a device's stream (a differing one is stale)."""
    device = _device(session, device_id)
    row = _stream(device, _checked_name(stream, "stream"))
    row.desired_model_id, row.desired_version, row.desired_sha256 = model_id, version, sha256


def clear_desired_model(session: Session, device_id: str, stream: str) -> None:
    """Forget what the controller wanted on a stream (nothing is stale there any more)."""
    row = _device(session, device_id).streams.get(stream)
    if row is not None:
        row.desired_model_id = row.desired_version = row.desired_sha256 = None


# -- groups and tags --------------------------------------------------------------------


def add_to_group(session: Session, group: str, device_ids: Iterable[str]) -> None:
    """Put devices in a group, making the group when it is new."""
    name = _checked_name(group, "group name")
    row = session.scalars(select(Group).where(Group.name == name)).one_or_none()
    if row is None:
        row = Group(name=name, created_at=time.time())
        session.add(row)
        session.flush()
    for device_id in device_ids:
        _device(session, device_id)
        if session.get(GroupMember, (row.id, device_id)) is None:
            session.add(GroupMember(group_id=row.id, device_id=device_id))
    session.flush()


def remove_from_group(session: Session, group: str, device_ids: Iterable[str]) -> None:
    """Take devices out of a group (the group stays, even empty)."""
    row = _group(session, group)
    session.execute(
        delete(GroupMember).where(
            GroupMember.group_id == row.id, GroupMember.device_id.in_(list(device_ids))
        )
    )


def delete_group(session: Session, group: str) -> None:
    """Delete a group and its memberships (the devices stay)."""
    row = _group(session, group)
    session.execute(delete(GroupMember).where(GroupMember.group_id == row.id))
    session.delete(row)
    session.flush()


def groups(session: Session) -> dict[str, list[str]]:
    """Every group by name, with its device ids, sorted."""
    found: dict[str, list[str]] = {
        name: [] for name in session.scalars(select(Group.name).order_by(Group.name))
    }
    query = (
        select(Group.name, GroupMember.device_id)
        .join(GroupMember, GroupMember.group_id == Group.id)
        .order_by(Group.name, GroupMember.device_id)
    )
    for name, device_id in session.execute(query):
        found[name].append(device_id)
    return found


def tag(session: Session, device_id: str, key: str, value: str) -> None:
    """Set a device's tag ``key`` to ``value`` (one value per key)."""
    device = _device(session, device_id)
    _checked_name(key, "tag key")
    if not _TAG_VALUE.match(value):
        raise BadName(
            f"tag value {value!r} of {key}: 1 to 128 of letters, digits and _ . : / @ + -",
            hint="commas and '=' separate selectors, so a value cannot hold them",
        )
    existing = device.tags.get(key)
    if existing is None:
        device.tags[key] = DeviceTag(device_id=device.id, key=key, value=value)
    else:
        existing.value = value
    session.flush()


def untag(session: Session, device_id: str, key: str) -> bool:
    """Remove a device's tag ``key``; False when it had none."""
    device = _device(session, device_id)
    removed = device.tags.pop(key, None) is not None
    session.flush()
    return removed


def _checked_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise BadName(
            f"{what} {name!r}: it must start with a letter or digit and hold at most 64 "
            "letters, digits, '_', '.' and '-'",
            hint=f"pick another {what}",
        )
    return name


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise UnknownDevice(
            f"no device {device_id!r} in the registry",
            hint="a device is known once the controller has seen one message from it; "
            "'edgefleet devices list' shows them",
        )
    return device


def _group(session: Session, name: str) -> Group:
    row = session.scalars(select(Group).where(Group.name == name)).one_or_none()
    if row is None:
        raise UnknownGroup(
            f"no group {name!r}",
            hint="'edgefleet devices tag' makes groups; 'edgefleet devices list' shows them",
        )
    return row


# -- selectors --------------------------------------------------------------------------


class SelectorTerm(BaseModel):
    """One part of a selector."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(description="device, group, tag or all.")
    name: str | None = Field(None, description="The device id, group name or tag key.")
    value: str | None = Field(None, description="The tag's value (tag only).")

    def __str__(self) -> str:
        if self.kind == "all":
            return "all"
        if self.kind == "tag":
            return f"tag:{self.name}={self.value}"
        return f"{self.kind}:{self.name}"


class Selector(BaseModel):
    """Devices that match every term (the parts of ``group:shops,tag:hw=pi5``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    terms: tuple[SelectorTerm, ...] = Field(min_length=1, description="All must match.")

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.terms)


def parse_selector(text: str) -> Selector:
    """Parse ``device:ID``, ``group:NAME``, ``tag:K=V`` or ``all``, comma-joined (intersection)."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise BadSelector(f"selector {text!r} has an empty part", hint=_SELECTOR_HINT)
    return Selector(terms=tuple(_term(part, text) for part in parts))


def _term(part: str, text: str) -> SelectorTerm:
    if part == "all":
        return SelectorTerm(kind="all")
    kind, colon, rest = part.partition(":")
    if not colon or kind not in ("device", "group", "tag"):
        raise BadSelector(f"selector {text!r}: {part!r} is none of the kinds", hint=_SELECTOR_HINT)
    if kind == "tag":
        key, equals, value = rest.partition("=")
        if not equals or not _NAME.match(key) or not _TAG_VALUE.match(value):
            raise BadSelector(
                f"selector {text!r}: {part!r} is not tag:KEY=VALUE", hint=_SELECTOR_HINT
            )
        return SelectorTerm(kind="tag", name=key, value=value)
    if not _NAME.match(rest):
        raise BadSelector(f"selector {text!r}: {rest!r} is not a {kind} name", hint=_SELECTOR_HINT)
    return SelectorTerm(kind=kind, name=rest)


def select_device_ids(session: Session, selectors: Sequence[Selector]) -> list[str]:
    """Ids of the devices matching any of ``selectors`` (each the intersection of its terms)."""
    clause = or_(false(), *(_selector_clause(session, s) for s in selectors))
    return list(session.scalars(select(Device.id).where(clause).order_by(Device.id)))


def _selector_clause(session: Session, selector: Selector) -> ColumnElement[bool]:
    return and_(true(), *(_term_clause(session, term) for term in selector.terms))


def _term_clause(session: Session, term: SelectorTerm) -> ColumnElement[bool]:
    if term.kind == "all":
        return true()
    assert term.name is not None, "parse_selector: every term but all has a name"
    if term.kind == "device":
        _device(session, term.name)
        return Device.id == term.name
    if term.kind == "group":
        group = _group(session, term.name)
        return Device.id.in_(select(GroupMember.device_id).where(GroupMember.group_id == group.id))
    return exists().where(
        DeviceTag.device_id == Device.id, DeviceTag.key == term.name, DeviceTag.value == term.value
    )


# -- queries ----------------------------------------------------------------------------


def _any_stream(*conditions: ColumnElement[bool]) -> ColumnElement[bool]:
    return exists().where(DeviceStream.device_id == Device.id, *conditions)


def _state_clause(state: DeviceState) -> ColumnElement[bool]:
    if state is DeviceState.ONLINE:
        return Device.status.in_(("online", "degraded"))
    if state is DeviceState.OFFLINE:
        return or_(Device.status == "offline", Device.status.is_(None))
    if state is DeviceState.DEGRADED:
        return or_(Device.status == "degraded", _any_stream(DeviceStream.state == "degraded"))
    if state is DeviceState.UPDATING:
        return _any_stream(DeviceStream.update_state.in_(sorted(_ACTIVE_VALUES)))
    return _any_stream(
        DeviceStream.desired_sha256.is_not(None),
        or_(
            DeviceStream.model_sha256.is_(None),
            DeviceStream.model_sha256 != DeviceStream.desired_sha256,
        ),
    )


class StreamView(BaseModel):
    """One stream of a device as the registry knows it."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    stream: str = Field(description="Stream name.")
    model_id: str | None = Field(description="Model running now.")
    model_version: str | None = Field(description="Its version.")
    model_sha256: str | None = Field(description="sha256 of its bytes.")
    backend: str | None = Field(description="Interpreter backend and version.")
    delegate: str | None = Field(description="Delegate in use.")
    update_state: str | None = Field(description="State of the latest update.")
    update_reason: str | None = Field(description="Why it was refused or rolled back.")
    update_version: int | None = Field(description="Manifest version of the latest update.")
    state: str | None = Field(description="Stream health state (running, degraded, ...).")
    fps: float | None = Field(description="Processed frames per second.")
    latency_p50_ms: float | None = Field(description="Capture to result, median.")
    latency_p99_ms: float | None = Field(description="Capture to result, 99th percentile.")
    processed: int | None = Field(description="Frames inferred since the agent started.")
    failed: int | None = Field(description="Frames whose inference failed since then.")
    events_lost: int | None = Field(description="Events that could not be stored.")
    last_error: str | None = Field(description="Most recent source or inference error.")
    desired_sha256: str | None = Field(description="Model the controller wants here.")
    stale: bool = Field(description="A desired model is set and differs from the running one.")


class DeviceView(BaseModel):
    """One device as the registry knows it (``edgefleet devices show``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="Device id.")
    states: list[DeviceState] = Field(description="Every state the device is in.")
    status: str | None = Field(description="Last status: online, degraded or offline.")
    status_reason: str | None = Field(description="Why offline or degraded.")
    first_seen: float = Field(description="Oldest message time seen, Unix seconds.")
    last_seen: float = Field(description="Newest message time seen, Unix seconds.")
    online_since: float | None = Field(description="When it last came online.")
    offline_since: float | None = Field(description="When it last went offline.")
    agent_version: str | None = Field(description="edgefleet version on the device.")
    backends: list[str] = Field(description="Interpreter backends it has.")
    temperature_c: float | None = Field(description="CPU temperature.")
    throttled: bool | None = Field(description="Any throttling flag set (Pi).")
    cpu_percent: float | None = Field(description="Agent CPU use, percent of one core.")
    rss_mb: float | None = Field(description="Agent resident memory, MiB.")
    outbox_depth: int | None = Field(description="Events waiting for the broker.")
    events_dropped: int | None = Field(description="Events dropped, outbox full.")
    events_lost: int | None = Field(description="Events not stored or lost to damage.")
    mqtt_reconnects: int | None = Field(description="Broker reconnections since start.")
    parts_failing: list[str] = Field(description="Agent threads not running.")
    health_ts: float | None = Field(description="Time of the last health message.")
    reported_ts: float | None = Field(description="Time of the last reported state.")
    groups: list[str] = Field(description="Groups it is in.")
    tags: dict[str, str] = Field(description="Its tags.")
    streams: list[StreamView] = Field(description="Its streams, by name.")


def list_devices(
    session: Session,
    *,
    state: DeviceState | None = None,
    selectors: Sequence[Selector] = (),
) -> list[DeviceView]:
    """Devices in ``state`` (any when None) matching any of ``selectors`` (all when none)."""
    query = select(Device).options(selectinload(Device.streams), selectinload(Device.tags))
    if state is not None:
        query = query.where(_state_clause(state))
    if selectors:
        query = query.where(or_(*(_selector_clause(session, s) for s in selectors)))
    devices = list(session.scalars(query.order_by(Device.id)))
    memberships = _memberships(session, [d.id for d in devices])
    return [_view(d, memberships.get(d.id, [])) for d in devices]


def show_device(session: Session, device_id: str) -> DeviceView:
    """One device (:class:`UnknownDevice` when never seen)."""
    device = _device(session, device_id)
    return _view(device, _memberships(session, [device_id]).get(device_id, []))


def _memberships(session: Session, ids: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    query = (
        select(GroupMember.device_id, Group.name)
        .join(Group, Group.id == GroupMember.group_id)
        .where(GroupMember.device_id.in_(ids))
        .order_by(Group.name)
    )
    for device_id, name in session.execute(query):
        found.setdefault(device_id, []).append(name)
    return found


def _stale(row: DeviceStream) -> bool:
    return row.desired_sha256 is not None and row.model_sha256 != row.desired_sha256


def device_states(device: Device) -> list[DeviceState]:
    """The states ``device`` is in, as :func:`list_devices` filters them."""
    rows = list(device.streams.values())
    checks = {
        DeviceState.ONLINE: device.status in ("online", "degraded"),
        DeviceState.OFFLINE: device.status in ("offline", None),
        DeviceState.DEGRADED: device.status == "degraded"
        or any(r.state == "degraded" for r in rows),
        DeviceState.UPDATING: any(r.update_state in _ACTIVE_VALUES for r in rows),
        DeviceState.STALE: any(_stale(r) for r in rows),
    }
    return [state for state, holds in checks.items() if holds]


def _view(device: Device, group_names: list[str]) -> DeviceView:
    streams = [_stream_view(device.streams[name]) for name in sorted(device.streams)]
    return DeviceView(
        id=device.id,
        states=device_states(device),
        status=device.status,
        status_reason=device.status_reason,
        first_seen=device.first_seen,
        last_seen=device.last_seen,
        online_since=device.online_since,
        offline_since=device.offline_since,
        agent_version=device.agent_version,
        backends=list(device.backends or []),
        temperature_c=device.temperature_c,
        throttled=device.throttled,
        cpu_percent=device.cpu_percent,
        rss_mb=device.rss_mb,
        outbox_depth=device.outbox_depth,
        events_dropped=device.events_dropped,
        events_lost=device.events_lost,
        mqtt_reconnects=device.mqtt_reconnects,
        parts_failing=list(device.parts_failing or []),
        health_ts=device.health_ts,
        reported_ts=device.reported_ts,
        groups=group_names,
        tags={key: row.value for key, row in sorted(device.tags.items())},
        streams=streams,
    )


def _stream_view(row: DeviceStream) -> StreamView:
    fields: dict[str, Any] = {
        name: getattr(row, name) for name in StreamView.model_fields if name != "stale"
    }
    fields["stale"] = _stale(row)
    return StreamView.model_validate(fields)


# -- audit log ----------------------------------------------------------------------------


def record_audit(
    session: Session,
    *,
    actor: str,
    action: str,
    target: str,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
    at: float | None = None,
) -> None:
    """Write one audit entry (who did what to which target, why) in the caller's transaction."""
    session.add(
        AuditEntry(
            at=_now(at), actor=actor, action=action, target=target, reason=reason, details=details
        )
    )


def audit_entries(session: Session, *, limit: int = 100) -> list[AuditEntry]:
    """The newest ``limit`` audit entries, newest first."""
    query = select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(limit)
    return list(session.scalars(query))
