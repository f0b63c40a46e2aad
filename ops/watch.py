"""``edgefleet watch``: print what devices publish, one line per message, as they arrive.

Runs paho's network loop in its own thread (``loop_start``); the main thread
waits for the deadline or Ctrl-C. Payloads are parsed with the wire contract's
models; a payload that does not parse is printed as such, never fatal.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from edgefleet.agent.protocol import (
    TOPIC_ROOT,
    DesiredState,
    EventMessage,
    HealthMessage,
    ReportedState,
    StatusMessage,
)
from edgefleet.runtime import EdgefleetError


def register(subcommands: Any) -> None:
    """Add ``watch`` to the top-level command parser."""
    watch = subcommands.add_parser("watch", help="print device status, events and health")
    watch.add_argument("--host", default="localhost", help="broker host (default: localhost)")
    watch.add_argument("--port", type=int, default=1883, help="broker port (default: 1883)")
    watch.add_argument("--device", default="+", help="one device id (default: every device)")
    watch.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    watch.add_argument("--count", type=int, help="stop after this many events")
    watch.set_defaults(handler=_watch)


def describe(topic: str, payload: bytes) -> str:
    """One human line for one message."""
    kind = topic.split("/")[3] if topic.count("/") >= 3 else ""
    describer = _DESCRIBERS.get(kind)
    if describer is None or not payload:
        return f"{topic}: {len(payload)} bytes"
    try:
        return describer(payload)
    except ValidationError as exc:
        return f"{topic}: payload does not match the contract ({exc.error_count()} errors)"


def _event(payload: bytes) -> str:
    e = EventMessage.model_validate_json(payload)
    life = f" {e.lifecycle}" if e.lifecycle else ""
    track = f" #{e.track_id}" if e.track_id is not None else ""
    score = f" {e.score:.2f}" if e.score is not None else ""
    return (
        f"{e.device_id}/{e.stream} event{life}{track}: {e.label or e.kind}{score} "
        f"({e.latency_ms:.0f} ms after capture, model {e.model.id} {e.model.version})"
    )


def _status(payload: bytes) -> str:
    s = StatusMessage.model_validate_json(payload)
    reason = f" ({s.reason})" if s.reason else ""
    return f"{s.device_id} {s.state}{reason}, agent {s.agent_version or '?'}"


def _health(payload: bytes) -> str:
    h = HealthMessage.model_validate_json(payload)
    streams = ", ".join(
        f"{name} {sh.state} {sh.fps:.1f} fps p50 {sh.latency_p50_ms or 0:.0f} ms"
        for name, sh in h.streams.items()
    )
    return (
        f"{h.device_id} health: {streams}; outbox {h.outbox.depth} "
        f"(dropped {h.outbox.dropped}); cpu {h.system.cpu_percent:.0f}% "
        f"rss {h.system.rss_mb:.0f} MiB"
    )


def _reported(payload: bytes) -> str:
    r = ReportedState.model_validate_json(payload)
    parts = []
    for name, model in r.models.items():
        line = f"{name} runs {model.id} {model.version}"
        update = r.updates.get(name)
        if update is not None:
            line += f", update to {update.model_id} {update.version}: {update.state.value}"
            if update.reason:
                line += f" ({update.reason})"
        parts.append(line)
    return f"{r.device_id} reported: {'; '.join(parts) or 'no stream'}"


def _desired(payload: bytes) -> str:
    d = DesiredState.model_validate_json(payload)
    streams = ", ".join(f"{name}" for name in sorted(d.models)) or "no model"
    return f"desired revision {d.revision}: {streams}"


_DESCRIBERS: dict[str, Callable[[bytes], str]] = {
    "events": _event,
    "status": _status,
    "health": _health,
    "reported": _reported,
    "desired": _desired,
}


def _watch(args: argparse.Namespace) -> int:
    events = 0
    enough = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        nonlocal events
        print(describe(message.topic, bytes(message.payload)), flush=True)
        if "/events/" in message.topic:
            events += 1
            if args.count and events >= args.count:
                enough.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    try:
        client.connect(args.host, args.port)
    except OSError as exc:
        raise EdgefleetError(
            f"cannot reach the broker at {args.host}:{args.port} ({exc})",
            hint="check --host and --port, and that the broker runs",
        ) from exc
    client.subscribe(f"{TOPIC_ROOT}/{args.device}/#", qos=1)
    client.loop_start()
    deadline = time.monotonic() + args.seconds if args.seconds else None
    try:
        while not enough.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            enough.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
    print(f"{events} event(s)", file=sys.stderr)
    return 0
