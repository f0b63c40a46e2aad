"""The device registry on SQLite and PostgreSQL: facts from status, health and reported state,
ordered by the messages' own times; states; groups, tags and selectors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from controller_db import health_message, reported_message, status_message

from edgefleet.agent.protocol import UpdateState
from edgefleet.ops.controller import registry
from edgefleet.ops.controller.db import Database, DeviceStream, open_database
from edgefleet.ops.controller.registry import (
    BadName,
    BadSelector,
    DeviceState,
    Received,
    UnknownDevice,
    UnknownGroup,
    parse_selector,
)

T0 = 1_800_000_000.0


@pytest.fixture
def database(controller_db_url: str) -> Iterator[Database]:
    with open_database(controller_db_url) as opened:
        yield opened


def ids(views: list[registry.DeviceView]) -> list[str]:
    return [view.id for view in views]


def test_a_birth_makes_an_online_device_with_its_versions_and_models(database: Database) -> None:
    with database.session() as session:
        assert registry.record_status(session, status_message("cam1", T0))
    with database.session() as session:
        device = registry.show_device(session, "cam1")
    assert device.status == "online"
    assert device.states == [DeviceState.ONLINE]
    assert device.online_since == T0
    assert device.first_seen == device.last_seen == T0
    assert device.agent_version == "0.1.0"
    assert device.backends == ["litert 2.3.0"]
    assert [(s.stream, s.model_id, s.model_version) for s in device.streams] == [
        ("door", "ssd", "1")
    ]


def test_health_records_rates_latencies_temperature_and_counters(database: Database) -> None:
    with database.session() as session:
        registry.record_status(session, status_message("cam1", T0))
        registry.record_health(session, health_message("cam1", T0 + 10, fps=14.5, failed=3))
    with database.session() as session:
        device = registry.show_device(session, "cam1")
    (door,) = device.streams
    assert (door.fps, door.latency_p50_ms, door.latency_p99_ms) == (14.5, 21.0, 35.0)
    assert door.failed == 3
    assert device.temperature_c == 51.5
    assert device.throttled is True
    assert (device.outbox_depth, device.events_dropped, device.events_lost) == (3, 1, 3)
    assert device.mqtt_reconnects == 2
    assert device.last_seen == T0 + 10


def test_an_older_heartbeat_does_not_move_facts_backwards(database: Database) -> None:
    with database.session() as session:
        registry.record_health(session, health_message("cam1", T0 + 20, fps=20.0))
    with database.session() as session:
        assert not registry.record_health(session, health_message("cam1", T0 + 10, fps=5.0))
        assert not registry.record_health(session, health_message("cam1", T0 + 20, fps=5.0))
    with database.session() as session:
        device = registry.show_device(session, "cam1")
    assert device.streams[0].fps == 20.0
    assert device.health_ts == device.last_seen == T0 + 20
    assert device.first_seen == T0 + 20


def test_an_older_reported_state_does_not_undo_an_update(database: Database) -> None:
    new = reported_message("cam1", T0 + 30, version="2", sha256="b" * 64)
    old = reported_message("cam1", T0 + 5, version="1", update=UpdateState.DOWNLOADING)
    with database.session() as session:
        registry.record(session, [Received(new, T0 + 30), Received(old, T0 + 31)])
    with database.session() as session:
        (door,) = registry.show_device(session, "cam1").streams
    assert (door.model_version, door.model_sha256, door.update_state) == ("2", "b" * 64, None)


def test_an_older_birth_after_a_shutdown_leaves_the_device_offline(database: Database) -> None:
    with database.session() as session:
        registry.record_status(session, status_message("cam1", T0))
        registry.record_status(
            session, status_message("cam1", T0 + 60, "offline", reason="shutdown")
        )
        assert not registry.record_status(session, status_message("cam1", T0 + 1))
    with database.session() as session:
        device = registry.show_device(session, "cam1")
    assert (device.status, device.status_reason) == ("offline", "shutdown")
    assert device.offline_since == T0 + 60


def test_the_last_will_marks_the_device_offline_though_it_is_dated_at_the_start(
    database: Database,
) -> None:
    will = status_message("cam1", T0 - 1, "offline", reason="connection lost")
    with database.session() as session:
        registry.record_status(session, status_message("cam1", T0))
        registry.record_health(session, health_message("cam1", T0 + 100, uptime_s=101.0))
    with database.session() as session:
        assert registry.record_status(session, will, received_at=T0 + 500)
    with database.session() as session:
        device = registry.show_device(session, "cam1")
    assert (device.status, device.status_reason) == ("offline", "connection lost")
    assert device.offline_since == T0 + 500
    assert device.last_seen == T0 + 100  # the will says nothing about when it was last heard


def test_a_will_from_an_earlier_agent_run_is_ignored(database: Database) -> None:
    with database.session() as session:
        registry.record_status(session, status_message("cam1", T0 + 1000))
        registry.record_health(session, health_message("cam1", T0 + 1010, uptime_s=20.0))
    stale_will = status_message("cam1", T0 - 1, "offline", reason="connection lost")
    with database.session() as session:
        assert not registry.record_status(session, stale_will, received_at=T0 + 1020)
        assert registry.show_device(session, "cam1").status == "online"


def test_devices_are_listed_by_state(database: Database) -> None:
    with database.session() as session:
        registry.record_status(session, status_message("ok", T0))
        registry.record_status(session, status_message("down", T0, "offline", reason="shutdown"))
        registry.record_status(session, status_message("sick", T0, "degraded", reason="no camera"))
        registry.record_status(session, status_message("busy", T0))
        registry.record_reported(
            session, reported_message("busy", T0, update=UpdateState.PROBATION)
        )
        registry.record_status(session, status_message("old", T0))
        registry.record_reported(session, reported_message("old", T0))
        registry.set_desired_model(
            session, "old", "door", model_id="ssd", version=2, sha256="b" * 64
        )
        registry.set_desired_model(
            session, "ok", "door", model_id="ssd", version=1, sha256="a" * 64
        )
    with database.session() as session:
        by_state = {s: ids(registry.list_devices(session, state=s)) for s in DeviceState}
    assert by_state == {
        DeviceState.ONLINE: ["busy", "ok", "old", "sick"],
        DeviceState.OFFLINE: ["down"],
        DeviceState.DEGRADED: ["sick"],
        DeviceState.UPDATING: ["busy"],
        DeviceState.STALE: ["old"],
    }


def test_a_stream_health_degraded_makes_the_device_degraded(database: Database) -> None:
    with database.session() as session:
        registry.record_health(session, health_message("cam1", T0, stream_state="degraded"))
    with database.session() as session:
        assert ids(registry.list_devices(session, state=DeviceState.DEGRADED)) == ["cam1"]
        assert DeviceState.DEGRADED in registry.show_device(session, "cam1").states


def _fleet(database: Database) -> None:
    with database.session() as session:
        for device in ("a", "b", "c", "d"):
            registry.record_status(session, status_message(device, T0))
        registry.add_to_group(session, "shops", ["a", "b", "c"])
        registry.tag(session, "b", "hw", "pi5")
        registry.tag(session, "c", "hw", "pi4")
        registry.tag(session, "d", "hw", "pi5")


@pytest.mark.parametrize(
    ("selectors", "expected"),
    [
        (["all"], ["a", "b", "c", "d"]),
        (["device:c"], ["c"]),
        (["group:shops"], ["a", "b", "c"]),
        (["tag:hw=pi5"], ["b", "d"]),
        (["group:shops,tag:hw=pi5"], ["b"]),  # a comma intersects
        (["group:shops,tag:hw=pi5", "device:d"], ["b", "d"]),  # separate selectors unite
        (["all,tag:hw=pi4"], ["c"]),
        (["tag:hw=pi3"], []),
    ],
)
def test_selectors_pick_devices(
    database: Database, selectors: list[str], expected: list[str]
) -> None:
    _fleet(database)
    parsed = [parse_selector(text) for text in selectors]
    with database.session() as session:
        assert registry.select_device_ids(session, parsed) == expected
        assert ids(registry.list_devices(session, selectors=parsed)) == expected


def test_groups_and_tags_show_on_the_device_and_can_be_removed(database: Database) -> None:
    _fleet(database)
    with database.session() as session:
        device = registry.show_device(session, "b")
        assert (device.groups, device.tags) == (["shops"], {"hw": "pi5"})
        registry.tag(session, "b", "hw", "pi5-8gb")
        assert registry.untag(session, "c", "hw")
        assert not registry.untag(session, "c", "hw")
        registry.remove_from_group(session, "shops", ["a"])
    with database.session() as session:
        assert registry.show_device(session, "b").tags == {"hw": "pi5-8gb"}
        assert registry.groups(session) == {"shops": ["b", "c"]}
        registry.delete_group(session, "shops")
    with database.session() as session:
        assert registry.groups(session) == {}
        assert registry.show_device(session, "b").groups == []


def test_an_unknown_group_or_device_in_a_selector_is_an_error(database: Database) -> None:
    _fleet(database)
    with database.session() as session, pytest.raises(UnknownGroup, match="farms"):
        registry.select_device_ids(session, [parse_selector("group:farms")])
    with database.session() as session, pytest.raises(UnknownDevice, match="zz"):
        registry.select_device_ids(session, [parse_selector("device:zz")])


def test_tagging_an_unknown_device_or_with_a_bad_value_is_an_error(database: Database) -> None:
    _fleet(database)
    with database.session() as session, pytest.raises(UnknownDevice):
        registry.tag(session, "zz", "hw", "pi5")
    with database.session() as session, pytest.raises(BadName, match="commas"):
        registry.tag(session, "a", "hw", "pi5,pi4")


@pytest.mark.parametrize(
    "text", ["", "group:", "tag:hw", "tag:=x", "host:a", "device:a,,all", "group:a/b", "tag:k=v w"]
)
def test_malformed_selectors_are_refused_with_a_hint(text: str) -> None:
    with pytest.raises(BadSelector) as refused:
        parse_selector(text)
    assert "group:shops,tag:hw=pi5" in refused.value.hint


def test_a_selector_prints_as_it_parses() -> None:
    assert str(parse_selector("group:shops, tag:hw=pi5,all")) == "group:shops,tag:hw=pi5,all"


def test_audit_entries_come_back_newest_first(database: Database) -> None:
    with database.session() as session:
        registry.record_audit(session, actor="ops", action="pause", target="r1", at=T0)
        registry.record_audit(
            session, actor="ops", action="halt", target="r1", reason="gate", at=T0 + 1
        )
    with database.session() as session:
        entries = registry.audit_entries(session)
        assert [(e.action, e.reason) for e in entries] == [("halt", "gate"), ("pause", None)]


def test_heartbeats_of_one_batch_leave_the_newest(database: Database) -> None:
    with database.session() as session:
        registry.record_status(session, status_message("cam1", T0))
    beats = [health_message("cam1", T0 + ts, fps=float(ts)) for ts in (30, 10, 40, 20)]
    with database.session() as session:
        applied = registry.record(session, [Received(beat, T0 + 50) for beat in beats])
    assert applied == 2  # 30, then 40; 10 and 20 came after a newer one
    with database.session() as session:
        device = registry.show_device(session, "cam1")
    assert (device.health_ts, device.streams[0].fps) == (T0 + 40, 40.0)
    assert (device.first_seen, device.last_seen) == (T0, T0 + 40)


def test_a_heartbeat_with_a_new_stream_adds_it(database: Database) -> None:
    beat = health_message("cam1", T0 + 1)
    yard = beat.model_copy(update={"streams": {**beat.streams, "yard": beat.streams["door"]}})
    with database.session() as session:
        registry.record_health(session, health_message("cam1", T0))
    with database.session() as session:
        assert registry.record_health(session, yard)
    with database.session() as session:
        assert [s.stream for s in registry.show_device(session, "cam1").streams] == ["door", "yard"]


def test_a_streams_error_rate_counts_the_running_models_frames_only(database: Database) -> None:
    def rate() -> float | None:
        with database.session() as session:
            row = session.get(DeviceStream, ("cam1", "door"))
            assert row is not None
            return registry.error_rate(row)

    with database.session() as session:
        registry.record_status(session, status_message("cam1", T0))
        registry.record_health(session, health_message("cam1", T0 + 1, processed=1000, failed=10))
        # A live swap: the agent's counters go on from 1000 frames.
        registry.record_reported(session, reported_message("cam1", T0 + 2, sha256="b" * 64))
        registry.record_health(session, health_message("cam1", T0 + 3, processed=1100, failed=40))
    assert rate() == pytest.approx(0.3)  # 30 of the new model's 100 frames, not 40 of 1100
    with database.session() as session:
        row = session.get(DeviceStream, ("cam1", "door"))
        assert row is not None
        assert row.previous_error_rate == pytest.approx(0.01)
        # The agent restarts: its counters start again, all of them the running model's.
        registry.record_health(session, health_message("cam1", T0 + 9, processed=50, failed=1))
    assert rate() == pytest.approx(0.02)
