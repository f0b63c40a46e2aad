"""The operator's `edgefleet keys | manifest | deploy | cmd`, run as the console script."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from broker import Mosquitto, MqttProbe, free_port
from conftest import Assets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.agent.protocol import (
    CommandReply,
    CommandRequest,
    DesiredState,
    ErrorCode,
    Manifest,
    SignedManifest,
    TensorSpec,
    Topics,
)
from edgefleet.provisioning import TrustedKeys, sign_manifest

EDGEFLEET = Path(sys.executable).with_name("edgefleet")
MOBILENET = "mobilenet_v1_0.25_128_quant.tflite"
DAY_S = 86_400


def edgefleet(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EDGEFLEET), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def assert_clean_failure(
    result: subprocess.CompletedProcess[str], code: int, *phrases: str
) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert "edgefleet: error:" in result.stderr
    assert "what to do:" in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr


def signed_manifest_file(path: Path, model_id: str, *, expires_in_s: float = DAY_S) -> Path:
    """A signed manifest for a made-up release, written where `deploy` reads it."""
    now = time.time()
    manifest = Manifest(
        model_id=model_id, version=1, sha256="ab" * 32, size=1000, artifact=f"{model_id}.tflite",
        urls=[f"https://models.example/{model_id}.tflite"],
        inputs=[TensorSpec(shape=(1, 128, 128, 3), dtype="uint8")],
        issued_at=now, expires_at=now + expires_in_s,
    )  # fmt: skip
    path.write_text(sign_manifest(manifest, Ed25519PrivateKey.generate()).model_dump_json())
    return path


# -- keys and manifests ---------------------------------------------------------------------


def test_keys_generate_then_manifest_create_signs_the_real_model(
    assets: Assets, tmp_path: Path
) -> None:
    model = assets.model(MOBILENET)
    keys = edgefleet("keys", "generate", tmp_path / "keys")
    assert keys.returncode == 0, keys.stderr

    created = edgefleet(
        "manifest", "create", model, "--model-id", "mobilenet", "--version", 4,
        "--url", "https://models.example/a.tflite", "--url", "mqtt:",
        "--key", tmp_path / "keys" / "fleet.key", "--max-latency-ms", 50,
        "--task", "classification",
    )  # fmt: skip

    assert created.returncode == 0, created.stderr
    signed = SignedManifest.model_validate_json(created.stdout)
    manifest = TrustedKeys.from_paths([tmp_path / "keys" / "fleet.pub"]).verify(signed)
    assert signed.key_id in keys.stdout
    assert manifest.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    assert manifest.size == model.stat().st_size
    assert manifest.inputs == [TensorSpec(shape=(1, 128, 128, 3), dtype="uint8")]
    assert manifest.outputs == [TensorSpec(shape=(1, 1001), dtype="uint8")]
    assert (manifest.model_id, manifest.version, manifest.artifact) == ("mobilenet", 4, MOBILENET)
    assert manifest.urls == ["https://models.example/a.tflite", "mqtt:"]
    assert manifest.task.task == "classification"
    assert manifest.max_latency_ms == 50
    assert not manifest.rollback
    assert abs(manifest.expires_at - manifest.issued_at - 30 * DAY_S) < 1
    assert abs(manifest.issued_at - time.time()) < 60


def test_manifest_create_writes_out_and_names_the_options_that_break_the_manifest(
    assets: Assets, tmp_path: Path
) -> None:
    assert edgefleet("keys", "generate", tmp_path).returncode == 0
    common = ["manifest", "create", assets.model(MOBILENET), "--key", tmp_path / "fleet.key"]

    bad = edgefleet(*common, "--model-id", "has space", "--version", 0, "--url", "https://x/m")
    good = edgefleet(
        *common, "--model-id", "m", "--version", 1, "--url", "https://x/m", "--rollback",
        "--artifact", "m.tflite", "--out", tmp_path / "m.json",
    )  # fmt: skip

    assert_clean_failure(bad, 2, "--model-id: String should match pattern", "--version")
    assert good.returncode == 0, good.stderr
    assert good.stdout == ""
    manifest = TrustedKeys.from_paths([tmp_path]).verify(
        SignedManifest.model_validate_json((tmp_path / "m.json").read_text())
    )
    assert manifest.rollback
    assert manifest.artifact == "m.tflite"


def test_manifest_create_with_the_public_key_says_to_use_the_private_one(
    assets: Assets, tmp_path: Path
) -> None:
    assert edgefleet("keys", "generate", tmp_path).returncode == 0

    result = edgefleet(
        "manifest", "create", assets.model(MOBILENET), "--model-id", "m", "--version", 1,
        "--url", "https://x/m", "--key", tmp_path / "fleet.pub",
    )  # fmt: skip

    assert_clean_failure(result, 2, "holds a public key")


def test_manifest_create_takes_mqtt_only_as_exactly_mqtt_colon(
    assets: Assets, tmp_path: Path
) -> None:
    assert edgefleet("keys", "generate", tmp_path).returncode == 0

    result = edgefleet(
        "manifest", "create", assets.model(MOBILENET), "--model-id", "m", "--version", 1,
        "--url", "mqtt://broker/m.tflite", "--key", tmp_path / "fleet.key",
    )  # fmt: skip

    assert_clean_failure(result, 2, "is not a download URL", "exactly mqtt:")


def test_keys_generate_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    assert edgefleet("keys", "generate", tmp_path, "--name", "prod").returncode == 0
    before = (tmp_path / "prod.key").read_bytes()

    again = edgefleet("keys", "generate", tmp_path, "--name", "prod")

    assert_clean_failure(again, 2, "refusing to overwrite")
    assert (tmp_path / "prod.key").read_bytes() == before


# -- deploy ---------------------------------------------------------------------------------


def retained_desired(broker: Mosquitto, device: str) -> DesiredState:
    """The retained desired state, as a late subscriber (the device coming online) sees it."""
    with MqttProbe(broker) as probe:
        probe.subscribe(Topics(device).desired)
        message = probe.wait_for_message(Topics(device).desired)
    assert message.retain
    return DesiredState.model_validate_json(message.payload)


def test_deploys_to_two_streams_keep_both_in_the_retained_desired_state(
    broker: Mosquitto, tmp_path: Path
) -> None:
    door = signed_manifest_file(tmp_path / "door.json", "ssd")
    yard = signed_manifest_file(tmp_path / "yard.json", "mobilenet")

    first = edgefleet("deploy", "dev1", "door", door, "--host", broker.host, "--port", broker.port)
    second = edgefleet("deploy", "dev1", "yard", yard, "--host", broker.host, "--port", broker.port)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "desired revision 1" in first.stdout
    assert "desired revision 2" in second.stdout
    desired = retained_desired(broker, "dev1")
    assert desired.revision == 2
    assert desired.models == {
        "door": SignedManifest.model_validate_json(door.read_text()),
        "yard": SignedManifest.model_validate_json(yard.read_text()),
    }


def test_deploy_of_a_file_that_is_not_a_signed_manifest_is_refused_before_connecting(
    tmp_path: Path,
) -> None:
    not_signed = tmp_path / "manifest.json"
    not_signed.write_text('{"model_id": "ssd", "version": 1}')
    unused_port = free_port()

    result = edgefleet("deploy", "dev1", "door", not_signed, "--host", "127.0.0.1",
                       "--port", unused_port)  # fmt: skip

    assert_clean_failure(result, 2, "is not a signed manifest", "payload: Field required")


def test_deploy_of_an_expired_manifest_is_refused(tmp_path: Path) -> None:
    expired = signed_manifest_file(tmp_path / "old.json", "ssd", expires_in_s=-1)

    result = edgefleet("deploy", "dev1", "door", expired, "--host", "127.0.0.1",
                       "--port", free_port())  # fmt: skip

    assert_clean_failure(result, 2, "expired at")


def test_deploy_leaves_a_desired_state_it_cannot_read_alone(
    broker: Mosquitto, tmp_path: Path
) -> None:
    with MqttProbe(broker) as probe:
        probe.publish(Topics("dev1").desired, b'{"revision": "many"}', retain=True)
    manifest = signed_manifest_file(tmp_path / "door.json", "ssd")

    result = edgefleet("deploy", "dev1", "door", manifest, "--host", broker.host,
                       "--port", broker.port)  # fmt: skip

    assert_clean_failure(result, 1, "is not a desired state", "revision")
    with MqttProbe(broker) as probe:
        probe.subscribe(Topics("dev1").desired)
        assert probe.wait_for_message(Topics("dev1").desired).payload == b'{"revision": "many"}'


def test_deploy_without_a_broker_fails_cleanly(tmp_path: Path) -> None:
    manifest = signed_manifest_file(tmp_path / "door.json", "ssd")

    result = edgefleet("deploy", "dev1", "door", manifest, "--host", "127.0.0.1",
                       "--port", free_port())  # fmt: skip

    assert_clean_failure(result, 1, "cannot reach the broker")


# -- cmd ------------------------------------------------------------------------------------


class Responder:
    """A stand-in device: answers each command of one device on the request's response topic.

    paho's network thread runs ``_on_message``, which records the request and publishes the
    reply from there; the test thread reads ``requests`` only after the CLI exited.
    """

    def __init__(self, broker: Mosquitto, device: str, *, ok: bool = True) -> None:
        self.topics = Topics(device)
        self.ok = ok
        self.requests: list[tuple[str, CommandRequest, str, bytes]] = []
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._broker = broker

    def __enter__(self) -> Responder:
        self._client.connect(self._broker.host, self._broker.port)
        self._client.loop_start()
        self._client.subscribe(self.topics.commands, qos=1)
        assert self._subscribed.wait(5), "no SUBACK"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_subscribe(self, *args: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        request = CommandRequest.model_validate_json(message.payload)
        response_topic = message.properties.ResponseTopic  # type: ignore[union-attr]
        correlation = message.properties.CorrelationData  # type: ignore[union-attr]
        name = self.topics.command_name(message.topic) or "?"
        self.requests.append((name, request, response_topic, correlation))
        reply = CommandReply(
            id=request.id, command=name, ok=self.ok,
            error=None if self.ok else ErrorCode.NOT_FOUND,
            message="pong" if self.ok else "no stream 'attic'",
            result={"args": request.args} if self.ok else None, ts=time.time(),
        )  # fmt: skip
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.CorrelationData = correlation
        client.publish(response_topic, reply.model_dump_json(), qos=1, properties=properties)


def test_cmd_prints_the_devices_reply_and_exits_0(broker: Mosquitto) -> None:
    with Responder(broker, "dev1") as device:
        result = edgefleet("cmd", "dev1", "snapshot", "--args", '{"stream": "door"}',
                           "--host", broker.host, "--port", broker.port)  # fmt: skip

    assert result.returncode == 0, result.stderr
    reply = CommandReply.model_validate_json(result.stdout)
    assert (reply.ok, reply.command, reply.result) == (
        True,
        "snapshot",
        {"args": {"stream": "door"}},
    )
    ((name, request, response_topic, correlation),) = device.requests
    assert name == "snapshot"
    assert reply.id == request.id
    assert correlation == request.id.encode()
    assert response_topic == f"edgefleet/v1/dev1/reply/{request.id}"
    assert request.expires_at > time.time()


def test_cmd_that_the_device_refuses_prints_the_reply_and_exits_1(broker: Mosquitto) -> None:
    with Responder(broker, "dev1", ok=False):
        result = edgefleet("cmd", "dev1", "restart_stream", "--args", '{"stream": "attic"}',
                           "--host", broker.host, "--port", broker.port)  # fmt: skip

    assert result.returncode == 1
    assert json.loads(result.stdout)["error"] == "not_found"
    assert "did not carry out restart_stream: not_found: no stream 'attic'" in result.stderr


def test_cmd_that_nobody_answers_exits_1_after_the_timeout(broker: Mosquitto) -> None:
    started = time.monotonic()
    result = edgefleet("cmd", "dev1", "ping", "--timeout", 1, "--host", broker.host,
                       "--port", broker.port)  # fmt: skip

    assert_clean_failure(result, 1, "no reply from dev1 to ping within 1 s")
    assert time.monotonic() - started >= 1
    assert result.stdout == ""


def test_cmd_with_arguments_the_command_does_not_take_exits_2_before_sending(
    broker: Mosquitto,
) -> None:
    with MqttProbe(broker) as probe:
        probe.subscribe("edgefleet/v1/dev1/cmd/#")

        missing = edgefleet("cmd", "dev1", "snapshot", "--args", "{}", "--host", broker.host,
                            "--port", broker.port)  # fmt: skip
        not_json = edgefleet("cmd", "dev1", "ping", "--args", "{oops", "--host", broker.host,
                             "--port", broker.port)  # fmt: skip
        extra = edgefleet("cmd", "dev1", "ping", "--args", '{"stream": "door"}',
                          "--host", broker.host, "--port", broker.port)  # fmt: skip

        assert probe.messages() == []
    assert_clean_failure(missing, 2, "--args for snapshot: stream: Field required")
    assert_clean_failure(not_json, 2, "--args is not JSON")
    assert_clean_failure(extra, 2, "Extra inputs are not permitted")
