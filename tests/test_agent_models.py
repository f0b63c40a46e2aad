"""The agent on models beyond SSD and classifiers: YOLOv8n and DeepLab on the kite video.

A real agent process, Mosquitto and the real models; every event is parsed by the
protocol's own ``EventMessage`` model, so a payload the contract does not allow fails.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import tflite_builder as tb
from agentproc import AgentProcess
from broker import Mosquitto
from conftest import Assets
from PIL import Image
from test_agent import agent_config, events, subscriber

from edgefleet.agent.config import StreamSettings
from edgefleet.agent.pipeline import StreamRunner
from edgefleet.agent.protocol import EventMessage, Topics

LEFT_HALF = [(0.0, 0.0), (0.5, 0.0), (0.5, 1.0), (0.0, 1.0)]


@pytest.fixture
def two_model_config(assets: Assets, broker: Mosquitto, tmp_path: Path) -> dict:
    config = agent_config(assets, broker.port, tmp_path)
    video = config["streams"][0]["source"]
    config["streams"] = [
        {
            "name": "yolo",
            "source": video,
            "model": {
                "path": str(assets.model("yolov8n_coco_float.tflite")),
                "labels": str(assets.model("coco80_labels.txt")),
                "threads": 1,
            },
            "events": {"labels": ["person", "kite"]},
        },
        {
            "name": "segments",
            "source": video,
            "model": {
                "path": str(assets.model("deeplabv3_mnv2_pascal_quant.tflite")),
                "labels": str(assets.model("pascal_voc_segmentation_labels.txt")),
                "threads": 1,
            },
            "events": {
                "labels": ["person"],
                "min_coverage": 0.005,
                "min_interval_s": 0.5,
                "zones": [{"name": "left", "polygon": LEFT_HALF}],
            },
        },
    ]
    return config


def test_yolo_and_segmentation_streams_publish_events_the_protocol_accepts(
    two_model_config: dict, broker: Mosquitto, tmp_path: Path
) -> None:
    probe = subscriber(broker)
    with AgentProcess(tmp_path / "agent", two_model_config):
        probe.wait_until(
            lambda: (
                {("yolo", "person"), ("yolo", "kite"), ("segments", "person")}
                <= {(e.stream, e.label) for e in events(probe)}
            ),
            "YOLO person and kite events and a segmentation event",
            120,
        )
    received = events(probe)  # each parsed by EventMessage: the contract holds
    yolo = [e for e in received if e.stream == "yolo"]
    segmented = [e for e in received if e.stream == "segments"]

    assert {e.kind for e in yolo} == {"detection"}
    assert {e.model.task for e in yolo} == {"detection"}
    for event in yolo:
        assert event.detections
        for detection in event.detections:
            ymin, xmin, ymax, xmax = detection.box
            assert 0.0 <= ymin < ymax <= 1.0
            assert 0.0 <= xmin < xmax <= 1.0

    assert {e.kind for e in segmented} == {"segmentation"}
    for event in segmented:
        assert event.segments
        person = next(s for s in event.segments if s.label == "person")
        assert max(person.coverage, *person.zones.values()) >= 0.005  # of the frame or the zone
        assert set(person.zones) == {"left"}
        assert 0.0 <= person.zones["left"] <= 1.0
        assert event.label == "person"
        assert [s.label for s in event.segments] == ["person"]  # background left out
    # The zone is named in an event only while the class covers enough of it.
    for event in segmented:
        covered = event.segments[0].zones["left"] >= 0.005
        assert (event.zones == ["left"]) is covered


class _Events:
    def __init__(self) -> None:
        self.messages: list[EventMessage] = []

    def emit(self, stream: str, topic: str, payloads: list[bytes]) -> None:
        self.messages.extend(EventMessage.model_validate_json(p) for p in payloads)


def test_a_stream_carries_an_output_into_an_input_from_frame_to_frame(tmp_path: Path) -> None:
    model = tmp_path / "image_and_state.tflite"
    model.write_bytes(tb.image_and_state_model())
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.new("RGB", (4, 4), (255, 255, 255)).save(frames / "white.png")  # 1.0 in [-1, 1]
    settings = StreamSettings.model_validate(
        {
            "name": "rnn",
            "source": {"type": "images", "folder": str(frames), "interval_s": 0, "loop": True},
            "model": {"path": str(model), "task": "raw", "carry": {"state": "sum"}},
            "events": {"min_interval_s": 0},
        }
    )
    sink = _Events()
    runner = StreamRunner(settings, topics=Topics("dev-rnn"), sink=sink)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while len(sink.messages) < 5:
            assert time.monotonic() < deadline, "no events from the stream"
            time.sleep(0.05)
    finally:
        runner.stop()

    # Each frame's sum is the frame (1.0 everywhere) plus the previous sum: 1, 2, 3, ...
    firsts = [e.tensors[0].values[0][0][0][0] for e in sink.messages[:5]]  # type: ignore[index]
    assert firsts == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
