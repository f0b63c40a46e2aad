"""The operator's `edgefleet keys | manifest | deploy | cmd`, run as the console script."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from agentproc import AgentProcess
from broker import Mosquitto, MqttProbe, free_port
from conftest import Assets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fleet import DEVICE, SMALL, STREAM, Fleet, agent_config, device_probe, variant, video
from httpserver import ModelServer
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from edgefleet.agent.mqtt import close_client
from edgefleet.agent.protocol import (
    COMMAND_ARGS,
    CommandReply,
    CommandRequest,
    DesiredState,
    ErrorCode,
    LineMark,
    Manifest,
    ModelRef,
    ReportedState,
    SignedManifest,
    StatusMessage,
    StreamMarks,
    TensorSpec,
    Topics,
)
from edgefleet.ops.commands import describe
from edgefleet.ops.deploy import DeviceRecord, judge_deploy, next_revision
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


def signed_manifest_file(
    path: Path,
    model_id: str,
    *,
    expires_in_s: float = DAY_S,
    key: Ed25519PrivateKey | None = None,
) -> Path:
    """A signed manifest for a made-up release, written where `deploy` reads it."""
    now = time.time()
    manifest = Manifest(
        model_id=model_id, version=1, sha256="ab" * 32, size=1000, artifact=f"{model_id}.tflite",
        urls=[f"https://models.example/{model_id}.tflite"],
        inputs=[TensorSpec(shape=(1, 128, 128, 3), dtype="uint8")],
        issued_at=now, expires_at=now + expires_in_s,
    )  # fmt: skip
    signed = sign_manifest(manifest, key or Ed25519PrivateKey.generate())
    path.write_text(signed.model_dump_json())
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
        *common, "--model-id", "m", "--version", 1, "--url", "https://x/m",
        "--rollback-from", f"2:{'ab' * 32}", "--artifact", "m.tflite", "--out", tmp_path / "m.json",
    )  # fmt: skip

    assert_clean_failure(bad, 2, "--model-id: String should match pattern", "--version")
    assert good.returncode == 0, good.stderr
    assert good.stdout == ""
    manifest = TrustedKeys.from_paths([tmp_path]).verify(
        SignedManifest.model_validate_json((tmp_path / "m.json").read_text())
    )
    assert manifest.rollback_from is not None
    assert (manifest.rollback_from.version, manifest.rollback_from.sha256) == (2, "ab" * 32)
    assert abs(manifest.expires_at - manifest.issued_at - 6 * 3600) < 1  # a rollback: hours
    assert manifest.artifact == "m.tflite"


def test_manifest_create_numbers_every_manifest_of_a_model_line_beside_the_key(
    assets: Assets, tmp_path: Path
) -> None:
    assert edgefleet("keys", "generate", tmp_path).returncode == 0
    common = ["manifest", "create", assets.model(MOBILENET), "--key", tmp_path / "fleet.key"]

    def create(model_id: str, *extra: object) -> int:
        created = edgefleet(
            *common, "--model-id", model_id, "--version", 3, "--url", "mqtt:", *extra
        )
        assert created.returncode == 0, created.stderr
        return Manifest.model_validate_json(
            SignedManifest.model_validate_json(created.stdout).payload
        ).sequence

    numbered = [create("a"), create("a"), create("b"), create("a", "--sequence", 40), create("a")]

    assert numbered == [1, 2, 1, 40, 41]
    assert json.loads((tmp_path / "sequences.json").read_text()) == {"a": 41, "b": 1}


def test_manifest_create_refuses_a_rollback_from_that_names_no_release(
    assets: Assets, tmp_path: Path
) -> None:
    assert edgefleet("keys", "generate", tmp_path).returncode == 0

    result = edgefleet(
        "manifest", "create", assets.model(MOBILENET), "--key", tmp_path / "fleet.key",
        "--model-id", "m", "--version", 1, "--url", "mqtt:", "--rollback-from", "9",
    )  # fmt: skip

    assert_clean_failure(result, 2, "--rollback-from '9' is neither VERSION:SHA256", "sha256")


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


def retained_on(broker: Mosquitto, topic: str) -> bytes | None:
    """The retained message on ``topic`` now, or None: the broker sends a subscription's
    retained messages before one published after it (the marker)."""
    marker = f"test/marker/{uuid.uuid4().hex}"
    with MqttProbe(broker) as probe:
        probe.subscribe(topic)
        probe.subscribe(marker)
        probe.publish(marker, b"after")
        probe.wait_for_message(marker)
        held = [m.payload for m in probe.messages(topic) if m.retain]
    return held[0] if held else None


def retained_desired(broker: Mosquitto, device: str) -> DesiredState:
    """The retained desired state, as a late subscriber (the device coming online) sees it."""
    with MqttProbe(broker) as probe:
        probe.subscribe(Topics(device).desired)
        message = probe.wait_for_message(Topics(device).desired)
    assert message.retain
    return DesiredState.model_validate_json(message.payload)


def test_forced_deploys_to_two_streams_keep_both_in_the_retained_desired_state(
    broker: Mosquitto, tmp_path: Path
) -> None:
    door = signed_manifest_file(tmp_path / "door.json", "ssd")
    yard = signed_manifest_file(tmp_path / "yard.json", "mobilenet")
    options = ["--insecure", "--host", broker.host, "--port", broker.port, "--force"]

    first = edgefleet("deploy", "dev1", "door", door, *options)
    second = edgefleet("deploy", "dev1", "yard", yard, *options)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "warning: forced despite: dev1 has never connected" in first.stderr
    assert "desired revision 1" in first.stdout
    assert "desired revision 2" in second.stdout
    desired = retained_desired(broker, "dev1")
    assert desired.revision == 2
    assert desired.models == {
        "door": SignedManifest.model_validate_json(door.read_text()),
        "yard": SignedManifest.model_validate_json(yard.read_text()),
    }


def test_deploy_to_a_device_that_never_connected_is_refused_with_exit_3(
    broker: Mosquitto, tmp_path: Path
) -> None:
    manifest = signed_manifest_file(tmp_path / "door.json", "ssd")

    result = edgefleet("deploy", "nobody", "door", manifest, "--insecure", "--host", broker.host,
                       "--port", broker.port)  # fmt: skip

    assert_clean_failure(result, 3, "nobody has never connected to this broker", "--force")
    assert result.stdout == ""
    assert retained_on(broker, Topics("nobody").desired) is None


def test_deploy_of_a_file_that_is_not_a_signed_manifest_is_refused_before_connecting(
    tmp_path: Path,
) -> None:
    not_signed = tmp_path / "manifest.json"
    not_signed.write_text('{"model_id": "ssd", "version": 1}')
    unused_port = free_port()

    result = edgefleet("deploy", "dev1", "door", not_signed, "--insecure", "--host", "127.0.0.1",
                       "--port", unused_port)  # fmt: skip

    assert_clean_failure(result, 2, "is not a signed manifest", "payload: Field required")


def test_deploy_of_an_expired_manifest_is_refused(tmp_path: Path) -> None:
    expired = signed_manifest_file(tmp_path / "old.json", "ssd", expires_in_s=-1)

    result = edgefleet("deploy", "dev1", "door", expired, "--insecure", "--host", "127.0.0.1",
                       "--port", free_port())  # fmt: skip

    assert_clean_failure(result, 2, "expired at")


def test_deploy_leaves_a_desired_state_it_cannot_read_alone(
    broker: Mosquitto, tmp_path: Path
) -> None:
    with MqttProbe(broker) as probe:
        probe.publish(Topics("dev1").desired, b'{"revision": "many"}', retain=True)
    manifest = signed_manifest_file(tmp_path / "door.json", "ssd")

    result = edgefleet("deploy", "dev1", "door", manifest, "--insecure", "--host", broker.host,
                       "--port", broker.port)  # fmt: skip

    assert_clean_failure(result, 1, "is not a desired state", "revision")
    with MqttProbe(broker) as probe:
        probe.subscribe(Topics("dev1").desired)
        assert probe.wait_for_message(Topics("dev1").desired).payload == b'{"revision": "many"}'


def test_deploy_without_a_broker_fails_cleanly(tmp_path: Path) -> None:
    manifest = signed_manifest_file(tmp_path / "door.json", "ssd")

    result = edgefleet("deploy", "dev1", "door", manifest, "--insecure", "--host", "127.0.0.1",
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
        close_client(self._client)

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


def test_cmd_json_prints_the_devices_reply_and_exits_0(broker: Mosquitto) -> None:
    with Responder(broker, "dev1") as device:
        result = edgefleet("cmd", "dev1", "snapshot", "--args", '{"stream": "door"}', "--json",
                           "--insecure", "--host", broker.host, "--port", broker.port)  # fmt: skip

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
                           "--json", "--insecure", "--host", broker.host,
                           "--port", broker.port)  # fmt: skip

    assert result.returncode == 1
    assert json.loads(result.stdout)["error"] == "not_found"
    assert "did not carry out restart_stream: not_found: no stream 'attic'" in result.stderr


def test_cmd_that_nobody_answers_exits_1_after_the_timeout(broker: Mosquitto) -> None:
    started = time.monotonic()
    result = edgefleet("cmd", "dev1", "ping", "--timeout", 1, "--insecure", "--host", broker.host,
                       "--port", broker.port)  # fmt: skip

    assert_clean_failure(result, 1, "no reply from dev1 to ping within 1 s")
    assert time.monotonic() - started >= 1
    assert result.stdout == ""


def test_cmd_with_arguments_the_command_does_not_take_exits_2_before_sending(
    broker: Mosquitto,
) -> None:
    with MqttProbe(broker) as probe:
        probe.subscribe("edgefleet/v1/dev1/cmd/#")

        missing = edgefleet("cmd", "dev1", "snapshot", "--args", "{}", "--insecure",
                            "--host", broker.host, "--port", broker.port)  # fmt: skip
        not_json = edgefleet("cmd", "dev1", "ping", "--args", "{oops", "--insecure",
                             "--host", broker.host, "--port", broker.port)  # fmt: skip
        extra = edgefleet("cmd", "dev1", "ping", "--args", '{"stream": "door"}',
                          "--insecure", "--host", broker.host, "--port", broker.port)  # fmt: skip

        assert probe.messages() == []
    assert_clean_failure(missing, 2, "--args for snapshot: stream: Field required")
    assert_clean_failure(not_json, 2, "--args is not JSON")
    assert_clean_failure(extra, 2, "Extra inputs are not permitted")


def test_cmd_takes_the_arguments_as_key_value_words_json_values_or_strings(
    broker: Mosquitto,
) -> None:
    with Responder(broker, "dev1") as device:
        words = edgefleet("cmd", "dev1", "bench_model", "stream=door", "runs=20",
                          "--insecure", "--host", broker.host, "--port", broker.port)  # fmt: skip
        both = edgefleet("cmd", "dev1", "rollback_model", "stream=door", "--args",
                         '{"stream": "yard", "reason": "too slow"}',
                         "--insecure", "--host", broker.host, "--port", broker.port)  # fmt: skip
    bad = edgefleet("cmd", "dev1", "snapshot", "door", "--insecure", "--port", free_port())

    assert words.returncode == 0, words.stderr
    assert both.returncode == 0, both.stderr
    assert [request.args for _, request, _, _ in device.requests] == [
        {"stream": "door", "runs": 20},
        {"stream": "door", "reason": "too slow"},
    ]
    assert_clean_failure(bad, 2, "'door' is not KEY=VALUE", "stream=door")


def test_cmd_set_sends_a_json_merge_patch_built_from_the_dotted_keys(broker: Mosquitto) -> None:
    with Responder(broker, "dev1") as device:
        result = edgefleet(
            "cmd", "dev1", "set_config", "--set", "streams.door.events.min_score=0.6",
            "--set", "streams.door.events.labels=[\"person\"]", "--set", "logging.level=DEBUG",
            "--set", "streams.yard=null", "--insecure", "--host", broker.host,
            "--port", broker.port,
        )  # fmt: skip

    assert result.returncode == 0, result.stderr
    ((name, request, _, _),) = device.requests
    assert name == "set_config"
    assert request.args == {
        "patch": {
            "streams": {"door": {"events": {"min_score": 0.6, "labels": ["person"]}}, "yard": None},
            "logging": {"level": "DEBUG"},
        }
    }


def test_cmd_set_that_is_not_key_value_or_not_for_set_config_exits_2_before_sending(
    broker: Mosquitto,
) -> None:
    with MqttProbe(broker) as probe:
        probe.subscribe("edgefleet/v1/dev1/cmd/#")

        no_value = edgefleet("cmd", "dev1", "set_config", "--set", "streams.door", "--insecure",
                             "--host", broker.host, "--port", broker.port)  # fmt: skip
        clash = edgefleet("cmd", "dev1", "set_config", "--set", "a=1", "--set", "a.b=2",
                          "--insecure", "--host", broker.host, "--port", broker.port)  # fmt: skip
        not_config = edgefleet("cmd", "dev1", "ping", "--set", "a=1", "--insecure",
                               "--host", broker.host, "--port", broker.port)  # fmt: skip

        assert probe.messages() == []
    assert_clean_failure(no_value, 2, "is not KEY=VALUE")
    assert_clean_failure(clash, 2, "a is set to a value already")
    assert_clean_failure(not_config, 2, "--set is for set_config")


def test_cmd_help_names_the_command_argument_and_lists_every_command() -> None:
    result = edgefleet("cmd", "--help")

    assert result.returncode == 0
    assert "DEVICE COMMAND" in result.stdout
    for name, model in COMMAND_ARGS.items():
        line = next(
            line for line in result.stdout.splitlines() if line.startswith(f"  {name.value} ")
        )
        for field in model.model_fields:
            assert field in line


# -- keys list and manifest verify ------------------------------------------------------------


def test_keys_list_prints_each_key_id_as_the_device_computes_it(tmp_path: Path) -> None:
    assert edgefleet("keys", "generate", tmp_path, "--name", "fleet").returncode == 0
    assert edgefleet("keys", "generate", tmp_path, "--name", "prod").returncode == 0

    result = edgefleet("keys", "list", tmp_path)

    assert result.returncode == 0, result.stderr
    device_ids = TrustedKeys.from_paths([tmp_path]).key_ids
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert sorted((Path(r[2]).name, r[1]) for r in rows) == [
        ("fleet.key", "private"), ("fleet.pub", "public"),
        ("prod.key", "private"), ("prod.pub", "public"),
    ]  # fmt: skip
    assert {r[0] for r in rows} == device_ids
    by_file = {Path(r[2]).name: r[0] for r in rows}
    assert by_file["fleet.key"] == by_file["fleet.pub"] != by_file["prod.pub"]


def test_keys_list_marks_a_file_that_is_not_a_key_and_exits_2(tmp_path: Path) -> None:
    assert edgefleet("keys", "generate", tmp_path).returncode == 0
    (tmp_path / "notes.pub").write_text("not a key\n")

    result = edgefleet("keys", "list", tmp_path)
    missing = edgefleet("keys", "list", tmp_path / "nowhere")

    assert result.returncode == 2
    assert "notes.pub" in result.stdout
    assert "not a PEM public key" in result.stdout
    assert "fleet.pub" in result.stdout
    assert "1 of 3 files are not usable keys" in result.stderr
    assert_clean_failure(missing, 2, "no such folder")


def created_manifest(assets: Assets, keys: Path, out: Path, *extra: object) -> Path:
    result = edgefleet(
        "manifest", "create", assets.model(MOBILENET), "--model-id", "mobilenet", "--version", 3,
        "--url", "https://models.example/m.tflite", "--key", keys / "fleet.key", "--out", out,
        *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def test_manifest_verify_checks_the_signature_and_prints_what_it_says(
    assets: Assets, tmp_path: Path
) -> None:
    assert edgefleet("keys", "generate", tmp_path / "keys").returncode == 0
    signed = created_manifest(assets, tmp_path / "keys", tmp_path / "m.json", "--task",
                              "classification")  # fmt: skip

    by_key = edgefleet("manifest", "verify", signed, "--key", tmp_path / "keys" / "fleet.pub")
    by_dir = edgefleet("manifest", "verify", signed, "--keys-dir", tmp_path / "keys", "--json")

    assert by_key.returncode == 0, by_key.stderr
    key = SignedManifest.model_validate_json(signed.read_text()).key_id
    sha = hashlib.sha256(assets.model(MOBILENET).read_bytes()).hexdigest()
    lines = dict(line.split(None, 1) for line in by_key.stdout.splitlines())
    assert lines["signature"] == f"ok, key {key}"
    assert lines["model"] == "mobilenet version 3"
    assert lines["sha256"] == sha
    assert lines["task"] == "classification"
    assert lines["input"] == "[1, 128, 128, 3] uint8"
    assert by_dir.returncode == 0, by_dir.stderr
    assert Manifest.model_validate_json(by_dir.stdout).sha256 == sha


def test_manifest_create_allow_slower_is_signed_and_verify_says_which_pace_check_applies(
    assets: Assets, tmp_path: Path
) -> None:
    assert edgefleet("keys", "generate", tmp_path / "keys").returncode == 0
    default = created_manifest(assets, tmp_path / "keys", tmp_path / "default.json")
    slower = created_manifest(assets, tmp_path / "keys", tmp_path / "slower.json", "--allow-slower")

    shown = {}
    for name, signed in (("default", default), ("slower", slower)):
        verified = edgefleet("manifest", "verify", signed, "--key", tmp_path / "keys" / "fleet.pub")
        assert verified.returncode == 0, verified.stderr
        shown[name] = dict(line.split(None, 1) for line in verified.stdout.splitlines())["max"]

    assert not Manifest.model_validate_json(json_payload(default)).allow_slower
    assert Manifest.model_validate_json(json_payload(slower)).allow_slower
    assert "refused when much slower than the running model" in shown["default"]
    assert shown["slower"].endswith("no limit (allow_slower)")


def json_payload(signed: Path) -> str:
    return SignedManifest.model_validate_json(signed.read_text()).payload


def test_manifest_verify_refuses_another_key_and_an_altered_manifest_with_exit_3(
    assets: Assets, tmp_path: Path
) -> None:
    assert edgefleet("keys", "generate", tmp_path / "keys").returncode == 0
    assert edgefleet("keys", "generate", tmp_path / "other").returncode == 0
    signed = created_manifest(assets, tmp_path / "keys", tmp_path / "m.json")
    altered = tmp_path / "altered.json"
    altered.write_text(signed.read_text().replace('\\"version\\":3', '\\"version\\":4'))
    assert altered.read_text() != signed.read_text()

    other = edgefleet("manifest", "verify", signed, "--keys-dir", tmp_path / "other")
    changed = edgefleet("manifest", "verify", altered, "--keys-dir", tmp_path / "keys")
    no_key = edgefleet("manifest", "verify", signed)

    assert_clean_failure(other, 3, "not one of the keys given", "keys list")
    assert_clean_failure(changed, 3, "signature does not verify")
    assert_clean_failure(no_key, 2, "no public key to verify with")
    assert other.stdout == changed.stdout == ""


def test_manifest_verify_of_an_expired_manifest_prints_it_and_exits_3(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    (tmp_path / "fleet.pub").write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    expired = signed_manifest_file(tmp_path / "old.json", "ssd", expires_in_s=-60, key=key)

    result = edgefleet("manifest", "verify", expired, "--key", tmp_path / "fleet.pub")

    assert_clean_failure(result, 3, "the signature verifies, but it expired")
    assert "EXPIRED" in result.stdout


# -- deploy and cmd against a real agent ------------------------------------------------------
#
# One agent for the module (starting one per test would cost the suite minutes): stream
# 'cam' runs the small classifier, then version 10 of it deployed with the CLI. The last two
# tests change the device for good (a rollback, then the agent stopped) and come last.


@dataclass
class Device:
    """A real agent on a real broker, with version 10 of its classifier deployed by the CLI."""

    broker: Mosquitto
    agent: AgentProcess
    fleet: Fleet
    content: bytes
    v10: Path
    workdir: Path

    def cli(self, *args: object) -> subprocess.CompletedProcess[str]:
        """``edgefleet`` with this broker's options (plain: the test broker has no TLS)."""
        broker = self.broker
        return edgefleet(*args, "--insecure", "--host", broker.host, "--port", broker.port)

    def manifest(self, version: int, padding: int, *extra: object, tag: str = "") -> Path:
        """A release of the classifier (``padding`` bytes more: another sha256), signed by
        the CLI with the key the device trusts, its model served over HTTP."""
        content = variant(self.content, padding)
        name = f"classifier-{version}-{padding}{tag}.tflite"
        (self.workdir / name).write_bytes(content)
        url = self.fleet.server.add(name, content)
        out = self.workdir / f"{name}.json"
        created = edgefleet(
            "manifest", "create", self.workdir / name, "--model-id", "classifier",
            "--version", version, "--url", url, "--key", self.fleet.private_path, "--out", out,
            *extra,
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        return out

    def desired(self) -> DesiredState:
        """The retained desired state now."""
        held = retained_on(self.broker, Topics(DEVICE).desired)
        assert held is not None
        return DesiredState.model_validate_json(held)


@pytest.fixture(scope="module")
def device(
    assets: Assets, mosquitto_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Device]:
    workdir = tmp_path_factory.mktemp("cli-device")
    content = assets.model(SMALL).read_bytes()
    with Mosquitto(workdir / "broker") as broker, ModelServer() as server:
        probe = device_probe(broker)
        fleet = Fleet(workdir / "keys", server, probe, DEVICE)
        config = agent_config(workdir, broker.port, assets.model(SMALL), video(assets))
        with AgentProcess(workdir / "agent", config) as agent:
            probe.wait_until(fleet.reported, "the device's first reported state", 60)
            device = Device(broker, agent, fleet, content, Path(), workdir)
            device.v10 = device.manifest(10, 10)
            deployed = device.cli("deploy", DEVICE, STREAM, device.v10)
            assert deployed.returncode == 0, deployed.stderr
            fleet.wait_for_update(STREAM, 10, {"committed"}, timeout_s=90)
            yield device
        probe.disconnect()


def test_deploy_to_a_real_device_says_which_revision_it_set(device: Device) -> None:
    reported = device.fleet.reported()
    assert reported is not None
    assert reported.models[STREAM].version == "10"
    assert device.desired().models[STREAM] == SignedManifest.model_validate_json(
        device.v10.read_text()
    )


def test_deploy_to_a_stream_the_device_does_not_run_is_refused_and_changes_nothing(
    device: Device,
) -> None:
    before = device.desired()

    result = device.cli("deploy", DEVICE, "attic", device.v10)

    assert_clean_failure(result, 3, f"{DEVICE} does not run stream 'attic' (its streams: cam)")
    assert device.desired() == before


def test_forced_deploy_to_a_stream_not_run_warns_and_undeploy_removes_the_entry(
    device: Device,
) -> None:
    forced = device.cli("deploy", DEVICE, "attic", device.v10, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "warning: forced despite: dev-ota does not run stream 'attic'" in forced.stderr
    assert "attic" in device.desired().models
    # Every later deploy points at the stale entry.
    again = device.cli("deploy", DEVICE, STREAM, device.v10)
    assert "names stream 'attic', which it does not run" in again.stderr
    assert f"edgefleet undeploy {DEVICE} attic" in again.stderr
    revision = device.desired().revision

    removed = device.cli("undeploy", DEVICE, "attic")
    twice = device.cli("undeploy", DEVICE, "attic")

    assert removed.returncode == 0, removed.stderr
    assert "keeps running the model it has" in removed.stdout
    desired = device.desired()
    assert desired.revision == revision + 1
    assert set(desired.models) == {STREAM}
    assert_clean_failure(
        twice,
        3,
        "names no model for stream 'attic'",
    )


def test_deploy_of_the_deployed_and_running_manifest_changes_nothing(device: Device) -> None:
    before = device.desired()

    result = device.cli("deploy", DEVICE, STREAM, device.v10)

    assert result.returncode == 0, result.stderr
    assert "already runs this model" in result.stderr
    assert f"is the desired model already (revision {before.revision}); nothing changed" in (
        result.stdout
    )
    assert device.desired() == before


def test_deploy_of_a_version_not_newer_than_the_installed_one_is_refused(device: Device) -> None:
    older = device.manifest(9, 9)
    before = device.desired()

    result = device.cli("deploy", DEVICE, STREAM, older)

    assert_clean_failure(result, 3, "version 9 is not newer than version 10", "--rollback")
    assert device.desired() == before


def test_deploy_of_the_running_bytes_signed_again_under_the_same_version_is_refused(
    device: Device,
) -> None:
    resigned = device.manifest(10, 10, tag="-again")  # the bytes cam runs, signed anew
    before = device.desired()

    result = device.cli("deploy", DEVICE, STREAM, resigned)

    assert_clean_failure(result, 3, "version 10 is not newer than version 10", "as a replay")
    assert device.desired() == before


def test_deploy_needing_a_newer_agent_is_refused(device: Device) -> None:
    future = device.manifest(11, 11, "--min-agent-version", "999.0")

    result = device.cli("deploy", DEVICE, STREAM, future)

    assert_clean_failure(result, 3, "the manifest needs agent 999.0 or newer")


def test_cmd_prints_one_line_for_a_person_by_default(device: Device) -> None:
    ping = device.cli("cmd", DEVICE, "ping")
    models = device.cli("cmd", DEVICE, "list_models")

    assert ping.returncode == 0, ping.stderr
    assert ping.stdout.startswith(f"{DEVICE} ping: pong, agent up ")
    assert len(ping.stdout.splitlines()) == 1
    assert models.stdout.startswith(f"{DEVICE} list_models: cam runs classifier 10; ")
    status = device.cli("cmd", DEVICE, "get_status")
    config = device.cli("cmd", DEVICE, "get_config")
    assert status.stdout.startswith(f"{DEVICE} get_status: cam running "), status.stdout
    assert config.stdout == f"{DEVICE} get_config: device {DEVICE}, streams: cam\n"


def test_cmd_snapshot_out_saves_the_image_the_reply_carries(device: Device) -> None:
    out = device.workdir / "cam.jpg"

    result = device.cli("cmd", DEVICE, "snapshot", "stream=cam", "--out", out, "--json")

    assert result.returncode == 0, result.stderr
    reply = CommandReply.model_validate_json(result.stdout)
    assert reply.result is not None
    assert out.read_bytes() == base64.b64decode(reply.result["jpeg_base64"])
    with Image.open(out) as image:
        assert image.format == "JPEG"
        assert image.size == (reply.result["width"], reply.result["height"])
    assert f"saved {len(out.read_bytes()) / 1024:.0f} KiB to {out}" in result.stderr


def test_the_snapshot_line_says_what_the_device_hid() -> None:
    shot = {"stream": "cam", "width": 64, "height": 48, "quality": 90, "jpeg_base64": "AAAA"}

    faces = describe("snapshot", {**shot, "redacted": {"mode": "faces", "regions": 2}}, "")
    plain = describe("snapshot", {**shot, "redacted": {"mode": "none", "regions": 0}}, "")
    older = describe("snapshot", shot, "")  # an agent from before redaction

    assert (
        faces == "cam 64x48 JPEG, 0 KiB (quality 90, faces hidden: 2); save it with --out FILE.jpg"
    )
    assert "(quality 90, not redacted)" in plain
    assert "(quality 90)" in older


def test_cmd_set_config_set_changes_the_one_setting_in_the_devices_file(device: Device) -> None:
    path = device.agent.config_path
    before = yaml.safe_load(path.read_text())

    result = device.cli("cmd", DEVICE, "set_config", "--set", "streams.cam.events.min_score=0.25")
    again = device.cli("cmd", DEVICE, "set_config", "--set", "streams.cam.events.min_score=0.25")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{DEVICE} set_config: wrote {path}; streams restarted: cam\n"
    assert again.stdout == f"{DEVICE} set_config: {path} says that already; nothing changed\n"
    after = yaml.safe_load(path.read_text())
    before["streams"][0]["events"]["min_score"] = 0.25
    assert after == before


def test_deploy_of_the_manifest_the_device_rolled_back_is_refused(device: Device) -> None:
    # Changes the device: cam goes back to the config's model. Runs after the tests above.
    rolled = device.cli("cmd", DEVICE, "rollback_model", "stream=cam")
    assert rolled.returncode == 0, rolled.stderr
    assert rolled.stdout.startswith(f"{DEVICE} rollback_model: stream cam rolled back to ")
    # The device reports rolled_back, and then, as the retained desired state still names
    # version 10, may report that manifest refused: either says the rollback is done.
    device.fleet.wait_for_update(STREAM, 10, {"rolled_back", "refused"})

    result = device.cli("deploy", DEVICE, STREAM, device.v10)
    forced = device.cli("deploy", DEVICE, STREAM, device.v10, "--force")

    # Seeing the same manifest again, the device may report it refused (it was rolled back):
    # the CLI refuses on either.
    assert_clean_failure(result, 3, "dev-ota/cam ", " classifier version 10 before: ")
    assert "it does not try the same manifest again" in result.stderr
    assert forced.returncode == 0, forced.stderr
    assert "forced despite: dev-ota/cam " in forced.stderr


def test_deploy_to_a_device_gone_offline_warns_and_sets_it(device: Device) -> None:
    # Stops the agent: the last test of the module.
    assert device.agent.terminate() == 0
    status = Topics(DEVICE).status
    device.fleet.probe.wait_until(
        lambda: b'"offline"' in (retained_on(device.broker, status) or b""), "offline status", 30
    )
    newer = device.manifest(12, 12)

    result = device.cli("deploy", DEVICE, STREAM, newer)

    assert result.returncode == 0, result.stderr
    assert f"warning: {DEVICE} is offline since " in result.stderr
    assert "it acts on this when it reconnects" in result.stderr
    assert device.desired().models[STREAM] == SignedManifest.model_validate_json(newer.read_text())


# -- the deploy decision, without a broker ----------------------------------------------------


def _record(*, status: str | None, streams: list[str], **fields: Any) -> DeviceRecord:
    model = ModelRef(id="m", version="1", sha256="c" * 64, task="raw", backend="b", delegate="cpu")
    reported = ReportedState(device_id="pi", ts=1.0, agent_version="0.1.0",
                             models=dict.fromkeys(streams, model))  # fmt: skip
    online = status == "online"
    message = StatusMessage(state=status, device_id="pi", ts=1.0, streams=streams if online else [])
    return DeviceRecord(status=message if status else None, reported=reported, **fields)


def _signed(tmp_path: Path) -> tuple[SignedManifest, Manifest]:
    path = signed_manifest_file(tmp_path / "m.json", "ssd")
    signed = SignedManifest.model_validate_json(path.read_text())
    return signed, Manifest.model_validate_json(signed.payload)


def test_judge_deploy_takes_an_offline_devices_streams_from_its_reported_state(
    tmp_path: Path,
) -> None:
    signed, manifest = _signed(tmp_path)
    offline = _record(status="offline", streams=["door"])

    to_door = judge_deploy("pi", "door", signed, manifest, offline)
    to_attic = judge_deploy("pi", "attic", signed, manifest, offline)

    assert to_door.refusals == []
    assert any("pi is offline since" in f.reason for f in to_door.findings)
    assert [f.reason.split(" (")[0] for f in to_attic.refusals] == [
        "pi does not run stream 'attic'"
    ]


def test_judge_deploy_warns_but_does_not_refuse_when_the_status_does_not_parse(
    tmp_path: Path,
) -> None:
    signed, manifest = _signed(tmp_path)
    unreadable = DeviceRecord(unreadable=("status",))

    judgement = judge_deploy("pi", "door", signed, manifest, unreadable)

    assert judgement.refusals == []
    reasons = [f.reason for f in judgement.findings]
    assert reasons == [
        "cannot read the retained status of pi; not checked against it",
        "cannot tell which streams pi runs; not checked",
    ]


def _judged_against_marks(**fields: Any) -> list[str]:
    """The refusals of deploying a manifest with ``fields`` to a device that reports, for
    stream door (running sha256 cc..), marks sequence 7 and version 3 of line ssd."""
    now = time.time()
    values: dict[str, Any] = {
        "model_id": "ssd", "version": 4, "sequence": 8, "sha256": "ab" * 32, "size": 1000,
        "artifact": "ssd.tflite", "urls": ["https://models.example/ssd.tflite"],
        "inputs": [TensorSpec(shape=(1, 128, 128, 3), dtype="uint8")],
        "issued_at": now, "expires_at": now + DAY_S,
    }  # fmt: skip
    manifest = Manifest.model_validate({**values, **fields})
    signed = sign_manifest(manifest, Ed25519PrivateKey.generate())
    record = _record(status="online", streams=["door"])
    assert record.reported is not None
    marks = StreamMarks(line="ssd", lines={"ssd": LineMark(sequence=7, version=3)})
    record = replace(record, reported=record.reported.model_copy(update={"marks": {"door": marks}}))
    judgement = judge_deploy("pi", "door", signed, manifest, record)
    return [f.reason for f in judgement.refusals]


def test_judge_deploy_accepts_what_is_newer_than_the_devices_marks() -> None:
    assert _judged_against_marks() == []


def test_judge_deploy_refuses_a_sequence_the_device_accepted_already() -> None:
    (reason,) = _judged_against_marks(sequence=7)
    assert reason.startswith("sequence 7 is not newer than 7, the newest pi/door accepted")


def test_judge_deploy_refuses_a_version_the_device_ran_already_unless_a_rollback() -> None:
    (reason,) = _judged_against_marks(version=3)
    assert reason.startswith("version 3 is not newer than version 3")
    assert _judged_against_marks(version=2, rollback_from={"version": 3, "sha256": "c" * 64}) == []


def test_judge_deploy_refuses_a_rollback_from_a_model_the_device_does_not_run() -> None:
    (reason,) = _judged_against_marks(version=2, rollback_from={"version": 3, "sha256": "d" * 64})
    assert "a rollback from sha256 dddddddddddd, but pi/door runs cccccccccccc" in reason


def test_judge_deploy_refuses_another_model_line_unless_it_replaces_the_devices() -> None:
    (reason,) = _judged_against_marks(model_id="yolo")
    assert "model yolo is not pi/door's model line ssd" in reason
    assert _judged_against_marks(model_id="yolo", replaces_model_id="ssd") == []


def test_the_next_desired_revision_is_above_the_one_the_device_saw() -> None:
    record = _record(status="online", streams=["door"], desired=DesiredState(revision=2))
    assert record.reported is not None
    record = replace(record, reported=record.reported.model_copy(update={"desired_revision": 9}))

    assert next_revision(record) == 10
