"""A real Mosquitto for tests, configured by edgefleet's own renderer, and an MQTT probe client.

``Mosquitto`` runs ``mosquitto -c FILE`` as a child process on a loopback port, with the
config written by :func:`edgefleet.provisioning.mosquitto.render_mosquitto_conf` and the
broker's log kept in its work directory (appended across restarts). The thread that made it
(the test or fixture) calls every method; no thread of its own.

``MqttProbe`` is a paho-mqtt 2.x client (MQTT 5) that tests drive synchronously: each call
waits for its acknowledgement with a deadline. paho's network thread (started by
``loop_start``, stopped by ``close``) runs the callbacks, which only record what arrived under
one condition variable that the test thread waits on.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.agent.mqtt import close_client
from edgefleet.provisioning.mosquitto import (
    BrokerListener,
    MosquittoSettings,
    TlsFiles,
    render_mosquitto_conf,
)

MOSQUITTO_ENV = "EDGEFLEET_MOSQUITTO"
INSTALL_HINT = "install it with: sudo apt-get install mosquitto"
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
_POLL_S = 0.01
_T = TypeVar("_T")
_RUNNING = re.compile(r"mosquitto version \S+ running")


class MosquittoNotInstalled(RuntimeError):
    """No mosquitto binary on this machine."""


class BrokerFailed(RuntimeError):
    """The broker did not start, or stopped other than when told to; carries its log."""


def find_mosquitto() -> Path:
    """The mosquitto binary: ``$EDGEFLEET_MOSQUITTO``, else PATH, else the sbin directories."""
    configured = os.environ.get(MOSQUITTO_ENV)
    if configured:
        if not os.access(configured, os.X_OK):
            raise MosquittoNotInstalled(f"{MOSQUITTO_ENV}={configured} is not an executable file")
        return Path(configured)
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path=os.pathsep.join(_SBIN_DIRS))
    if found is None:
        raise MosquittoNotInstalled(
            f"mosquitto not found on PATH or in {', '.join(_SBIN_DIRS)} "
            f"(or set {MOSQUITTO_ENV}); {INSTALL_HINT}"
        )
    return Path(found)


def require_mosquitto() -> Path:
    """For fixtures: the mosquitto binary, or a skip with the install command (CI: a failure)."""
    try:
        return find_mosquitto()
    except MosquittoNotInstalled as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (CI must run every test)")
        pytest.skip(str(exc))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class Mosquitto:
    """A Mosquitto broker process for one test, with the project's generated config.

    The default is a plain listener on a free loopback port, anonymous clients allowed and
    persistence in ``workdir/persistence``; ``tls`` puts that listener behind TLS and
    ``settings_overrides`` replaces any :class:`MosquittoSettings` field (``acl_file``,
    ``listeners``, ...). ``host``/``port`` are those of the first listener.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        tls: TlsFiles | None = None,
        settings_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        host = "127.0.0.1"
        defaults: dict[str, Any] = {
            "listeners": [BrokerListener(port=port or free_port(host), bind_address=host, tls=tls)],
            "persistence_dir": workdir / "persistence",
            "allow_anonymous": True,
            # Started as root, mosquitto would switch to the 'mosquitto' user, which cannot
            # read or write a test's private tmp_path.
            "run_as_user": pwd.getpwuid(os.geteuid()).pw_name,
        }
        self.settings = MosquittoSettings.model_validate({**defaults, **(settings_overrides or {})})
        logs_start = {"information", "all"} & set(self.settings.log_types)
        if self.settings.log_dest != "stderr" or not logs_start:
            raise ValueError("the test broker must log 'information' to stderr: start() reads it")
        self.host = self.settings.listeners[0].bind_address
        self.port = self.settings.listeners[0].port
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        workdir.mkdir(parents=True, exist_ok=True)
        if self.settings.persistence_dir is not None:
            self.settings.persistence_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(render_mosquitto_conf(self.settings))

    @classmethod
    def from_conf(cls, workdir: Path, conf: str, port: int) -> Mosquitto:
        """A broker running ``conf`` as given (``edgefleet broker config``'s output, say).

        ``conf`` must listen on loopback ``port`` and log 'information' to stderr;
        ``settings`` then describes the fixture's default, not what runs.
        """
        broker = cls(workdir, port=port)
        broker.conf_path.write_text(conf)
        return broker

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Mosquitto {self.host}:{self.port} {state} conf={self.conf_path}>"

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        """Everything the broker logged in this work directory, across restarts."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = 10) -> None:
        """Run ``mosquitto -c <conf>``; return once it listens, else raise with its log."""
        if self._process is not None:
            raise RuntimeError(f"{self!r} was started already")
        binary = find_mosquitto()
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self._process = subprocess.Popen(
                [str(binary), "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        self._wait_until_running(self._process, timeout_s)

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM the broker and wait; it saves its persistence database on the way down."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired as exc:
                process.kill()
                process.wait(timeout=timeout_s)
                message = self._failure(f"did not stop within {timeout_s} s; killed")
                raise BrokerFailed(message) from exc
        if process.returncode != 0:
            raise BrokerFailed(self._failure(f"exited with status {process.returncode}"))

    def kill(self) -> None:
        """SIGKILL the broker: it saves nothing (what a power cut or OOM kill does)."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait(timeout=10)

    def reload(self, timeout_s: float = 10) -> None:
        """SIGHUP, as ``systemctl reload mosquitto`` sends; wait until the broker says it
        reloaded."""
        assert self._process is not None, f"{self} is not running"
        before = self.log_text().count("Reloading config")
        self._process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while self.log_text().count("Reloading config") == before:
            if time.monotonic() > deadline:
                raise BrokerFailed(self._failure("did not reload on SIGHUP"))
            time.sleep(0.05)

    def restart(self, timeout_s: float = 10) -> None:
        """Stop and start again: same port, same config, same persistence."""
        self.stop(timeout_s)
        self.start(timeout_s)

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.stop()
        else:
            self.kill()

    def _wait_until_running(self, process: subprocess.Popen[bytes], timeout_s: float) -> None:
        # A TCP connection alone could reach whoever else holds the port; mosquitto logs
        # "running" only once every listener is open.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                raise BrokerFailed(self._failure(f"exited with status {process.returncode}"))
            if _RUNNING.search(self._log_since_start()):
                with socket.create_connection((self.host, self.port), timeout=timeout_s):
                    return
            time.sleep(_POLL_S)
        self.kill()
        raise BrokerFailed(self._failure(f"was not running within {timeout_s} s"))

    def _log_since_start(self) -> str:
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def _failure(self, what: str) -> str:
        output = self._log_since_start().strip()
        return f"mosquitto -c {self.conf_path} {what}; its log:\n{output or '(empty)'}"


@dataclass(frozen=True)
class ClientTls:
    """What a probe presents over TLS: the CA to verify the broker, and its own certificate."""

    cafile: Path
    certfile: Path | None = None
    keyfile: Path | None = None


@dataclass(frozen=True)
class Received:
    """One message a probe received."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


class MqttProbe:
    """A paho-mqtt 2.x MQTT 5 client for tests: every call waits for its acknowledgement.

    One probe is one connection: it does not reconnect after the broker drops it (make a new
    one). ``session_expiry_s > 0`` with ``clean_start=False`` makes a persistent session: the
    broker queues QoS 1 messages for its subscriptions while it is disconnected. ``port`` picks
    another of the broker's listeners than the first.
    """

    def __init__(
        self,
        broker: Mosquitto,
        client_id: str = "",
        *,
        port: int | None = None,
        username: str | None = None,
        clean_start: bool = True,
        session_expiry_s: int = 0,
        tls: ClientTls | None = None,
        timeout_s: float = 5,
    ) -> None:
        self.broker = broker
        self.port = port or broker.port
        self.timeout_s = timeout_s
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._changed = threading.Condition()
        self._connack: ReasonCode | None = None
        self._session_present = False
        self._connected = False
        self._disconnections = 0
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._pubacks: dict[int, ReasonCode] = {}
        self._messages: list[Received] = []
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        if username is not None:
            client.username_pw_set(username)
        if tls is not None:
            client.tls_set(
                ca_certs=str(tls.cafile),
                certfile=str(tls.certfile) if tls.certfile else None,
                keyfile=str(tls.keyfile) if tls.keyfile else None,
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self.client = client

    def connect(self) -> ReasonCode:
        """Connect, start paho's network thread, and return the CONNACK reason code."""
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self._session_expiry_s
        with self._changed:
            self._connack = None
        self.client.connect(
            self.broker.host,
            self.port,
            keepalive=30,
            clean_start=self._clean_start,
            properties=properties,
        )
        self.client.loop_start()
        return self._wait_for(lambda: self._connack, "CONNACK")

    def connect_refused(self) -> str:
        """Try to connect, expecting the broker to refuse; say how it refused.

        A refusal is a TLS handshake that fails, a failing CONNACK, or the broker closing
        the connection (TLS 1.3 checks a client certificate after the client's handshake
        has finished). A connection the broker accepts and keeps fails the test.
        """
        try:
            self.client.connect(self.broker.host, self.port, keepalive=30)
        except OSError as exc:  # ssl.SSLError included
            return f"refused at connect: {exc}"
        self.client.loop_start()
        try:
            self._wait_for(
                lambda: (
                    (self._connack is not None and self._connack.is_failure)
                    or self._disconnections
                    or None
                ),
                "a refusal (the broker accepted the client)",
            )
        finally:
            close_client(self.client)
        if self._connack is not None and self._connack.is_failure:
            return f"CONNACK {self._connack}"
        return "the broker closed the connection"

    @property
    def session_present(self) -> bool:
        """Whether the broker resumed a stored session at the last CONNACK."""
        return self._session_present

    @property
    def disconnections(self) -> int:
        """How many times this client lost or closed its connection."""
        with self._changed:
            return self._disconnections

    def wait_until_disconnected(self) -> None:
        """Wait for the connection to end (the broker dropped it, or it was closed)."""
        self._wait_for(lambda: not self._connected or None, "the disconnection")

    def subscribe(self, topic: str, qos: int = 1) -> ReasonCode:
        """Subscribe and return the SUBACK reason code (the granted QoS, or a refusal)."""
        result, mid = self.client.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS, f"subscribe {topic}: {result}"
        assert mid is not None
        return self._wait_for(lambda: self._subacks.get(mid), f"SUBACK for {topic}")[0]

    def publish(
        self, topic: str, payload: bytes | str = b"", qos: int = 1, *, retain: bool = False
    ) -> ReasonCode:
        """Publish and return the PUBACK reason code (for QoS 0: success once sent)."""
        info = self.client.publish(topic, payload, qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish {topic}: {info.rc}"
        return self._wait_for(lambda: self._pubacks.get(info.mid), f"PUBACK for {topic}")

    def publish_all(self, topic: str, payloads: Sequence[bytes], qos: int = 1) -> list[ReasonCode]:
        """Publish every payload in order without waiting in between, then wait for every PUBACK."""
        mids = []
        for payload in payloads:
            info = self.client.publish(topic, payload, qos)
            assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish {topic}: {info.rc}"
            mids.append(info.mid)
        pending = set(mids)

        def all_acknowledged() -> bool | None:
            pending.difference_update(self._pubacks.keys() & pending)
            return not pending or None

        self._wait_for(all_acknowledged, f"{len(mids)} PUBACKs on {topic}")
        with self._changed:
            return [self._pubacks[mid] for mid in mids]

    def wait_for_message(self, topic: str) -> Received:
        """The first message received on ``topic`` (waiting for it if none has arrived yet)."""

        def first() -> Received | None:
            return next((m for m in self._messages if m.topic == topic), None)

        return self._wait_for(first, f"a message on {topic}")

    def wait_for_count(self, count: int) -> list[Received]:
        """All messages received, once there are at least ``count``."""
        self._wait_for(lambda: len(self._messages) >= count or None, f"{count} messages")
        return self.messages()

    def wait_until(self, ready: Callable[[], _T | None], what: str, timeout_s: float) -> _T:
        """Wait up to ``timeout_s`` until ``ready()`` returns something other than None/False."""
        saved, self.timeout_s = self.timeout_s, timeout_s
        try:
            return self._wait_for(ready, what)
        finally:
            self.timeout_s = saved

    def messages(self, topic: str | None = None) -> list[Received]:
        """Messages received so far, in arrival order, optionally only those on ``topic``."""
        with self._changed:
            return [m for m in self._messages if topic is None or m.topic == topic]

    def disconnect(self) -> None:
        """Send DISCONNECT (the session stays if it has an expiry), stop the network thread."""
        with self._changed:
            connected = self._connected
        self.client.disconnect()
        if connected:
            self.wait_until_disconnected()
        close_client(self.client)

    def __enter__(self) -> MqttProbe:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.disconnect()

    def _wait_for(self, ready: Callable[[], _T | None], what: str) -> _T:
        with self._changed:
            if not self._changed.wait_for(ready, timeout=self.timeout_s):
                received = [m.topic for m in self._messages]
                raise AssertionError(
                    f"no {what} within {self.timeout_s} s (received so far: {received}); "
                    f"broker log:\n{self.broker.log_text()}"
                )
            result = ready()
            assert result is not None
            return result

    # paho's network thread from here on.

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._connack = reason_code
            self._session_present = flags.session_present
            self._connected = not reason_code.is_failure
            self._changed.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._connected = False
            self._disconnections += 1
            self._changed.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._subacks[mid] = reason_codes
            self._changed.notify_all()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._pubacks[mid] = reason_code
            self._changed.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received = Received(
            message.topic, bytes(message.payload), message.qos, bool(message.retain)
        )
        with self._changed:
            self._messages.append(received)
            self._changed.notify_all()
