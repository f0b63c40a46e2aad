"""``edgefleet watch``: what devices publish, one line a message, for a person to read.

Every line starts with the time it arrived (UTC, ISO 8601) and the device it is about::

    2026-12-02T06:10:05Z shop-7/door event start #7: person 0.81 (20 ms after capture, model ssd 3)
    2026-12-02T06:10:05Z shop-7 status: online, agent 0.1.0 [retained, 4 min old]
    2026-12-02T06:10:05Z fleet model 4f3a0c1d2e5b: 2.4 MiB in 39 chunks of 64 KiB [retained, ...]

A retained message (the broker's stored copy, sent when the subscription starts) says so,
and how old it is from its own time field (``ts``; an event's inference time), or that it
carries none. The fleet-wide models published over the broker (``<root>/_models/``) and the
release-key set (``<root>/_trust/keyset``) show as ``fleet``: a model's meta is one line;
its chunks, raw bytes, are not even subscribed to unless ``--chunks``. A payload that does
not parse is printed as such, never fatal.

The broker options (``--profile``, ``--host``, ``--port``, ``--topic-root``, ``--cafile``,
``--cert``, ``--key``, ``--insecure``) are those of every broker command
(``profile.add_broker_options``): TLS with the operator's certificate, or plain MQTT when
asked. A broker that closes the first connection before accepting it (a TLS alert, a plain
client on a TLS port) ends the watch with what it said; later losses reconnect.

Threads: paho's network thread (``loop_start``) runs the callbacks, which only put what
arrived on a queue (and resubscribe after a reconnect); the main thread takes it from the
queue and prints, until the deadline, the event count or Ctrl-C.
"""

from __future__ import annotations

import argparse
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from edgefleet.agent.mqtt import close_client
from edgefleet.agent.protocol import (
    MODEL_META_LEVEL,
    MODELS_LEVEL,
    TOPIC_LEVEL_PATTERN,
    TOPIC_ROOT,
    TRUST_LEVEL,
    ChunkedModelMeta,
    CommandReply,
    CommandRequest,
    DesiredState,
    EventMessage,
    HealthMessage,
    ReportedState,
    StatusMessage,
    describe_errors,
)
from edgefleet.provisioning.keyset import KeySet, SignedKeySet
from edgefleet.runtime import SettingError

from .connection import closed_before_connack, connect_client, prepare_client
from .errors import BrokerError
from .profile import ResolvedProfile, add_broker_options, broker_profile

FLEET = "fleet"
"""How a line about fleet-wide messages (``<root>/_models/...``, ``_trust/``) names its device."""

_POLL_S = 0.2
_SHA_SHOWN = 12  # hex digits of a model's sha256 in a line


def register(subcommands: Any) -> None:
    """Add ``watch`` to the top-level command parser."""
    watch = subcommands.add_parser(
        "watch",
        help="print what devices publish (status, events, health, updates), one line a message",
        description="Print what devices publish, one line a message: the time it arrived "
        "(UTC), the device, what it says; retained messages say so, and how old they are.",
    )
    add_broker_options(watch)
    watch.add_argument("--device", default="+", help="only this device id (default: every device)")
    watch.add_argument(
        "--seconds", type=_positive, help="stop after this many seconds (default: at Ctrl-C)"
    )
    watch.add_argument("--count", type=int, help="stop after this many events (default: at Ctrl-C)")
    watch.add_argument(
        "--chunks",
        action="store_true",
        help="also print the retained chunks of models published over the broker "
        "(default: only each model's meta)",
    )
    watch.set_defaults(handler=_watch)


@dataclass(frozen=True)
class Described:
    """What one message says: about which device, in words, and when it was made."""

    device: str
    text: str
    sent_ts: float | None = None  # the message's own time field, when it has one


def describe(topic: str, payload: bytes, *, topic_root: str = TOPIC_ROOT) -> Described:
    """What the message on ``topic`` says, for one line. Pure."""
    levels = topic.removeprefix(f"{topic_root}/").split("/")
    device, rest = levels[0], levels[1:]
    if device == MODELS_LEVEL:
        return _model_transfer(rest, payload)
    if device == TRUST_LEVEL:
        return _trust(rest, payload)
    kind = "/".join(rest)
    describer = _DESCRIBERS.get(rest[0] if rest else "")
    if not payload:
        return Described(device, f"{kind}: empty (clears the retained message)")
    if describer is None:
        return Described(device, f"{kind}: {len(payload)} bytes")
    try:
        return describer(device, rest, payload)
    except ValidationError as exc:
        return Described(device, f"{kind}: does not match the contract: {describe_errors(exc)}")


def _trust(rest: list[str], payload: bytes) -> Described:
    """The root-signed release-key set (``<root>/_trust/keyset``), read without verifying."""
    what = "/".join(rest)
    try:
        key_set = KeySet.model_validate_json(SignedKeySet.model_validate_json(payload).payload)
    except ValidationError:
        return Described(FLEET, f"{what}: {len(payload)} bytes, not a signed key set")
    keys = ", ".join(key.key_id for key in key_set.keys)
    return Described(
        FLEET,
        f"{what}: release-key set version {key_set.version} (keys {keys}; "
        f"{len(key_set.revoked)} revoked), expires {key_set.expires:%Y-%m-%d}",
    )


def line(described: Described, *, received_ts: float, retained: bool) -> str:
    """The printed line: arrival time, device, text, and for a retained message its age."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(received_ts))
    text = f"{stamp} {described.device} {described.text}"
    if retained:
        text += f" [retained, {_age(described.sent_ts, received_ts)}]"
    return text


def _age(sent_ts: float | None, now: float) -> str:
    if sent_ts is None:
        return "no time in the message"
    seconds = now - sent_ts
    if seconds < 0:
        return f"stamped {_duration(-seconds)} ahead of this clock"
    return f"{_duration(seconds)} old"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{hours // 24} days"


def _event(device: str, rest: list[str], payload: bytes) -> Described:
    e = EventMessage.model_validate_json(payload)
    life = f" {e.lifecycle}" if e.lifecycle else ""
    track = f" #{e.track_id}" if e.track_id is not None else ""
    score = f" {e.score:.2f}" if e.score is not None else ""
    stream = rest[1] if len(rest) > 1 else e.stream
    return Described(
        f"{device}/{stream}",
        f"event{life}{track}: {e.label or e.kind}{score} "
        f"({e.latency_ms:.0f} ms after capture, model {e.model.id} {e.model.version})",
        e.inference_ts,
    )


def _status(device: str, rest: list[str], payload: bytes) -> Described:
    s = StatusMessage.model_validate_json(payload)
    reason = f" ({s.reason})" if s.reason else ""
    streams = f", streams {', '.join(s.streams)}" if s.streams else ""
    return Described(
        device, f"status: {s.state}{reason}, agent {s.agent_version or '?'}{streams}", s.ts
    )


def _health(device: str, rest: list[str], payload: bytes) -> Described:
    h = HealthMessage.model_validate_json(payload)
    streams = ", ".join(
        f"{name} {sh.state} {sh.fps:.1f} fps p50 {sh.latency_p50_ms or 0:.0f} ms"
        for name, sh in h.streams.items()
    )
    return Described(
        device,
        f"health: {streams or 'no stream'}; outbox {h.outbox.depth} "
        f"(dropped {h.outbox.dropped}); cpu {h.system.cpu_percent:.0f}% "
        f"rss {h.system.rss_mb:.0f} MiB",
        h.ts,
    )


def _reported(device: str, rest: list[str], payload: bytes) -> Described:
    r = ReportedState.model_validate_json(payload)
    parts = []
    for name, model in r.models.items():
        part = f"{name} runs {model.id} {model.version}"
        update = r.updates.get(name)
        if update is not None:
            part += f", update to {update.model_id} {update.version}: {update.state.value}"
            if update.reason:
                part += f" ({update.reason})"
        parts.append(part)
    return Described(device, f"reported: {'; '.join(parts) or 'no stream'}", r.ts)


def _desired(device: str, rest: list[str], payload: bytes) -> Described:
    d = DesiredState.model_validate_json(payload)
    streams = ", ".join(sorted(d.models)) or "no model"
    return Described(device, f"desired revision {d.revision}: {streams}")


def _command(device: str, rest: list[str], payload: bytes) -> Described:
    c = CommandRequest.model_validate_json(payload)
    name = rest[1] if len(rest) > 1 else "?"
    return Described(device, f"command {name} asked (id {c.id})")


def _reply(device: str, rest: list[str], payload: bytes) -> Described:
    r = CommandReply.model_validate_json(payload)
    outcome = "ok" if r.ok else f"not done ({r.error.value if r.error else 'error'})"
    return Described(device, f"reply to {r.command}: {outcome}: {r.message}", r.ts)


def _model_transfer(rest: list[str], payload: bytes) -> Described:
    sha = rest[0][:_SHA_SHOWN] if rest else "?"
    if len(rest) != 2:
        return Described(FLEET, f"model {sha} {'/'.join(rest[1:])}: {len(payload)} bytes")
    if rest[1] != MODEL_META_LEVEL:
        return Described(FLEET, f"model {sha} chunk {rest[1]}: {len(payload)} bytes")
    if not payload:
        return Described(FLEET, f"model {sha}: removed from the broker")
    try:
        meta = ChunkedModelMeta.model_validate_json(payload)
    except ValidationError as exc:
        problem = describe_errors(exc)
        return Described(FLEET, f"model {sha} meta: does not match the contract: {problem}")
    return Described(
        FLEET,
        f"model {sha}: {_bytes(meta.size)} in {meta.chunks} chunks of {_bytes(meta.chunk_bytes)}",
    )


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"


_DESCRIBERS: dict[str, Callable[[str, list[str], bytes], Described]] = {
    "events": _event,
    "status": _status,
    "health": _health,
    "reported": _reported,
    "desired": _desired,
    "cmd": _command,
    "reply": _reply,
}


def topic_filters(topic_root: str, device: str, *, chunks: bool) -> list[str]:
    """What ``watch`` subscribes to: a device's topics, and the models' meta unless ``chunks``.

    MQTT cannot subscribe to everything but the chunks, so without ``chunks`` the filters
    name each kind of topic a device has (one and two levels below it).
    """
    if chunks:
        return [f"{topic_root}/{device}/#"]
    base = f"{topic_root}/{device}"
    filters = [f"{base}/+", f"{base}/events/+", f"{base}/cmd/+", f"{base}/reply/+"]
    if device == "+":
        filters.append(f"{topic_root}/{MODELS_LEVEL}/+/{MODEL_META_LEVEL}")
    return filters


@dataclass(frozen=True)
class _Arrived:
    topic: str
    payload: bytes
    retained: bool
    received_ts: float


class _Watcher:
    """The MQTT side: subscribe on every (re)connect, queue what arrives. Network thread."""

    def __init__(self, filters: list[str], resolved: ResolvedProfile) -> None:
        self.filters = filters
        self.arrived: queue.Queue[_Arrived | str] = queue.Queue()  # str: a note for stderr
        self.refused: str | None = None
        self.accepted = False  # a CONNACK came: later losses are a network's, retried
        self.closed_early = False  # closed before the first CONNACK: not let in
        self.socket_error: str | None = None  # paho's last socket error (a TLS alert)
        self.events = 0  # counted by the main thread
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_log = self._on_log
        prepare_client(client, resolved)
        self.client = client

    @property
    def done(self) -> bool:
        """The broker would not have us: refused, or closed before accepting."""
        return self.refused is not None or self.closed_early

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self.refused = str(reason_code)
            self.arrived.put(f"the broker refused the connection: {reason_code}")
            return
        self.accepted = True
        client.subscribe([(topic_filter, 1) for topic_filter in self.filters])

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [
            f for f, code in zip(self.filters, reason_codes, strict=False) if code.is_failure
        ]
        if refused:
            self.arrived.put(f"the broker refused the subscription to {', '.join(refused)}")
        else:
            self.arrived.put(f"watching {', '.join(self.filters)} (Ctrl-C stops)")

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not self.accepted and self.refused is None:
            self.closed_early = True
            client.disconnect()  # no reconnecting to a broker that will not have us
        elif self.refused is None:
            self.arrived.put(f"lost the broker ({reason_code}); reconnecting")

    def _on_log(self, client: mqtt.Client, userdata: object, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:  # a TLS alert from the broker shows up only here
            self.socket_error = text

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.arrived.put(
            _Arrived(message.topic, bytes(message.payload), bool(message.retain), time.time())
        )


def _watch(args: argparse.Namespace) -> int:
    if args.device != "+" and not re.fullmatch(TOPIC_LEVEL_PATTERN, args.device):
        raise SettingError(
            f"--device {args.device!r} is not a device id",
            hint="device ids are up to 64 letters, digits, '_', '.' and '-', starting with a "
            "letter or digit",
        )
    if args.count is not None and args.count < 1:
        raise SettingError(f"--count must be at least 1, not {args.count}")
    resolved = broker_profile(args)
    root = resolved.profile.topic_root
    watcher = _Watcher(topic_filters(root, args.device, chunks=args.chunks), resolved)
    connect_client(watcher.client, resolved)
    watcher.client.loop_start()
    # Ctrl-C, the usual way to stop, sets a flag the loop polls. A KeyboardInterrupt could
    # land inside queue.get just as it takes the queue's lock and leave it held; paho's
    # thread, putting its disconnect note, would then wait for it forever, and so would
    # loop_stop (seen once in CI: watch never exited).
    stopping = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stopping.set())
    try:
        _print_until_done(watcher, args, root, stopping)
    finally:
        signal.signal(signal.SIGINT, previous)
        watcher.client.disconnect()
        close_client(watcher.client)
    if watcher.refused is not None:
        raise BrokerError(
            f"the broker at {resolved.profile.address} refused the connection: {watcher.refused}",
            hint="check that the broker lets this client in (its ACL, anonymous access)",
        )
    if watcher.closed_early:
        raise closed_before_connack(resolved, watcher.socket_error)
    print(f"{watcher.events} event(s)", file=sys.stderr)
    return 0


def _print_until_done(
    watcher: _Watcher, args: argparse.Namespace, root: str, stopping: threading.Event
) -> None:
    """Print what arrives until the deadline, the event count, a refusal or Ctrl-C."""
    deadline = time.monotonic() + args.seconds if args.seconds else None
    while not watcher.done and not stopping.is_set():
        wait = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
        if wait <= 0:
            break
        try:
            arrived = watcher.arrived.get(timeout=wait)
        except queue.Empty:
            continue
        if isinstance(arrived, str):
            print(f"edgefleet watch: {arrived}", file=sys.stderr, flush=True)
            continue
        described = describe(arrived.topic, arrived.payload, topic_root=root)
        is_event = "/events/" in arrived.topic and not arrived.retained
        watcher.events += is_event  # before the print, so a Ctrl-C after it counts it
        print(
            line(described, received_ts=arrived.received_ts, retained=arrived.retained), flush=True
        )
        if is_event and args.count and watcher.events >= args.count:
            break


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value
