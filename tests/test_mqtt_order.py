"""The device's broker link against a real Mosquitto: what one thread publishes arrives in
the order it was published, however many threads publish, and a stop is a clean
disconnect (no last will)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from broker import Mosquitto, MqttProbe

from edgefleet.agent.config import BrokerSettings
from edgefleet.agent.mqtt import MqttLink
from edgefleet.agent.protocol import Topics

MESSAGES = 5000  # per publishing thread
THREADS = 3


@pytest.fixture
def link(broker: Mosquitto) -> Iterator[MqttLink]:
    settings = BrokerSettings(host=broker.host, port=broker.port, client_id="dev1")
    device = MqttLink(settings, will_topic=Topics("dev1").status, will_payload=b"will")
    device.start()
    assert device.wait_connected(10)
    yield device
    device.stop()


def test_each_threads_messages_arrive_in_the_order_it_published_them(
    broker: Mosquitto, link: MqttLink
) -> None:
    # The agent publishes from several threads (events, health, replies) while the link's
    # own thread runs paho's loop: a write from a publishing thread must never overtake a
    # packet the loop is writing.
    with MqttProbe(broker, "consumer", timeout_s=60) as probe:
        probe.subscribe("order/#")

        def publish_all(name: str) -> None:
            for n in range(MESSAGES):
                assert link.publish(f"order/{name}", str(n).encode(), qos=1)

        threads = [
            threading.Thread(target=publish_all, args=(f"t{i}",), name=f"publisher-{i}")
            for i in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        received = probe.wait_for_count(MESSAGES * THREADS)

    for i in range(THREADS):
        numbers = [int(m.payload) for m in received if m.topic == f"order/t{i}"]
        assert numbers == list(range(MESSAGES)), f"thread t{i}'s messages out of order"


def test_stop_disconnects_cleanly_so_the_broker_sends_no_last_will(broker: Mosquitto) -> None:
    status = Topics("dev1").status
    with MqttProbe(broker, "observer", timeout_s=10) as observer:
        observer.subscribe(status)
        settings = BrokerSettings(host=broker.host, port=broker.port, client_id="dev1")
        device = MqttLink(settings, will_topic=status, will_payload=b"will")
        device.start()
        assert device.wait_connected(10)
        device.publish(status, b"bye", qos=1, retain=True)
        observer.wait_for_message(status)

        device.stop()
        ended = observer.wait_until(
            lambda: next((line for line in broker.log_text().splitlines()
                          if "Client dev1 " in line and "connect" in line.split("dev1", 1)[1]
                          and "New client" not in line), None),
            "the broker's line about dev1's connection ending",
            10,
        )  # fmt: skip

    assert "Client dev1 disconnected" in ended  # a DISCONNECT, not a dropped socket
    assert [m.payload for m in observer.messages(status)] == [b"bye"]
