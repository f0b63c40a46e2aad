"""The broker connection, and the publisher that drains the outbox through it.

Threads:

- ``mqtt`` (``MqttLink._run``): connects, runs paho's network loop, and
  reconnects with full-jitter exponential backoff. paho callbacks
  (``_on_connect``, ``_on_disconnect``, ``_on_publish``, ``_on_message``) run
  here; ``on_message`` receives an ``Inbound`` and must only hand it over
  (commands and updates run on their own threads).
- ``publisher`` (``OutboxPublisher._run``): hands outbox rows to paho in
  ``seq`` order while connected, at most ``max_inflight`` unacknowledged, and
  deletes rows once the broker's PUBACK arrives.

Two processes with the same client id make the broker drop one connection
whenever the other connects. ``ClientIdWatch`` (pure, no clock of its own)
tells it from how connections end: an MQTT 5 DISCONNECT with reason 142
(session taken over), or, where the broker gives no reason (MQTT 3.1.1, and
Mosquitto 2.0 on MQTT 5 too), several connections in a row closed by the broker
within seconds of accepting them. The link then says so at ERROR and in
health, and waits ``id_conflict_backoff_s`` (doubling) before connecting again,
instead of reconnecting at once and knocking the other client off in turn.

paho 2.x keeps unacknowledged QoS 1 messages in memory and resends them itself
after a reconnect, so a row is handed to paho once per process; if the process
dies, the rows are still in the outbox and are sent again at the next start
(consumers drop the duplicates by event id). ``wait_for_publish`` is never
used: it raises forever for a message published while disconnected;
acknowledgements are tracked with ``on_publish``.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.runtime import EdgefleetError

from .config import BrokerSettings
from .outbox import Outbox, OutboxError, OutboxItem
from .supervisor import SUPERVISOR, fault_point

log = logging.getLogger(__name__)

_LOOP_TIMEOUT_S = 0.2
# How often acknowledgements the outbox could not apply (disk full) are tried again.
_ACK_RETRY_S = 1.0
# A PUBLISH packet's bytes besides its topic, payload and correlation data, at most: fixed
# header (1), remaining length (4), topic length (2), packet id (2), properties length (4).
_PUBLISH_OVERHEAD = 13
SESSION_TAKEN_OVER = 142
"""MQTT 5 DISCONNECT reason code 0x8E: another connection with this client id took over."""
# A connection the broker closes this soon after accepting it is "short"; this many short
# ones in a row, with no reason given, mean another client is using the id (two clients
# fighting reconnect within the reconnect delay, well under a second by default).
SHORT_CONNECTION_S = 5.0
SHORT_CONNECTIONS_IN_A_ROW = 3
# Past this many doublings the wait is at its maximum anyway (and 2**n stays a float).
_MAX_DOUBLINGS = 32


class BrokerSettingsError(EdgefleetError):
    """The broker settings cannot be used (unreadable TLS files or password)."""


def _read_password(settings: BrokerSettings) -> str | None:
    if settings.password_file is None:
        return None
    path = settings.password_file
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and not path.is_absolute() and (Path(credentials) / path).is_file():
        path = Path(credentials) / path
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise BrokerSettingsError(
            f"broker.password_file: cannot read {path} ({exc.strerror})",
            hint="check the path, or give it to the service with LoadCredential=",
        ) from exc


def close_client(client: paho.Client) -> None:
    """Stop the client's network thread (if started) and close its sockets now.

    paho 2.1 closes the socket pair it makes for ``loop_start``/``loop`` only in the
    client's ``__del__``, which a reference cycle (callbacks that are bound methods) may
    reach after the sockets' own finalizers: an "unclosed socket" warning at a random
    garbage collection, and two descriptors held until then (eclipse-paho/paho.mqtt.python
    issue 627). Call it after ``disconnect()``.
    """
    client.loop_stop()
    client._reset_sockets()


def tls_context(cafile: Path, certfile: Path | None, keyfile: Path | None) -> ssl.SSLContext:
    """A TLS 1.2+ client context: the broker verified against ``cafile`` (and its host
    name), this client's certificate when given. Raises ``OSError``/``ssl.SSLError``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=str(cafile))
    if certfile is not None:
        context.load_cert_chain(str(certfile), str(keyfile) if keyfile is not None else None)
    return context


@dataclass(frozen=True)
class IdConflict:
    """Another client uses this client id: what to tell the operator and how long to wait."""

    problem: str
    """One line for health and the log: who, and the evidence."""
    wait_s: float
    """How long to stay away before connecting again."""
    first: bool
    """True when this starts a conflict (the ERROR line), False while it goes on."""


class ClientIdWatch:
    """Decides from how connections end whether another client uses this client id.

    Pure: every call gets the monotonic time it is about. The mqtt thread owns it and
    calls its methods; the health thread only reads ``problem`` and ``conflicts``.
    """

    def __init__(self, client_id: str, *, backoff_s: float, backoff_max_s: float) -> None:
        self.client_id = client_id
        self.backoff_s = backoff_s
        self.backoff_max_s = max(backoff_max_s, backoff_s)
        self.problem: str | None = None
        """Set while a conflict is believed to go on; cleared once a connection holds."""
        self.conflicts = 0
        """Connections lost to another client with this id, since start."""
        self._connected_at: float | None = None
        self._short_in_a_row = 0
        self._level = 0

    def connected(self, now: float) -> None:
        """The broker accepted a connection at ``now``."""
        self._connected_at = now

    def lost(self, now: float, *, reason: int | None) -> IdConflict | None:
        """The connection ended at ``now``; ``reason``: the broker's DISCONNECT reason code,
        None when it closed the connection without one.

        Returns the conflict when the evidence says another client took the connection,
        None for an ordinary loss (reconnect as usual).
        """
        since, self._connected_at = self._connected_at, None
        if since is None:
            return None
        if reason == SESSION_TAKEN_OVER:
            evidence = "the broker said the session was taken over (MQTT 5 reason 142)"
        elif reason is None and now - since < SHORT_CONNECTION_S:
            self._short_in_a_row += 1
            if self._short_in_a_row < SHORT_CONNECTIONS_IN_A_ROW:
                return None
            evidence = (
                f"the broker closed {self._short_in_a_row} connections in a row within "
                f"{SHORT_CONNECTION_S:g} s of accepting them, without giving a reason, which "
                "is what it does when a second client connects with the same id"
            )
        else:
            self._short_in_a_row = 0
            return None
        first = self.problem is None
        self.conflicts += 1
        self._level = min(self._level + 1, _MAX_DOUBLINGS)
        wait_s = min(self.backoff_s * 2 ** (self._level - 1), self.backoff_max_s)
        self.problem = f"another client uses client id {self.client_id}: {evidence}"
        return IdConflict(problem=self.problem, wait_s=wait_s, first=first)

    def holding(self, now: float) -> bool:
        """Called while connected; True once, when a conflict is over.

        Over means this connection has held for ``backoff_max_s``: longer than the other
        client, backing off the same way, stays away.
        """
        if self.problem is None or self._connected_at is None:
            return False
        if now - self._connected_at < self.backoff_max_s:
            return False
        self.problem = None
        self._short_in_a_row = 0
        self._level = 0
        return True


@dataclass(frozen=True)
class Inbound:
    """A message the device received; the MQTT 5 response properties when the sender set them."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None


class MqttLink:
    """One paho client, kept connected by the ``mqtt`` thread."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        will_topic: str,
        will_payload: bytes,
        on_connected: Callable[[], None] | None = None,
        subscriptions: Sequence[str] = (),
        on_message: Callable[[Inbound], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_connected = on_connected
        self._subscriptions = tuple(subscriptions)
        self._on_inbound = on_message
        # Subscriptions added while running (a model transfer over MQTT), each with its handler.
        self._routes_lock = threading.Lock()
        self._routes: dict[str, Callable[[Inbound], None]] = {}
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._connects = 0
        self._connack = False  # set by _on_connect, acted on by _run after paho's resend
        self.max_packet_size: int | None = None
        """The largest packet the broker accepts: its MQTT 5 CONNACK's Maximum Packet Size,
        None when it names none (MQTT 3.1.1 never does). A broker disconnects a client that
        sends a larger one, and paho would send it again on every reconnect."""
        self._ever_connected = False
        self._watch = ClientIdWatch(
            settings.client_id or "",
            backoff_s=settings.id_conflict_backoff_s,
            backoff_max_s=settings.id_conflict_backoff_max_s,
        )
        # The reason code of the broker's DISCONNECT, None when it just closed the connection.
        self._disconnect_reason: int | None = None  # set by _on_disconnect, read by _run
        # Acknowledgement tracking: mid -> callback. Every publish records its mid, so an
        # ack that arrives before publish() returned (it can: paho's network thread may
        # read the PUBACK first) waits in _early for exactly that publish.
        self._ack_lock = threading.Lock()
        self._pending: dict[int, Callable[[], None] | None] = {}
        self._early: set[int] = set()
        # The TLS context the client connects with, owned here so that a renewed certificate
        # applies at the next connection; _switch asks the mqtt thread to make that now.
        self._tls: ssl.SSLContext | None = None
        self._switch = threading.Event()
        self._switching = False  # mqtt thread only
        self.client = self._make_client(will_topic, will_payload)

    def _make_client(self, will_topic: str, will_payload: bytes) -> paho.Client:
        s = self.settings
        mqtt5 = s.protocol == "mqtt5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id or "",
            protocol=MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if mqtt5 else False,
        )
        client.max_inflight_messages_set(s.max_inflight)
        client.will_set(will_topic, will_payload, qos=1, retain=True)
        if s.username:
            client.username_pw_set(s.username, _read_password(s))
        if s.tls is not None:
            try:
                self._tls = tls_context(s.tls.cafile, s.tls.certfile, s.tls.keyfile)
            except (OSError, ssl.SSLError) as exc:
                raise BrokerSettingsError(
                    f"broker.tls: cannot load the certificates ({exc})",
                    hint="check cafile, certfile and keyfile (PEM, readable by the agent)",
                ) from exc
            client.tls_set_context(self._tls)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        # paho writes a message to the socket from the thread that publishes it unless it
        # runs its own loop thread or an external loop registered for writes. With our loop
        # in the mqtt thread, the publisher's write and the loop's write of the next packet
        # could interleave: seen as two events swapped on the wire (seq 4729 before 4728)
        # under CPU load. Registering for writes leaves every socket write to the mqtt
        # thread: a publish only queues the packet and wakes the loop's select.
        client.on_socket_register_write = _writes_stay_in_the_mqtt_thread
        return client

    @property
    def reconnects(self) -> int:
        """Connections made after the first one."""
        return max(0, self._connects - 1)

    @property
    def problem(self) -> str | None:
        """Why the link cannot stay up, while it lasts: another client uses this client id."""
        return self._watch.problem

    @property
    def id_conflicts(self) -> int:
        """Connections lost to another client with this client id, since start."""
        return self._watch.conflicts

    @property
    def connected(self) -> bool:
        """True while the broker has accepted the connection."""
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until connected or ``timeout_s`` passed."""
        return self._connected.wait(timeout_s)

    def start(self) -> None:
        """Start the ``mqtt`` thread; it connects in the background."""
        self._stop.clear()
        self._thread = SUPERVISOR.start("mqtt", self._run, self._stop)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly (no last will) and end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.client.is_connected():
            self.client.disconnect()
            self.client.loop_write()  # the mqtt thread has ended: send the DISCONNECT here
        if self._thread is None or not self._thread.is_alive():
            close_client(self.client)
        self._connected.clear()

    def fits(self, topic: str, payload: bytes, correlation_data: bytes | None = None) -> bool:
        """Whether the broker accepts ``payload`` on ``topic`` in one packet."""
        limit = self.max_packet_size
        if limit is None:
            return True
        extra = 0 if correlation_data is None else 3 + len(correlation_data)
        return _PUBLISH_OVERHEAD + len(topic.encode()) + extra + len(payload) <= limit

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool = False,
        on_ack: Callable[[], None] | None = None,
        correlation_data: bytes | None = None,
    ) -> bool:
        """Hand a message to paho; ``on_ack`` runs (mqtt thread) once the broker has it.

        Returns False when paho refused the message outright, or when it is larger than
        the broker accepts (logged). A message handed over while the connection is down
        stays with paho, which sends it after reconnecting.
        ``correlation_data`` (MQTT 5) goes back with a command's reply.
        """
        if not self.fits(topic, payload, correlation_data):
            log.error(
                "not published to %s: %d bytes, more than the broker accepts in one packet "
                "(its maximum packet size, %s bytes)",
                topic,
                len(payload),
                self.max_packet_size,
            )
            return False
        properties = None
        if correlation_data is not None and self.settings.protocol == "mqtt5":
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation_data
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning(
                "publish to %s refused by the client: %s", topic, paho.error_string(info.rc)
            )
            return False
        if qos == 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return False  # paho drops QoS 0 while disconnected: no ack will come
        with self._ack_lock:
            early = info.mid in self._early
            if early:
                self._early.discard(info.mid)
            else:
                self._pending[info.mid] = on_ack
        if early and on_ack is not None:
            on_ack()
        return True

    def route(self, topic_filter: str, handler: Callable[[Inbound], None]) -> None:
        """Subscribe to ``topic_filter`` now and after every reconnect; ``handler`` gets its
        messages (on the mqtt thread) instead of ``on_message``."""
        with self._routes_lock:
            self._routes[topic_filter] = handler
        if self.connected:
            self.client.subscribe(topic_filter, qos=1)

    def switch_certificate(self, certfile: Path, keyfile: Path) -> None:
        """Use this certificate and key from now on: reconnect with them (any thread).

        The mqtt thread disconnects cleanly (no last will) and connects again at once; paho
        resends what was in flight, and the outbox holds everything else.
        """
        if self._tls is None:
            raise BrokerSettingsError(
                "cannot switch certificates without TLS", hint="configure broker.tls"
            )
        try:
            self._tls.load_cert_chain(str(certfile), str(keyfile))
        except (OSError, ssl.SSLError) as exc:
            raise BrokerSettingsError(
                f"cannot load the new certificate {certfile} ({exc})",
                hint="check the certificate matches the key",
            ) from exc
        self._switch.set()

    def unroute(self, topic_filter: str) -> None:
        """Undo ``route``."""
        with self._routes_lock:
            self._routes.pop(topic_filter, None)
        if self.connected:
            self.client.unsubscribe(topic_filter)

    # -- the mqtt thread --------------------------------------------------------

    def _run(self) -> None:
        delay = self.settings.reconnect_min_s
        while not self._stop.is_set():
            if not self._connect_once():
                self._sleep_jittered(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
                continue
            while not self._stop.is_set():
                rc = self.client.loop(timeout=_LOOP_TIMEOUT_S)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
                if self._connack:
                    self._connection_made()
                if self.connected:
                    delay = self.settings.reconnect_min_s
                    if self._watch.holding(time.monotonic()):
                        log.info("the client id conflict is over: the connection has held")
                    if self._switch.is_set() and not self._switching:
                        self._switching = True
                        self.client.disconnect()  # clean: the broker keeps the session
            if self._stop.is_set():
                # Let the orderly shutdown drain what is in flight: keep looping briefly.
                return
            self._connected.clear()
            self._connack = False
            if self._switching:  # our own disconnect: no conflict, no wait
                self._switching = False
                self._switch.clear()
                continue
            conflict = self._watch.lost(time.monotonic(), reason=self._disconnect_reason)
            self._disconnect_reason = None
            if conflict is not None:
                self._back_off(conflict)
                continue
            self._sleep_jittered(delay)
            delay = min(delay * 2, self.settings.reconnect_max_s)

    def _back_off(self, conflict: IdConflict) -> None:
        s = self.settings
        if conflict.first:
            log.error(
                "%s. The broker at %s:%s drops one of the two connections whenever the other "
                "connects; waiting %.0f s before connecting again instead of fighting over it. "
                "Give each device its own device_id (or broker.client_id), or stop the other "
                "agent",
                conflict.problem, s.host, s.port, conflict.wait_s,
            )  # fmt: skip
        else:
            log.warning(
                "the other client with id %s took the connection again; waiting %.0f s",
                self._watch.client_id, conflict.wait_s,
            )  # fmt: skip
        # Not full jitter: the point is to stay away long enough for the other to hold.
        self._stop.wait(random.uniform(conflict.wait_s / 2, conflict.wait_s))

    def _connect_once(self) -> bool:
        s = self.settings
        try:
            if not self._ever_connected:
                if s.protocol == "mqtt5":
                    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    properties.SessionExpiryInterval = s.session_expiry_s
                    self.client.connect(
                        s.host,
                        s.port,
                        keepalive=s.keepalive_s,
                        clean_start=False,
                        properties=properties,
                    )
                else:  # 3.1.1: the persistent session is clean_session=False on the client
                    self.client.connect(s.host, s.port, keepalive=s.keepalive_s)
                self._ever_connected = True
            else:
                self.client.reconnect()
        except (OSError, ssl.SSLError) as exc:
            log.warning("cannot reach the broker at %s:%s (%s); retrying", s.host, s.port, exc)
            return False
        return True

    def _sleep_jittered(self, delay_s: float) -> None:
        # Full jitter: 500 devices coming back after a broker restart must not stampede.
        self._stop.wait(random.uniform(0, delay_s))

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.error("the broker refused the connection: %s", reason)
            return
        if self._connected.is_set():
            return
        self._connects += 1
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        log.info(
            "connected to %s:%s (session %s)",
            self.settings.host,
            self.settings.port,
            "resumed" if flags.session_present else "new",
        )
        # paho calls this before it resends what was in flight when the connection broke.
        # Anything published now would overtake those messages, so the link only counts as
        # connected once the loop call that read the CONNACK has returned (_connection_made).
        self._connack = True

    def _connection_made(self) -> None:  # mqtt thread, after paho's resend
        self._connack = False
        self._watch.connected(time.monotonic())
        self._connected.set()
        with self._routes_lock:
            routed = list(self._routes)
        for topic in [*self._subscriptions, *routed]:
            self.client.subscribe(topic, qos=1)
        if self._on_connected is not None:
            self._on_connected()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        from_broker = bool(flags.is_disconnect_packet_from_server)
        self._disconnect_reason = getattr(reason, "value", None) if from_broker else None
        if self._stop.is_set():
            log.info("disconnected from the broker")
        elif self._connected.is_set() and from_broker:
            log.warning("the broker disconnected us: %s", reason)
        elif self._switching:
            log.info("reconnecting with the renewed certificate")
        elif self._connected.is_set():
            log.warning("connection to the broker lost (no reason given)")
        self._connected.clear()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        with self._ack_lock:
            if mid not in self._pending:
                self._early.add(mid)
                return
            callback = self._pending.pop(mid)
        if callback is not None:
            callback()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._routes_lock:
            handler = next(
                (h for f, h in self._routes.items() if paho.topic_matches_sub(f, message.topic)),
                self._on_inbound,
            )
        if handler is None:
            return
        props = getattr(message, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        handler(
            Inbound(
                topic=message.topic,
                payload=bytes(message.payload),
                response_topic=response_topic or None,
                correlation_data=bytes(correlation) if correlation is not None else None,
            )
        )


def _writes_stay_in_the_mqtt_thread(client: paho.Client, userdata: Any, sock: Any) -> None:
    """paho's want-to-write hook: nothing to do, the mqtt thread's loop writes."""


class OutboxPublisher:
    """Drains the outbox through the link: the ``publisher`` thread."""

    def __init__(self, outbox: Outbox, link: MqttLink, *, window: int) -> None:
        self.outbox = outbox
        self.link = link
        self.window = window
        self.published = 0
        self.undeliverable = 0
        """Events larger than the broker accepts, removed unsent (each logged)."""
        self._lock = threading.Lock()
        self._inflight = 0
        self._acked: list[int] = []
        self._removed: list[int] = []  # undeliverable rows, deleted with the next acks
        self._handed_seq = 0
        self._ack_problem: str | None = None
        self._ack_retry_at = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """Tell the publisher new rows are waiting (called after ``Outbox.put``)."""
        self._wake.set()

    def start(self) -> None:
        """Start the ``publisher`` thread."""
        self._stop.clear()
        self._thread = SUPERVISOR.start("publisher", self._run, self._stop)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop handing rows to paho and record the acknowledgements received so far."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._ack_retry_at = 0.0  # one last try, whatever the retry pace
        self._apply_acks()

    def flush(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self.outbox.depth > 0 and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.02)
        return self.outbox.depth == 0

    def _acked_seq(self, seq: int) -> None:  # mqtt thread
        with self._lock:
            self._acked.append(seq)
            self._inflight -= 1
        self._wake.set()

    @property
    def ack_problem(self) -> str | None:
        """Why acknowledgements received are not yet applied to the outbox (disk full), or None."""
        return self._ack_problem

    def _apply_acks(self) -> None:
        """Delete acknowledged rows; if the outbox cannot (disk full), keep them and retry.

        Rows already handed to paho are never handed again in this process
        (``_handed_seq`` only grows), so a failed delete sends no duplicates, and
        publishing of newer rows goes on while the acks wait.
        """
        if self._ack_problem is not None and time.monotonic() < self._ack_retry_at:
            return
        with self._lock:
            acked, self._acked = self._acked, []
            removed, self._removed = self._removed, []
        if not acked and not removed:
            return
        try:
            self.outbox.ack(acked + removed)
        except OutboxError as exc:
            with self._lock:
                self._acked[:0] = acked
                self._removed[:0] = removed
            self._ack_retry_at = time.monotonic() + _ACK_RETRY_S
            if self._ack_problem != exc.message:
                log.error(
                    "%s: keeping %d acknowledgement(s) in memory and retrying every %.0f s",
                    exc,
                    len(acked),
                    _ACK_RETRY_S,
                )
            self._ack_problem = exc.message
            return
        if self._ack_problem is not None:
            log.warning("outbox writable again: applied %d kept acknowledgement(s)", len(acked))
            self._ack_problem = None
        self.published += len(acked)

    def _remove_undeliverable(self, item: OutboxItem) -> None:
        """An event the broker would disconnect us for, again at every try: it goes, so the
        ones after it do not wait behind it forever."""
        log.error(
            "event %d on %s removed unsent: %d bytes, more than the broker accepts in one "
            "packet (%s bytes); raise the broker's max_packet_size to keep such events",
            item.seq,
            item.topic,
            len(item.payload),
            self.link.max_packet_size,
        )
        with self._lock:
            self._removed.append(item.seq)
        self.undeliverable += 1
        self._handed_seq = item.seq

    def _run(self) -> None:
        while not self._stop.is_set():
            # Cleared before looking at the state, so a wake-up during the work is kept.
            self._wake.clear()
            fault_point()
            self._apply_acks()
            room = self.window - self._inflight
            # Connection first: while it is down, every put wakes us and a peek would be waste.
            if not self.link.connected or room <= 0:
                self._wake.wait(0.05)
                continue
            items = self.outbox.peek(room, after_seq=self._handed_seq)
            if not items:
                self._wake.wait(0.05)
                continue
            for item in items:
                if not self.link.fits(item.topic, item.payload):
                    self._remove_undeliverable(item)
                    continue
                with self._lock:
                    self._inflight += 1
                if not self.link.publish(
                    item.topic, item.payload, qos=1, on_ack=partial(self._acked_seq, item.seq)
                ):
                    with self._lock:
                        self._inflight -= 1
                    break
                self._handed_seq = item.seq
