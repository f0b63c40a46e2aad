"""QoS 1 events/s into Mosquitto with each autosave setting, an offline subscriber queueing them.

What a save costs: Mosquitto rewrites its whole database (retained desired states and
model chunks, every queued message) on each save, in its one network thread. This
measures events/s a publisher gets acknowledged by a broker running the project's
generated config, for the time-based save (``--autosave-changes 0``, every 60 s) and for
saves after N changes, while an offline persistent subscriber (a controller that is down)
has every event queued for it (or, second, the controller is online and takes them) and
the broker holds ``--chunks`` retained 64 KiB model
chunks and a few desired states:

    python benchmarks/bench_broker_autosave.py [--events 5000] [--chunks 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from broker import Mosquitto  # noqa: E402  (the tests' broker runner, generated config)

WINDOW = 200
PAYLOAD = b'{"seq":0,"pad":"' + b"x" * 600 + b'"}'
CHUNK = b"c" * 64 * 1024


def _client(broker: Mosquitto, client_id: str, *, clean: bool = True) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(WINDOW)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    client.connect(broker.host, broker.port, clean_start=clean, properties=properties)
    client.loop_start()
    return client


def _publish_all(client: mqtt.Client, topic: str, payloads: list[bytes], retain: bool) -> float:
    started = time.monotonic()
    infos = [
        client.publish(topic if not retain else f"{topic}/{i}", p, qos=1, retain=retain)
        for i, p in enumerate(payloads)
    ]
    for info in infos:
        info.wait_for_publish(120)
    return time.monotonic() - started


def run(changes: int, events: int, chunks: int, *, online: bool = False) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"autosave_changes": changes, "autosave_interval_s": 60}
        with Mosquitto(Path(tmp) / "broker", settings_overrides=overrides) as broker:
            controller = _client(broker, "controller", clean=False)
            done = threading.Event()
            controller.on_subscribe = lambda *args: done.set()
            controller.subscribe("edgefleet/v1/+/events/#", qos=1)
            done.wait(10)
            if not online:
                controller.disconnect()
                controller.loop_stop()
            device = _client(broker, "dev1")
            _publish_all(device, "edgefleet/v1/models/m/chunks", [CHUNK] * chunks, retain=True)
            _publish_all(device, "edgefleet/v1/desired", [PAYLOAD] * 10, retain=True)
            took = _publish_all(device, "edgefleet/v1/dev1/events/s", [PAYLOAD] * events, False)
            for client in (device, controller) if online else (device,):
                client.disconnect()
                client.loop_stop()
            return events / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--changes", type=int, nargs="*", default=[0, 1, 10, 100, 1000])
    args = parser.parse_args()
    for online in (False, True):
        who = "controller online " if online else "controller offline"
        for changes in args.changes:
            rate = run(changes, args.events, args.chunks, online=online)
            label = "every 60 s" if changes == 0 else f"after {changes} changes"
            print(f"{who}, save {label:>18}: {rate:7.0f} events/s acknowledged", flush=True)


if __name__ == "__main__":
    main()
