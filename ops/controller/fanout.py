"""Fleet-wide commands: one command to many devices over one broker connection, one answer
per device (``POST /commands``; ``edgefleet cmd SELECTOR COMMAND``).

::

    POST /commands  {"selector": ["group:shops"], "name": "ping", "args": {}, "timeout_s": 10}
      -> 200 {"name": "ping", "selector": [...], "devices": [one row per device]}

:func:`fan_out` is the work, usable without HTTP: it checks the arguments as the device
would (``protocol.COMMAND_ARGS``), opens one MQTT 5 connection with the controller's broker
profile, subscribes to ``<root>/+/reply/<batch>`` first, publishes every device's
``CommandRequest`` at QoS 1 (its reply topic ``<root>/<device>/reply/<batch>``, under the
device's own subtree as the ACL wants, as the response topic and in ``reply_to`` for a
device on MQTT 3.1.1; its correlation data the request's id; the message expiring with the
timeout) and collects replies until every device answered or the deadline passed. A reply
is the device's by its topic (a device can write only its own), and, when it carries
correlation data, by that too. Each device's :class:`DeviceAnswer` says ``ok`` (the
result), ``error`` (the device's error code, or ``bad_reply`` for a reply that breaks the
wire contract) or ``no_answer``, and the seconds it took.

:func:`commands_router` is the API over it. The selectors are the registry's
(``registry.parse_selector``: several unite, a comma intersects); only devices the registry
knows are sent to, offline ones too (a device that comes back within the timeout answers;
the broker drops the request at its expiry, and the device refuses it after
``expires_at``): their rows say ``no_answer`` with the registry's status and since when.
The audit entry (action ``command``, the selectors as target, the command, its arguments and
how many devices, online and offline) is committed before anything is sent, so no command
leaves unrecorded; the outcome counts are in the answer and the log. The database is not
held during the wait. The handler blocks its worker thread up to ``timeout_s`` (at most
:data:`TIMEOUT_MAX_S`) plus the broker's acknowledgements.

Errors (answered as ``api.error_answer`` says)::

    SettingError (400)
    ├── BadCommandArgs        args the device would refuse, too large, or not JSON-clean
    └── NoDeviceSelected      the selectors match no device (a typo of a tag, say)
    (registry: BadSelector 400, UnknownDevice and UnknownGroup 404)
    EnvironmentProblem (503)
    └── CommandsUnavailable   no broker configured, or it cannot be reached or refuses us

Threads: :func:`fan_out` runs on its caller's thread (the API's: a FastAPI worker thread);
``BrokerConnection`` runs paho's network thread for the call's length and hands the
replies over on its queue.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter
from paho.mqtt.client import MQTTMessage
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.agent.protocol import (
    COMMAND_ARGS,
    TOPIC_LEVEL_PATTERN,
    CommandName,
    CommandReply,
    CommandRequest,
    Topics,
    describe_errors,
)
from edgefleet.ops.commands import request_properties
from edgefleet.ops.connection import BrokerConnection
from edgefleet.ops.errors import BrokerError
from edgefleet.ops.profile import ProfileError, ResolvedProfile
from edgefleet.runtime import EnvironmentProblem, SettingError

from . import registry
from .api import ApiContext, CallerDep, ContextDep, ErrorBody, audited
from .registry import DeviceView

log = logging.getLogger(__name__)

__all__ = [
    "ARGS_MAX_BYTES",
    "BAD_REPLY",
    "BadCommandArgs",
    "CommandAnswer",
    "CommandBody",
    "CommandsUnavailable",
    "DeviceAnswer",
    "DeviceRow",
    "NoDeviceSelected",
    "Outcome",
    "check_args",
    "commands_router",
    "fan_out",
]

TIMEOUT_DEFAULT_S = 10.0
TIMEOUT_MIN_S = 0.5
TIMEOUT_MAX_S = 120.0
ARGS_MAX_BYTES = 64 * 1024
"""Largest arguments (their JSON) a fleet-wide command takes; a device takes 256 KiB in all."""
SELECTORS_MAX = 32
SELECTOR_MAX_CHARS = 512
BAD_REPLY = "bad_reply"
"""The error code of a row whose reply does not parse as a ``CommandReply``."""
_DEVICE_ID = re.compile(TOPIC_LEVEL_PATTERN)


class BadCommandArgs(SettingError):
    """Arguments the device would refuse, or that cannot be sent as they are."""


class NoDeviceSelected(SettingError):
    """The selectors match no device in the registry."""


class CommandsUnavailable(EnvironmentProblem):
    """The controller cannot send commands: no broker configured, or the broker fails us."""


class Outcome(str, Enum):
    """What came of a command on one device."""

    OK = "ok"
    ERROR = "error"
    NO_ANSWER = "no_answer"


class DeviceAnswer(BaseModel):
    """One device's answer to a fleet-wide command."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str = Field(description="Device id.")
    outcome: Outcome = Field(
        description="ok: carried out; error: the device said why not (or its reply does not "
        "parse); no_answer: nothing came back within the timeout."
    )
    seconds: float = Field(
        description="Seconds from sending the requests to this device's reply, or to giving up."
    )
    result: dict[str, Any] | None = Field(description="The command's result, when ok.")
    error: str | None = Field(
        description="When error: the device's error code (malformed, invalid_args, "
        f"not_found, refused, failed, ...), or {BAD_REPLY} for a reply that does not parse."
    )
    message: str = Field(description="What the device said, or why there is no answer.")


class DeviceRow(DeviceAnswer):
    """A device's answer with what the registry knows of it."""

    status: str | None = Field(description="Its last status: online, degraded or offline.")
    status_reason: str | None = Field(description="Why offline or degraded.")
    offline_since: float | None = Field(description="When it last went offline, Unix seconds.")
    last_seen: float = Field(description="Newest message time seen, Unix seconds.")

    @classmethod
    def of(cls, answer: DeviceAnswer, device: DeviceView) -> DeviceRow:
        """``answer`` with ``device``'s registry facts."""
        offline = device.status in ("offline", None)
        return cls(
            **answer.model_dump(),
            status=device.status,
            status_reason=device.status_reason,
            offline_since=device.offline_since if offline else None,
            last_seen=device.last_seen,
        )


Selector = Annotated[
    str,
    Field(
        max_length=SELECTOR_MAX_CHARS,
        description="device:ID, group:NAME, tag:K=V or all; a comma intersects.",
    ),
]


class CommandBody(BaseModel):
    """The body of ``POST /commands``."""

    model_config = ConfigDict(extra="forbid")

    selector: list[Selector] = Field(
        min_length=1,
        max_length=SELECTORS_MAX,
        description="Which devices: several selectors unite, a comma within one intersects.",
    )
    name: CommandName = Field(description="The command.")
    args: dict[str, Any] = Field(
        default_factory=dict,
        description=f"The command's arguments, as the device takes them (at most "
        f"{ARGS_MAX_BYTES} bytes of JSON); checked before anything is sent.",
    )
    timeout_s: float = Field(
        TIMEOUT_DEFAULT_S,
        ge=TIMEOUT_MIN_S,
        le=TIMEOUT_MAX_S,
        allow_inf_nan=False,
        description="Seconds to wait for the replies; each device refuses the request after "
        "that too.",
    )


class CommandAnswer(BaseModel):
    """The answer of ``POST /commands``: one row per selected device, by id."""

    model_config = ConfigDict(extra="forbid")

    name: CommandName = Field(description="The command.")
    selector: list[str] = Field(description="The selectors, as given.")
    devices: list[DeviceRow] = Field(description="One row per selected device, by id.")


# -- the fan-out ---------------------------------------------------------------------------


def check_args(name: CommandName, args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` if the device would take them for ``name`` and they can be sent, else
    :class:`BadCommandArgs`."""
    model = COMMAND_ARGS[name]
    try:
        model.model_validate(args)
    except ValidationError as exc:
        fields = ", ".join(model.model_fields) or "none"
        raise BadCommandArgs(
            f"args for {name.value}: {describe_errors(exc)}",
            hint=f"{name.value} takes these arguments: {fields}",
        ) from exc
    try:
        size = len(json.dumps(args, ensure_ascii=False, allow_nan=False).encode())
    except (ValueError, TypeError, RecursionError) as exc:  # NaN, lone surrogates, too deep
        raise BadCommandArgs(
            f"args for {name.value} cannot be sent as JSON ({exc})",
            hint="give plain JSON values: no NaN or Infinity, no unpaired surrogates",
        ) from exc
    if size > ARGS_MAX_BYTES:
        raise BadCommandArgs(
            f"args for {name.value} are {size} bytes of JSON, more than {ARGS_MAX_BYTES}",
            hint="send less (set_config: a patch of what changes, not the whole file)",
        )
    return dict(args)


@dataclass(frozen=True)
class _Sent:
    """One device's request: its id and the topic its reply comes on."""

    device_id: str
    request_id: str
    reply_topic: str


def fan_out(
    resolved: ResolvedProfile,
    device_ids: Sequence[str],
    name: CommandName,
    args: Mapping[str, Any],
    timeout_s: float,
) -> list[DeviceAnswer]:
    """Send ``name`` with ``args`` to every device over one connection; one answer per
    device (duplicates once), in the order given, within ``timeout_s``."""
    checked = check_args(name, args)
    if not timeout_s > 0:
        raise SettingError(f"timeout {timeout_s} s: it must be more than 0", hint="raise it")
    ids = list(dict.fromkeys(device_ids))
    for device_id in ids:
        if not _DEVICE_ID.match(device_id):
            raise SettingError(f"{device_id!r} is not a device id", hint="check the ids")
    if not ids:
        return []
    root = resolved.profile.topic_root
    batch = uuid.uuid4().hex
    sent = {d: _Sent(d, uuid.uuid4().hex, f"{Topics(d, root).base}/reply/{batch}") for d in ids}
    try:
        answers, elapsed = _exchange(resolved, sent, _Batch(batch, name, checked, timeout_s))
    except (BrokerError, ProfileError) as exc:
        raise CommandsUnavailable(
            f"cannot send {name.value} to {len(ids)} device(s): {exc}",
            hint="check the broker and the controller's broker profile",
        ) from exc
    missing = f"no answer within {timeout_s:g} s"
    rows = [answers.get(d) or _answer(d, Outcome.NO_ANSWER, elapsed, missing) for d in ids]
    _log_outcome(name, rows, elapsed)
    return rows


@dataclass(frozen=True)
class _Batch:
    """One fan-out: its id (the reply topics' last level), the command, its arguments."""

    id: str
    name: CommandName
    args: dict[str, Any]
    timeout_s: float


def _exchange(
    resolved: ResolvedProfile, sent: dict[str, _Sent], batch: _Batch
) -> tuple[dict[str, DeviceAnswer], float]:
    """Subscribe, publish every request, collect the replies; and the seconds it took."""
    root = resolved.profile.topic_root
    with BrokerConnection(resolved) as broker:
        broker.subscribe(f"{root}/+/reply/{batch.id}")
        started = time.monotonic()
        messages, properties = _requests(sent, batch, root)
        broker.publish_all(messages, properties=properties)
        answers = _collect(broker, sent, started, started + batch.timeout_s)
        return answers, time.monotonic() - started


def _requests(
    sent: dict[str, _Sent], batch: _Batch, root: str
) -> tuple[list[tuple[str, bytes]], list[Properties | None]]:
    """Each device's request (topic, payload) and its MQTT 5 properties."""
    expires_at = time.time() + batch.timeout_s
    messages: list[tuple[str, bytes]] = []
    properties: list[Properties | None] = []
    for one in sent.values():
        request = CommandRequest(
            id=one.request_id, expires_at=expires_at, args=batch.args, reply_to=one.reply_topic
        )
        topic = Topics(one.device_id, root).command(batch.name.value)
        messages.append((topic, request.model_dump_json().encode()))
        properties.append(request_properties(one.reply_topic, one.request_id, batch.timeout_s))
    return messages, properties


def _collect(
    broker: BrokerConnection, sent: dict[str, _Sent], started: float, deadline: float
) -> dict[str, DeviceAnswer]:
    """The replies that came by ``deadline`` (monotonic), by device."""
    by_topic = {one.reply_topic: one for one in sent.values()}
    answers: dict[str, DeviceAnswer] = {}
    while len(answers) < len(sent):
        message = broker.receive(deadline - time.monotonic())
        if message is None:
            break
        one = by_topic.get(message.topic)
        if one is None or one.device_id in answers or not _correlates(message, one):
            continue  # not a reply to us, a repeat, or an answer to another request
        arrived = message.timestamp or time.monotonic()  # paho's receive time, monotonic
        answers[one.device_id] = _reply(one, bytes(message.payload), max(arrived - started, 0.0))
    return answers


def _correlates(message: MQTTMessage, one: _Sent) -> bool:
    correlation = getattr(message.properties, "CorrelationData", None)
    return correlation is None or bytes(correlation) == one.request_id.encode()


def _reply(one: _Sent, payload: bytes, seconds: float) -> DeviceAnswer:
    try:
        reply = CommandReply.model_validate_json(payload)
    except ValidationError as exc:
        message = f"the reply is not a command reply: {describe_errors(exc)}"
        return _answer(one.device_id, Outcome.ERROR, seconds, message, error=BAD_REPLY)
    if reply.id is not None and reply.id != one.request_id:
        message = f"the reply answers request {reply.id!r}, not {one.request_id!r}"
        return _answer(one.device_id, Outcome.ERROR, seconds, message, error=BAD_REPLY)
    if not reply.ok:
        error = reply.error.value if reply.error is not None else "failed"
        return _answer(one.device_id, Outcome.ERROR, seconds, reply.message, error=error)
    result = reply.result or {}
    return _answer(one.device_id, Outcome.OK, seconds, reply.message, result=result)


def _answer(
    device_id: str,
    outcome: Outcome,
    seconds: float,
    message: str,
    *,
    error: str | None = None,
    result: dict[str, Any] | None = None,
) -> DeviceAnswer:
    return DeviceAnswer(
        device_id=device_id,
        outcome=outcome,
        seconds=round(seconds, 3),
        result=result,
        error=error,
        message=message,
    )


def _log_outcome(name: CommandName, rows: list[DeviceAnswer], elapsed: float) -> None:
    counts = {o: sum(r.outcome is o for r in rows) for o in Outcome}
    log.info(
        "command %s to %d devices: %d ok, %d error, %d no answer, in %.1f s",
        name.value,
        len(rows),
        counts[Outcome.OK],
        counts[Outcome.ERROR],
        counts[Outcome.NO_ANSWER],
        elapsed,
    )


# -- the API -------------------------------------------------------------------------------


_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorBody,
        "description": "Bad input: a selector that does not parse or matches no device, "
        "arguments the device would refuse.",
    },
    404: {"model": ErrorBody, "description": "A device or group the selector names is unknown."},
    503: {
        "model": ErrorBody,
        "description": "No broker configured, or the broker or the database cannot be reached.",
    },
}


def commands_router() -> APIRouter:
    """``POST /commands``: a command to every selected device, one row per device."""
    router = APIRouter(tags=["commands"])

    @router.post("/commands", responses=_RESPONSES)
    def send_command(body: CommandBody, context: ContextDep, who: CallerDep) -> CommandAnswer:
        """Send a command to the selected devices and wait for their replies (at most
        ``timeout_s``): one row per device, by id."""
        args = check_args(body.name, body.args)
        selectors = [registry.parse_selector(text) for text in body.selector]
        with context.database.session() as session:
            devices = registry.list_devices(session, selectors=selectors)
            if not devices:
                raise NoDeviceSelected(
                    f"no device matches {' or '.join(map(repr, body.selector))}",
                    hint="'edgefleet devices list' shows the devices, their groups and tags",
                )
            broker = _broker(context)
            online = sum(d.status in ("online", "degraded") for d in devices)
            details = {
                "name": body.name.value,
                "args": args,
                "devices": len(devices),
                "online": online,
                "offline": len(devices) - online,
            }
            target = " ".join(str(s) for s in selectors)
            audited(session, who, "command", target, details)
        answers = fan_out(broker, [d.id for d in devices], body.name, args, body.timeout_s)
        rows = [DeviceRow.of(a, d) for a, d in zip(answers, devices, strict=True)]
        return CommandAnswer(name=body.name, selector=body.selector, devices=rows)

    return router


def _broker(context: ApiContext) -> ResolvedProfile:
    if context.broker is None:
        raise CommandsUnavailable(
            "this controller has no broker to send commands through",
            hint="give the controller's config a broker (an operator profile)",
        )
    return context.broker
