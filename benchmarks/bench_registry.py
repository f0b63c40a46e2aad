"""Heartbeats (health messages) ingested per second into the controller's registry, SQLite and
PostgreSQL, batched writes against one transaction per message, measured in the same run.

Every heartbeat is a real ``HealthMessage`` JSON (one stream, ~1.3 kB) of one of ``--devices``
devices, each newer than the last of its device, so every one is applied (an upsert of the
device row and its stream row). Three ways, on each backend, in one run:

- baseline: parse, then one transaction per message (``registry.record_health`` in its own
  session): what a controller without batching does;
- batched: ``RegistryWriter.offer`` (parse at the edge, queue) with the ``registry-writer``
  thread committing up to ``--batch`` messages or 100 ms per transaction, timed from the first
  offer until every message is committed;
- end to end: the same heartbeats published at QoS 0, as agents send health, through a real
  Mosquitto (the project's generated config) to ``Ingest``, timed from the first publish until
  the last one is committed (a QoS 0 message the broker drops is counted as missing).

PostgreSQL is the server at ``$EDGEFLEET_TEST_POSTGRES`` (default postgres@127.0.0.1:5432,
trust auth); the benchmark makes its own database and drops it. ``--no-postgres`` skips it.

    python benchmarks/bench_registry.py [--devices 1000] [--messages 20000] [--batch 500]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from importlib import metadata
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.protocol import HealthMessage, Topics
from edgefleet.ops.controller import registry
from edgefleet.ops.controller.db import Database, open_database
from edgefleet.ops.controller.ingest import Ingest, IngestSettings, RegistryWriter
from edgefleet.ops.profile import OperatorProfile, ResolvedProfile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from broker import Mosquitto  # noqa: E402  (the tests' broker runner, generated config)
from controller_db import health_message, postgres_database  # noqa: E402

ROOT = "edgefleet/v1"
T0 = 1_800_000_000.0
WAIT_S = 600.0
QUIET_S = 5.0


def heartbeats(devices: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` health messages round-robin over ``devices``, each newer than the last."""
    out = []
    for n in range(count):
        device = f"dev{n % devices:05d}"
        message = health_message(device, T0 + n, fps=10 + n % 7, uptime_s=60.0 + n)
        out.append((Topics(device).health, message.model_dump_json().encode()))
    return out


def per_message(database: Database, messages: list[tuple[str, bytes]]) -> float:
    """Messages/s: parse, then one transaction per message."""
    start = time.perf_counter()
    for _topic, payload in messages:
        message = HealthMessage.model_validate_json(payload)
        with database.session() as session:
            registry.record_health(session, message)
    return len(messages) / (time.perf_counter() - start)


def batched(
    database: Database, messages: list[tuple[str, bytes]], batch: int
) -> tuple[float, float]:
    """Messages/s through the writer thread, and the mean messages per transaction."""
    settings = IngestSettings(batch_max_messages=batch, queue_max_messages=len(messages) + 1)
    writer = RegistryWriter(database, ROOT, settings)
    writer.start()
    try:
        start = time.perf_counter()
        for topic, payload in messages:
            writer.offer(topic, payload)
        stats = writer.wait_for(lambda s: s.settled >= len(messages), WAIT_S)
        elapsed = time.perf_counter() - start
    finally:
        writer.stop()
    assert stats.written == len(messages), stats
    return len(messages) / elapsed, stats.written / max(stats.batches, 1)


def end_to_end(
    database: Database, broker: Mosquitto, messages: list[tuple[str, bytes]], batch: int
) -> tuple[float, int]:
    """Messages/s published at QoS 0 (as the agent sends health) through Mosquitto until all
    are committed or none came for ``QUIET_S``; and how many were committed."""
    resolved = ResolvedProfile(OperatorProfile(host=broker.host, port=broker.port, insecure=True))
    settings = IngestSettings(batch_max_messages=batch, queue_max_messages=len(messages) + 1)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.max_queued_messages_set(0)
    publisher.connect(broker.host, broker.port)
    publisher.loop_start()
    try:
        with Ingest(database, resolved, settings) as ingest:
            start = time.perf_counter()
            for topic, payload in messages:
                publisher.publish(topic, payload, qos=0)
            stats, last = ingest.stats(), start
            while stats.settled < len(messages) and time.perf_counter() - last < QUIET_S:
                before = stats.settled
                stats = ingest.writer.wait_for(lambda s: s.settled >= len(messages), 1.0)
                if stats.settled > before:
                    last = time.perf_counter()
            elapsed = last - start
    finally:
        publisher.disconnect()
        publisher.loop_stop()
    return stats.written / elapsed, stats.written


@contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as folder:
        yield f"sqlite:///{folder}/controller.sqlite3"


def run_backend(
    name: str,
    database_url: Callable[[], AbstractContextManager[str]],
    args: argparse.Namespace,
    broker: Mosquitto,
) -> None:
    messages = heartbeats(args.devices, args.messages)
    baseline_messages = messages[: args.baseline_messages]
    with database_url() as url, open_database(url) as database:
        baseline = per_message(database, baseline_messages)
    with database_url() as url, open_database(url) as database:
        rate, per_batch = batched(database, messages, args.batch)
    with database_url() as url, open_database(url) as database:
        through_broker, arrived = end_to_end(database, broker, messages, args.batch)
    print(f"{name:10} one transaction per message  {baseline:8.0f} heartbeats/s "
          f"({len(baseline_messages)} messages)")  # fmt: skip
    print(f"{name:10} batched writer               {rate:8.0f} heartbeats/s "
          f"({per_batch:.0f} per transaction, {rate / baseline:.1f}x)")  # fmt: skip
    print(f"{name:10} end to end through Mosquitto {through_broker:8.0f} heartbeats/s "
          f"(QoS 0, {arrived} of {len(messages)} committed)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--baseline-messages", type=int, default=3_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    print(f"machine   {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(
        f"python    {platform.python_version()}, SQLAlchemy {metadata.version('sqlalchemy')}, "
        f"psycopg {metadata.version('psycopg')}, paho-mqtt {metadata.version('paho-mqtt')}"
    )
    print(f"fleet     {args.devices} devices, {args.messages} heartbeats, batch {args.batch}")
    with tempfile.TemporaryDirectory() as folder, Mosquitto(Path(folder) / "broker") as broker:
        run_backend("sqlite", sqlite_url, args, broker)
        if not args.no_postgres:
            run_backend("postgresql", postgres_database, args, broker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
