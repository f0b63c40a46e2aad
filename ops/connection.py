"""One MQTT 5 connection per operator command, over TLS with the operator's certificate.

Every ``edgefleet`` command that talks to the broker (``deploy``, ``undeploy``, ``cmd``,
``transfer``, ``watch``) takes the same options (``add_broker_options``: ``--profile``,
``--host``, ``--port``, ``--topic-root``, ``--cafile``, ``--cert``, ``--key``,
``--insecure``), resolved with the environment and the operator profile file into one
:class:`~edgefleet.ops.profile.ResolvedProfile` (``edgefleet.ops.profile``). The
connection is TLS 1.2 or later, the broker's certificate checked against the CA and its
name against the host, and presents the client certificate (``prepare_client``); without
those files a command refuses, and ``--insecure`` alone gives plain MQTT with a warning.
TLS failures become :class:`BrokerError` messages that say what to check.

Threads: a command runs in the CLI's main thread. ``BrokerConnection`` starts paho's network
thread (``loop_start``) and stops it on exit; its callbacks only record acknowledgements
under one condition variable and put messages on a queue, which the main thread waits on
with a deadline.
"""

from __future__ import annotations

import functools
import queue
import ssl
import sys
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

from edgefleet.agent.mqtt import close_client
from edgefleet.agent.protocol import MODELS_LEVEL
from edgefleet.provisioning import pki

from .errors import BrokerError
from .profile import TLS_PORT, OperatorProfile, ProfileError, ResolvedProfile

ACK_TIMEOUT_S = 10.0
KEEPALIVE_S = 30
# Under the fleet-wide models level, which the controller may write and read: a marker
# topic there is allowed by the generated ACL, and no device subscribes to it.
_SYNC_LEVEL = "_sync"
_T = TypeVar("_T")
_X509_HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH


def tls_context(resolved: ResolvedProfile) -> ssl.SSLContext:
    """A TLS 1.2+ client context that checks the broker's certificate and name against the
    profile's CA and presents the profile's client certificate."""
    resolved.check_transport()
    p = resolved.profile
    assert p.cafile is not None, "check_transport: TLS has every file"
    assert p.certfile is not None, "check_transport: TLS has every file"
    assert p.keyfile is not None, "check_transport: TLS has every file"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(p.cafile))
    except (OSError, ssl.SSLError) as exc:
        raise _unreadable(resolved, "cafile", exc, "a CA certificate (PEM)") from exc
    try:
        context.load_cert_chain(str(p.certfile), str(p.keyfile))
    except (OSError, ssl.SSLError) as exc:
        missing = [n for n in ("certfile", "keyfile") if not getattr(p, n).is_file()]
        if missing:
            raise _unreadable(resolved, missing[0], exc, "a file") from exc
        raise ProfileError(
            f"cannot load the client certificate {p.certfile} with its key {p.keyfile} "
            f"({_reason(exc)}; {resolved.named('certfile')}, {resolved.named('keyfile')})",
            hint="pass a PEM certificate and the unencrypted PEM key it was issued for, e.g. "
            "DIR/operators/controller.crt and .key from 'edgefleet provision init DIR'",
        ) from exc
    return context


def _unreadable(resolved: ResolvedProfile, name: str, exc: Exception, what: str) -> ProfileError:
    path = getattr(resolved.profile, name)
    return ProfileError(
        f"{resolved.named(name)} {path}: cannot load it as {what} ({_reason(exc)})",
        hint="check the path ('edgefleet profile show' says where it came from)",
    )


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def prepare_client(client: mqtt.Client, resolved: ResolvedProfile) -> None:
    """Set up ``client``'s transport: TLS with the client certificate, or (insecure) plain
    MQTT with one warning line on stderr. Refuses (:class:`ProfileError`) neither set."""
    resolved.check_transport()
    p = resolved.profile
    if p.insecure:
        print(
            f"edgefleet: warning: insecure ({resolved.source('insecure')}): plain MQTT to "
            f"{p.address}, no TLS, no client certificate; anyone on the network can read "
            "and forge this traffic",
            file=sys.stderr,
            flush=True,
        )
        return
    if p.keyfile is not None and (problem := pki.key_mode_problem(p.keyfile, "edgefleet")):
        raise ProfileError(
            problem, hint=f"the operator key comes from {resolved.source('keyfile')}"
        )
    client.tls_set_context(tls_context(resolved))


def connect_client(client: mqtt.Client, resolved: ResolvedProfile) -> None:
    """``client.connect`` to the profile's broker, its failures as :class:`BrokerError`."""
    p = resolved.profile
    try:
        client.connect(p.host, p.broker_port, keepalive=KEEPALIVE_S)
    except ssl.SSLCertVerificationError as exc:
        raise _untrusted_broker(resolved, exc) from exc
    except (ssl.SSLError, ConnectionResetError) as exc:
        if p.insecure and isinstance(exc, ConnectionResetError):
            raise _unreachable(p, exc) from exc
        raise BrokerError(
            f"the TLS handshake with the broker at {p.address} failed ({_reason(exc)})",
            hint=f"check that {p.address} is the broker's TLS listener (port {TLS_PORT} by "
            "default) and not a plain one; with a plain lab broker pass --insecure",
        ) from exc
    except OSError as exc:
        raise _unreachable(p, exc) from exc


def _unreachable(p: OperatorProfile, exc: OSError) -> BrokerError:
    return BrokerError(
        f"cannot reach the broker at {p.address} ({exc})",
        hint="check --host and --port (or the profile: 'edgefleet profile show'), and that "
        "the broker runs",
    )


def _untrusted_broker(resolved: ResolvedProfile, exc: ssl.SSLCertVerificationError) -> BrokerError:
    p = resolved.profile
    reason = exc.verify_message or _reason(exc)
    if exc.verify_code == _X509_HOSTNAME_MISMATCH:
        return BrokerError(
            f"the broker at {p.address} presented a certificate not made out to {p.host!r} "
            f"({reason})",
            hint="connect with a host name the broker's certificate names (its subject "
            "alternative names, set by 'edgefleet provision init'), in --host or the profile",
        )
    return BrokerError(
        f"the broker at {p.address} presented a certificate that does not verify against "
        f"{p.cafile} ({reason}; {resolved.named('cafile')})",
        hint="check that cafile is the fleet's CA (DIR/ca/ca.crt), that this is the fleet's "
        "broker, and that its certificate has not expired",
    )


def closed_before_connack(resolved: ResolvedProfile, socket_error: str | None) -> BrokerError:
    """Why a broker that closed the connection before its CONNACK did, as far as we can tell."""
    p = resolved.profile
    said = f" ({socket_error})" if socket_error else ""
    if p.insecure:
        return BrokerError(
            f"the broker at {p.address} closed the plain connection before accepting it{said}",
            hint=f"a TLS listener drops plain clients: check that port {p.broker_port} is a "
            "plain listener, or drop --insecure and connect with the operator profile; else "
            "the broker log says why",
        )
    return BrokerError(
        f"the broker at {p.address} closed the TLS connection before accepting it{said}",
        hint=f"check that the client certificate {p.certfile} is issued by the broker's CA, "
        "has not expired and is not revoked, and that the broker allows its identity; the "
        "broker log says why",
    )


def sync_topic(topic_root: str) -> str:
    """A topic only this call uses, for ``BrokerConnection.retained``'s marker."""
    return f"{topic_root}/{MODELS_LEVEL}/{_SYNC_LEVEL}/{uuid.uuid4().hex}"


class BrokerConnection:
    """One MQTT 5 connection for one command; each call waits, with a deadline, for its ack."""

    def __init__(self, resolved: ResolvedProfile, timeout_s: float = ACK_TIMEOUT_S) -> None:
        self._resolved = resolved
        self._host, self._port = resolved.profile.host, resolved.profile.broker_port
        self._timeout_s = timeout_s
        self._socket_error: str | None = None  # paho's last socket error, for a message
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
        client.on_log = self._on_log
        prepare_client(client, resolved)
        self._client = client

    def __enter__(self) -> BrokerConnection:
        connect_client(self._client, self._resolved)
        self._client.loop_start()
        try:
            connack = self._wait(lambda: self._connack, "CONNACK")
            self._check(connack, "refused the connection")
        except BrokerError:
            close_client(self._client)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._client.disconnect()
        close_client(self._client)

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

    def publish_all(
        self,
        messages: Sequence[tuple[str, bytes]],
        *,
        retain: bool = False,
        properties: Sequence[Properties | None] = (),
    ) -> None:
        """Publish each (topic, payload) at QoS 1, all at once, then wait for every PUBACK.

        ``properties``, when given, are each message's MQTT 5 properties, in order. Each
        wait has the full timeout: a slow link is fine while the acks keep coming.
        """
        sent = []
        for i, (topic, payload) in enumerate(messages):
            props = properties[i] if i < len(properties) else None
            info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
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
            if self._closed is not None and self._connack is None:
                raise closed_before_connack(self._resolved, self._socket_error)
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

    def _on_log(self, client: mqtt.Client, userdata: object, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:  # a TLS alert from the broker shows up only here
            with self._changed:
                self._socket_error = text
