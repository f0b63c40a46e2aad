"""Rollouts made durable and applied (ops/controller/reconcile.py): the engine's decisions
stored on SQLite and PostgreSQL and written as retained desired states to a real Mosquitto,
seen by a test subscriber; devices registered from real protocol messages; releases signed
into a real store with a real key."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker import Mosquitto, MqttProbe
from conftest import Assets
from fleet import variant
from sqlalchemy import select

from edgefleet.agent.protocol import (
    DesiredState,
    ModelRef,
    ReportedState,
    SignedManifest,
    StatusMessage,
    UpdateReport,
    UpdateState,
)
from edgefleet.ops.controller import registry
from edgefleet.ops.controller.db import Database, DeviceStream, open_database
from edgefleet.ops.controller.reconcile import (
    BrokerPublisher,
    RolloutOverlaps,
    RolloutRunner,
    command,
    device_facts,
    list_rollouts,
    load_plan,
    load_state,
    show_rollout,
    start_rollout,
    unwritten,
)
from edgefleet.ops.controller.releases import Release, ReleaseStore, create_release, sign_rollback
from edgefleet.ops.controller.rollout_tables import (
    DesiredWriteRow,
    RolloutCommandRow,
    RolloutDecisionRow,
    RolloutRow,
)
from edgefleet.ops.controller.rollouts import (
    CommandRefused,
    DecisionKind,
    ManifestRef,
    OperatorCommand,
    OperatorCommandKind,
    RolloutGates,
    RolloutPlan,
    RolloutStatus,
)
from edgefleet.ops.controller.service import RolloutLoop
from edgefleet.ops.errors import BrokerError
from edgefleet.ops.fleet import ManifestTerms, SequenceCounter
from edgefleet.ops.profile import OperatorProfile, ResolvedProfile
from edgefleet.provisioning import generate_signing_key, load_private_key

MODEL = "mobilenet_v1_0.25_128_quant.tflite"
ROOT = "edgefleet/v1"
STREAM = "door"
DEVICES = ("cam1", "cam2", "cam3")
T0 = 1_800_000_000.0
SOAK_S = 60.0
HOUR_S = 3600.0


@dataclass(frozen=True)
class Signed:
    """The release running today, the one rolled out, and its pre-signed rollback."""

    old: Release
    new: Release
    rollback: SignedManifest


@pytest.fixture
def signed(assets: Assets, tmp_path: Path) -> Signed:
    key, _ = generate_signing_key(tmp_path / "keys", "release")
    store, private, counter = ReleaseStore(tmp_path / "store"), load_private_key(key), None
    counter = SequenceCounter.beside(key)
    model = assets.model(MODEL)
    rebuilt = tmp_path / "rebuilt" / MODEL
    rebuilt.parent.mkdir()
    rebuilt.write_bytes(variant(model.read_bytes(), 16))
    releases = []
    for version, path in ((1, model), (2, rebuilt)):
        terms = ManifestTerms(
            model_id="mobilenet", version=version, urls=("mqtt:",), lifetime_s=HOUR_S
        )
        releases.append(create_release(store, path, terms, private, counter))
    old, new = releases
    return Signed(old, new, sign_rollback(old, new, private, 2 * HOUR_S, counter))


@pytest.fixture
def database(controller_db_url: str) -> Iterator[Database]:
    with open_database(controller_db_url) as opened:
        yield opened


@pytest.fixture
def publisher(broker: Mosquitto) -> BrokerPublisher:
    return BrokerPublisher(
        ResolvedProfile(OperatorProfile(host=broker.host, port=broker.port, insecure=True))
    )


@pytest.fixture
def watcher(broker: Mosquitto) -> Iterator[MqttProbe]:
    """Every desired state written, in order, from before the rollout starts."""
    with MqttProbe(broker) as probe:
        probe.subscribe(f"{ROOT}/+/desired")
        yield probe


def model_ref(release: Release) -> ModelRef:
    return ModelRef(
        id=release.model_id, version=str(release.version), sha256=release.sha256,
        task="classification", backend="litert 2.3.0", delegate="cpu",
    )  # fmt: skip


def register(database: Database, signed: Signed, *, at: float = T0 - 100) -> None:
    """Each device says it is online and runs the old release on its stream."""
    received = []
    for device in DEVICES:
        status = StatusMessage(
            state="online", device_id=device, ts=at, agent_version="0.1.0",
            models=[model_ref(signed.old)], streams=[STREAM],
        )  # fmt: skip
        received += [
            registry.Received(status, at),
            registry.Received(reported(device, signed.old, at=at + 1, update=None), at + 1),
        ]
    with database.session() as session:
        registry.record(session, received)


def reported(
    device: str,
    running: Release,
    *,
    at: float,
    update: tuple[UpdateState, Release] | None,
    reason: str | None = None,
) -> ReportedState:
    updates = {}
    if update is not None:
        state, release = update
        updates[STREAM] = UpdateReport(
            state=state, model_id=release.model_id, version=release.version,
            sha256=release.sha256, reason=reason, ts=at,
        )  # fmt: skip
    return ReportedState(
        device_id=device, ts=at, agent_version="0.1.0", desired_revision=1,
        models={STREAM: model_ref(running)}, updates=updates,
    )  # fmt: skip


def report(database: Database, message: ReportedState) -> None:
    with database.session() as session:
        assert registry.record_reported(session, message, received_at=message.ts)


def make_plan(signed: Signed, rollout_id: str = "r1") -> RolloutPlan:
    new, old = signed.new, signed.old
    return RolloutPlan(
        rollout_id=rollout_id,
        release_id=new.id,
        stream=STREAM,
        release=ManifestRef(ref=new.id, model_id=new.model_id, version=new.version,
                            sha256=new.sha256),
        rollback=ManifestRef(ref=f"{new.id}/rollback", model_id=old.model_id,
                             version=old.version, sha256=old.sha256),
        devices=DEVICES,
        waves="1,100%",
        gates=RolloutGates(min_soak_s=SOAK_S),
        deadline=T0 + HOUR_S,
    )  # fmt: skip


def start(database: Database, signed: Signed, rollout_id: str = "r1") -> RolloutPlan:
    plan = make_plan(signed, rollout_id)
    with database.session() as session:
        start_rollout(
            session, plan, "alice", release=signed.new.manifest, rollback=signed.rollback, now=T0
        )
    return plan


def desired_models(probe: MqttProbe, device: str) -> list[tuple[int, SignedManifest]]:
    """Each desired state the device was sent: its revision and the stream's manifest."""
    seen = []
    for message in probe.messages(f"{ROOT}/{device}/desired"):
        desired = DesiredState.model_validate_json(message.payload)
        seen.append((desired.revision, desired.models[STREAM]))
    return seen


def wait_for_desired(probe: MqttProbe, device: str, count: int) -> list[tuple[int, SignedManifest]]:
    probe.wait_until(
        lambda: len(probe.messages(f"{ROOT}/{device}/desired")) >= count or None,
        f"{count} desired states of {device}",
        20,
    )
    return desired_models(probe, device)


def decisions(database: Database, rollout_id: str = "r1") -> list[tuple[str, str]]:
    with database.session() as session:
        query = (
            select(RolloutDecisionRow)
            .where(RolloutDecisionRow.rollout_id == rollout_id)
            .order_by(RolloutDecisionRow.seq)
        )
        return [(row.kind, row.reason) for row in session.scalars(query)]


# -- facts ---------------------------------------------------------------------------------


def test_facts_come_from_the_registry_and_keep_the_previous_models_figures(
    database: Database, signed: Signed
) -> None:
    register(database, signed)
    plan = make_plan(signed)
    with database.session() as session:
        row = session.get(DeviceStream, ("cam1", STREAM))
        assert row is not None
        row.processed, row.failed, row.latency_p99_ms = 1000, 10, 40.0
    report(
        database,
        reported("cam1", signed.new, at=T0 + 5, update=(UpdateState.COMMITTED, signed.new)),
    )
    with database.session() as session:
        registry.mark_offline(session, "cam2", at=T0, reason="silent")
        facts = device_facts(session, plan)

    cam1 = facts["cam1"]
    assert cam1.online
    assert cam1.running_sha256 == signed.new.sha256
    assert cam1.update is not None
    assert cam1.update.state is UpdateState.COMMITTED
    assert (cam1.previous_error_rate, cam1.previous_latency_p99_ms) == (0.01, 40.0)
    assert cam1.running_since == T0 + 5
    assert not facts["cam2"].online
    assert facts["cam3"].update is None
    assert facts["cam3"].previous_error_rate is None


# -- a rollout in waves ---------------------------------------------------------------------


def test_waves_are_written_to_the_broker_and_advance_on_success(
    database: Database, signed: Signed, publisher: BrokerPublisher, watcher: MqttProbe
) -> None:
    register(database, signed)
    start(database, signed)
    runner = RolloutRunner(database, publisher)

    first = runner.step("r1", T0)

    assert first.published == ("cam1",)
    assert [r.kind for r in first.decision.records] == [DecisionKind.WAVE_STARTED]
    [(revision, manifest)] = wait_for_desired(watcher, "cam1", 1)
    assert manifest == signed.new.manifest
    assert revision == 2
    again = runner.step("r1", T0 + 1)  # no new facts: nothing new
    assert again.published == ()
    assert again.decision.records == ()

    report(database, reported("cam1", signed.new, at=T0 + 10,
                              update=(UpdateState.COMMITTED, signed.new)))  # fmt: skip
    soaking = runner.step("r1", T0 + 20)
    assert soaking.published == ()
    advanced = runner.step("r1", T0 + 10 + SOAK_S)

    assert advanced.published == ("cam2", "cam3")
    assert [r.kind for r in advanced.decision.records] == [
        DecisionKind.ADVANCED, DecisionKind.WAVE_STARTED
    ]  # fmt: skip
    for device in ("cam2", "cam3"):
        assert [m for _, m in wait_for_desired(watcher, device, 1)] == [signed.new.manifest]
    for device in ("cam2", "cam3"):
        report(database, reported(device, signed.new, at=T0 + 100,
                                  update=(UpdateState.COMMITTED, signed.new)))  # fmt: skip
    done = runner.step("r1", T0 + 100 + SOAK_S)
    assert done.decision.state.status is RolloutStatus.COMPLETED
    assert done.published == ()

    kinds = [kind for kind, _ in decisions(database)]
    assert kinds == ["wave_started", "advanced", "wave_started", "completed"]
    assert all(reason for _, reason in decisions(database))
    with database.session() as session:
        view = registry.show_device(session, "cam2")
        rollout = session.get(RolloutRow, "r1")
        assert rollout is not None
        assert rollout.status == "completed"
        entries = registry.audit_entries(session)
    stream = next(s for s in view.streams if s.stream == STREAM)
    assert stream.model_dump()["desired_sha256"] == signed.new.sha256
    assert [(e.actor, e.action) for e in entries] == [("alice", "rollout.start")]
    assert len(desired_models(watcher, "cam1")) == 1


def test_a_probation_rollback_at_wave_one_rolls_that_device_back_and_no_other_gets_it(
    database: Database, signed: Signed, publisher: BrokerPublisher, watcher: MqttProbe
) -> None:
    register(database, signed)
    start(database, signed)
    runner = RolloutRunner(database, publisher)
    runner.step("r1", T0)
    wait_for_desired(watcher, "cam1", 1)
    report(database, reported("cam1", signed.old, at=T0 + 30,
                              update=(UpdateState.ROLLED_BACK, signed.new),
                              reason="probation: 40% of frames failed"))  # fmt: skip

    stepped = runner.step("r1", T0 + 31)

    assert stepped.decision.state.status is RolloutStatus.ROLLED_BACK
    assert stepped.published == ("cam1",)
    sent = wait_for_desired(watcher, "cam1", 2)
    assert [m for _, m in sent] == [signed.new.manifest, signed.rollback]
    assert sent[1][0] > sent[0][0]
    failed = [reason for kind, reason in decisions(database) if kind == "gate_failed"]
    assert len(failed) == 1
    assert "probation: 40% of frames failed" in failed[0]
    assert runner.step("r1", T0 + 40).published == ()
    # The others never got the release: a fresh subscriber finds no retained state for them.
    with MqttProbe(watcher.broker) as fresh:
        fresh.subscribe(f"{ROOT}/+/desired")
        fresh.wait_for_message(f"{ROOT}/cam1/desired")
        assert {m.topic for m in fresh.messages()} == {f"{ROOT}/cam1/desired"}
    assert desired_models(watcher, "cam2") == desired_models(watcher, "cam3") == []


# -- operator commands -------------------------------------------------------------------------


def test_commands_are_stored_audited_and_applied_once_by_the_next_step(
    database: Database, signed: Signed, publisher: BrokerPublisher, watcher: MqttProbe
) -> None:
    register(database, signed)
    start(database, signed)
    runner = RolloutRunner(database, publisher)
    runner.step("r1", T0)
    pause = OperatorCommand(id="c1", kind=OperatorCommandKind.PAUSE, actor="bob", reason="lunch")
    with database.session() as session:
        assert command(session, "r1", pause, now=T0 + 1)
        assert not command(session, "r1", pause, now=T0 + 2)  # the same id: once
        resume = OperatorCommand(
            id="c2", kind=OperatorCommandKind.RESUME, actor="bob", reason="back"
        )
        assert command(session, "r1", resume, now=T0 + 3)  # allowed once c1 is applied
        with pytest.raises(CommandRefused):
            command(session, "r1", resume.model_copy(update={"id": "c3"}), now=T0 + 4)

    stepped = runner.step("r1", T0 + 5)

    assert [r.kind for r in stepped.decision.records] == [DecisionKind.PAUSED, DecisionKind.RESUMED]
    assert stepped.decision.state.status is RolloutStatus.RUNNING
    rollback = OperatorCommand(
        id="c4", kind=OperatorCommandKind.ROLLBACK, actor="carol", reason="bad"
    )
    with database.session() as session:
        command(session, "r1", rollback, now=T0 + 6)
    rolled = runner.step("r1", T0 + 7)
    assert rolled.published == ("cam1",)
    assert rolled.decision.state.status is RolloutStatus.ROLLED_BACK
    assert [m for _, m in wait_for_desired(watcher, "cam1", 2)] == [
        signed.new.manifest, signed.rollback
    ]  # fmt: skip
    with database.session() as session:
        applied = session.scalars(select(RolloutCommandRow).order_by(RolloutCommandRow.at)).all()
        assert [(c.id, c.applied_at) for c in applied] == [
            ("c1", T0 + 5), ("c2", T0 + 5), ("c4", T0 + 7)
        ]  # fmt: skip
        actions = [(e.actor, e.action) for e in reversed(registry.audit_entries(session))]
    assert actions == [
        ("alice", "rollout.start"), ("bob", "rollout.pause"), ("bob", "rollout.resume"),
        ("carol", "rollout.rollback"),
    ]  # fmt: skip


def test_a_second_rollout_of_the_stream_on_the_same_devices_is_refused(
    database: Database, signed: Signed
) -> None:
    register(database, signed)
    start(database, signed)
    with pytest.raises(RolloutOverlaps, match="rollout r1"):
        start(database, signed, "r2")


# -- crashes -----------------------------------------------------------------------------------


def test_a_restarted_controller_resumes_and_no_device_gets_two_states_for_one_step(
    controller_db_url: str, signed: Signed, publisher: BrokerPublisher, watcher: MqttProbe
) -> None:
    with open_database(controller_db_url) as first:
        register(first, signed)
        start(first, signed)
        RolloutRunner(first, publisher).decide("r1", T0)  # crash: committed, never published

    with open_database(controller_db_url) as second:
        runner = RolloutRunner(second, publisher)
        resumed = runner.step("r1", T0 + 1)
        assert resumed.published == ("cam1",)
        assert resumed.decision.records == ()
        wait_for_desired(watcher, "cam1", 1)
        report(second, reported("cam1", signed.new, at=T0 + 10,
                                update=(UpdateState.COMMITTED, signed.new)))  # fmt: skip
        runner.decide("r1", T0 + 10 + SOAK_S)  # wave 2 decided
        with second.session() as session:
            writes = unwritten(session, "r1")
        assert [w.device_id for w in writes] == ["cam2", "cam3"]
        publisher.publish_retained(  # published, then a crash before they are marked
            [(f"{ROOT}/{w.device_id}/desired", w.payload.encode()) for w in writes]
        )

    with open_database(controller_db_url) as third:
        runner = RolloutRunner(third, publisher)
        again = runner.step("r1", T0 + 11 + SOAK_S)
        assert again.published == ("cam2", "cam3")
        assert again.decision.records == ()
        assert runner.step("r1", T0 + 12 + SOAK_S).published == ()
        with third.session() as session:
            row = session.get(RolloutRow, "r1")
            assert row is not None
            state, plan = load_state(row), load_plan(row)
            steps = {w.device_id: w.step for w in session.scalars(select(DesiredWriteRow))}
        kinds = [kind for kind, _ in decisions(third)]
    assert kinds == ["wave_started", "advanced", "wave_started"]
    assert len(state.waves) == 2
    assert plan.devices == DEVICES
    assert steps == {"cam1": 1, "cam2": 2, "cam3": 2}

    for device in ("cam2", "cam3"):
        wait_for_desired(watcher, device, 2)
    for device in DEVICES:
        payloads = {m.payload for m in watcher.messages(f"{ROOT}/{device}/desired")}
        assert len(payloads) == 1, f"{device} got {len(payloads)} desired states for one step"
        assert json.loads(payloads.pop())["models"][STREAM] == signed.new.manifest.model_dump()


def test_two_controllers_stepping_at_once_decide_each_wave_once(
    controller_db_url: str, signed: Signed, publisher: BrokerPublisher, watcher: MqttProbe
) -> None:
    with open_database(controller_db_url) as setup:
        register(setup, signed)
        start(setup, signed)
        report(setup, reported("cam1", signed.new, at=T0 + 10,
                               update=(UpdateState.COMMITTED, signed.new)))  # fmt: skip
    barrier = threading.Barrier(2)
    failures: list[BaseException] = []

    def controller(database: Database) -> None:
        runner = RolloutRunner(database, publisher)
        try:
            barrier.wait(10)
            for now in (T0, T0 + 1, T0 + 10 + SOAK_S, T0 + 11 + SOAK_S):
                runner.step("r1", now)
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    # Opened (migrated) here: Alembic's migration context is one per process.
    with open_database(controller_db_url) as one, open_database(controller_db_url) as two:
        threads = [
            threading.Thread(target=controller, args=(database,), name=f"controller-{n}")
            for n, database in ((1, one), (2, two))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

    assert failures == []
    with open_database(controller_db_url) as database:
        kinds = [kind for kind, _ in decisions(database)]
    assert kinds == ["wave_started", "advanced", "wave_started"]
    for device in DEVICES:
        wait_for_desired(watcher, device, 1)
        payloads = {m.payload for m in watcher.messages(f"{ROOT}/{device}/desired")}
        assert len(payloads) == 1


def test_a_device_offline_at_its_wave_gets_the_retained_state_and_is_recorded_on_return(
    database: Database, signed: Signed, publisher: BrokerPublisher, watcher: MqttProbe
) -> None:
    register(database, signed)
    with database.session() as session:
        registry.mark_offline(session, "cam1", at=T0 - 1, reason="connection lost")
    start(database, signed)
    runner = RolloutRunner(database, publisher)

    first = runner.step("r1", T0)

    assert first.published == ("cam1",)  # retained: it finds it when it returns
    assert "cam1 offline: pending" in first.decision.records[0].reason
    with MqttProbe(watcher.broker) as returning:  # the device, back: the broker's retained copy
        returning.subscribe(f"{ROOT}/cam1/desired")
        retained = returning.wait_for_message(f"{ROOT}/cam1/desired")
    assert retained.retain
    assert DesiredState.model_validate_json(retained.payload).models[STREAM] == signed.new.manifest
    status = StatusMessage(
        state="online", device_id="cam1", ts=T0 + 50, agent_version="0.1.0",
        models=[model_ref(signed.new)], streams=[STREAM],
    )  # fmt: skip
    with database.session() as session:
        registry.record_status(session, status, received_at=T0 + 50)
    report(database, reported("cam1", signed.new, at=T0 + 51,
                              update=(UpdateState.COMMITTED, signed.new)))  # fmt: skip

    back = runner.step("r1", T0 + 52)

    assert [r.kind for r in back.decision.records] == [DecisionKind.CONVERGED]
    assert "cam1 returned and converged" in back.decision.records[0].reason
    assert back.published == ()


def test_step_all_steps_what_is_due_and_show_rollout_tells_what_was_decided_and_written(
    database: Database, signed: Signed, publisher: BrokerPublisher, watcher: MqttProbe
) -> None:
    register(database, signed)
    start(database, signed)
    runner = RolloutRunner(database, publisher)

    stepped = runner.step_all(T0)

    assert list(stepped) == ["r1"]
    assert stepped["r1"].published == ("cam1",)
    wait_for_desired(watcher, "cam1", 1)
    with database.session() as session:
        view = show_rollout(session, "r1")
        [listed] = list_rollouts(session, status=RolloutStatus.RUNNING)
    assert listed.id == "r1"
    assert listed.decisions == []
    assert (view.status, view.waves_started, view.devices, view.created_by) == (
        RolloutStatus.RUNNING, 1, 3, "alice"
    )  # fmt: skip
    assert [d.kind for d in view.decisions] == ["wave_started"]
    assert "release mobilenet@2" in view.decisions[0].reason
    [write] = view.writes
    assert (write.device_id, write.step, write.target) == ("cam1", 1, "release")
    assert write.manifest_sha256 == signed.new.sha256
    assert write.written_at == T0

    report(database, reported("cam1", signed.new, at=T0 + 1,
                              update=(UpdateState.COMMITTED, signed.new)))  # fmt: skip
    rollback = OperatorCommand(id="c1", kind=OperatorCommandKind.ROLLBACK, actor="bob", reason="x")
    with database.session() as session:
        command(session, "r1", rollback, now=T0 + 1)
    assert runner.step_all(T0 + 2)["r1"].published == ("cam1",)
    report(database, reported("cam1", signed.old, at=T0 + 3,
                              update=(UpdateState.COMMITTED, signed.old)))  # fmt: skip
    assert [r.kind for r in runner.step_all(T0 + 4)["r1"].decision.records] == [
        DecisionKind.CONVERGED
    ]
    assert runner.step_all(T0 + 5) == {}  # rolled back and recorded: nothing is due


def test_a_broker_outage_leaves_the_decision_stored_and_the_next_step_writes_it(
    database: Database, signed: Signed, publisher: BrokerPublisher, broker: Mosquitto
) -> None:
    register(database, signed)
    start(database, signed)
    runner = RolloutRunner(database, publisher)
    broker.stop()

    with pytest.raises(BrokerError):
        runner.step("r1", T0)

    with database.session() as session:
        assert [w.device_id for w in unwritten(session, "r1")] == ["cam1"]
        assert load_state(session.get_one(RolloutRow, "r1")).waves  # decided, committed
    broker.start()
    resumed = runner.step("r1", T0 + 1)
    assert resumed.published == ("cam1",)
    assert resumed.decision.records == ()
    with MqttProbe(broker) as device:
        device.subscribe(f"{ROOT}/cam1/desired")
        retained = device.wait_for_message(f"{ROOT}/cam1/desired")
    assert DesiredState.model_validate_json(retained.payload).models[STREAM] == signed.new.manifest
    with database.session() as session:
        assert unwritten(session, "r1") == []


def test_the_services_rollout_loop_logs_a_failed_step_and_the_next_one_writes_it(
    database: Database,
    signed: Signed,
    publisher: BrokerPublisher,
    broker: Mosquitto,
    caplog: pytest.LogCaptureFixture,
) -> None:
    register(database, signed)
    start(database, signed)
    loop = RolloutLoop(RolloutRunner(database, publisher), interval_s=5)
    broker.stop()

    with caplog.at_level(logging.ERROR, logger="edgefleet.ops.controller.service"):
        loop.step()  # raises nothing: the service's thread goes on

    assert loop.failures == 1
    assert "rollout r1: a step failed" in caplog.text
    assert "trying again in 5 s" in caplog.text
    broker.start()
    loop.step()
    assert loop.failures == 1
    with database.session() as session:
        assert unwritten(session, "r1") == []
