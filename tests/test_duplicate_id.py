"""Two agents with one device id: each is told so, at ERROR and in health, and they stop fighting.

Two real agent processes share a device id (and so an MQTT client id) on a real Mosquitto,
over MQTT 5 and 3.1.1. Mosquitto 2.0 closes the older connection without a DISCONNECT reason
on either protocol, so both runs exercise the pattern the agent reads: connections closed
by the broker right after it accepted them. (Brokers that send MQTT 5's reason 142, session
taken over, are recognised at once: tests/test_mqtt_link.py drives that decision.)
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import tflite_builder as tb
from agentproc import AgentProcess, wait_until
from broker import Mosquitto, MqttProbe

from edgefleet.agent.protocol import HealthMessage

DEVICE = "dev-twin"
ROOT = f"edgefleet/v1/{DEVICE}"
WINDOW_S = 15.0
# Before the fix, two agents reconnected 28 times in 15 s (both together, default settings).
# Once they back off, the window holds the connects that found the conflict and a few retries.
MAX_CONNECTS_IN_WINDOW = 14


def twin_config(model: Path, port: int, workdir: Path, protocol: str) -> dict[str, Any]:
    """A tiny model on a slow test pattern; reconnect and conflict settings left at default."""
    return {
        "device_id": DEVICE,
        "broker": {
            "host": "127.0.0.1",
            "port": port,
            "protocol": protocol,
        },
        "streams": [
            {
                "name": "pattern",
                "source": {"type": "synthetic", "width": 8, "height": 8, "fps": 2},
                "model": {"path": str(model), "task": "raw"},
                "events": {"min_interval_s": 3600},
            }
        ],
        "outbox": {"path": str(workdir / "outbox.sqlite3")},
        "updates": {"store_dir": str(workdir / "store"), "trusted_keys": []},
        "health": {"interval_s": 1},
    }


def connects(agent: AgentProcess) -> list[str]:
    """The 'connected to' lines of the agent's log."""
    return re.findall(r"^.* connected to 127\.0\.0\.1:\d+ .*$", agent.log(), re.M)


def error_lines(agent: AgentProcess) -> list[str]:
    """The ERROR lines of the agent's log."""
    return [line for line in agent.log().splitlines() if " ERROR " in line]


@pytest.mark.parametrize("protocol", ["mqtt5", "mqtt311"])
def test_two_agents_with_one_device_id_are_told_so_and_back_off(
    protocol: str, broker: Mosquitto, tmp_path: Path
) -> None:
    model = tmp_path / "flat.tflite"
    model.write_bytes(tb.reshape_model(8, 8))
    probe = MqttProbe(broker, "observer", timeout_s=30)
    probe.connect()
    probe.subscribe(f"{ROOT}/health", qos=0)
    first = AgentProcess(
        tmp_path / "first", twin_config(model, broker.port, tmp_path / "first", protocol)
    )
    second = AgentProcess(
        tmp_path / "second", twin_config(model, broker.port, tmp_path / "second", protocol)
    )
    with first:
        first.wait_for_log("connected to 127.0.0.1", 60)
        with second:
            second.wait_for_log("connected to 127.0.0.1", 60)
            window_start = len(connects(first)) + len(connects(second))
            time.sleep(WINDOW_S)
            in_window = len(connects(first)) + len(connects(second)) - window_start

            both = lambda: first.log() + "\n----\n" + second.log()  # noqa: E731
            wait_until(
                lambda: error_lines(first) and error_lines(second),
                "an ERROR line in both agents' logs",
                30,
                both,
            )
            problems = probe.wait_until(
                lambda: [
                    h.mqtt.problem
                    for h in (
                        HealthMessage.model_validate_json(m.payload)
                        for m in probe.messages(f"{ROOT}/health")
                    )
                    if h.mqtt.problem
                ],
                "a health message naming the conflict",
                30,
            )
    probe.disconnect()

    client_id = f"edgefleet-{DEVICE}"
    for agent in (first, second):
        (error,) = {line.split(" ERROR ", 1)[1] for line in error_lines(agent)}
        assert f"another client uses client id {client_id}" in error, error
        assert "instead of fighting over it" in error
        assert "Traceback" not in agent.log()
    assert f"another client uses client id {client_id}" in problems[0]
    print(f"{protocol}: {in_window} connects by both agents in {WINDOW_S:g} s")
    assert in_window <= MAX_CONNECTS_IN_WINDOW, both()
