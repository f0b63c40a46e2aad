"""MQTT ingest against a real Mosquitto, into the registry on SQLite and PostgreSQL: real
protocol payloads in, the registry updated; bad payloads counted, never fatal; batches."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import Mosquitto, MqttProbe
from controller_db import health_message, reported_message, status_message
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.agent.mqtt import close_client
from edgefleet.agent.protocol import Topics, UpdateState
from edgefleet.ops.controller import registry
from edgefleet.ops.controller.db import Database, open_database
from edgefleet.ops.controller.ingest import (
    Ingest,
    IngestSettings,
    IngestStats,
    RegistryWriter,
    parse_message,
    subscriptions,
)
from edgefleet.ops.errors import BrokerError, ContractBroken
from edgefleet.ops.profile import OperatorProfile, ResolvedProfile

ROOT = "edgefleet/v1"
T0 = 1_800_000_000.0
WAIT_S = 20.0


@pytest.fixture
def database(controller_db_url: str) -> Iterator[Database]:
    with open_database(controller_db_url) as opened:
        yield opened


def plain(broker: Mosquitto) -> ResolvedProfile:
    """The test broker's plain listener (TLS is the connection module's own tests)."""
    return ResolvedProfile(OperatorProfile(host=broker.host, port=broker.port, insecure=True))


def settled(source: RegistryWriter | Ingest, count: int) -> IngestStats:
    """The stats once ``count`` offered messages are done with (written, malformed, ...)."""
    writer = source.writer if isinstance(source, Ingest) else source
    stats = writer.wait_for(lambda s: s.settled >= count, WAIT_S)
    assert stats.settled >= count, stats
    return stats


# -- parsing at the edge ----------------------------------------------------------------


def test_each_topic_parses_into_its_protocol_model() -> None:
    topics = Topics("cam1")
    for topic, message in (
        (topics.status, status_message("cam1", T0)),
        (topics.health, health_message("cam1", T0)),
        (topics.reported, reported_message("cam1", T0)),
    ):
        assert parse_message(ROOT, topic, message.model_dump_json().encode()) == message


def test_an_empty_payload_is_a_cleared_retained_message() -> None:
    assert parse_message(ROOT, Topics("cam1").status, b"") is None


@pytest.mark.parametrize(
    ("topic", "payload", "says"),
    [
        (f"{ROOT}/cam1/health", b"{not json", "not a HealthMessage"),
        (f"{ROOT}/cam1/status", b'{"state": "asleep"}', "not a StatusMessage"),
        (f"{ROOT}/cam2/status", status_message("cam1", T0).model_dump_json().encode(), "cam1"),
        (f"{ROOT}/cam1/events/door", b"{}", "not a device's status"),
        ("other/cam1/status", b"{}", "not a device's status"),
    ],
)
def test_what_is_not_the_protocol_is_contract_broken(topic: str, payload: bytes, says: str) -> None:
    with pytest.raises(ContractBroken, match=says):
        parse_message(ROOT, topic, payload)


@given(payload=st.binary(max_size=512), kind=st.sampled_from(["status", "health", "reported"]))
def test_any_bytes_parse_or_are_contract_broken(payload: bytes, kind: str) -> None:
    with contextlib.suppress(ContractBroken):
        parse_message(ROOT, f"{ROOT}/cam1/{kind}", payload)


def test_shared_subscriptions_apply_to_health_only() -> None:
    assert subscriptions(ROOT, "controllers") == [
        f"{ROOT}/+/status",
        f"$share/controllers/{ROOT}/+/health",
        f"{ROOT}/+/reported",
    ]


# -- the writer -------------------------------------------------------------------------


def test_the_writer_commits_in_batches_of_at_most_batch_max_messages(database: Database) -> None:
    writer = RegistryWriter(database, ROOT, IngestSettings(batch_max_messages=100))
    for n in range(1000):
        message = health_message(f"cam{n % 50}", T0 + n)
        writer.offer(Topics(message.device_id).health, message.model_dump_json().encode())
    writer.start()
    try:
        stats = settled(writer, 1000)
    finally:
        writer.stop()
    assert (stats.written, stats.applied, stats.batches) == (1000, 1000, 10)
    with database.session() as session:
        assert len(registry.list_devices(session)) == 50
        assert registry.show_device(session, "cam49").health_ts == T0 + 999


def test_stop_writes_what_is_queued(database: Database) -> None:
    writer = RegistryWriter(database, ROOT, IngestSettings(batch_max_ms=60_000))
    writer.start()
    for n in range(20):
        message = health_message("cam1", T0 + n)
        writer.offer(Topics("cam1").health, message.model_dump_json().encode())
    writer.stop()
    assert writer.stats().written == 20
    assert not writer.alive


def test_a_full_queue_drops_and_counts(database: Database) -> None:
    settings = IngestSettings(queue_max_messages=2, queue_put_timeout_s=0)
    writer = RegistryWriter(database, ROOT, settings)  # not started: nothing drains
    beats = [health_message("cam1", T0 + n).model_dump_json().encode() for n in range(3)]
    queued = [writer.offer(Topics("cam1").health, beat) for beat in beats]
    assert queued == [True, True, False]
    assert writer.stats().queue_full == 1


def test_the_writer_thread_is_named(database: Database) -> None:
    writer = RegistryWriter(database, ROOT, IngestSettings())
    writer.start()
    try:
        assert "registry-writer" in [t.name for t in threading.enumerate()]
    finally:
        writer.stop()
    assert "registry-writer" not in [t.name for t in threading.enumerate()]


def test_a_locked_database_is_retried_and_the_batch_kept(tmp_path: Path) -> None:
    path = tmp_path / "controller.sqlite3"
    settings = IngestSettings(retry_backoff_s=0.05, retry_backoff_max_s=0.1)
    with open_database(path, busy_timeout_ms=20) as database:
        lock = sqlite3.connect(path, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
        writer = RegistryWriter(database, ROOT, settings)
        writer.start()
        try:
            writer.offer(
                Topics("cam1").health, health_message("cam1", T0).model_dump_json().encode()
            )
            locked = writer.wait_for(lambda s: s.retries >= 2, WAIT_S)
            assert locked.retries >= 2
            assert locked.written == 0
            lock.execute("COMMIT")
            stats = settled(writer, 1)
        finally:
            lock.close()
            writer.stop()
        assert (stats.written, stats.dropped) == (1, 0)
        with database.session() as session:
            assert registry.show_device(session, "cam1").health_ts == T0


# -- through a real broker ----------------------------------------------------------------


def test_ingest_keeps_the_registry_current_from_real_messages(
    broker: Mosquitto, database: Database
) -> None:
    topics = Topics("cam1")
    with MqttProbe(broker) as device:
        device.publish(topics.status, status_message("cam1", T0).model_dump_json(), retain=True)
        with Ingest(database, plain(broker)) as ingest:
            device.publish(
                topics.health, health_message("cam1", T0 + 5, fps=12.5).model_dump_json()
            )
            reported = reported_message("cam1", T0 + 6, update=UpdateState.PROBATION)
            device.publish(topics.reported, reported.model_dump_json(), retain=True)
            stats = settled(ingest, 3)
            assert stats.connected
    assert (stats.written, stats.malformed) == (3, 0)
    with database.session() as session:
        view = registry.show_device(session, "cam1")
    assert view.status == "online"
    assert view.streams[0].fps == 12.5
    assert view.streams[0].update_state == "probation"
    assert registry.DeviceState.UPDATING in view.states


def test_the_last_will_from_the_broker_marks_the_device_offline(
    broker: Mosquitto, database: Database
) -> None:
    topics = Topics("cam1")
    will = status_message("cam1", T0 - 1, "offline", reason="connection lost")
    with Ingest(database, plain(broker)) as ingest:
        device = MqttProbe(broker, "cam1")
        device.client.will_set(topics.status, will.model_dump_json(), qos=1, retain=True)
        device.connect()
        device.publish(topics.status, status_message("cam1", T0).model_dump_json(), retain=True)
        settled(ingest, 1)
        device.client.socket().close()  # dropped, not disconnected: the broker sends the will
        stats = settled(ingest, 2)
        close_client(device.client)
    assert stats.applied == 2
    with database.session() as session:
        assert registry.show_device(session, "cam1").status_reason == "connection lost"


def test_a_malformed_payload_is_counted_and_ingest_keeps_running(
    broker: Mosquitto, database: Database
) -> None:
    topics = Topics("cam1")
    with Ingest(database, plain(broker)) as ingest, MqttProbe(broker) as device:
        device.publish(topics.health, b'{"device_id": "cam1", "ts": "soon"}')
        device.publish(topics.health, b"\xff\xfe garbage")
        device.publish(topics.health, health_message("cam1", T0).model_dump_json())
        stats = settled(ingest, 3)
    assert (stats.malformed, stats.written) == (2, 1)
    assert stats.last_malformed is not None
    assert "not a HealthMessage" in stats.last_malformed
    with database.session() as session:
        assert registry.show_device(session, "cam1").health_ts == T0


def test_ingest_reconnects_and_resubscribes_after_a_broker_restart(
    broker: Mosquitto, database: Database
) -> None:
    with Ingest(database, plain(broker)) as ingest:
        broker.restart()
        ingest.writer.wait_for(lambda s: s.subscribed >= 2, WAIT_S)
        with MqttProbe(broker) as device:
            device.publish(Topics("cam1").health, health_message("cam1", T0).model_dump_json())
            stats = settled(ingest, 1)
    assert (stats.subscribed, stats.written) == (2, 1)


def test_a_shared_subscription_still_gets_heartbeats_and_retained_status(
    broker: Mosquitto, database: Database
) -> None:
    topics = Topics("cam1")
    settings = IngestSettings(shared_group="controllers")
    with MqttProbe(broker) as device:
        device.publish(topics.status, status_message("cam1", T0).model_dump_json(), retain=True)
        with Ingest(database, plain(broker), settings) as ingest:
            device.publish(topics.health, health_message("cam1", T0 + 1).model_dump_json())
            stats = settled(ingest, 2)
    assert stats.written == 2
    with database.session() as session:
        view = registry.show_device(session, "cam1")
    assert (view.status, view.health_ts) == ("online", T0 + 1)


def test_an_unreachable_broker_is_a_broker_error(database: Database) -> None:
    profile = ResolvedProfile(OperatorProfile(host="127.0.0.1", port=1, insecure=True))
    with pytest.raises(BrokerError, match="cannot reach the broker"):
        Ingest(database, profile).start()
