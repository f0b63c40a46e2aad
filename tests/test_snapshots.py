"""A stream's own snapshots: taken when a tracked object starts, redacted, sent over MQTT
and shown in Home Assistant's image entity.

The rule's decisions and its thread run here with real callbacks; end to end, a real agent
process and Mosquitto, the SSD detector finding the person in grace_hopper.bmp (an
image-folder source) and the MediaPipe face detector hiding her face.
"""

from __future__ import annotations

import base64
import io
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agentproc import AgentProcess, wait_until
from broker import Mosquitto
from conftest import Assets
from PIL import Image
from test_agent import DEVICE, ROOT, agent_config, events, healths, subscriber
from test_homeassistant import (
    PREFIX,
    HaImage,
    check_discovery_payload,
    expected_plan,
    retained_under,
    track,
)
from test_privacy import FACES, _face_box

from edgefleet.agent.config import ConfigError, SnapshotRuleSettings, parse_config
from edgefleet.agent.privacy import Redact
from edgefleet.agent.protocol import ErrorCode, SnapshotMessage
from edgefleet.agent.snapshots import Snapshot, SnapshotFailed, SnapshotRule, Trigger, trigger
from edgefleet.runtime import load_image

RULE = SnapshotRuleSettings(on_track_start=True, labels=["person"], min_interval_s=10)


SHOT = Snapshot(
    jpeg=b"\xff\xd8jpeg",
    capture_ts=1.0,
    frame_width=64,
    frame_height=48,
    width=64,
    height=48,
    quality=90,
    redact=Redact.FACES,
    regions=1,
)


# -- which events take one ------------------------------------------------------------


def test_the_start_of_a_wanted_label_takes_a_snapshot_and_nothing_else_does() -> None:
    assert trigger(RULE, [track("update", 1), track("start", 4)]) == Trigger(4, "person")
    assert trigger(RULE, [track("start", 5, "car"), track("start", 6)]) == Trigger(6, "person")
    assert trigger(RULE, [track("update", 1), track("end", 1)]) is None
    assert trigger(RULE, [track(None, None)]) is None  # untracked
    assert trigger(RULE, [track("start", 5, "car")]) is None
    any_label = SnapshotRuleSettings(on_track_start=True)
    assert trigger(any_label, [track("start", 5, "car")]) == Trigger(5, "car")
    assert trigger(SnapshotRuleSettings(), [track("start", 1)]) is None  # off by default


def test_a_rule_on_a_stream_without_tracking_is_refused_with_the_fix() -> None:
    stream = {
        "name": "door",
        "source": {"type": "synthetic"},
        "model": {"path": "detect.tflite"},
        "events": {"tracking": {"enabled": False}},
        "snapshots": {"on_track_start": True},
    }
    with pytest.raises(ConfigError, match=r"needs events\.tracking\.enabled: true"):
        parse_config({"device_id": "d", "streams": [stream]}, "agent.yaml", base_dir=Path("/"))


def test_a_rule_snapshot_must_fit_the_brokers_packet_limit() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        SnapshotRuleSettings(max_bytes=600_000)


# -- the rule's thread --------------------------------------------------------------


class Recorder:
    """What the rule published, and a snapshot source that can be made to fail."""

    def __init__(self) -> None:
        self.published: list[Trigger] = []
        self.failure: SnapshotFailed | None = None
        self.changed = threading.Condition()

    def take(self, max_bytes: int) -> Snapshot:
        assert max_bytes == RULE.max_bytes
        if self.failure is not None:
            raise self.failure
        return SHOT

    def publish(self, shot: Snapshot, why: Trigger) -> None:
        assert shot is SHOT
        with self.changed:
            self.published.append(why)
            self.changed.notify_all()


def rule_with(recorder: Recorder, now: list[float]) -> SnapshotRule:
    rule = SnapshotRule(
        "door", RULE, take=recorder.take, publish=recorder.publish, clock=lambda: now[0]
    )
    rule.start()
    return rule


def test_one_snapshot_per_interval_however_many_objects_start() -> None:
    recorder, now = Recorder(), [100.0]
    rule = rule_with(recorder, now)
    try:
        rule.offer([track("start", 1)])
        wait_until(lambda: rule.published == 1, "the first snapshot", 30)
        now[0] += RULE.min_interval_s - 1
        rule.offer([track("start", 2)])  # within the interval: none
        now[0] += 1
        rule.offer([track("start", 3)])
        wait_until(lambda: rule.published == 2, "the next interval's snapshot", 30)
    finally:
        rule.stop()

    assert recorder.published == [Trigger(1, "person"), Trigger(3, "person")]
    assert rule.failed == 0


def test_a_snapshot_that_cannot_be_taken_is_counted_and_the_rule_goes_on() -> None:
    recorder, now = Recorder(), [100.0]
    recorder.failure = SnapshotFailed(ErrorCode.FAILED, "the faces model could not run")
    rule = rule_with(recorder, now)
    try:
        rule.offer([track("start", 1)])
        wait_until(lambda: rule.failed == 1, "the failure counted", 30)
        assert rule.last_error == "the faces model could not run"
        recorder.failure = None
        now[0] += RULE.min_interval_s
        rule.offer([track("start", 2)])
        wait_until(lambda: rule.published == 1, "a snapshot once it can be taken", 30)
    finally:
        rule.stop()

    assert recorder.published == [Trigger(2, "person")]
    assert rule.last_error is None


# -- end to end -------------------------------------------------------------------------


def _config(assets: Assets, port: int, workdir: Path) -> dict[str, Any]:
    frames = workdir / "frames"
    frames.mkdir()
    shutil.copyfile(assets.image("grace_hopper.bmp"), frames / "grace_hopper.bmp")
    config = agent_config(assets, port, workdir)
    config["homeassistant"] = {"enabled": True}
    config["streams"][0].update(
        source={"type": "images", "folder": str(frames), "interval_s": 0.5},
        events={"labels": ["person"]},
        privacy={"face_model": str(assets.model(FACES))},  # redact: faces, by default
        snapshots={"on_track_start": True, "labels": ["person"], "min_interval_s": 1},
    )
    return config


def test_a_person_who_appears_is_sent_as_a_redacted_snapshot_to_mqtt_and_home_assistant(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    config = _config(assets, broker.port, tmp_path)
    plan = expected_plan(config)
    image_topic = plan.image_topic("kite")
    assert image_topic is not None
    (image_config,) = [plan.config_topic(e) for e in plan.entities if e.component == "image"]
    probe = subscriber(broker)
    probe.subscribe(f"{PREFIX}/#", qos=1)
    with AgentProcess(tmp_path / "agent", config) as agent:
        received = probe.wait_for_message(f"{ROOT}/snapshots/kite")
        shown = probe.wait_for_message(image_topic)
        health = probe.wait_until(
            lambda: next(
                (h for h in healths(probe) if h.streams["kite"].snapshots_published), None
            ),
            "a health message counting the snapshot",
            60,
        )
        discovered = probe.wait_for_message(image_config)
        assert agent.terminate() == 0
    (kept,) = retained_under(broker, image_topic)
    probe.disconnect()

    snapshot = SnapshotMessage.model_validate_json(received.payload)
    starts = {e.track_id for e in events(probe) if e.lifecycle == "start" and e.label == "person"}
    assert snapshot.device_id == DEVICE
    assert snapshot.label == "person"
    assert snapshot.track_id in starts
    original = load_image(assets.image("grace_hopper.bmp"))
    assert (snapshot.frame_height, snapshot.frame_width) == original.shape[:2]
    assert snapshot.redacted.mode == "faces"
    assert snapshot.redacted.regions == 1
    jpeg = base64.b64decode(snapshot.jpeg_base64)
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.int16)
    assert pixels.shape == original.shape
    assert _face_box(assets, pixels) is None  # her face is gone
    assert _face_box(assets, original.astype(np.int16)) is not None  # and was there

    entity = check_discovery_payload(image_config, discovered.payload)
    assert isinstance(entity, HaImage)
    assert entity.image_topic == image_topic
    assert shown.payload == jpeg  # the JPEG itself, as Home Assistant's image wants it
    (*_, last) = probe.messages(f"{ROOT}/snapshots/kite")
    latest = SnapshotMessage.model_validate_json(last.payload)
    assert kept.payload == base64.b64decode(latest.jpeg_base64)  # retained: the latest one
    assert health.streams["kite"].snapshots_failed == 0
