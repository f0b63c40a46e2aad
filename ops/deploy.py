"""``edgefleet deploy | undeploy``: set, or remove, the model a device's stream should run.

::

    edgefleet deploy DEVICE STREAM SIGNED_MANIFEST.json [--force] [--host H] [--port P]
    edgefleet undeploy DEVICE STREAM [--host H] [--port P]

Both are a read-modify-write of the device's retained ``desired`` state: they assume one
operator (or controller) writes a device's desired state at a time; two concurrent deploys
to one device can lose one of the changes.

``deploy`` first reads what the broker holds for the device (its retained ``status``, the
birth message naming its streams, and its retained ``reported`` state) and judges the
deploy with ``judge_deploy``, a pure function. It refuses (exit 3, nothing published) what
the device would ignore or refuse: a device that never connected, a stream it does not
run, the manifest it already rolled back or refused, a version not newer than the one
it installed, an agent too old. ``--force`` sets it anyway, with the reasons as warnings.
It warns, and deploys, when the device is offline (it acts on it when it reconnects), when
it already runs the model, and when the desired state names streams the device does not
run (``undeploy`` removes those).

``undeploy`` removes one stream's entry; the stream keeps running the model it has.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from edgefleet.agent.protocol import (
    SCHEMA_VERSION,
    TOPIC_LEVEL_PATTERN,
    DesiredState,
    Manifest,
    ModelRef,
    ReportedState,
    SignedManifest,
    StatusMessage,
    StreamMarks,
    Topics,
    UpdateState,
    describe_errors,
)
from edgefleet.runtime import SettingError

from .connection import BrokerConnection, sync_topic
from .errors import ContractBroken, Refused
from .profile import add_broker_options, broker_options, broker_profile

_GAVE_UP = (UpdateState.ROLLED_BACK, UpdateState.REFUSED)
_M = TypeVar("_M", bound=BaseModel)
_MANIFEST_HINT = "pass the file 'edgefleet manifest create' wrote"


def register(subcommands: Any) -> None:
    """Add ``deploy`` and ``undeploy`` to the command parser."""
    deploy = subcommands.add_parser(
        "deploy",
        help="set the model a device's stream should run",
        description="Set the model a device's stream should run, in the device's retained "
        "desired state. Refuses (exit 3) what the device would ignore or refuse, judged "
        "from its retained status and reported state; --force sets it anyway.",
    )
    deploy.add_argument("device", metavar="DEVICE", help="device id")
    deploy.add_argument("stream", metavar="STREAM", help="stream name on that device")
    deploy.add_argument(
        "manifest",
        type=Path,
        metavar="SIGNED_MANIFEST.json",
        help="signed manifest (from 'edgefleet manifest create')",
    )
    deploy.add_argument(
        "--force",
        action="store_true",
        help="set it even when the device would ignore or refuse it (default: refuse)",
    )
    add_broker_options(deploy)
    deploy.set_defaults(handler=_deploy)

    undeploy = subcommands.add_parser(
        "undeploy",
        help="remove a stream's model from a device's desired state",
        description="Remove a stream's entry from the device's retained desired state. The "
        "stream keeps running the model it has; the device stops being asked for another.",
    )
    undeploy.add_argument("device", metavar="DEVICE", help="device id")
    undeploy.add_argument("stream", metavar="STREAM", help="stream name in its desired state")
    add_broker_options(undeploy)
    undeploy.set_defaults(handler=_undeploy)


# -- the decision (pure) ----------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRecord:
    """What the broker holds for one device: its retained status, reported and desired state.

    ``unreadable`` names retained messages that did not parse (left out of the checks).
    """

    status: StatusMessage | None = None
    reported: ReportedState | None = None
    desired: DesiredState = field(default_factory=lambda: DesiredState(revision=0))
    unreadable: tuple[str, ...] = ()

    @property
    def seen(self) -> bool:
        """Whether the device ever connected: it left a status or a reported state."""
        return self.status is not None or self.reported is not None or bool(self.unreadable)

    @property
    def streams(self) -> list[str] | None:
        """The streams the device runs, from its birth message or else its reported state."""
        if self.status is not None and self.status.state == "online":
            return list(self.status.streams)
        if self.reported is not None:
            return list(self.reported.models)
        return None

    @property
    def agent_version(self) -> str | None:
        """The edgefleet version the device last announced."""
        if self.status is not None and self.status.agent_version:
            return self.status.agent_version
        return self.reported.agent_version if self.reported is not None else None


@dataclass(frozen=True)
class Finding:
    """One thing a deploy would run into: a reason to refuse it, or only to warn."""

    refuse: bool
    reason: str
    hint: str = ""


@dataclass(frozen=True)
class Judgement:
    """What ``judge_deploy`` found; ``unchanged``: the desired state already says this."""

    findings: list[Finding]
    unchanged: bool = False

    @property
    def refusals(self) -> list[Finding]:
        """The findings that stop the deploy unless forced."""
        return [f for f in self.findings if f.refuse]


def judge_deploy(
    device: str, stream: str, signed: SignedManifest, manifest: Manifest, record: DeviceRecord
) -> Judgement:
    """What deploying ``signed`` to ``device``/``stream`` would do, judged from ``record``."""
    if not record.seen:
        return Judgement(
            [
                Finding(
                    True,
                    f"{device} has never connected to this broker: it left no retained "
                    "status or reported state",
                    "check the device id and --topic-root (edgefleet watch shows the devices "
                    "online); --force sets it for a device that is yet to connect",
                )
            ]
        )
    findings = [
        Finding(False, f"cannot read the retained {what} of {device}; not checked against it")
        for what in record.unreadable
    ]
    findings += _stream_findings(device, stream, record)
    findings += _update_findings(device, stream, signed, manifest, record)
    findings += _agent_findings(device, manifest, record)
    unchanged = record.desired.models.get(stream) == signed and not any(f.refuse for f in findings)
    return Judgement(findings, unchanged=unchanged)


def _stream_findings(device: str, stream: str, record: DeviceRecord) -> list[Finding]:
    findings = []
    status = record.status
    if status is not None and status.state == "offline":
        since = _utc(status.ts)
        why = f" ({status.reason})" if status.reason else ""
        findings.append(
            Finding(
                False,
                f"{device} is offline since {since}{why}; it acts on this when it reconnects",
            )
        )
    streams = record.streams
    if streams is None:
        findings.append(Finding(False, f"cannot tell which streams {device} runs; not checked"))
        return findings
    if stream not in streams:
        runs = f"its streams: {', '.join(streams)}" if streams else "it runs no stream"
        findings.append(
            Finding(
                True,
                f"{device} does not run stream {stream!r} ({runs}); it would ignore this "
                "entry and warn about it at every reconnect",
                "check the stream name; a new stream first needs the device's config "
                "(edgefleet cmd DEVICE set_config)",
            )
        )
    stale = sorted(set(record.desired.models) - set(streams) - {stream})
    for name in stale:
        findings.append(
            Finding(
                False,
                f"the desired state of {device} also names stream {name!r}, which it does not "
                f"run; remove it with: edgefleet undeploy {device} {name}",
            )
        )
    return findings


def _update_findings(
    device: str, stream: str, signed: SignedManifest, manifest: Manifest, record: DeviceRecord
) -> list[Finding]:
    reported = record.reported
    if reported is None:
        return []
    where = f"{device}/{stream}"
    running = reported.models.get(stream)
    update = reported.updates.get(stream)
    release = f"{manifest.model_id} version {manifest.version}"
    if (
        update is not None
        and update.state in _GAVE_UP
        and (update.model_id, update.version, update.sha256)
        == (manifest.model_id, manifest.version, manifest.sha256)
    ):
        again = (
            "it does not try the same manifest again"
            if record.desired.models.get(stream) == signed
            else "a manifest signed again would be tried again, and likely end the same way"
        )
        return [
            Finding(
                True,
                f"{where} {update.state.value.replace('_', ' ')} {release} before"
                f"{f': {update.reason}' if update.reason else ''}; {again}",
                "deploy a fixed release under a new version; --force sets it anyway",
            )
        ]
    installed = (
        update.version
        if update is not None
        and update.state is UpdateState.COMMITTED
        and running is not None
        and running.sha256 == update.sha256
        else None
    )
    runs_it = running is not None and running.sha256 == manifest.sha256
    deployed = record.desired.models.get(stream) == signed
    if not (deployed and runs_it):
        refusal = _order_refusal(where, manifest, reported.marks.get(stream), installed, running)
        if refusal is not None:
            return [refusal]
    if runs_it:
        return [
            Finding(
                False,
                f"{where} already runs this model (sha256 {manifest.sha256[:12]}); nothing "
                "is downloaded",
            )
        ]
    return []


def _order_refusal(
    where: str,
    manifest: Manifest,
    marks: StreamMarks | None,
    installed: int | None,
    running: ModelRef | None,
) -> Finding | None:
    """What the device refuses by its high-water marks (its ``acceptance`` module), from the
    marks it reports; a device reporting none is judged by the version it installed."""
    mark = marks.lines.get(manifest.model_id) if marks is not None else None
    line = marks.line if marks is not None else None
    runs_it = running is not None and running.sha256 == manifest.sha256
    if line is not None and line not in (manifest.model_id, manifest.replaces_model_id):
        return Finding(
            True,
            f"model {manifest.model_id} is not {where}'s model line {line}; the device "
            "refuses a manifest that changes the line without saying so",
            f"sign it with --replaces {line} if it is meant to replace {line}",
        )
    if mark is not None and manifest.sequence <= mark.sequence:
        return Finding(
            True,
            f"sequence {manifest.sequence} is not newer than {mark.sequence}, the newest "
            f"{where} accepted for {manifest.model_id}; the device refuses it as a replay",
            "sign it again with 'edgefleet manifest create' (it numbers every manifest), or "
            f"give --sequence above {mark.sequence}",
        )
    newest = max(mark.version if mark is not None else 0, installed or 0) or None
    source = manifest.rollback_from
    if source is not None:
        if running is not None and running.sha256 != source.sha256:
            return Finding(
                True,
                f"a rollback from sha256 {source.sha256[:12]}, but {where} runs "
                f"{running.sha256[:12]}; the device refuses it",
                "sign the rollback with --rollback-from the release the device runs now",
            )
        return None
    if newest is not None and manifest.version <= newest:
        return Finding(
            True,
            f"version {manifest.version} is not newer than version {newest}, which {where} "
            "installed; the device refuses it"
            + (" as a replay, although it runs these bytes" if runs_it else ""),
            f"sign it with a --version above {newest}, or as a return to an older release "
            "with --rollback-from",
        )
    return None


def _agent_findings(device: str, manifest: Manifest, record: DeviceRecord) -> list[Finding]:
    agent = record.agent_version
    if agent is None or _version_tuple(agent) >= _version_tuple(manifest.min_agent_version):
        return []
    return [
        Finding(
            True,
            f"the manifest needs agent {manifest.min_agent_version} or newer; {device} runs "
            f"{agent} and refuses it",
            "upgrade the agent on the device first",
        )
    ]


def _version_tuple(version: str) -> tuple[int, ...]:
    # The device's own comparison (edgefleet.agent.acceptance): the first four numbers.
    return tuple(int(part) for part in re.findall(r"\d+", version)[:4])


# -- the commands -----------------------------------------------------------------------


def _deploy(args: argparse.Namespace) -> int:
    check_topic_level("device id", args.device)
    check_topic_level("stream name", args.stream)
    signed, manifest = read_signed_manifest(args.manifest)
    resolved = broker_profile(args)
    topics = Topics(args.device, resolved.profile.topic_root)
    with BrokerConnection(resolved) as broker:
        record = read_device(broker, topics)
        judgement = judge_deploy(args.device, args.stream, signed, manifest, record)
        _report(judgement, force=args.force)
        if judgement.unchanged:
            print(
                f"{args.device}/{args.stream}: {manifest.model_id} version {manifest.version} "
                f"is the desired model already (revision {record.desired.revision}); "
                "nothing changed"
            )
            return 0
        current = record.desired
        desired = DesiredState(
            revision=next_revision(record), models={**current.models, args.stream: signed}
        )
        broker.publish(topics.desired, desired.model_dump_json(), retain=True)
    watch = " ".join(filter(None, ["edgefleet watch --device", args.device, broker_options(args)]))
    print(
        f"{args.device}/{args.stream}: {manifest.model_id} version {manifest.version}; "
        f"desired revision {desired.revision} (follow it with: {watch})"
    )
    return 0


def next_revision(record: DeviceRecord) -> int:
    """One above both the retained desired revision and the one the device reports seeing:
    a device ignores a revision older than the highest it saw (a retained desired state
    cleared by hand would otherwise start again below it)."""
    seen = record.reported.desired_revision if record.reported is not None else None
    return max(record.desired.revision, seen or 0) + 1


def _report(judgement: Judgement, *, force: bool) -> None:
    """Print the warnings; raise the first refusal unless ``force``."""
    refusals = judgement.refusals
    if refusals and not force:
        first, *others = refusals
        also = "".join(f"; also: {f.reason}" for f in others)
        raise Refused(f"not deployed: {first.reason}{also}", hint=first.hint)
    for finding in judgement.findings:
        forced = "forced despite: " if finding.refuse else ""
        print(f"edgefleet: warning: {forced}{finding.reason}", file=sys.stderr)


def _undeploy(args: argparse.Namespace) -> int:
    check_topic_level("device id", args.device)
    check_topic_level("stream name", args.stream)
    resolved = broker_profile(args)
    topics = Topics(args.device, resolved.profile.topic_root)
    with BrokerConnection(resolved) as broker:
        device = read_device(broker, topics)
        current = device.desired
        if args.stream not in current.models:
            named = ", ".join(sorted(current.models)) or "none"
            raise Refused(
                f"the desired state of {args.device} names no model for stream "
                f"{args.stream!r} (streams it names: {named}); nothing changed",
                hint="check the device id, the stream name and --topic-root",
            )
        models = {k: v for k, v in current.models.items() if k != args.stream}
        desired = DesiredState(revision=next_revision(device), models=models)
        broker.publish(topics.desired, desired.model_dump_json(), retain=True)
    print(
        f"{args.device}/{args.stream}: removed from the desired state (revision "
        f"{desired.revision}); the stream keeps running the model it has"
    )
    return 0


# -- reading what the broker holds ------------------------------------------------------


def check_topic_level(what: str, value: str) -> None:
    """Refuse a device id or stream name that cannot be one topic level."""
    if not re.fullmatch(TOPIC_LEVEL_PATTERN, value):
        raise SettingError(
            f"{what} {value!r} cannot be a topic level",
            hint="use up to 64 letters, digits, '_', '.' and '-', starting with a letter or digit",
        )


def read_signed(path: Path) -> SignedManifest:
    """The signed manifest in ``path``, as the file says (bad input when it is none)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise SettingError(f"cannot read {path}: {reason}", hint=_MANIFEST_HINT) from exc
    try:
        return SignedManifest.model_validate_json(text)
    except ValidationError as exc:
        raise SettingError(
            f"{path} is not a signed manifest: {describe_errors(exc)}", hint=_MANIFEST_HINT
        ) from exc


def read_signed_manifest(path: Path) -> tuple[SignedManifest, Manifest]:
    """The signed manifest in ``path`` and its (unverified) manifest, for checks and messages.

    Not a trust decision: the device verifies the signature. This only stops an operator
    from deploying a file that is not a manifest, or one every device would refuse as expired.
    """
    signed = read_signed(path)
    try:
        manifest = Manifest.model_validate_json(signed.payload)
    except ValidationError as exc:
        raise SettingError(
            f"{path} is not a signed manifest: payload: {describe_errors(exc)}",
            hint=_MANIFEST_HINT,
        ) from exc
    if manifest.expires_at <= time.time():
        raise SettingError(
            f"{path} expired at {_utc(manifest.expires_at)}; devices would refuse it",
            hint="sign a new one with 'edgefleet manifest create'",
        )
    return signed, manifest


def read_device(broker: BrokerConnection, topics: Topics) -> DeviceRecord:
    """The retained status, reported and desired state of one device, as the broker holds them."""
    held = broker.retained(
        [topics.status, topics.reported, topics.desired], sync_topic(topics.root)
    )
    unreadable: list[str] = []
    try:
        status = _parse(StatusMessage, held.get(topics.status))
    except ValidationError:
        status, unreadable = None, [*unreadable, "status"]
    try:
        reported = _parse(ReportedState, held.get(topics.reported))
    except ValidationError:
        reported, unreadable = None, [*unreadable, "reported state"]
    return DeviceRecord(
        status=status,
        reported=reported,
        desired=_desired(topics.desired, held.get(topics.desired)),
        unreadable=tuple(unreadable),
    )


def _parse(model: type[_M], payload: bytes | None) -> _M | None:
    """``payload`` as ``model``, None when there is none; a ValidationError when it breaks it."""
    return None if payload is None else model.model_validate_json(payload)


def _desired(topic: str, payload: bytes | None) -> DesiredState:
    """The retained desired state; revision 0 with no models when there is none."""
    if payload is None:
        return DesiredState(revision=0)
    try:
        state = DesiredState.model_validate_json(payload)
    except ValidationError as exc:
        raise ContractBroken(
            f"the retained message on {topic} is not a desired state: {describe_errors(exc)}",
            hint=f"inspect it (mosquitto_sub -t {topic} -C 1); clear it with "
            f"mosquitto_pub -t {topic} -r -n, then deploy every stream again",
        ) from exc
    if state.schema_version != SCHEMA_VERSION:
        raise ContractBroken(
            f"the desired state on {topic} has schema version {state.schema_version}; "
            f"this edgefleet writes {SCHEMA_VERSION}",
            hint="deploy with the edgefleet version that wrote it",
        )
    return state


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


__all__ = [
    "DeviceRecord",
    "Finding",
    "Judgement",
    "judge_deploy",
    "read_device",
    "read_signed",
    "read_signed_manifest",
    "register",
]
