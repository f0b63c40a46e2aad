"""Two-stage streams in a real agent: face detection then the face mesh on photos, the SSD
detector then a classifier on the kite video; one event per object carries both."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess
from broker import Mosquitto
from conftest import Assets
from test_agent import agent_config, events, healths, subscriber

from edgefleet.agent.protocol import ClassOut, EventMessage, LandmarksOut


@pytest.fixture
def two_stage_config(assets: Assets, broker: Mosquitto, tmp_path: Path) -> dict[str, Any]:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("grace_hopper.bmp", "astronaut.png"):
        shutil.copyfile(assets.image(name), photos / name)
    config = agent_config(assets, broker.port, tmp_path)
    video = config["streams"][0]["source"]
    config["streams"] = [
        {
            "name": "faces",
            "source": {"type": "images", "folder": str(photos), "interval_s": 0.3},
            "model": {"path": str(assets.model("mediapipe_face_detection_short_range.tflite"))},
            "stages": [
                {
                    "name": "mesh",
                    "model": {"path": str(assets.model("mediapipe_face_landmark.tflite"))},
                }
            ],
            "events": {"tracking": {"enabled": False}},
        },
        {
            "name": "kite",
            "source": video,
            "model": {"path": str(assets.ssd), "labels": str(assets.coco_labels), "threads": 1},
            "stages": [
                {
                    "name": "kind",
                    "model": {
                        "path": str(assets.mobilenet_v2),
                        "labels": str(assets.imagenet_labels),
                        "threads": 1,
                    },
                    "on_labels": ["person", "kite"],
                    "expand": 1.2,
                    "rotate": False,
                }
            ],
            "events": {"labels": ["person", "kite"]},
        },
    ]
    return config


def _meshed(event: EventMessage) -> bool:
    return bool(event.detections and event.detections[0].stages)


def test_second_stages_ride_in_the_first_stages_events(
    two_stage_config: dict[str, Any], broker: Mosquitto, tmp_path: Path
) -> None:
    probe = subscriber(broker)
    with AgentProcess(tmp_path / "agent", two_stage_config):
        probe.wait_until(
            lambda: (
                {"faces", "kite"} <= {e.stream for e in events(probe) if _meshed(e)}
                and len([e for e in events(probe) if e.stream == "faces"]) >= 4
            ),
            "events with second-stage results on both streams",
            120,
        )
        probe.wait_until(
            lambda: any(
                h.streams["faces"].stage_latency_p50_ms.get("mesh") for h in healths(probe)
            ),
            "the mesh's latency in health",
            60,
        )
    received = events(probe)

    faces = [e for e in received if e.stream == "faces"]
    assert faces
    for event in faces:
        (face,) = event.detections or []  # one face per photo, one event per face
        assert face.stages is not None
        (mesh,) = face.stages["mesh"]
        assert isinstance(mesh, LandmarksOut)
        assert len(mesh.points) == 468
        ymin, xmin, ymax, xmax = face.box
        slack = 0.15 * (ymax - ymin)  # the mesh reaches the forehead and chin a little past it
        xs, ys = [p[0] for p in mesh.points], [p[1] for p in mesh.points]
        assert ymin - slack <= min(ys) < max(ys) <= ymax + slack
        assert xmin - slack <= min(xs) < max(xs) <= xmax + slack

    kite = [e for e in received if e.stream == "kite" and _meshed(e)]
    assert kite
    for event in kite:
        (detection,) = event.detections or []
        assert detection.label in {"person", "kite"}
        assert detection.stages is not None
        classes = detection.stages["kind"]
        assert classes
        assert all(isinstance(c, ClassOut) for c in classes)  # the classifier's own labels

    latency = healths(probe)[-1].streams
    assert latency["faces"].stage_latency_p50_ms["mesh"] is not None
    assert latency["kite"].stage_latency_p50_ms["kind"] is not None
