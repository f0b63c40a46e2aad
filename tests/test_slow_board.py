"""A slow board: the real SSD detector on a real agent, fed one frame every few seconds.

At such a rate the old fixed tracking (``end_after_s`` 1 s, ``min_hits`` 3) ended every
track before it was confirmed and published nothing. The defaults now follow the measured
frame interval; explicit settings that cannot work at that rate are a health warning.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from agentproc import AgentProcess
from broker import Mosquitto, MqttProbe
from conftest import Assets

from edgefleet.agent.protocol import EventMessage, HealthMessage

DEVICE = "dev-slow"
ROOT = f"edgefleet/v1/{DEVICE}"
FRAME_INTERVAL_S = 2.0  # an image every 2 s: well past the old end_after_s of 1 s


def slow_config(
    assets: Assets, port: int, workdir: Path, tracking: dict[str, Any]
) -> dict[str, Any]:
    """The SSD detector on a photo of a person, one frame every FRAME_INTERVAL_S."""
    frames = workdir / "frames"
    frames.mkdir(parents=True)
    shutil.copy(assets.image("grace_hopper.bmp"), frames / "grace_hopper.bmp")
    return {
        "device_id": DEVICE,
        "broker": {"host": "127.0.0.1", "port": port},
        "streams": [
            {
                "name": "door",
                "source": {"type": "images", "folder": str(frames), "interval_s": FRAME_INTERVAL_S},
                "model": {"path": str(assets.ssd), "labels": str(assets.coco_labels)},
                "events": {"labels": ["person"], "tracking": tracking},
            }
        ],
        "outbox": {"path": str(workdir / "outbox.sqlite3")},
        "updates": {"store_dir": str(workdir / "store"), "trusted_keys": []},
        "health": {"interval_s": 1},
    }


def observer(broker: Mosquitto) -> MqttProbe:
    probe = MqttProbe(broker, "observer", timeout_s=60)
    probe.connect()
    probe.subscribe(f"{ROOT}/#", qos=1)
    return probe


def door_health(probe: MqttProbe) -> list[HealthMessage]:
    return [
        HealthMessage.model_validate_json(m.payload)
        for m in probe.messages(f"{ROOT}/health")
        if b'"door"' in m.payload
    ]


def test_a_slow_stream_with_default_tracking_publishes_the_person_it_sees(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    probe = observer(broker)
    config = slow_config(assets, broker.port, tmp_path, tracking={})
    with AgentProcess(tmp_path / "agent", config) as agent:
        start = probe.wait_until(
            lambda: next(
                (
                    e
                    for e in (
                        EventMessage.model_validate_json(m.payload)
                        for m in probe.messages(f"{ROOT}/events/door")
                    )
                    if e.lifecycle == "start"
                ),
                None,
            ),
            "a start event",
            90,
        )
        health = probe.wait_until(
            lambda: next(
                (h for h in door_health(probe) if h.streams["door"].frame_interval_s), None
            ),
            "health with the measured frame interval",
            30,
        )
        assert "cannot be met" not in agent.log()
    probe.disconnect()

    assert start.label == "person"
    door = health.streams["door"]
    assert door.frame_interval_s is not None
    assert door.frame_interval_s >= FRAME_INTERVAL_S * 0.9  # paced by the source, not faster
    assert door.warnings == []


def test_tracking_that_cannot_work_at_the_measured_rate_is_a_health_warning(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    probe = observer(broker)
    config = slow_config(assets, broker.port, tmp_path, tracking={"end_after_s": 1.0})
    with AgentProcess(tmp_path / "agent", config) as agent:
        warned = probe.wait_until(
            lambda: next((h for h in door_health(probe) if h.streams["door"].warnings), None),
            "a health warning about tracking",
            90,
        )
        agent.wait_for_log("tracking.end_after_s 1 s cannot be met", 30)
        events = probe.messages(f"{ROOT}/events/door")
    probe.disconnect()

    (warning,) = warned.streams["door"].warnings
    assert "tracking.end_after_s 1 s cannot be met" in warning
    assert "no detection becomes an event" in warning
    assert "unset end_after_s" in warning
    assert events == []
