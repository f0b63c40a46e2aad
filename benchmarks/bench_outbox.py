"""Sustained QoS 1 events/s from the outbox through Mosquitto to a QoS 1 subscriber, zero loss.

Two senders push the same N events (realistic event JSON, ~700 bytes) through a
real Mosquitto (the project's generated config) to one QoS 1 subscriber, and
the time from the first event to the subscriber holding all N is measured:

- baseline: a plain paho-mqtt publish loop (QoS 1, same inflight window), the
  most a Python publisher reaches without any durability;
- edgefleet: a producer thread puts the events into the SQLite outbox (one
  transaction per 4 events, as the pipeline does per frame) while the agent's
  publisher drains it through its MQTT link, deleting each row on PUBACK.

Every event carries a sequence number; the subscriber checks that all N arrived
(duplicates allowed, none missing). Target: edgefleet >= 2,000 events/s.

    python benchmarks/bench_outbox.py [--events 20000]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.config import BrokerSettings
from edgefleet.agent.mqtt import MqttLink, OutboxPublisher
from edgefleet.agent.outbox import Outbox, OutboxSettings
from edgefleet.provisioning.mosquitto import MosquittoSettings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from broker import Mosquitto  # noqa: E402  (the tests' broker runner, generated config)

WINDOW = 200
PER_FRAME = 4
PAYLOAD_PAD = "x" * 600


def payload(seq: int) -> bytes:
    return f'{{"seq":{seq},"pad":"{PAYLOAD_PAD}"}}'.encode()


class Counter:
    """A QoS 1 subscriber that records which sequence numbers arrived."""

    def __init__(self, broker: Mosquitto, topic: str, expected: int) -> None:
        self.seen: set[int] = set()
        self.expected = expected
        self.done = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        time.sleep(0.3)  # SUBACK before anything is sent

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        seq = int(message.payload[7 : message.payload.index(b",")])
        self.seen.add(seq)
        if len(self.seen) == self.expected:
            self.done.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def plain_paho(broker: Mosquitto, n: int) -> float:
    counter = Counter(broker, "bench/plain", n)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(WINDOW)
    client.connect(broker.host, broker.port)
    client.loop_start()
    started = time.perf_counter()
    for seq in range(1, n + 1):
        client.publish("bench/plain", payload(seq), qos=1)
    counter.done.wait(300)
    elapsed = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    counter.close()
    assert len(counter.seen) == n, f"plain paho lost {n - len(counter.seen)} events"
    return n / elapsed


def edgefleet(broker: Mosquitto, n: int, workdir: Path) -> tuple[float, float]:
    counter = Counter(broker, "bench/edgefleet", n)
    outbox = Outbox(OutboxSettings(path=workdir / "outbox.sqlite3", max_events=n + 1))
    settings = BrokerSettings(host=broker.host, port=broker.port, client_id="bench-outbox")
    link = MqttLink(settings, will_topic="bench/status", will_payload=b"offline")
    publisher = OutboxPublisher(outbox, link, window=WINDOW)
    link.start()
    link.wait_connected(10)
    publisher.start()
    started = time.perf_counter()
    for first in range(1, n + 1, PER_FRAME):
        batch = [payload(s) for s in range(first, min(first + PER_FRAME, n + 1))]
        outbox.put_many("s", "bench/edgefleet", batch)
        publisher.wake()
    put_rate = n / (time.perf_counter() - started)
    counter.done.wait(300)
    elapsed = time.perf_counter() - started
    publisher.flush(10)
    publisher.stop()
    link.stop()
    depth = outbox.depth
    outbox.close()
    counter.close()
    assert len(counter.seen) == n, f"edgefleet lost {n - len(counter.seen)} events"
    assert depth == 0, f"{depth} events still in the outbox"
    return n / elapsed, put_rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument(
        "--autosave-changes",
        type=int,
        default=MosquittoSettings.model_fields["autosave_changes"].default,
        help="the broker saves its database after this many changes (0: every 60 s)",
    )
    args = parser.parse_args()
    n = args.events
    print(f"machine   {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"python    {platform.python_version()}, paho-mqtt {metadata.version('paho-mqtt')}")
    print(f"broker    saves after {args.autosave_changes} changes (0: every 60 s)")
    overrides = {"autosave_changes": args.autosave_changes}
    with (
        tempfile.TemporaryDirectory() as tmp,
        Mosquitto(Path(tmp) / "broker", settings_overrides=overrides) as broker,
    ):
        plain = plain_paho(broker, n)
        ours, put_rate = edgefleet(broker, n, Path(tmp))
    print(
        f"events    {n}, ~{len(payload(1))} bytes each, QoS 1 both ways, inflight window {WINDOW}"
    )
    print(f"plain paho publish loop      {plain:8.0f} events/s (no durability)")
    print(
        f"edgefleet outbox -> broker   {ours:8.0f} events/s  ({ours / plain:.2f}x plain; "
        f"outbox puts alone {put_rate:.0f}/s), zero loss"
    )
    ok = ours >= 2000
    print(f"{'PASS' if ok else 'FAIL'} (target >= 2000 events/s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
