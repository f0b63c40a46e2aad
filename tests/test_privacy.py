"""Snapshots leave the device with faces hidden; one that cannot be redacted is not sent.

A real agent process and Mosquitto, the real MediaPipe face detector, grace_hopper.bmp
through an image-folder source, the snapshot command over MQTT 5.
"""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agentproc import AgentProcess, wait_until
from broker import Mosquitto
from conftest import Assets
from PIL import Image
from pydantic import ValidationError
from test_commands import REPLIES, TOPICS, Device, Requester, wait_answering

from edgefleet.agent.privacy import PrivacySettings, Redact, Redactor
from edgefleet.agent.protocol import ErrorCode
from edgefleet.runtime import Detection, Predictor, load_image

FACES = "mediapipe_face_detection_short_range.tflite"
SELFIE = "mediapipe_selfie_segmentation.tflite"


def _config(assets: Assets, port: int, workdir: Path, privacy: dict[str, Any]) -> dict[str, Any]:
    frames = workdir / "frames"
    frames.mkdir(exist_ok=True)
    shutil.copyfile(assets.image("grace_hopper.bmp"), frames / "grace_hopper.bmp")
    return {
        "device_id": TOPICS.device_id,
        "broker": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.2},
        "streams": [
            {
                "name": "kite",  # the stream name test_commands' helpers expect
                "source": {"type": "images", "folder": str(frames), "interval_s": 0.5},
                "model": {"path": str(assets.model("mobilenet_v1_0.25_128_quant.tflite"))},
                "events": {"min_interval_s": 3600},
                "privacy": privacy,
            }
        ],
        "outbox": {"path": str(workdir / "outbox.sqlite3")},
        "updates": {"store_dir": str(workdir / "store"), "trusted_keys": []},
        "health": {"interval_s": 1},
    }


@pytest.fixture
def device_with(assets: Assets, mosquitto_binary: Path, tmp_path: Path) -> Iterator[Any]:
    """Start an agent whose stream has the given privacy settings; yields a ``Device``."""
    running: list[Any] = []

    def start(privacy: dict[str, Any]) -> Device:
        broker = Mosquitto(tmp_path / "broker").__enter__()
        client = Requester(broker, "operator").__enter__()
        agent = AgentProcess(
            tmp_path / "agent", _config(assets, broker.port, tmp_path, privacy)
        ).__enter__()
        running.extend([agent, client, broker])
        client.subscribe(f"{REPLIES}/#")
        client.subscribe(TOPICS.health)
        device = Device(broker, agent, client, assets.model(FACES))
        wait_answering(device)
        return device

    yield start
    for part in running:
        part.__exit__(None, None, None)


def _snapshot(device: Device) -> tuple[dict[str, Any], np.ndarray]:
    reply = device.ask("snapshot", {"stream": "kite", "max_bytes": 2_000_000})
    assert reply.ok, reply
    result = reply.result
    assert result is not None
    image = Image.open(io.BytesIO(base64.b64decode(result["jpeg_base64"]))).convert("RGB")
    return result, np.asarray(image).astype(np.int16)


def _face_box(assets: Assets, pixels: np.ndarray) -> tuple[int, int, int, int] | None:
    with Predictor.open(assets.model(FACES), min_score=0.5) as faces:
        found = [r for r in faces.predict(pixels.astype(np.uint8)).results]
    if not found:
        return None
    (face,) = found
    assert isinstance(face, Detection)
    height, width = pixels.shape[:2]
    ymin, xmin, ymax, xmax = face.box
    return round(ymin * height), round(xmin * width), round(ymax * height), round(xmax * width)


def test_a_snapshot_with_faces_redacted_hides_the_face_and_nothing_else(
    assets: Assets, device_with: Any
) -> None:
    original = load_image(assets.image("grace_hopper.bmp")).astype(np.int16)
    box = _face_box(assets, original)
    assert box is not None
    top, left, bottom, right = box

    device = device_with({"face_model": str(assets.model(FACES))})  # faces by default
    result, snapshot = _snapshot(device)

    assert result["redacted"] == {"mode": "faces", "regions": 1}
    assert snapshot.shape == original.shape  # the full frame, not the model's input
    difference = np.abs(snapshot - original).mean(axis=2)
    inside = difference[top:bottom, left:right].mean()
    outside = np.ones(difference.shape, dtype=bool)
    # The hidden patch is the face box widened by the margin (25%): leave that out too.
    margin_y, margin_x = (bottom - top) // 4, (right - left) // 4
    outside[
        max(0, top - margin_y) : bottom + margin_y, max(0, left - margin_x) : right + margin_x
    ] = False
    assert inside > 15, inside  # filled: the face's detail is gone
    assert difference[outside].mean() < 3  # elsewhere only JPEG's rounding
    assert _face_box(assets, snapshot) is None  # the detector finds no face left

    wait_until(
        lambda: [h for h in device.healths() if h.streams["kite"].redacted_regions == 1],
        "a health message counting the redacted face",
        30,
        device.agent.log,
    )


def test_a_face_model_that_fails_sends_no_snapshot_and_says_why(
    assets: Assets, device_with: Any, tmp_path: Path
) -> None:
    broken = tmp_path / "faces.tflite"
    broken.write_bytes(Path(assets.model("model_invoking_error.tflite")).read_bytes())

    device = device_with({"redact": "faces", "face_model": str(broken)})
    reply = device.ask("snapshot", {"stream": "kite"})

    assert not reply.ok, reply
    assert reply.error is ErrorCode.FAILED
    assert "the faces model could not run, so the snapshot is not sent" in reply.message
    assert "fake-op-double" in reply.message
    assert reply.result is None


def test_redact_none_is_a_deliberate_choice_and_people_need_their_model(assets: Assets) -> None:
    assert PrivacySettings().mode is Redact.NONE
    assert PrivacySettings(face_model=assets.model(FACES)).mode is Redact.FACES
    assert PrivacySettings(redact=Redact.NONE, face_model=assets.model(FACES)).mode is Redact.NONE
    with pytest.raises(ValidationError, match="redact: people needs people_model"):
        PrivacySettings(redact=Redact.PEOPLE)


def test_people_redaction_pixelates_the_persons_pixels(assets: Assets) -> None:
    frame = load_image(assets.image("grace_hopper.bmp"))
    redactor = Redactor(PrivacySettings(redact=Redact.PEOPLE, people_model=assets.model(SELFIE)))
    try:
        redacted = redactor.redact(frame)
    finally:
        redactor.close()

    changed = np.abs(redacted.pixels.astype(np.int16) - frame).mean(axis=2) > 8
    assert redacted.regions == 1
    assert 0.3 < changed.mean() < 0.9  # the person, not the whole frame
    assert _face_box(assets, redacted.pixels.astype(np.int16)) is None
