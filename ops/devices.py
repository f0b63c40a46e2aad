"""``edgefleet devices`` and ``edgefleet audit``: the controller's registry and audit log,
through its HTTP API.

::

    edgefleet devices list [SELECTOR ...] [--state STATE] [--json]
    edgefleet devices show ID [--json]
    edgefleet devices tag ID KEY=VALUE [KEY=VALUE ...]
    edgefleet devices untag ID KEY [KEY ...]
    edgefleet devices groups [--json]
    edgefleet devices group add|remove NAME ID [ID ...]
    edgefleet audit [--limit N] [--json]

Selectors are the controller's (``device:ID``, ``group:NAME``, ``tag:K=V``, ``all``; a
comma intersects, several unite); ``--state`` is one of online, offline, degraded,
updating or stale (a desired model that differs from the running one). Each tag, untag and
group change is its own call, audited by the controller under the caller's name; a change
that fails stops the rest and says which ones were made. ``--json`` prints the API's
answer.

Errors: the client's (``edgefleet.ops.apiclient``: an unknown device or a bad tag exit 2,
the controller unreachable exit 1), and ``KEY=VALUE`` without ``=`` exit 2.

Threads: none.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from edgefleet.runtime import EdgefleetError

from .apiclient import add_controller_options, controller_client, parse_answer
from .text import age, table, utc

if TYPE_CHECKING:
    from .controller.registry import DeviceView, StreamView

STATES = ("online", "offline", "degraded", "updating", "stale")
DEFAULT_AUDIT_LIMIT = 50


# -- argument parsing -------------------------------------------------------------------


def register(subcommands: Any) -> None:
    """Add ``devices`` and ``audit`` to the command parser."""
    devices = subcommands.add_parser(
        "devices", help="the controller's devices: their state, models, groups and tags"
    )
    commands = devices.add_subparsers(dest="devices_command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="devices, one line each")
    listing.add_argument(
        "selector",
        nargs="*",
        metavar="SELECTOR",
        help="device:ID, group:NAME, tag:K=V or all; a comma intersects, several unite "
        "(default: all)",
    )
    listing.add_argument(
        "--state", choices=STATES, help="only devices in this state (default: any)"
    )
    _finish(listing, _list)

    show = commands.add_parser("show", help="one device: status, health, streams and models")
    show.add_argument("id", metavar="ID", help="the device")
    _finish(show, _show)

    tag = commands.add_parser("tag", help="set tags on a device (one value per key)")
    tag.add_argument("id", metavar="ID", help="the device")
    tag.add_argument("tags", nargs="+", type=_tag, metavar="KEY=VALUE", help="a tag to set")
    _finish(tag, _tag_device, json_option=False)

    untag = commands.add_parser("untag", help="remove tags from a device")
    untag.add_argument("id", metavar="ID", help="the device")
    untag.add_argument("keys", nargs="+", metavar="KEY", help="a tag to remove")
    _finish(untag, _untag_device, json_option=False)

    groups = commands.add_parser("groups", help="every group with its devices")
    _finish(groups, _groups)

    group = commands.add_parser("group", help="put devices in a group or take them out")
    change = group.add_subparsers(dest="group_command", required=True, metavar="COMMAND")
    verbs = {
        "add": "put devices in a group (made when new)",
        "remove": "take devices out of a group (it stays, even empty)",
    }
    for verb, text in verbs.items():
        each = change.add_parser(verb, help=text)
        each.add_argument("name", metavar="NAME", help="the group")
        each.add_argument("ids", nargs="+", metavar="ID", help="a device")
        _finish(each, _group_change, json_option=False, verb=verb)

    audit = subcommands.add_parser(
        "audit", help="who tagged, grouped, rolled out, paused or rolled back what, and when"
    )
    audit.add_argument(
        "--limit",
        type=_positive_int,
        default=DEFAULT_AUDIT_LIMIT,
        metavar="N",
        help="the newest N entries",
    )
    _finish(audit, _audit)


def _finish(
    parser: argparse.ArgumentParser, handler: Any, *, json_option: bool = True, **defaults: Any
) -> None:
    if json_option:
        parser.add_argument("--json", action="store_true", help="the API's JSON (default: text)")
    add_controller_options(parser)
    parser.set_defaults(handler=handler, **defaults)


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. site=shop12)")
    return key, value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return value


def _device_path(device_id: str) -> str:
    return f"/devices/{quote(device_id, safe='')}"


# -- devices -----------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"selector": list(args.selector)}
    if args.state is not None:
        params["state"] = args.state
    with controller_client(args) as client:
        answer = client.get("/devices", params=params)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    views = device_views(answer)
    if not views:
        wanted = " or ".join(args.selector) or "the fleet"
        print(f"no devices in {wanted}" + (f" are {args.state}" if args.state else ""))
        return 0
    now = time.time()
    rows: list[tuple[str, ...]] = [
        ("DEVICE", "STATE", "SEEN", "AGENT", "MODELS", "FPS", "P99 MS", "TEMP", "TAGS")
    ]
    rows += [_device_row(view, now) for view in views]
    print("\n".join(table(rows)))
    return 0


def _device_row(view: DeviceView, now: float) -> tuple[str, ...]:
    fps = [s.fps for s in view.streams if s.fps is not None]
    p99 = [s.latency_p99_ms for s in view.streams if s.latency_p99_ms is not None]
    labels = [*(f"group:{g}" for g in view.groups), *(f"{k}={v}" for k, v in view.tags.items())]
    return (
        view.id,
        ",".join(s.value for s in view.states) or "-",
        f"{age(now - view.last_seen)} ago",
        view.agent_version or "-",
        " ".join(_model_cell(s) for s in view.streams) or "-",
        f"{sum(fps):.1f}" if fps else "-",
        f"{max(p99):.0f}" if p99 else "-",
        f"{view.temperature_c:.0f}C" if view.temperature_c is not None else "-",
        " ".join(labels) or "-",
    )


def _model_cell(stream: StreamView) -> str:
    model = f"{stream.model_id}@{stream.model_version}" if stream.model_id else "none"
    return f"{stream.stream}={model}" + ("*" if stream.stale else "")


def _show(args: argparse.Namespace) -> int:
    with controller_client(args) as client:
        answer = client.get(_device_path(args.id))
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print("\n".join(describe(device_views([answer])[0], time.time())))
    return 0


def describe(view: DeviceView, now: float) -> list[str]:
    """A device for people: what it is, how it is doing, what each stream runs."""
    status = view.status or "unknown"
    if view.status_reason:
        status += f" ({view.status_reason})"
    since = view.offline_since if view.status == "offline" else view.online_since
    lines = [
        f"device         {view.id}  ({', '.join(s.value for s in view.states) or 'no state'})",
        f"status         {status}" + (f" since {utc(since)}" if since else ""),
        f"last seen      {utc(view.last_seen, seconds=True)} ({age(now - view.last_seen)} ago)",
        f"agent          {view.agent_version or 'unknown'}"
        + (f" on {', '.join(view.backends)}" if view.backends else ""),
        f"health         {_health(view)}",
        f"groups         {', '.join(view.groups) or 'none'}",
        f"tags           {', '.join(f'{k}={v}' for k, v in view.tags.items()) or 'none'}",
    ]
    if view.parts_failing:
        lines.append(f"failing        {', '.join(view.parts_failing)}")
    for stream in view.streams:
        lines += _stream_lines(stream)
    return lines


def _health(view: DeviceView) -> str:
    parts = []
    if view.temperature_c is not None:
        parts.append(f"{view.temperature_c:.1f} C" + (" throttled" if view.throttled else ""))
    if view.cpu_percent is not None:
        parts.append(f"cpu {view.cpu_percent:.0f}%")
    if view.rss_mb is not None:
        parts.append(f"rss {view.rss_mb:.0f} MiB")
    counters = (
        ("outbox", view.outbox_depth),
        ("dropped", view.events_dropped),
        ("lost", view.events_lost),
        ("reconnects", view.mqtt_reconnects),
    )
    parts += [f"{name} {value}" for name, value in counters if value is not None]
    return ", ".join(parts) or "no health message yet"


def _stream_lines(s: StreamView) -> list[str]:
    model = "none"
    if s.model_id:
        model = f"{s.model_id} v{s.model_version} ({(s.model_sha256 or '')[:12]})"
    on = ", ".join(x for x in (s.backend, s.delegate) if x)
    lines = [f"stream {s.stream:<8} {model}" + (f" on {on}" if on else "")]
    figures = [
        f"{s.state or 'unknown'}",
        f"{s.fps:.1f} fps" if s.fps is not None else None,
        f"p50 {s.latency_p50_ms:.0f} ms, p99 {s.latency_p99_ms:.0f} ms"
        if s.latency_p50_ms is not None and s.latency_p99_ms is not None
        else None,
        f"{s.processed} frames, {s.failed or 0} failed" if s.processed is not None else None,
    ]
    lines.append("  " + ", ".join(f for f in figures if f))
    if s.update_state:
        update = f"  update v{s.update_version}: {s.update_state}"
        lines.append(update + (f" ({s.update_reason})" if s.update_reason else ""))
    if s.stale:
        lines.append(f"  stale: the controller wants {(s.desired_sha256 or '')[:12]}")
    if s.last_error:
        lines.append(f"  last error: {s.last_error}")
    return lines


def device_views(answer: Any) -> list[DeviceView]:
    """The devices of a ``GET /devices`` answer."""
    from .controller.registry import DeviceView

    views: list[DeviceView] = parse_answer(list[DeviceView], answer, "device list")
    return views


# -- tags and groups ---------------------------------------------------------------------


def _tag_device(args: argparse.Namespace) -> int:
    changes = [
        (f"{key}={value}", "PUT", f"{_device_path(args.id)}/tags/{quote(key, safe='')}", value)
        for key, value in args.tags
    ]
    return _apply(args, changes, f"tagged {args.id}")


def _untag_device(args: argparse.Namespace) -> int:
    changes = [
        (key, "DELETE", f"{_device_path(args.id)}/tags/{quote(key, safe='')}", None)
        for key in args.keys
    ]
    return _apply(args, changes, f"untagged {args.id}")


def _group_change(args: argparse.Namespace) -> int:
    method = "PUT" if args.verb == "add" else "DELETE"
    base = f"/groups/{quote(args.name, safe='')}/devices"
    changes = [(i, method, f"{base}/{quote(i, safe='')}", None) for i in args.ids]
    done = "added to" if args.verb == "add" else "removed from"
    return _apply(args, changes, f"{done} group {args.name}")


def _apply(
    args: argparse.Namespace, changes: Sequence[tuple[str, str, str, str | None]], done: str
) -> int:
    """Each change in order; one that fails names the ones already made."""
    made: list[str] = []
    with controller_client(args) as client:
        for label, method, path, value in changes:
            body = {"value": value} if value is not None else None
            try:
                client.request(method, path, body=body)
            except EdgefleetError as exc:
                if made:
                    exc.message += f" (already done: {', '.join(made)})"
                raise
            made.append(label)
    print(f"{done}: {', '.join(made)}")
    return 0


def _groups(args: argparse.Namespace) -> int:
    with controller_client(args) as client:
        answer = client.get("/groups")
    if args.json:
        print(json.dumps(answer, indent=2))
    elif not answer:
        print("no groups ('edgefleet devices group add NAME ID' makes one)")
    else:
        rows = [("GROUP", "DEVICES", "IDS")]
        rows += [(g["name"], str(len(g["devices"])), " ".join(g["devices"])) for g in answer]
        print("\n".join(table(rows)))
    return 0


# -- audit -------------------------------------------------------------------------------


def _audit(args: argparse.Namespace) -> int:
    with controller_client(args) as client:
        answer = client.get("/audit", params={"limit": args.limit})
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    if not answer:
        print("the audit log is empty")
        return 0
    rows = [("WHEN", "WHO", "ACTION", "TARGET", "DETAILS")]
    rows += [
        (
            utc(e["at"], seconds=True),
            e["actor"],
            e["action"],
            e["target"],
            _details(e.get("details"), e.get("reason")),
        )
        for e in reversed(answer)
    ]
    print("\n".join(table(rows)))
    return 0


def _details(details: dict[str, Any] | None, reason: str | None) -> str:
    parts = [
        f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, dict) else v}"
        for k, v in (details or {}).items()
        if not isinstance(v, list)  # a rollout's device ids: --json has them
    ]
    if reason:
        parts.append(f"reason: {reason}")
    return " ".join(parts)
