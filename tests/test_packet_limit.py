"""Nothing the agent sends is larger than the broker accepts in one packet.

Mosquitto disconnects a client that sends a packet over its ``max_packet_size`` (the
generated config's ``message_size_limit_bytes``, 1 MiB by default), and paho sends a QoS 1
message again after every reconnect: one oversize reply or event took the device offline
for good. Real Mosquitto brokers with the project's config and small limits, the real link,
outbox and agent process.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess
from broker import Mosquitto, MqttProbe
from conftest import Assets
from test_agent import ROOT, agent_config, events, healths, subscriber
from test_commands import REPLIES, Device, Requester, wait_answering
from test_privacy import _config as snapshot_config

from edgefleet.agent.config import BrokerSettings, OutboxSettings
from edgefleet.agent.mqtt import MqttLink, OutboxPublisher
from edgefleet.agent.outbox import Outbox
from edgefleet.agent.protocol import EVENT_MAX_BYTES, Topics
from edgefleet.agent.snapshots import jpeg_budget

LIMIT = 40_000  # bytes: a broker far stricter than the default, so test messages stay small


@pytest.fixture
def strict_broker(mosquitto_binary: Path, tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(
        tmp_path / "strict", settings_overrides={"message_size_limit_bytes": LIMIT}
    ) as broker:
        yield broker


@pytest.fixture
def link(strict_broker: Mosquitto) -> Iterator[MqttLink]:
    settings = BrokerSettings(host=strict_broker.host, port=strict_broker.port, client_id="dev1")
    device = MqttLink(settings, will_topic=Topics("dev1").status, will_payload=b"will")
    device.start()
    assert device.wait_connected(10)
    yield device
    device.stop()


def test_the_link_learns_the_limit_and_refuses_a_message_over_it_instead_of_being_dropped(
    strict_broker: Mosquitto, link: MqttLink
) -> None:
    probe = MqttProbe(strict_broker, "reader", timeout_s=30)
    with probe:
        probe.subscribe("t/#")
        refused = link.publish("t/big", b"x" * LIMIT, qos=1)
        sent = link.publish("t/small", b"ok", qos=1)
        probe.wait_for_message("t/small")

    assert link.max_packet_size == LIMIT  # from the CONNACK
    assert not refused
    assert sent
    assert [m.topic for m in probe.messages()] == ["t/small"]
    assert link.connected
    assert link.reconnects == 0


def test_the_generated_broker_config_announces_its_one_mebibyte_limit(broker: Mosquitto) -> None:
    settings = BrokerSettings(host=broker.host, port=broker.port, client_id="dev2")
    device = MqttLink(settings, will_topic=Topics("dev2").status, will_payload=b"will")
    device.start()
    try:
        assert device.wait_connected(10)
        assert device.max_packet_size == 1_048_576
    finally:
        device.stop()


def test_an_event_too_large_for_the_broker_is_removed_and_the_ones_after_it_delivered(
    strict_broker: Mosquitto, link: MqttLink, tmp_path: Path
) -> None:
    topic = Topics("dev1").events("cam")
    outbox = Outbox(OutboxSettings(path=tmp_path / "outbox.sqlite3"))
    outbox.put("cam", topic, b"first")
    outbox.put("cam", topic, b"y" * LIMIT)
    outbox.put("cam", topic, b"last")
    publisher = OutboxPublisher(outbox, link, window=10)
    with MqttProbe(strict_broker, "reader", timeout_s=30) as probe:
        probe.subscribe(topic)
        publisher.start()
        try:
            probe.wait_until(lambda: len(probe.messages(topic)) == 2 or None, "both events", 30)
            probe.wait_until(lambda: outbox.depth == 0 or None, "an empty outbox", 30)
        finally:
            publisher.stop()
            outbox.close()

    assert [m.payload for m in probe.messages(topic)] == [b"first", b"last"]
    assert publisher.undeliverable == 1
    assert publisher.published == 2
    assert link.reconnects == 0


def test_a_snapshot_asked_larger_than_the_broker_allows_comes_smaller_and_the_device_stays(
    assets: Assets, strict_broker: Mosquitto, tmp_path: Path
) -> None:
    config = snapshot_config(assets, strict_broker.port, tmp_path, {"redact": "none"})
    with (
        Requester(strict_broker, "operator") as client,
        AgentProcess(tmp_path / "agent", config) as agent,
    ):
        client.subscribe(f"{REPLIES}/#")
        device = Device(strict_broker, agent, client, Path(config["streams"][0]["model"]["path"]))
        wait_answering(device)
        reply = device.ask("snapshot", {"stream": "kite", "max_bytes": 2_000_000})
        after = device.ask("ping")
        reconnects = agent.log().count("connected to ") - 1

    assert reply.ok, reply
    assert reply.result is not None
    budget = jpeg_budget(2_000_000, LIMIT)
    assert reply.result["max_bytes"] == budget
    assert len(base64.b64decode(reply.result["jpeg_base64"])) <= budget
    assert reply.result["quality"] < 90 or reply.result["width"] < 512  # made smaller to fit
    assert after.ok
    assert reconnects == 0


def test_a_raw_event_over_the_bound_leaves_the_values_out_and_says_how_many(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    config: dict[str, Any] = agent_config(assets, broker.port, tmp_path)
    config["streams"][0]["model"] = {
        "path": str(assets.model("yolov8n_coco_float.tflite")),
        "task": "raw",
        "threads": 1,
    }
    config["streams"][0]["events"] = {"min_interval_s": 0}
    probe = subscriber(broker)
    with AgentProcess(tmp_path / "agent", config) as agent:
        probe.wait_until(lambda: len(events(probe)) >= 2 or None, "two raw events", 90)
        probe.wait_until(lambda: healths(probe) or None, "a health message", 30)
        log = agent.log()

    received = [m for m in probe.messages() if m.topic.startswith(f"{ROOT}/events/")]
    assert all(len(m.payload) <= EVENT_MAX_BYTES for m in received)
    (tensor,) = json.loads(received[0].payload)["tensors"]
    assert tensor["shape"] == [1, 84, 8400]
    assert tensor["values"] == []
    assert tensor["omitted_values"] == 84 * 8400
    assert log.count("their tensors' values are left out") == 1  # once, not per frame
    assert healths(probe)[-1].outbox.undeliverable == 0
