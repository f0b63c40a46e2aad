"""The generated Mosquitto config, rendered and then run: a real broker, real paho clients.

Devices and the controller are MQTT 5 paho clients (``MqttProbe``). The ACL tests without
TLS use plain usernames: Mosquitto applies ``%u`` patterns to the username in CONNECT, as it
does to the certificate CN on the TLS listener, which the TLS tests check with certificates
made here by the openssl CLI.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker import (
    BrokerFailed,
    ClientTls,
    Mosquitto,
    MqttProbe,
    free_port,
)
from pydantic import ValidationError

from edgefleet.agent.protocol import DesiredState, Manifest, TensorSpec
from edgefleet.provisioning.mosquitto import (
    BrokerListener,
    MosquittoSettings,
    TlsFiles,
    render_acl,
    render_mosquitto_conf,
)
from edgefleet.provisioning.signing import generate_signing_key, load_private_key, sign_manifest
from edgefleet.runtime import SettingError

ROOT = "edgefleet/v1"
MODEL_SHA256 = "ab" * 32
CHUNK_BYTES = 64 * 1024  # what `edgefleet transfer publish` cuts a model into by default


@pytest.fixture
def acl_broker(tmp_path: Path, mosquitto_binary: Path) -> Iterator[Mosquitto]:
    """A running broker with the generated ACL; clients identify by username."""
    acl = tmp_path / "acl"
    acl.write_text(render_acl())
    with Mosquitto(tmp_path / "broker", settings_overrides={"acl_file": acl}) as running:
        yield running


def _settings(**overrides: object) -> MosquittoSettings:
    return MosquittoSettings.model_validate(
        {"listeners": [{}], "persistence_dir": None, "allow_anonymous": True, **overrides}
    )


def _persistent_subscriber(broker: Mosquitto) -> MqttProbe:
    """A controller whose session outlives its connection (MQTT 5 session expiry)."""
    return MqttProbe(broker, "controller-1", clean_start=False, session_expiry_s=300)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


# The rendered text.


def test_conf_overrides_mosquittos_queue_and_size_defaults() -> None:
    lines = _lines(render_mosquitto_conf(_settings()))

    assert "max_queued_messages 100000" in lines
    assert "max_packet_size 1048576" in lines
    assert "max_inflight_messages 100" in lines
    assert "listener 1883 127.0.0.1" in lines


def test_conf_puts_tls_options_after_their_listener() -> None:
    tls = TlsFiles(cafile=Path("/etc/ef/ca.crt"), certfile=Path("/b.crt"), keyfile=Path("/b.key"))
    settings = _settings(
        listeners=[BrokerListener(), BrokerListener(port=8883, bind_address="0.0.0.0", tls=tls)]
    )

    lines = _lines(render_mosquitto_conf(settings))

    tls_block = lines[lines.index("listener 8883 0.0.0.0") :]
    assert "cafile /etc/ef/ca.crt" in tls_block
    assert "require_certificate true" in tls_block
    assert "use_identity_as_username true" in tls_block
    assert lines.index("listener 1883 127.0.0.1") < lines.index("listener 8883 0.0.0.0")


def test_settings_refuse_a_config_no_client_could_connect_to() -> None:
    with pytest.raises(ValidationError, match="no client could ever connect"):
        _settings(allow_anonymous=False)


def test_settings_refuse_a_path_that_would_inject_a_config_line() -> None:
    with pytest.raises(ValidationError, match="acl_file"):
        _settings(acl_file="/tmp/acl\nallow_anonymous true")


def test_identity_as_username_requires_a_client_certificate() -> None:
    with pytest.raises(ValidationError, match="require_certificate"):
        TlsFiles(
            cafile=Path("ca"),
            certfile=Path("crt"),
            keyfile=Path("key"),
            require_certificate=False,
        )


def test_acl_grants_devices_by_username_never_by_client_id() -> None:
    acl = render_acl()

    assert f"pattern read {ROOT}/%u/#" in _lines(acl)
    assert not [line for line in _lines(acl) if "%c" in line]


def test_acl_refuses_a_wildcard_topic_root() -> None:
    with pytest.raises(SettingError, match="topic root"):
        render_acl("edgefleet/+")


def test_acl_refuses_a_controller_identity_with_a_topic_separator() -> None:
    with pytest.raises(SettingError, match="controller_identity"):
        render_acl(controller_identity="controller/x")


# The broker running with it.


def test_client_publishes_qos1_and_receives_it_over_mqtt5(broker: Mosquitto) -> None:
    with MqttProbe(broker, "sub") as sub, MqttProbe(broker, "pub") as pub:
        sub.subscribe(f"{ROOT}/dev1/events/+")

        ack = pub.publish(f"{ROOT}/dev1/events/cam0", b"person", qos=1)

        assert not ack.is_failure
        received = sub.wait_for_message(f"{ROOT}/dev1/events/cam0")
    assert (received.payload, received.qos) == (b"person", 1)


def test_retained_message_survives_a_broker_restart(broker: Mosquitto) -> None:
    with MqttProbe(broker, "dev1") as device:
        device.publish(f"{ROOT}/dev1/status", b"online", retain=True)

    broker.restart()

    with MqttProbe(broker, "observer") as observer:
        observer.subscribe(f"{ROOT}/dev1/status")
        status = observer.wait_for_message(f"{ROOT}/dev1/status")
    assert (status.payload, status.retain) == (b"online", True)


def test_broker_without_persistence_forgets_retained_messages_on_restart(
    tmp_path: Path, mosquitto_binary: Path
) -> None:
    with Mosquitto(tmp_path, settings_overrides={"persistence_dir": None}) as broker:
        with MqttProbe(broker, "dev1") as device:
            device.publish(f"{ROOT}/dev1/status", b"online", retain=True)

        broker.restart()

        with MqttProbe(broker, "observer") as observer:
            observer.subscribe(f"{ROOT}/dev1/status")
            observer.subscribe("marker")
            observer.publish("marker", b"after")
            observer.wait_for_message("marker")
            assert observer.messages(f"{ROOT}/dev1/status") == []


def test_killed_broker_saving_by_time_comes_back_without_what_it_had_not_saved(
    tmp_path: Path, mosquitto_binary: Path
) -> None:
    overrides = {"autosave_changes": 0, "autosave_interval_s": 60}
    with Mosquitto(tmp_path / "broker", settings_overrides=overrides) as broker:
        with MqttProbe(broker, "dev1") as device:
            device.publish(f"{ROOT}/dev1/status", b"online", retain=True)

        broker.kill()  # no save on the way down; the next autosave was a minute away
        broker.start()
        _assert_forgot_status(broker)


def _assert_forgot_status(broker: Mosquitto) -> None:
    """The broker no longer has dev1's retained status."""
    with MqttProbe(broker, "observer") as observer:
        observer.subscribe(f"{ROOT}/dev1/status")
        observer.subscribe("marker")
        observer.publish("marker", b"after")
        observer.wait_for_message("marker")
        assert observer.messages(f"{ROOT}/dev1/status") == []


def test_offline_persistent_subscriber_gets_what_was_published_meanwhile(
    broker: Mosquitto,
) -> None:
    with _persistent_subscriber(broker) as controller:
        controller.subscribe(f"{ROOT}/+/events/+")

    with MqttProbe(broker, "dev1") as device:
        device.publish(f"{ROOT}/dev1/events/cam0", b"while-offline")

    with _persistent_subscriber(broker) as controller:
        assert controller.session_present
        assert controller.wait_for_message(f"{ROOT}/dev1/events/cam0").payload == b"while-offline"


def test_queued_message_for_offline_subscriber_survives_a_broker_restart(
    broker: Mosquitto,
) -> None:
    with _persistent_subscriber(broker) as controller:
        controller.subscribe(f"{ROOT}/+/events/+")
    with MqttProbe(broker, "dev1") as device:
        device.publish(f"{ROOT}/dev1/events/cam0", b"queued")

    broker.restart()

    with _persistent_subscriber(broker) as controller:
        assert controller.session_present
        assert controller.wait_for_message(f"{ROOT}/dev1/events/cam0").payload == b"queued"


def test_offline_subscriber_gets_more_than_mosquittos_default_1000_queued(
    broker: Mosquitto,
) -> None:
    payloads = [str(i).encode() for i in range(1500)]
    with _persistent_subscriber(broker) as controller:
        controller.subscribe(f"{ROOT}/+/events/+")
    with MqttProbe(broker, "dev1") as device:
        device.publish_all(f"{ROOT}/dev1/events/cam0", payloads)

    with _persistent_subscriber(broker) as controller:
        received = controller.wait_for_count(len(payloads))

    assert sorted(m.payload for m in received) == sorted(payloads)


def test_broker_restarts_on_its_port_after_stopping_with_clients_connected(
    broker: Mosquitto,
) -> None:
    # The broker closes the connection first, leaving its side in TIME_WAIT on the port;
    # binding again needs SO_REUSEADDR.
    with socket.create_connection((broker.host, broker.port), timeout=5):
        broker.stop()

    broker.start()

    with MqttProbe(broker, "after") as client:
        assert not client.publish("check", b"1").is_failure


def test_start_failure_reports_mosquittos_own_error(broker: Mosquitto, tmp_path: Path) -> None:
    second = Mosquitto(tmp_path / "second", port=broker.port)

    with pytest.raises(BrokerFailed, match="Address already in use"):
        second.start()
    assert not second.running


def test_broker_without_anonymous_access_refuses_a_client_without_credentials(
    tmp_path: Path, mosquitto_binary: Path
) -> None:
    passwords = tmp_path / "passwords"
    passwords.write_text("")
    overrides = {"allow_anonymous": False, "password_file": passwords}

    with Mosquitto(tmp_path / "broker", settings_overrides=overrides) as broker:
        anonymous = MqttProbe(broker, "anonymous")
        refusal = anonymous.connect()
        anonymous.disconnect()

    assert refusal.is_failure
    assert refusal.getName() == "Not authorized"


def test_broker_with_two_listeners_serves_both(tmp_path: Path, mosquitto_binary: Path) -> None:
    ports = [free_port(), free_port()]
    listeners = [BrokerListener(port=port) for port in ports]

    with (
        Mosquitto(tmp_path, settings_overrides={"listeners": listeners}) as broker,
        MqttProbe(broker, "a") as first,
        MqttProbe(broker, "b", port=ports[1]) as second,
    ):
        first.subscribe("hello")
        second.publish("hello", b"across listeners")
        assert first.wait_for_message("hello").payload == b"across listeners"


# The broker as `edgefleet broker config` writes it: retained desired state survives.

EDGEFLEET = Path(sys.executable).with_name("edgefleet")
DESIRED = f"{ROOT}/dev1/desired"


def test_conf_keeps_retained_state_in_debians_directory_by_default() -> None:
    settings = MosquittoSettings(listeners=[BrokerListener()], allow_anonymous=True)

    lines = _lines(render_mosquitto_conf(settings))

    assert "persistence true" in lines
    assert "persistence_location /var/lib/mosquitto/" in lines
    assert "persistence_file mosquitto.db" in lines


def test_broker_config_keeps_memory_only_when_asked() -> None:
    conf = _broker_config("--port", "1883", "--no-persistence")

    assert "persistence false" in _lines(conf)
    assert not [line for line in _lines(conf) if line.startswith("persistence_location")]


def test_broker_config_keeps_every_devices_desired_state_across_a_restart(
    tmp_path: Path, mosquitto_binary: Path
) -> None:
    port = free_port()
    conf = _broker_config("--port", str(port), *_persistence_in(tmp_path / "db"))
    desired = _desired_state(tmp_path)

    with Mosquitto.from_conf(tmp_path / "broker", conf, port) as broker:
        with MqttProbe(broker, "controller") as controller:
            controller.publish(DESIRED, desired, retain=True)

        broker.stop()  # SIGTERM, as systemctl stop and a reboot send: the database is saved
        broker.start()

        with MqttProbe(broker, "dev1") as device:
            device.subscribe(DESIRED)
            kept = device.wait_for_message(DESIRED)
    assert (kept.payload, kept.retain) == (desired, True)
    assert DesiredState.model_validate_json(kept.payload).revision == 4


def test_broker_config_saves_on_change_so_a_sigkill_loses_no_acknowledged_desired_state(
    tmp_path: Path, mosquitto_binary: Path
) -> None:
    port = free_port()
    conf = _broker_config("--port", str(port), *_persistence_in(tmp_path / "db"))
    assert {"autosave_on_changes true", "autosave_interval 1"} <= set(_lines(conf))
    desired = _desired_state(tmp_path)
    devices = [f"dev{n}" for n in range(20)]

    with Mosquitto.from_conf(tmp_path / "broker", conf, port) as broker:
        with MqttProbe(broker, "controller") as controller:
            for device_id in devices:  # each publish returns once its PUBACK is in
                controller.publish(f"{ROOT}/{device_id}/desired", desired, retain=True)
            # Mosquitto saves at the top of its loop, just after the pass that sent the
            # PUBACK: any later packet it acknowledges (the next desired state, this one)
            # was read after that save. Without it, a kill in that instant can lose the last.
            controller.publish(f"{ROOT}/controller/saved", b"", qos=1)
            broker.kill()  # at once, no save on the way down

        broker.start()

        with MqttProbe(broker, "observer") as observer:
            observer.subscribe(f"{ROOT}/+/desired")
            kept = observer.wait_for_count(len(devices))
    assert sorted(m.topic for m in kept) == sorted(f"{ROOT}/{d}/desired" for d in devices)
    assert {(m.payload, m.retain) for m in kept} == {(desired, True)}


def _broker_config(*options: str) -> str:
    """``edgefleet broker config --allow-anonymous OPTIONS``, run as the console script."""
    command = [str(EDGEFLEET), "broker", "config", "--allow-anonymous", *options]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


def _persistence_in(directory: Path) -> tuple[str, ...]:
    """Options keeping the database in ``directory``, written by this test's own user.

    Started as root, mosquitto would switch to the 'mosquitto' user, which cannot write a
    test's private tmp_path.
    """
    directory.mkdir()
    return ("--persistence-dir", str(directory), "--user", pwd.getpwuid(os.geteuid()).pw_name)


def _desired_state(tmp_path: Path) -> bytes:
    """A controller's retained desired state: one stream's signed manifest, revision 4."""
    content = b"TFL3 model bytes"
    manifest = Manifest(
        model_id="detector",
        version=2,
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
        artifact="detector-2.tflite",
        urls=["https://models.example/detector-2.tflite"],
        inputs=[TensorSpec(shape=(1, 300, 300, 3), dtype="uint8")],
        issued_at=time.time(),
        expires_at=time.time() + 86400,
    )
    private, _ = generate_signing_key(tmp_path / "keys")
    signed = sign_manifest(manifest, load_private_key(private))
    return DesiredState(revision=4, models={"entrance": signed}).model_dump_json().encode()


# The ACL, with usernames standing in for certificate identities.


def test_device_publishes_to_its_own_events(acl_broker: Mosquitto) -> None:
    with (
        MqttProbe(acl_broker, "ctl", username="controller") as controller,
        MqttProbe(acl_broker, "dev1", username="dev1") as device,
    ):
        controller.subscribe(f"{ROOT}/#")

        ack = device.publish(f"{ROOT}/dev1/events/x", b"mine")

        assert not ack.is_failure
        assert controller.wait_for_message(f"{ROOT}/dev1/events/x").payload == b"mine"


@pytest.mark.parametrize(
    "topic",
    [
        f"{ROOT}/dev2/events/x",
        f"{ROOT}/dev1/cmd/reboot",
        f"{ROOT}/dev1/desired",
        f"{ROOT}/_models/{MODEL_SHA256}/0",
    ],
    ids=["other-device", "own-cmd", "own-desired", "model-chunk"],
)
def test_device_publish_outside_what_it_may_write_never_arrives(
    acl_broker: Mosquitto, topic: str
) -> None:
    with (
        MqttProbe(acl_broker, "ctl", username="controller") as controller,
        MqttProbe(acl_broker, "dev1", username="dev1") as device,
    ):
        controller.subscribe(f"{ROOT}/#")

        refused = device.publish(topic, b"forged")
        # Delivery from one client is in order: once this arrives, the forged one never will.
        device.publish(f"{ROOT}/dev1/events/marker", b"after")
        controller.wait_for_message(f"{ROOT}/dev1/events/marker")

        assert refused.getName() == "Not authorized"
        assert controller.messages(topic) == []


def test_controller_command_reaches_only_the_device_it_addresses(acl_broker: Mosquitto) -> None:
    with (
        MqttProbe(acl_broker, "ctl", username="controller") as controller,
        MqttProbe(acl_broker, "dev1", username="dev1") as dev1,
        MqttProbe(acl_broker, "dev2", username="dev2") as dev2,
    ):
        dev1.subscribe(f"{ROOT}/dev1/cmd/#")
        # Mosquitto grants any subscription and filters each message by read access.
        dev2.subscribe(f"{ROOT}/+/cmd/#")

        ack = controller.publish(f"{ROOT}/dev1/cmd/reboot", b"{}")
        controller.publish(f"{ROOT}/dev2/cmd/marker", b"after")
        dev2.wait_for_message(f"{ROOT}/dev2/cmd/marker")

        assert not ack.is_failure
        assert dev1.wait_for_message(f"{ROOT}/dev1/cmd/reboot").payload == b"{}"
        assert dev2.messages(f"{ROOT}/dev1/cmd/reboot") == []


def test_every_device_receives_a_full_model_chunk_the_controller_published(
    acl_broker: Mosquitto,
) -> None:
    chunk = bytes(range(256)) * (CHUNK_BYTES // 256)
    topic = f"{ROOT}/_models/{MODEL_SHA256}/0"
    with MqttProbe(acl_broker, "ctl", username="controller") as controller:
        ack = controller.publish(topic, chunk, retain=True)

    with (
        MqttProbe(acl_broker, "dev1", username="dev1") as dev1,
        MqttProbe(acl_broker, "dev2", username="dev2") as dev2,
    ):
        dev1.subscribe(f"{ROOT}/_models/{MODEL_SHA256}/#")
        dev2.subscribe(f"{ROOT}/_models/{MODEL_SHA256}/#")

        assert not ack.is_failure
        assert dev1.wait_for_message(topic).payload == chunk
        assert dev2.wait_for_message(topic).payload == chunk


def test_anonymous_client_may_publish_nothing_under_the_acl(acl_broker: Mosquitto) -> None:
    with MqttProbe(acl_broker, "anonymous") as anonymous:
        refusal = anonymous.publish(f"{ROOT}/dev1/events/x", b"spoofed")

    assert refusal.getName() == "Not authorized"


# TLS: certificates from a throwaway CA, the CN as the identity.


@dataclass(frozen=True)
class Pki:
    """A throwaway CA, a broker certificate for 127.0.0.1, and client certificates by CN."""

    directory: Path

    @property
    def ca(self) -> Path:
        """The CA certificate."""
        return self.directory / "ca.crt"

    def broker_tls(self) -> TlsFiles:
        """The broker's side: its certificate and the CA it checks clients against."""
        return TlsFiles(
            cafile=self.ca,
            certfile=self.directory / "broker.crt",
            keyfile=self.directory / "broker.key",
        )

    def client(self, name: str) -> ClientTls:
        """A client presenting the certificate issued to CN ``name``."""
        return ClientTls(self.ca, self.directory / f"{name}.crt", self.directory / f"{name}.key")


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30)


def _issue(directory: Path, name: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        directory, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates for the broker, 'controller', 'dev1' and 'dev2' (openssl CLI)."""
    if shutil.which("openssl") is None:
        reason = "the TLS tests make certificates with openssl: apt-get install openssl"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run every test)")
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("pki")
    _openssl(
        directory, "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt",
        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=edgefleet test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    _issue(
        directory,
        "broker",
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    for client in ("controller", "dev1", "dev2"):
        _issue(directory, client, "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    return Pki(directory)


@contextmanager
def _tls_broker(
    workdir: Path, pki: Pki, *, use_username_as_clientid: bool = False
) -> Iterator[Mosquitto]:
    """The production shape: TLS with client certificates, CN as username, the ACL, no anonymous."""
    workdir.mkdir()
    (workdir / "acl").write_text(render_acl())
    listener = BrokerListener(
        port=free_port(), tls=pki.broker_tls(), use_username_as_clientid=use_username_as_clientid
    )
    overrides = {"listeners": [listener], "acl_file": workdir / "acl", "allow_anonymous": False}
    with Mosquitto(workdir / "broker", settings_overrides=overrides) as broker:
        yield broker


@pytest.fixture
def tls_broker(tmp_path: Path, mosquitto_binary: Path, pki: Pki) -> Iterator[Mosquitto]:
    """A running broker in the production shape (see _tls_broker)."""
    with _tls_broker(tmp_path / "tls", pki) as broker:
        yield broker


def test_tls_listener_takes_the_identity_from_the_certificate_cn(
    tls_broker: Mosquitto, pki: Pki
) -> None:
    with (
        MqttProbe(tls_broker, "ctl", tls=pki.client("controller")) as controller,
        # The username dev1 claims is ignored: the certificate says dev2.
        MqttProbe(tls_broker, "dev1", username="dev1", tls=pki.client("dev2")) as device,
    ):
        controller.subscribe(f"{ROOT}/#")

        refused = device.publish(f"{ROOT}/dev1/events/x", b"forged")
        allowed = device.publish(f"{ROOT}/dev2/events/x", b"own")
        controller.wait_for_message(f"{ROOT}/dev2/events/x")

        assert refused.getName() == "Not authorized"
        assert not allowed.is_failure
        assert controller.messages(f"{ROOT}/dev1/events/x") == []


def test_a_certificate_holder_can_kick_another_device_off_by_reusing_its_client_id(
    tls_broker: Mosquitto, pki: Pki
) -> None:
    with MqttProbe(tls_broker, "dev1", tls=pki.client("dev1")) as dev1:
        with MqttProbe(tls_broker, "dev1", tls=pki.client("dev2")):
            dev1.wait_until_disconnected()

        assert dev1.disconnections >= 1


def test_username_as_clientid_stops_a_device_kicking_another_off(
    tmp_path: Path, mosquitto_binary: Path, pki: Pki
) -> None:
    with (
        _tls_broker(tmp_path / "tls", pki, use_username_as_clientid=True) as broker,
        MqttProbe(broker, "dev1", tls=pki.client("dev1")) as dev1,
        MqttProbe(broker, "dev1", tls=pki.client("dev2")) as impostor,
    ):
        # A round trip after the impostor's CONNACK: a kick would have arrived before it.
        impostor.publish(f"{ROOT}/dev2/health", b"{}")
        dev1.publish(f"{ROOT}/dev1/health", b"{}")

        assert dev1.disconnections == 0


def test_tls_listener_refuses_a_client_without_a_certificate(
    tls_broker: Mosquitto, pki: Pki
) -> None:
    with (
        _tls_socket(tls_broker, ClientTls(pki.ca)) as tls,
        pytest.raises(ssl.SSLError, match="certificate required"),
    ):
        tls.recv(1)


@contextmanager
def _tls_socket(broker: Mosquitto, client: ClientTls) -> Iterator[ssl.SSLSocket]:
    """A TLS connection to the broker that has sent nothing yet.

    With TLS 1.3 the client's handshake completes before the broker has checked the client
    certificate, so a refusal arrives as an alert on the first read.
    """
    context = ssl.create_default_context(cafile=str(client.cafile))
    if client.certfile is not None:
        context.load_cert_chain(client.certfile, client.keyfile)
    with (
        socket.create_connection((broker.host, broker.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=broker.host) as tls,
    ):
        yield tls


def test_tls_listener_refuses_a_revoked_certificate(
    tmp_path: Path, mosquitto_binary: Path, pki: Pki
) -> None:
    crl = _crl_revoking(pki, "dev2", tmp_path / "crl")
    tls = pki.broker_tls().model_copy(update={"crlfile": crl})
    (tmp_path / "acl").write_text(render_acl())
    overrides = {"acl_file": tmp_path / "acl", "allow_anonymous": False}

    with Mosquitto(tmp_path / "broker", tls=tls, settings_overrides=overrides) as broker:
        with MqttProbe(broker, "dev1", tls=pki.client("dev1")) as dev1:
            assert not dev1.publish(f"{ROOT}/dev1/health", b"{}").is_failure
        with (
            _tls_socket(broker, pki.client("dev2")) as dev2,
            pytest.raises(ssl.SSLError, match="revoked"),
        ):
            dev2.recv(1)


def _crl_revoking(pki: Pki, name: str, directory: Path) -> Path:
    """A CRL from the test CA that revokes the certificate issued to ``name``."""
    directory.mkdir()
    (directory / "index.txt").write_text("")
    (directory / "ca.cnf").write_text(
        f"[ca]\ndefault_ca = test\n[test]\ndatabase = {directory / 'index.txt'}\n"
        "default_md = sha256\ndefault_crl_days = 2\n"
    )
    ca = ("-config", str(directory / "ca.cnf"), "-cert", "ca.crt", "-keyfile", "ca.key")
    _openssl(pki.directory, "ca", *ca, "-revoke", f"{name}.crt")
    _openssl(pki.directory, "ca", *ca, "-gencrl", "-out", str(directory / "ca.crl"))
    return directory / "ca.crl"
