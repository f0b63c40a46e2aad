"""``edgefleet cmd``: send a device, or every device a selector names, one command and print
the replies.

::

    edgefleet cmd TARGET COMMAND [KEY=VALUE ...] [--args JSON] [--set KEY.SUB=VALUE ...]
                  [--out FILE.jpg | DIR] [--json] [--timeout S]

TARGET is a device id, sent to directly over the broker (the broker options, the operator
profile), or a selector, sent through the controller's API (``POST /commands``; the
controller options, ``edgefleet.ops.apiclient``): ``device:ID``, ``group:NAME``,
``tag:KEY=VALUE``, ``all``, or a comma-joined combination, which intersects
(``group:shops,tag:hw=pi5``). A TARGET holding ``:`` or ``,``, or ``all``, is a selector; a
device that is called ``all`` is ``device:all``. The controller sends to every selected
device the registry knows, online or not, over one broker connection, and answers one row
per device. Here that is one line per device: its id, ``ok``, ``error`` or ``no_answer``, and
the command's one-line summary, the device's error code and message, or "no answer in
10 s" (with since when the registry has it offline); ``--json`` prints the controller's
answer as it came. ``snapshot --out DIR`` with a selector writes ``DIR/<device id>.jpg`` for
each device that sent one (DIR is made if missing; a name ending in ``.jpg`` is refused, as
one file cannot hold many devices' images).

The command's arguments are ``KEY=VALUE`` words (``stream=door``), or a JSON object in
``--args``, or both (the words win). By default the reply is one short line for a person
(``summary``); ``--json`` prints the reply as the device sent it. ``snapshot --out
FILE.jpg`` writes the JPEG the reply carries (``result.jpeg_base64``). ``set_config --set
streams.door.events.min_score=0.6`` (repeatable) builds an RFC 7396 JSON merge patch, one
object level per dot, and sends it as ``{"patch": {...}}``; a VALUE (there and in the
words) is JSON where it parses as JSON (``0.6``, ``true``, ``null``, which in a patch
removes the key), else a string. How the device applies the patch (streams by name) is
its side of ``set_config``.

A device that answers ``ok: false`` exits 1 with its error on stderr; one that does not
answer within ``--timeout`` exits 1 too (``NoReply``). With a selector: exit 0 when every
device answered ok, else 1 (a line on stderr says how many did not); the controller's
refusals keep their exit codes (``ApiRejected`` 2: a selector that does not parse, names an
unknown device or group, or matches nothing).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from edgefleet.agent.protocol import (
    COMMAND_ARGS,
    CommandName,
    CommandReply,
    CommandRequest,
    Topics,
    describe_errors,
)
from edgefleet.runtime import SettingError

from .apiclient import add_controller_fields
from .connection import BrokerConnection
from .deploy import check_topic_level
from .errors import ContractBroken, NoReply
from .profile import add_broker_options, broker_options, broker_profile

if TYPE_CHECKING:
    from .controller.fanout import CommandAnswer, DeviceRow

DEFAULT_COMMAND_TIMEOUT_S = 10.0
ANSWER_MARGIN_S = 30.0
"""How much longer than ``--timeout`` to wait for the controller's answer to a fan-out."""
KIB = 1024
_SELECTOR_MARKS = (":", ",")
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_ARGS_HINT = 'pass an object, e.g. {"stream": "door"}'


def register(subcommands: Any) -> None:
    """Add ``cmd`` to the command parser."""
    names = [c.value for c in CommandName]
    cmd = subcommands.add_parser(
        "cmd",
        help="send a device, or the devices a selector names, a command; print the replies",
        description="Send a device a command and print its reply: one line by default, "
        "the reply's JSON with --json. With a selector, the controller sends it to every "
        "device selected and answers one line per device.",
        epilog=_commands_epilog(),
    )
    cmd.add_argument(
        "target",
        metavar="TARGET",
        help="a device id (sent directly over the broker), or a selector sent through the "
        "controller: device:ID, group:NAME, tag:KEY=VALUE or all, comma-joined for the "
        "devices that match every part",
    )
    cmd.add_argument(
        "name",
        metavar="COMMAND",
        choices=names,
        help=f"the command, one of: {', '.join(names)} (their arguments below)",
    )
    cmd.add_argument(
        "pairs",
        nargs="*",
        metavar="KEY=VALUE",
        help="the command's arguments, e.g. stream=door; VALUE is JSON or else a string "
        "(default: none)",
    )
    cmd.add_argument(
        "--args",
        default="{}",
        metavar="JSON",
        help="the command's arguments as a JSON object (default: %(default)s)",
    )
    cmd.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.SUB=VALUE",
        dest="settings",
        help="set_config: change one setting, e.g. streams.door.events.min_score=0.6 (a JSON "
        "merge patch, one level per dot; VALUE is JSON or else a string; null removes it); "
        "repeat (default: none)",
    )
    cmd.add_argument(
        "--out",
        type=Path,
        metavar="FILE.jpg",
        help="snapshot: write the image here; with a selector a folder, one DEVICE.jpg each "
        "(default: not saved)",
    )
    cmd.add_argument(
        "--json", action="store_true", help="print the reply's JSON (default: one line)"
    )
    cmd.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_COMMAND_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for the reply; the device refuses it after that too; with a "
        "selector 0.5 to 120 (default: %(default)s)",
    )
    add_broker_options(cmd)
    add_controller_fields(
        cmd.add_argument_group(
            "controller connection (a selector)",
            "--profile, --cert and --key above serve both; flags beat the EDGEFLEET_* "
            "variables, which beat the profile file",
        )
    )
    cmd.set_defaults(handler=_cmd)


def _commands_epilog() -> str:
    lines = ["commands and their arguments (KEY=VALUE, or --args JSON; [key=default] optional):"]
    for name, model in COMMAND_ARGS.items():
        fields = []
        for key, info in model.model_fields.items():
            default = info.default.value if isinstance(info.default, Enum) else info.default
            if info.is_required():
                fields.append(key)
            else:
                fields.append(f"[{key}]" if default is None else f"[{key}={default}]")
        lines.append(f"  {name.value:<15} {' '.join(fields) or '(none)'}")
    lines.append("")
    lines.append("  edgefleet cmd DEVICE COMMAND ...    one device, directly over the broker")
    lines.append("  edgefleet cmd SELECTOR COMMAND ...  the devices selected, via the controller")
    lines.append("e.g. edgefleet cmd pi-7 snapshot stream=door --out door.jpg")
    lines.append("     edgefleet cmd pi-7 set_config --set streams.door.events.min_score=0.6")
    lines.append("     edgefleet cmd group:shops,tag:hw=pi5 get_status")
    lines.append("     edgefleet cmd tag:site=farm snapshot stream=door --out farm/")
    return "\n".join(lines)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


# -- the command ------------------------------------------------------------------------


def _cmd(args: argparse.Namespace) -> int:
    name = CommandName(args.name)
    fleet = is_selector(args.target)
    if not fleet:
        check_topic_level("device id", args.target)
    command_args = _command_args(name, args.args, args.pairs, args.settings)
    if args.out is not None and name is not CommandName.SNAPSHOT:
        raise SettingError(f"--out is for snapshot, not {name.value}", hint="leave out --out")
    if fleet:
        return _fleet_cmd(args, name, command_args)
    return _device_cmd(args, args.target, name, command_args)


def is_selector(target: str) -> bool:
    """Whether ``edgefleet cmd``'s TARGET is a selector (else a device id)."""
    return target == "all" or any(mark in target for mark in _SELECTOR_MARKS)


def _device_cmd(
    args: argparse.Namespace, device: str, name: CommandName, command_args: dict[str, Any]
) -> int:
    """One device, directly over the broker."""
    resolved = broker_profile(args)
    topics = Topics(device, resolved.profile.topic_root)
    request_id = uuid.uuid4().hex
    # Under the device's own subtree: the generated ACL lets a device write only there.
    reply_topic = f"{topics.base}/reply/{request_id}"
    request = CommandRequest(
        id=request_id,
        expires_at=time.time() + args.timeout,
        args=command_args,
        reply_to=reply_topic,  # for a device on MQTT 3.1.1, which gets no response topic
    )
    deadline = time.monotonic() + args.timeout
    with BrokerConnection(resolved) as broker:
        broker.subscribe(reply_topic)
        broker.publish(
            topics.command(name.value),
            request.model_dump_json(),
            properties=request_properties(reply_topic, request.id, args.timeout),
        )
        reply = _await_reply(broker, request.id, deadline)
    if reply is None:
        watch = " ".join(filter(None, ["edgefleet watch --device", device, broker_options(args)]))
        raise NoReply(
            f"no reply from {device} to {name.value} within {args.timeout:g} s",
            hint=f"check that {device} is online ({watch}) and runs an agent that "
            "answers commands, or raise --timeout",
        )
    if not reply.ok:
        if args.json:
            print(reply.model_dump_json(indent=2))
        error = reply.error.value if reply.error else "error"
        print(
            f"edgefleet: {device} did not carry out {name.value}: {error}: {reply.message}",
            file=sys.stderr,
        )
        return 1
    saved = ""
    if args.out is not None:
        jpeg = _save_snapshot(reply.result or {}, args.out)
        saved = f"saved {len(jpeg) / KIB:.0f} KiB to {args.out}"
        if args.json:
            print(saved, file=sys.stderr)
    if args.json:
        print(reply.model_dump_json(indent=2))
    elif args.out is not None:
        print(f"{device} snapshot: {_image(reply.result or {})}; {saved}")
    else:
        print(summary(device, reply))
    return 0


# -- a selector, through the controller ----------------------------------------------------


def _fleet_cmd(args: argparse.Namespace, name: CommandName, command_args: dict[str, Any]) -> int:
    """Every device a selector names, through the controller's ``POST /commands``."""
    from .apiclient import client_for

    folder = _snapshot_folder(args.out) if args.out is not None else None
    body = {
        "selector": [args.target],
        "name": name.value,
        "args": command_args,
        "timeout_s": args.timeout,
    }
    with client_for(broker_profile(args), os.environ) as client:
        raw = client.post("/commands", body, timeout_s=args.timeout + ANSWER_MARGIN_S)
    answer = _fleet_answer(raw)
    saved = _save_snapshots(answer.devices, folder) if folder is not None else {}
    if args.json:
        print(json.dumps(raw, indent=2))
        for line in saved.values():
            print(line, file=sys.stderr)
    else:
        width = max(len(row.device_id) for row in answer.devices)
        for row in answer.devices:
            text = _row_text(row, name, args.timeout, saved.get(row.device_id))
            print(f"{row.device_id:<{width}}  {row.outcome.value:<9}  {text}")
    failed = sum(row.outcome.value != "ok" for row in answer.devices)
    if failed:
        print(
            f"edgefleet: {failed} of {len(answer.devices)} devices did not carry out {name.value}",
            file=sys.stderr,
        )
        return 1
    return 0


def _fleet_answer(raw: Any) -> CommandAnswer:
    from .apiclient import ControllerError
    from .controller.fanout import CommandAnswer

    try:
        return CommandAnswer.model_validate(raw)
    except ValidationError as exc:
        raise ControllerError(
            f"the controller's answer to POST /commands does not parse: {describe_errors(exc)}",
            hint="the controller runs another edgefleet version than this CLI; check both",
        ) from exc


def _snapshot_folder(out: Path) -> Path:
    """``--out`` with a selector: a folder, made when missing."""
    if out.suffix.lower() in _JPEG_SUFFIXES:
        raise SettingError(
            f"--out {out}: with a selector --out is a folder (one DEVICE.jpg per device), and "
            "one file cannot hold many devices' images",
            hint="give a folder, e.g. --out snapshots/",
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingError(
            f"cannot make the folder {out}: {exc.strerror or exc}", hint="check --out"
        ) from exc
    return out


def _save_snapshots(rows: list[DeviceRow], folder: Path) -> dict[str, str]:
    """Write each ok row's JPEG to ``folder/<device id>.jpg``; what was saved, by device."""
    saved = {}
    for row in rows:
        if row.outcome.value == "ok":
            out = folder / f"{row.device_id}.jpg"
            jpeg = _save_snapshot(row.result or {}, out)
            saved[row.device_id] = f"saved {len(jpeg) / KIB:.0f} KiB to {out}"
    return saved


def _row_text(row: DeviceRow, name: CommandName, timeout_s: float, saved: str | None) -> str:
    """What one device's line says after its id and outcome."""
    if row.outcome.value == "ok":
        result = row.result or {}
        if name is CommandName.SNAPSHOT:
            return f"{_image(result)}; {saved or 'save them with --out DIR'}"
        return describe(name.value, result, row.message)
    if row.outcome.value == "error":
        return f"{row.error}: {row.message}"
    text = f"no answer in {timeout_s:g} s"
    if row.status is None:
        return f"{text}; no status from it yet"
    if row.offline_since is not None:
        why = f" ({row.status_reason})" if row.status_reason else ""
        return f"{text}; offline since {_utc(row.offline_since)}{why}"
    return f"{text}; {row.status}, last seen {_utc(row.last_seen)}"


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def _command_args(
    name: CommandName, text: str, pairs: list[str], settings: list[str]
) -> dict[str, Any]:
    """``--args`` and the ``KEY=VALUE`` words (with ``--set`` as the ``patch``), checked
    against the command's argument model."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingError(f"--args is not JSON: {exc}", hint=_ARGS_HINT) from exc
    if not isinstance(value, dict):
        raise SettingError("--args must be a JSON object", hint=_ARGS_HINT)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise SettingError(
                f"{pair!r} is not KEY=VALUE",
                hint=f"give the arguments as words like stream=door ('edgefleet cmd --help' "
                f"lists those of {name.value})",
            )
        value[key] = _setting_value(text)
    if settings:
        if name is not CommandName.SET_CONFIG:
            raise SettingError(f"--set is for set_config, not {name.value}", hint="use --args")
        value["patch"] = merge_patch(settings, value.get("patch"))
    model = COMMAND_ARGS[name]
    try:
        model.model_validate(value)
    except ValidationError as exc:
        fields = ", ".join(model.model_fields) or "none"
        raise SettingError(
            f"--args for {name.value}: {describe_errors(exc)}",
            hint=f"{name.value} takes these arguments: {fields}",
        ) from exc
    return value


def merge_patch(settings: list[str], base: object = None) -> dict[str, Any]:
    """An RFC 7396 merge patch from ``KEY.SUB=VALUE`` settings, added to ``base``."""
    patch: dict[str, Any] = dict(base) if isinstance(base, dict) else {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise SettingError(
                f"--set {setting!r} is not KEY=VALUE",
                hint="name the setting with dots, e.g. --set streams.door.events.min_score=0.6",
            )
        level = patch
        for i, part in enumerate(parts[:-1]):
            child = level.setdefault(part, {})
            if not isinstance(child, dict):
                raise SettingError(
                    f"--set {setting!r}: {'.'.join(parts[: i + 1])} is set to a value already",
                    hint="set either the key or what is under it, not both",
                )
            level = child
        level[parts[-1]] = _setting_value(text)
    return patch


def _setting_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a plain string: door, /dev/video0, rtsp://cam/1


def request_properties(reply_topic: str, request_id: str, timeout_s: float) -> Properties:
    """A command request's MQTT 5 properties: where to answer, its correlation data, and
    an expiry of ``timeout_s``."""
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.ResponseTopic = reply_topic
    properties.CorrelationData = request_id.encode()
    # The broker drops it for a device that comes back too late to answer in time.
    properties.MessageExpiryInterval = math.ceil(timeout_s)
    return properties


def _await_reply(broker: BrokerConnection, request_id: str, deadline: float) -> CommandReply | None:
    """The reply correlated with ``request_id``, or None once ``deadline`` (monotonic) passed."""
    while (message := broker.receive(deadline - time.monotonic())) is not None:
        correlation = getattr(message.properties, "CorrelationData", None)
        if correlation is not None and correlation != request_id.encode():
            continue  # someone else's reply on our topic: not ours to read
        try:
            return CommandReply.model_validate_json(message.payload)
        except ValidationError as exc:
            raise ContractBroken(
                f"the reply on {message.topic} is not a command reply: {describe_errors(exc)}",
                hint="the device's agent breaks the wire contract; check its version",
            ) from exc
    return None


# -- what the reply says ------------------------------------------------------------------


def _save_snapshot(result: dict[str, Any], out: Path) -> bytes:
    """Write the JPEG of a snapshot's result to ``out``; returns it."""
    encoded = result.get("jpeg_base64")
    if not isinstance(encoded, str):
        raise ContractBroken(
            "the snapshot reply carries no image (result.jpeg_base64)",
            hint="the device's agent breaks the wire contract; check its version",
        )
    try:
        jpeg = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise ContractBroken(
            f"the snapshot's image is not base64: {exc}",
            hint="the device's agent breaks the wire contract; check its version",
        ) from exc
    try:
        out.write_bytes(jpeg)
    except OSError as exc:
        raise SettingError(
            f"cannot write {out}: {exc.strerror or exc}", hint="check --out"
        ) from exc
    return jpeg


def summary(device: str, reply: CommandReply) -> str:
    """One line for a person about a reply that is ok."""
    return f"{device} {reply.command}: {describe(reply.command, reply.result or {}, reply.message)}"


def describe(command: str, result: dict[str, Any], message: str) -> str:
    """What an ok result of ``command`` says, for a person (``message`` when it cannot tell)."""
    summarise = _SUMMARIES.get(command)
    try:
        text = summarise(result) if summarise is not None else None
    except (KeyError, TypeError, ValueError, AttributeError):
        text = None  # a result of another shape: say what the device said
    return text or message


def _ping(result: dict[str, Any]) -> str:
    return f"pong, agent up {_duration(float(result['uptime_s']))}"


def _get_status(result: dict[str, Any]) -> str:
    health = result["health"]
    streams = ", ".join(
        f"{name} {s['state']} {float(s['fps']):.1f} fps" for name, s in health["streams"].items()
    )
    return f"{streams or 'no streams'}; up {_duration(float(health['uptime_s']))}"


def _get_config(result: dict[str, Any]) -> str:
    config = result["config"]
    names = ", ".join(s["name"] for s in config.get("streams", []))
    return f"device {config['device_id']}, streams: {names or 'none'}"


def _set_config(result: dict[str, Any]) -> str:
    if result.get("changed") is False:
        return f"{result['written']} says that already; nothing changed"
    parts = [f"wrote {result['written']}"]
    for key in ("restarted", "refused", "removed"):
        if result.get(key):
            parts.append(f"streams {key}: {', '.join(map(str, result[key]))}")
    return "; ".join(parts)


def _snapshot(result: dict[str, Any]) -> str:
    return f"{_image(result)}; save it with --out FILE.jpg"


def _image(result: dict[str, Any]) -> str:
    size = len(str(result.get("jpeg_base64", ""))) * 3 // 4
    redacted = result.get("redacted")
    hidden = ""
    if isinstance(redacted, dict) and "mode" in redacted:
        mode = redacted["mode"]
        hidden = (
            ", not redacted" if mode == "none" else f", {mode} hidden: {redacted.get('regions')}"
        )
    return (
        f"{result['stream']} {result['width']}x{result['height']} JPEG, {size / KIB:.0f} KiB "
        f"(quality {result['quality']}{hidden})"
    )


def _restart_stream(result: dict[str, Any]) -> str:
    return f"stream {result['stream']} restarted"


def _list_models(result: dict[str, Any]) -> str:
    running = "; ".join(
        f"{name} runs {s['running']['id']} {s['running']['version']}"
        for name, s in result["streams"].items()
    )
    return f"{running or 'no streams'}; {len(result['stored'])} model(s) stored"


def _bench_model(result: dict[str, Any]) -> str:
    return (
        f"{result['stream']}: p50 {float(result['latency_p50_ms']):.2f} ms, p90 "
        f"{float(result['latency_p90_ms']):.2f} ms over {result['runs']} runs "
        f"({result['backend']}, {result['delegate']})"
    )


def _rollback_model(result: dict[str, Any]) -> str:
    return f"stream {result['stream']} rolled back to {str(result['sha256'])[:12]}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


_SUMMARIES: dict[str, Callable[[dict[str, Any]], str]] = {
    CommandName.PING.value: _ping,
    CommandName.GET_STATUS.value: _get_status,
    CommandName.GET_CONFIG.value: _get_config,
    CommandName.SET_CONFIG.value: _set_config,
    CommandName.SNAPSHOT.value: _snapshot,
    CommandName.RESTART_STREAM.value: _restart_stream,
    CommandName.LIST_MODELS.value: _list_models,
    CommandName.BENCH_MODEL.value: _bench_model,
    CommandName.ROLLBACK_MODEL.value: _rollback_model,
}

__all__ = ["describe", "is_selector", "merge_patch", "register", "request_properties", "summary"]
