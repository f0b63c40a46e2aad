"""Every model family the project runs goes over the air, with the manifest the CLI writes.

One agent starts on the small classifier; each test signs a release of another family with
``edgefleet manifest create`` (run as a user runs it: the installed command, in its own
process), deploys it through the retained ``desired`` topic of a real Mosquitto, and waits
until the device reports it committed and its events come from the new model. The SSD
detector is the case that was refused: its TFLite_Detection_PostProcess outputs have no shape
in the model file, and the manifest says so (shape null) instead of promising scalars.

The versions rise through the module (2, 3, ...), so any test also runs on its own.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agentproc import AgentProcess
from broker import Mosquitto, MqttProbe
from conftest import Assets
from fleet import (
    DEVICE,
    ROOT,
    SMALL,
    STREAM,
    Fleet,
    agent_config,
    device_probe,
    event_count,
    video,
)
from httpserver import ModelServer

from edgefleet.agent.protocol import EventMessage, Manifest, SignedManifest

EDGEFLEET = Path(sys.executable).with_name("edgefleet")
COMMIT_TIMEOUT_S = 120  # download, validation in its own process, probation, on a busy machine
EVENTS_TIMEOUT_S = 60
NEW_EVENTS = 3


@dataclass
class Device:
    """The agent, its controller, and where the CLI writes manifests."""

    agent: AgentProcess
    fleet: Fleet
    probe: MqttProbe
    server: ModelServer
    workdir: Path


@pytest.fixture(scope="module")
def device(
    assets: Assets, mosquitto_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Device]:
    workdir = tmp_path_factory.mktemp("families")
    with Mosquitto(workdir / "broker") as broker, ModelServer() as server:
        probe = device_probe(broker)
        fleet = Fleet(workdir / "agent" / "keys", server, probe, DEVICE)
        config = agent_config(workdir / "agent", broker.port, assets.model(SMALL), video(assets))
        # Pose and raw results are an event per min_interval_s: two a second is plenty here.
        config["streams"][0]["events"]["min_interval_s"] = 0.5
        with AgentProcess(workdir / "agent", config) as agent:
            yield Device(agent, fleet, probe, server, workdir)
        probe.disconnect()


def create_manifest(device: Device, model: Path, version: int, task: str) -> SignedManifest:
    """``edgefleet manifest create`` for ``model`` (served by the test's HTTP server)."""
    url = device.server.add(f"{model.stem}-{version}.tflite", model.read_bytes())
    out = device.workdir / f"{model.stem}-{version}.json"
    model_id = model.stem.split("_")[0]
    reported = device.fleet.reported()
    running = reported.models[STREAM].id if reported is not None else model_id
    # Another family is another model line: the manifest says which line it replaces.
    replaces = ["--replaces", running] if running != model_id else []
    command = [
        str(EDGEFLEET),
        "manifest",
        "create",
        str(model),
        "--model-id",
        model_id,
        *replaces,
        "--version",
        str(version),
        "--url",
        url,
        "--key",
        str(device.fleet.private_path),
        "--task",
        task,
        # Each family is a bigger model than the small classifier on purpose (SSD is ~30x
        # slower): the operator says so, else the device's default pace check refuses it.
        "--allow-slower",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return SignedManifest.model_validate_json(out.read_text())


def new_model_events(device: Device, sha256: str) -> list[EventMessage]:
    """The events the model with ``sha256`` produced, parsed (only those: raw ones are big)."""
    topic = f"{ROOT}/events/{STREAM}"
    return [
        EventMessage.model_validate_json(m.payload)
        for m in device.probe.messages(topic)
        if sha256.encode() in m.payload
    ]


def deploy_and_watch(device: Device, signed: SignedManifest) -> list[EventMessage]:
    """Deploy ``signed``; once committed and running, the new model's first events."""
    manifest = Manifest.model_validate_json(signed.payload)
    device.fleet.deploy(STREAM, signed)
    reported = device.fleet.wait_for_update(
        STREAM, manifest.version, {"committed", "refused", "rolled_back"}, COMMIT_TIMEOUT_S
    )
    update = reported.updates[STREAM]
    print(f"\n{manifest.model_id} v{manifest.version}: {update.state.value} {update.reason or ''}")
    assert update.state.value == "committed", update.reason
    assert reported.models[STREAM].sha256 == manifest.sha256
    device.probe.wait_until(
        lambda: event_count(device.probe, manifest.sha256.encode()) >= NEW_EVENTS,
        f"{NEW_EVENTS} events from {manifest.model_id} v{manifest.version}",
        EVENTS_TIMEOUT_S,
    )
    return new_model_events(device, manifest.sha256)


def test_ssd_detector_with_postprocess_is_committed_and_detects(
    device: Device, assets: Assets
) -> None:
    signed = create_manifest(device, assets.ssd, 2, "detection")
    outputs = Manifest.model_validate_json(signed.payload).outputs
    # The four TFLite_Detection_PostProcess outputs: no shape in the file, none promised.
    assert outputs is not None
    assert [(o.shape, o.dtype) for o in outputs] == [(None, "float32")] * 4

    found = deploy_and_watch(device, signed)

    assert {e.kind for e in found} == {"detection"}
    assert all(e.model.task == "detection" for e in found)
    assert any(e.detections for e in found)


def test_movenet_pose_is_committed_and_reports_keypoints(device: Device, assets: Assets) -> None:
    found = deploy_and_watch(device, create_manifest(device, assets.movenet, 3, "pose"))

    assert {e.kind for e in found} == {"pose"}
    assert all(e.keypoints is not None and len(e.keypoints) == 17 for e in found)


def test_raw_model_is_committed_and_reports_its_tensors(device: Device, assets: Assets) -> None:
    model = assets.model("mediapipe_face_landmark.tflite")  # float input, two plain outputs

    found = deploy_and_watch(device, create_manifest(device, model, 4, "raw"))

    assert {e.kind for e in found} == {"raw"}
    for event in found:
        assert event.tensors is not None
        assert [t.shape for t in event.tensors] == [(1, 1, 1, 1404), (1, 1, 1, 1)]


def test_classifier_is_committed_and_classifies(device: Device, assets: Assets) -> None:
    signed = create_manifest(device, assets.mobilenet_v2, 5, "classification")

    found = deploy_and_watch(device, signed)

    assert {e.kind for e in found} == {"classification"}
    assert all(e.classes for e in found)
