"""One MQTT 5 connection per operator command, and the broker options every such command takes.

Every ``edgefleet`` command that talks to the broker (``deploy``, ``undeploy``, ``cmd``,
``transfer``) takes ``--host`` (default localhost), ``--port`` (default 1883) and
``--topic-root`` (default edgefleet/v1) through ``add_broker_options``.

Threads: a command runs in the CLI's main thread. ``BrokerConnection`` starts paho's network
thread (``loop_start``) and stops it on exit; its callbacks only record acknowledgements
under one condition variable and put messages on a queue, which the main thread waits on
with a deadline.
"""

from __future__ import annotations

import argparse
import functools
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgefleet.agent.protocol import MODELS_LEVEL, TOPIC_ROOT

from .errors import BrokerError

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 1883
ACK_TIMEOUT_S = 10.0
KEEPALIVE_S = 30
# Under the fleet-wide models level, which the controller may write and read: a marker
# topic there is allowed by the generated ACL, and no device subscribes to it.
_SYNC_LEVEL = "_sync"
_T = TypeVar("_T")


def add_broker_options(parser: argparse.ArgumentParser) -> None:
    """``--host``, ``--port`` and ``--topic-root``, the same in every broker command."""
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"broker host name or address (default: {DEFAULT_HOST})",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        metavar="PORT",
        help=f"broker port (default: {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--topic-root",
        default=TOPIC_ROOT,
        metavar="ROOT",
        help=f"topic root (default: {TOPIC_ROOT})",
    )


def broker_options(args: argparse.Namespace) -> str:
    """The broker options of ``args``, as typed on a command line (only those not default)."""
    options = []
    if args.host != DEFAULT_HOST:
        options.append(f"--host {args.host}")
    if args.port != DEFAULT_PORT:
        options.append(f"--port {args.port}")
    if args.topic_root != TOPIC_ROOT:
        options.append(f"--topic-root {args.topic_root}")
    return " ".join(options)


def sync_topic(topic_root: str) -> str:
    """A topic only this call uses, for ``BrokerConnection.retained``'s marker."""
    return f"{topic_root}/{MODELS_LEVEL}/{_SYNC_LEVEL}/{uuid.uuid4().hex}"


class BrokerConnection:
    """One MQTT 5 connection for one command; each call waits, with a deadline, for its ack."""

    def __init__(self, host: str, port: int, timeout_s: float = ACK_TIMEOUT_S) -> None:
        self._host, self._port = host, port
        self._timeout_s = timeout_s
        self._changed = threading.Condition()
        self._connack: ReasonCode | None = None
        self._max_packet_bytes: int | None = None
        self._closed: ReasonCode | None = None
        self._acks: dict[int, ReasonCode] = {}  # by message id: first SUBACK code, or PUBACK
        self._messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, reconnect_on_failure=False
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._client = client

    def __enter__(self) -> BrokerConnection:
        try:
            self._client.connect(self._host, self._port, keepalive=KEEPALIVE_S)
        except OSError as exc:
            raise BrokerError(
                f"cannot reach the broker at {self._host}:{self._port} ({exc})",
                hint="check --host and --port, and that the broker runs",
            ) from exc
        self._client.loop_start()
        try:
            connack = self._wait(lambda: self._connack, "CONNACK")
            self._check(connack, "refused the connection")
        except BrokerError:
            self._client.loop_stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def max_packet_bytes(self) -> int | None:
        """The largest packet the broker accepts, when it said (MQTT 5 CONNACK)."""
        return self._max_packet_bytes

    def subscribe(self, topic: str, *, no_local: bool = False) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK; ``no_local``: not to our own messages."""
        options = SubscribeOptions(qos=1, noLocal=no_local)
        result, mid = self._client.subscribe(topic, options=options)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise self._lost(f"subscribing to {topic}")
        self._check(self._wait(lambda: self._acks.get(mid), "SUBACK"), f"refused {topic}")

    def publish(
        self,
        topic: str,
        payload: str | bytes,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        """Publish at QoS 1 and wait for the PUBACK."""
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise self._lost(f"publishing to {topic}")
        self._check(self._wait(lambda: self._acks.get(info.mid), "PUBACK"), f"refused {topic}")

    def publish_all(self, messages: Sequence[tuple[str, bytes]], *, retain: bool = False) -> None:
        """Publish each (topic, payload) at QoS 1, all at once, then wait for every PUBACK.

        Each wait has the full timeout: a slow link is fine while the acks keep coming.
        """
        sent = []
        for topic, payload in messages:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise self._lost(f"publishing to {topic}")
            sent.append((topic, info.mid))
        for topic, mid in sent:
            ack = self._wait(functools.partial(self._acks.get, mid), "PUBACK")
            self._check(ack, f"refused {topic}")

    def retained(self, topic_filters: Sequence[str], marker_topic: str) -> dict[str, bytes]:
        """The retained messages on ``topic_filters`` now, by topic (cleared ones left out).

        The broker sends a subscription's retained messages before anything published after
        it: once our own QoS 1 message on ``marker_topic`` is back, every one of them is in.
        """
        for topic_filter in topic_filters:
            self.subscribe(topic_filter, no_local=True)
        self.subscribe(marker_topic)
        marker = uuid.uuid4().hex
        self.publish(marker_topic, marker)
        found: dict[str, bytes] = {}
        deadline = time.monotonic() + self._timeout_s
        while (message := self.receive(deadline - time.monotonic())) is not None:
            if message.topic == marker_topic and message.payload == marker.encode():
                return found
            if message.retain and message.payload:
                found[message.topic] = bytes(message.payload)
        raise BrokerError(
            f"the broker at {self._host}:{self._port} did not send back our message on "
            f"{marker_topic} within {self._timeout_s:g} s",
            hint="check that this identity may read and write it (the broker ACL) and the "
            "broker's load",
        )

    def receive(self, timeout_s: float) -> mqtt.MQTTMessage | None:
        """The next message of the subscriptions, or None after ``timeout_s``."""
        try:
            return self._messages.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            return None

    def _wait(self, ready: Callable[[], _T | None], what: str) -> _T:
        with self._changed:
            self._changed.wait_for(
                lambda: ready() is not None or self._closed is not None, self._timeout_s
            )
            result = ready()
            if result is not None:
                return result
            if self._closed is not None:
                raise self._lost(f"waiting for its {what}")
        raise BrokerError(
            f"no {what} from the broker at {self._host}:{self._port} within {self._timeout_s:g} s",
            hint="check the broker's load and the network",
        )

    def _check(self, code: ReasonCode, what: str) -> None:
        if code.is_failure:
            raise BrokerError(
                f"the broker at {self._host}:{self._port} {what}: {code}",
                hint="check that this identity may read and write these topics (the broker ACL)",
            )

    def _lost(self, doing: str) -> BrokerError:
        return BrokerError(
            f"the broker at {self._host}:{self._port} closed the connection while {doing} "
            f"({self._closed})",
            hint="check the broker log: it drops clients it does not accept",
        )

    # paho's network thread from here on.

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._connack = reason_code
            self._max_packet_bytes = getattr(properties, "MaximumPacketSize", None)
            self._changed.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._closed = reason_code
            self._changed.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._acks[mid] = reason_codes[0]
            self._changed.notify_all()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._acks[mid] = reason_code
            self._changed.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self._messages.put(message)
