"""The rollout engine's decision (ops/controller/rollouts.py): pure, driven without I/O."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgefleet.agent.protocol import UpdateReport, UpdateState
from edgefleet.ops.controller.rollouts import (
    CommandRefused,
    Decision,
    DecisionKind,
    DesiredTarget,
    DeviceFacts,
    ManifestRef,
    OperatorCommand,
    OperatorCommandKind,
    RolloutGates,
    RolloutPlan,
    RolloutPlanError,
    RolloutState,
    RolloutStatus,
    decide,
    parse_gates,
    parse_waves,
    resolve_waves,
)

T0 = 1_800_000_000.0
OLD_SHA = "a" * 64
NEW_SHA = "b" * 64
RELEASE = ManifestRef(ref="manifests/det-v2", model_id="det", version=2, sha256=NEW_SHA)
ROLLBACK = ManifestRef(ref="manifests/det-v1-rollback", model_id="det", version=1, sha256=OLD_SHA)


def make_plan(
    devices: int = 3,
    waves: str = "1,100%",
    *,
    soak_s: float = 600,
    deadline: float = T0 + 3600,
    proceed_without_offline: bool = False,
    **gates: float,
) -> RolloutPlan:
    return RolloutPlan(
        rollout_id="ro-1",
        release_id="det-v2",
        stream="front",
        release=RELEASE,
        rollback=ROLLBACK,
        devices=tuple(f"dev-{i}" for i in range(1, devices + 1)),
        waves=waves,
        gates=RolloutGates(min_soak_s=soak_s, **gates),
        deadline=deadline,
        proceed_without_offline=proceed_without_offline,
    )


def report(
    state: UpdateState, ts: float, manifest: ManifestRef = RELEASE, reason: str | None = None
) -> UpdateReport:
    return UpdateReport(
        state=state,
        model_id=manifest.model_id,
        version=manifest.version,
        sha256=manifest.sha256,
        reason=reason,
        ts=ts,
    )


def idle(device: str, *, online: bool = True) -> DeviceFacts:
    """A device on the previous model that has not touched the release."""
    return DeviceFacts(device_id=device, online=online, running_sha256=OLD_SHA)


def committed(
    device: str,
    ts: float,
    *,
    error_rate: float = 0.01,
    previous_error_rate: float = 0.01,
    latency_p99_ms: float = 100.0,
    previous_latency_p99_ms: float = 100.0,
    online: bool = True,
) -> DeviceFacts:
    return DeviceFacts(
        device_id=device,
        online=online,
        update=report(UpdateState.COMMITTED, ts),
        running_sha256=NEW_SHA,
        running_since=ts - 30,
        error_rate=error_rate,
        previous_error_rate=previous_error_rate,
        latency_p99_ms=latency_p99_ms,
        previous_latency_p99_ms=previous_latency_p99_ms,
    )


def rolled_back(device: str, ts: float, reason: str = "error rate 40% > 5%") -> DeviceFacts:
    return DeviceFacts(
        device_id=device,
        online=True,
        update=report(UpdateState.ROLLED_BACK, ts, reason=reason),
        running_sha256=OLD_SHA,
    )


def updating(device: str, ts: float, state: UpdateState = UpdateState.DOWNLOADING) -> DeviceFacts:
    return DeviceFacts(
        device_id=device, online=True, update=report(state, ts), running_sha256=OLD_SHA
    )


def facts_of(*items: DeviceFacts) -> dict[str, DeviceFacts]:
    return {item.device_id: item for item in items}


def targets(decision: Decision) -> dict[str, DesiredTarget]:
    return {device: desired.target for device, desired in decision.desired.items()}


def kinds(decision: Decision) -> list[DecisionKind]:
    return [record.kind for record in decision.records]


def command(
    kind: OperatorCommandKind, id_: str = "c1", reason: str = "night shift"
) -> OperatorCommand:
    return OperatorCommand(id=id_, kind=kind, actor="alice", reason=reason)


def started(plan: RolloutPlan, facts: dict[str, DeviceFacts]) -> RolloutState:
    """The state after the rollout's first decision, at T0."""
    return decide(plan, RolloutState(), facts, T0).state


R, U, B = DesiredTarget.RELEASE, DesiredTarget.UNTOUCHED, DesiredTarget.ROLLBACK


# -- waves and convergence ---------------------------------------------------------------


def test_first_decision_gives_wave_1_the_release_and_leaves_the_rest_untouched() -> None:
    plan = make_plan()
    decision = decide(plan, RolloutState(), facts_of(*map(idle, plan.devices)), T0)

    assert targets(decision) == {"dev-1": R, "dev-2": U, "dev-3": U}
    assert decision.desired["dev-1"].manifest == RELEASE
    assert decision.desired["dev-1"].step == 1
    assert kinds(decision) == [DecisionKind.WAVE_STARTED]
    assert decision.records[0].reason == "wave 1 of 2 started: release det-v2 (v2) to dev-1"
    assert decision.state.status is RolloutStatus.RUNNING


def test_waves_1_then_2_converge_on_all_three_devices() -> None:
    plan = make_plan(soak_s=600)
    state = started(plan, facts_of(*map(idle, plan.devices)))

    wave_1_done = facts_of(committed("dev-1", T0 + 60), idle("dev-2"), idle("dev-3"))
    advanced = decide(plan, state, wave_1_done, T0 + 660)
    assert kinds(advanced) == [DecisionKind.ADVANCED, DecisionKind.WAVE_STARTED]
    assert advanced.records[0].reason == (
        "wave 1 of 2: 1/1 updated, error rate +0% ≤ 2%, latency p99 +0% ≤ 20%, "
        "soak 10m passed: advancing to wave 2"
    )
    assert targets(advanced) == {"dev-1": R, "dev-2": R, "dev-3": R}
    assert advanced.desired["dev-3"].step == 2

    all_done = facts_of(*(committed(d, T0 + 700) for d in plan.devices))
    completed = decide(plan, advanced.state, all_done, T0 + 1300)
    assert kinds(completed) == [DecisionKind.COMPLETED]
    assert completed.records[0].reason.startswith("wave 2 of 2: 3/3 updated")
    assert completed.records[0].reason.endswith("rollout completed")
    assert completed.state.status is RolloutStatus.COMPLETED
    assert targets(completed) == {"dev-1": R, "dev-2": R, "dev-3": R}


def test_next_wave_waits_for_every_device_of_the_waves_so_far() -> None:
    plan = make_plan(devices=4, waves="2,100%", soak_s=0)
    state = started(plan, facts_of(*map(idle, plan.devices)))

    half = facts_of(committed("dev-1", T0 + 10), updating("dev-2", T0 + 10))
    decision = decide(plan, state, half, T0 + 100)

    assert decision.records == ()
    assert decision.state == state


def test_soak_counts_from_the_last_commit_of_the_waves_so_far() -> None:
    plan = make_plan(devices=3, waves="2,100%", soak_s=600)
    state = started(plan, facts_of(*map(idle, plan.devices)))
    facts = facts_of(committed("dev-1", T0 + 10), committed("dev-2", T0 + 200), idle("dev-3"))

    assert decide(plan, state, facts, T0 + 799).records == ()
    assert kinds(decide(plan, state, facts, T0 + 800))[0] is DecisionKind.ADVANCED


def test_a_wave_spec_that_rounds_to_fewer_waves_runs_those() -> None:
    plan = make_plan(devices=3, waves="1,10%,50%,100%", soak_s=0)
    facts = facts_of(*(committed(d, T0) for d in plan.devices))
    state = RolloutState()
    started_waves = []
    for _ in range(5):
        decision = decide(plan, state, facts, T0 + 1)
        state = decision.state
        started_waves += [
            r.devices for r in decision.records if r.kind is DecisionKind.WAVE_STARTED
        ]

    assert started_waves == [("dev-1",), ("dev-2",), ("dev-3",)]
    assert state.status is RolloutStatus.COMPLETED


# -- gates -------------------------------------------------------------------------------


def test_probation_rollback_at_wave_1_rolls_wave_1_back_and_later_waves_never_get_it() -> None:
    plan = make_plan()
    state = started(plan, facts_of(*map(idle, plan.devices)))

    failed = facts_of(rolled_back("dev-1", T0 + 90, "errors on 38% of frames"), idle("dev-2"))
    decision = decide(plan, state, failed, T0 + 100)

    assert decision.state.status is RolloutStatus.ROLLED_BACK
    assert targets(decision) == {"dev-1": B, "dev-2": U, "dev-3": U}
    assert decision.desired["dev-1"].manifest == ROLLBACK
    assert decision.desired["dev-1"].step == 2
    gate = decision.records[0]
    assert gate.kind is DecisionKind.GATE_FAILED
    assert gate.reason == (
        "wave 1 halted: dev-1 (errors on 38% of frames) rolled back in probation: 1 > 0 "
        "allowed: rolling wave 1 back (1 device gets the rollback)"
    )
    assert gate.devices == ("dev-1",)
    # The device already runs the previous model: it is recorded as converged on the rollback.
    assert decision.records[1].kind is DecisionKind.CONVERGED
    assert "dev-1 converged on the rollback" in decision.records[1].reason

    later = decide(plan, decision.state, failed, T0 + 10_000)
    assert later.records == ()
    assert targets(later) == {"dev-1": B, "dev-2": U, "dev-3": U}


def test_probation_rollbacks_within_the_gate_do_not_halt() -> None:
    plan = make_plan(
        devices=4, waves="3,100%", soak_s=0, max_probation_rollbacks=1, min_success_ratio=0.6
    )
    state = started(plan, facts_of(*map(idle, plan.devices)))
    facts = facts_of(
        committed("dev-1", T0 + 5), committed("dev-2", T0 + 5), rolled_back("dev-3", T0 + 5)
    )

    decision = decide(plan, state, facts, T0 + 10)

    assert kinds(decision)[0] is DecisionKind.ADVANCED
    assert decision.records[0].reason.startswith("wave 1 of 2: 2/3 updated")


def test_a_refused_release_fails_the_success_ratio_gate() -> None:
    plan = make_plan()
    state = started(plan, facts_of(*map(idle, plan.devices)))
    refused = DeviceFacts(
        device_id="dev-1",
        online=True,
        update=report(UpdateState.REFUSED, T0 + 5, reason="validation: output shape"),
        running_sha256=OLD_SHA,
    )

    decision = decide(plan, state, facts_of(refused), T0 + 10)

    assert decision.state.status is RolloutStatus.ROLLED_BACK
    assert decision.records[0].reason.startswith(
        "wave 1 halted: dev-1 refused or rolled back the release: at most 0% of 1 can update, "
        "below 100%"
    )


def test_success_ratio_fails_early_once_the_gate_cannot_be_reached() -> None:
    plan = make_plan(devices=10, waves="5,100%", min_success_ratio=0.8, max_probation_rollbacks=5)
    state = started(plan, facts_of(*map(idle, plan.devices)))
    facts = facts_of(
        rolled_back("dev-1", T0 + 5), rolled_back("dev-2", T0 + 5), updating("dev-3", T0 + 5)
    )

    decision = decide(plan, state, facts, T0 + 10)

    assert decision.state.status is RolloutStatus.ROLLED_BACK
    assert "at most 60% of 5 can update, below 80%" in decision.records[0].reason
    assert {d for d, t in targets(decision).items() if t is B} == {f"dev-{i}" for i in range(1, 6)}


def test_error_rate_increase_over_the_previous_model_fails_the_gate() -> None:
    plan = make_plan(devices=3, waves="2,100%", soak_s=0)
    state = started(plan, facts_of(*map(idle, plan.devices)))
    facts = facts_of(
        committed("dev-1", T0 + 5, error_rate=0.05, previous_error_rate=0.01),
        committed("dev-2", T0 + 5, error_rate=0.03, previous_error_rate=0.01),
    )

    decision = decide(plan, state, facts, T0 + 10)

    assert decision.state.status is RolloutStatus.ROLLED_BACK
    assert decision.records[0].reason.startswith(
        "wave 1 halted: error rate +3% > 2% against the previous model (mean of 2; worst "
        "dev-1 +4%): rolling wave 1 back"
    )
    assert targets(decision) == {"dev-1": B, "dev-2": B, "dev-3": U}


def test_error_rate_within_the_gate_advances_and_says_by_how_much() -> None:
    plan = make_plan(devices=2, waves="1,100%", soak_s=0)
    state = started(plan, facts_of(*map(idle, plan.devices)))
    facts = facts_of(committed("dev-1", T0 + 5, error_rate=0.011, previous_error_rate=0.01))

    decision = decide(plan, state, facts, T0 + 10)

    assert "error rate +0.1% ≤ 2%" in decision.records[0].reason
    assert kinds(decision)[0] is DecisionKind.ADVANCED


def test_latency_p99_increase_over_the_previous_model_fails_the_gate() -> None:
    plan = make_plan(devices=2, waves="1,100%", soak_s=0, max_latency_p99_increase=0.2)
    state = started(plan, facts_of(*map(idle, plan.devices)))
    slow = committed("dev-1", T0 + 5, latency_p99_ms=150, previous_latency_p99_ms=100)

    decision = decide(plan, state, facts_of(slow), T0 + 10)

    assert decision.state.status is RolloutStatus.ROLLED_BACK
    assert "latency p99 +50% > 20% against the previous model" in decision.records[0].reason


def test_a_regression_during_soak_rolls_back_before_the_soak_ends() -> None:
    plan = make_plan(devices=2, waves="1,100%", soak_s=600)
    state = started(plan, facts_of(*map(idle, plan.devices)))
    state = decide(plan, state, facts_of(committed("dev-1", T0 + 5)), T0 + 100).state
    worse = committed("dev-1", T0 + 5, error_rate=0.2, previous_error_rate=0.01)

    decision = decide(plan, state, facts_of(worse), T0 + 200)

    assert decision.state.status is RolloutStatus.ROLLED_BACK


def test_health_gates_without_figures_pass_and_say_so() -> None:
    plan = make_plan(devices=2, waves="1,100%", soak_s=0)
    state = started(plan, facts_of(*map(idle, plan.devices)))
    bare = DeviceFacts(device_id="dev-1", online=True, update=report(UpdateState.COMMITTED, T0 + 5))

    decision = decide(plan, state, facts_of(bare), T0 + 10)

    assert decision.records[0].reason == (
        "wave 1 of 2: 1/1 updated, error rate: no figures, latency p99: no figures, "
        "soak 0s passed: advancing to wave 2"
    )


def test_a_device_that_runs_the_release_without_a_report_counts_as_updated() -> None:
    plan = make_plan(devices=2, waves="1,100%", soak_s=60)
    state = started(plan, facts_of(*map(idle, plan.devices)))
    running = DeviceFacts(
        device_id="dev-1", online=True, running_sha256=NEW_SHA, running_since=T0 + 100
    )

    assert decide(plan, state, facts_of(running), T0 + 159).records == ()
    assert kinds(decide(plan, state, facts_of(running), T0 + 160))[0] is DecisionKind.ADVANCED


# -- offline devices and the deadline ----------------------------------------------------


def test_an_offline_device_is_pending_then_converges_and_is_recorded() -> None:
    plan = make_plan(devices=3, waves="1,100%", soak_s=0)
    away = idle("dev-3", online=False)
    state = started(plan, facts_of(idle("dev-1"), idle("dev-2"), away))
    wave_2 = decide(plan, state, facts_of(committed("dev-1", T0 + 5), idle("dev-2"), away), T0 + 10)
    assert wave_2.records[-1].reason.endswith(
        "to dev-2, dev-3; dev-3 offline: pending, they converge when they return"
    )
    assert wave_2.desired["dev-3"].target is R  # set anyway, retained: it converges on return

    waiting = facts_of(committed("dev-1", T0 + 5), committed("dev-2", T0 + 20), away)
    assert decide(plan, wave_2.state, waiting, T0 + 100).records == ()

    back = {**waiting, "dev-3": committed("dev-3", T0 + 300)}
    decision = decide(plan, wave_2.state, back, T0 + 310)
    assert kinds(decision) == [DecisionKind.CONVERGED, DecisionKind.COMPLETED]
    assert decision.records[0].reason == "dev-3 returned and converged: committed release v2"
    assert decision.records[0].devices == ("dev-3",)


def test_past_the_deadline_without_proceed_the_rollout_halts_and_names_who_it_waited_for() -> None:
    plan = make_plan(devices=2, waves="1,100%", soak_s=0, deadline=T0 + 3600)
    away = idle("dev-1", online=False)
    state = started(plan, facts_of(away, idle("dev-2")))

    assert decide(plan, state, facts_of(away), T0 + 3599).records == ()
    decision = decide(plan, state, facts_of(away), T0 + 3600)

    assert decision.state.status is RolloutStatus.HALTED
    assert decision.records[0].kind is DecisionKind.DEADLINE_HALTED
    assert decision.records[0].reason == (
        "wave 1 of 2: the deadline passed waiting for dev-1 offline; proceed_without_offline "
        "is off: halted"
    )
    assert targets(decision) == {"dev-1": R, "dev-2": U}

    back = decide(plan, decision.state, facts_of(committed("dev-1", T0 + 4000)), T0 + 4001)
    assert kinds(back) == [DecisionKind.CONVERGED]
    assert back.state.status is RolloutStatus.HALTED


def test_past_the_deadline_with_proceed_the_wave_advances_without_offline_devices() -> None:
    plan = make_plan(devices=3, waves="2,100%", soak_s=0, proceed_without_offline=True)
    away = idle("dev-2", online=False)
    state = started(plan, facts_of(idle("dev-1"), away, idle("dev-3")))
    facts = facts_of(committed("dev-1", T0 + 5), away, idle("dev-3"))

    assert decide(plan, state, facts, T0 + 3599).records == ()
    decision = decide(plan, state, facts, T0 + 3600)

    assert kinds(decision) == [
        DecisionKind.LEFT_PENDING,
        DecisionKind.ADVANCED,
        DecisionKind.WAVE_STARTED,
    ]
    assert decision.records[0].devices == ("dev-2",)
    assert "the deadline passed with dev-2 offline; proceed_without_offline" in (
        decision.records[0].reason
    )
    assert targets(decision) == {"dev-1": R, "dev-2": R, "dev-3": R}
    assert decision.state.left_behind == ("dev-2",)

    returned = {**facts, "dev-2": committed("dev-2", T0 + 5000), "dev-3": committed("dev-3", T0)}
    later = decide(plan, decision.state, returned, T0 + 5001)
    assert later.records[0].reason == (
        "dev-2 returned and converged (the rollout went on without it): committed release v2"
    )
    assert later.state.status is RolloutStatus.COMPLETED


def test_a_device_left_behind_that_fails_on_return_still_halts_the_rollout() -> None:
    plan = make_plan(devices=3, waves="2,100%", soak_s=0, proceed_without_offline=True)
    away = idle("dev-2", online=False)
    state = started(plan, facts_of(idle("dev-1"), away, idle("dev-3")))
    state = decide(plan, state, facts_of(committed("dev-1", T0 + 5), away), T0 + 3600).state

    returned = facts_of(committed("dev-1", T0 + 5), rolled_back("dev-2", T0 + 4000))
    decision = decide(plan, state, returned, T0 + 4001)

    assert decision.state.status is RolloutStatus.ROLLED_BACK
    assert targets(decision) == {"dev-1": B, "dev-2": B, "dev-3": B}


def test_past_the_deadline_a_device_still_updating_online_halts_even_with_proceed() -> None:
    plan = make_plan(devices=2, waves="1,100%", proceed_without_offline=True)
    state = started(plan, facts_of(idle("dev-1"), idle("dev-2")))

    decision = decide(plan, state, facts_of(updating("dev-1", T0 + 5)), T0 + 3600)

    assert decision.state.status is RolloutStatus.HALTED
    assert "dev-1 online, still updating" in decision.records[0].reason


# -- operator commands -------------------------------------------------------------------


def test_pause_holds_the_next_wave_and_resume_lets_it_go() -> None:
    plan = make_plan(devices=2, waves="1,100%", soak_s=0)
    state = started(plan, facts_of(*map(idle, plan.devices)))
    facts = facts_of(committed("dev-1", T0 + 5))

    paused = decide(plan, state, facts, T0 + 10, command(OperatorCommandKind.PAUSE))
    assert kinds(paused) == [DecisionKind.PAUSED]
    assert paused.records[0].reason == "paused at wave 1 of 2 by alice: night shift"
    assert paused.records[0].actor == "alice"
    assert decide(plan, paused.state, facts, T0 + 5000).records == ()

    resumed = decide(
        plan, paused.state, facts, T0 + 5000, command(OperatorCommandKind.RESUME, "c2", "morning")
    )
    assert kinds(resumed) == [
        DecisionKind.RESUMED,
        DecisionKind.ADVANCED,
        DecisionKind.WAVE_STARTED,
    ]


def test_a_paused_rollout_still_rolls_back_a_probation_failure() -> None:
    plan = make_plan()
    state = started(plan, facts_of(*map(idle, plan.devices)))
    paused = decide(plan, state, {}, T0 + 1, command(OperatorCommandKind.PAUSE)).state

    decision = decide(plan, paused, facts_of(rolled_back("dev-1", T0 + 5)), T0 + 10)

    assert decision.state.status is RolloutStatus.ROLLED_BACK


def test_operator_halt_freezes_the_rollout_as_it_is() -> None:
    plan = make_plan(soak_s=0)
    state = started(plan, facts_of(*map(idle, plan.devices)))
    halted = decide(plan, state, {}, T0 + 1, command(OperatorCommandKind.HALT, reason="recall"))
    assert halted.records[0].reason == "halted at wave 1 of 2 by alice: recall"

    later = decide(plan, halted.state, facts_of(committed("dev-1", T0 + 5)), T0 + 9999)
    assert later.records == ()
    assert targets(later) == {"dev-1": R, "dev-2": U, "dev-3": U}
    with pytest.raises(CommandRefused, match="is halted: it cannot resume"):
        decide(plan, halted.state, {}, T0 + 2, command(OperatorCommandKind.RESUME, "c2"))


def test_operator_rollback_gives_every_device_that_got_the_release_the_rollback() -> None:
    plan = make_plan(devices=3, waves="2,100%", soak_s=0)
    state = started(plan, facts_of(*map(idle, plan.devices)))
    facts = facts_of(committed("dev-1", T0 + 5), committed("dev-2", T0 + 5))

    decision = decide(
        plan, state, facts, T0 + 6, command(OperatorCommandKind.ROLLBACK, reason="bad labels")
    )

    assert decision.state.status is RolloutStatus.ROLLED_BACK
    assert targets(decision) == {"dev-1": B, "dev-2": B, "dev-3": U}
    assert decision.records[0].kind is DecisionKind.ROLLED_BACK
    assert decision.records[0].reason == (
        "rolled back by alice: bad labels (2 devices get the rollback)"
    )
    assert decision.records[0].actor == "alice"

    home = facts_of(
        DeviceFacts(
            device_id="dev-1",
            online=True,
            update=report(UpdateState.COMMITTED, T0 + 50, manifest=ROLLBACK),
            running_sha256=OLD_SHA,
        )
    )
    converged = decide(plan, decision.state, home, T0 + 60)
    assert [r.devices for r in converged.records] == [("dev-1",)]
    assert "dev-1 converged on the rollback: rollback manifest committed" in (
        converged.records[0].reason
    )


def test_a_completed_rollout_can_still_be_rolled_back() -> None:
    plan = make_plan(devices=1, waves="100%", soak_s=0)
    state = started(plan, facts_of(idle("dev-1")))
    done = decide(plan, state, facts_of(committed("dev-1", T0 + 5)), T0 + 6).state
    assert done.status is RolloutStatus.COMPLETED

    decision = decide(plan, done, {}, T0 + 7, command(OperatorCommandKind.ROLLBACK))

    assert targets(decision) == {"dev-1": B}


def test_a_command_is_applied_once_by_its_id() -> None:
    plan = make_plan()
    state = started(plan, {})
    pause = command(OperatorCommandKind.PAUSE)
    paused = decide(plan, state, {}, T0 + 1, pause)

    again = decide(plan, paused.state, {}, T0 + 2, pause)

    assert again.records == ()
    assert again.state == paused.state
    with pytest.raises(CommandRefused, match="is paused: it cannot pause"):
        decide(plan, paused.state, {}, T0 + 2, command(OperatorCommandKind.PAUSE, "c2"))


def test_a_rolled_back_rollout_refuses_every_command() -> None:
    plan = make_plan()
    state = decide(plan, started(plan, {}), {}, T0 + 1, command(OperatorCommandKind.ROLLBACK)).state

    for i, kind in enumerate(OperatorCommandKind):
        with pytest.raises(CommandRefused):
            decide(plan, state, {}, T0 + 2, command(kind, f"x{i}"))


# -- persistence and restarts ------------------------------------------------------------


def test_a_restarted_controller_resumes_from_the_stored_state_without_deciding_twice() -> None:
    plan = make_plan(devices=3, waves="1,100%", soak_s=0)
    facts = facts_of(committed("dev-1", T0 + 5))
    advanced = decide(plan, started(plan, facts), facts, T0 + 10)
    stored = advanced.state.model_dump_json()

    restarted = RolloutState.model_validate_json(stored)
    decision = decide(plan, restarted, facts, T0 + 10)

    assert restarted == advanced.state
    assert decision.records == ()
    assert decision.desired == advanced.desired


# -- the plan and the wave spec ----------------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "expected"),
    [(1, (1,)), (3, (1, 2, 3)), (10, (1, 5, 10)), (1000, (1, 100, 500, 1000))],
)
def test_waves_1_10_50_100_percent_resolve_per_fleet_size(
    devices: int, expected: tuple[int, ...]
) -> None:
    assert resolve_waves("1,10%,50%,100%", devices) == expected


def test_wave_items_are_counts_or_shares() -> None:
    assert resolve_waves(" 2 , 12.5% ,100%", 16) == (2, 16)
    assert resolve_waves("5,100%", 3) == (3,)
    assert resolve_waves("12.5%,100%", 16) == (2, 16)


@pytest.mark.parametrize(
    ("spec", "devices", "message"),
    [
        ("", 3, "the wave spec is empty"),
        ("1,,100%", 3, "wave '' in '1,,100%' is neither a device count nor a percentage"),
        ("abc", 3, "wave 'abc' in 'abc' is neither"),
        ("-1,100%", 3, "is neither a device count nor a percentage"),
        ("1.5,100%", 3, "is neither a device count nor a percentage"),
        ("٣,100%", 3, "is neither a device count nor a percentage"),
        ("0,100%", 3, "a wave needs at least 1 device"),
        ("0%,100%", 3, "a percentage must be above 0% and at most 100%"),
        ("150%", 3, "a percentage must be above 0% and at most 100%"),
        ("x%", 3, "is not a percentage"),
        ("1,50%", 10, "waves '1,50%' reach 5 of 10 devices"),
        ("50%,2,100%", 10, "shrink on 10 devices (5 then 2): waves are cumulative"),
        ("100%", 0, "the rollout has no devices"),
    ],
)
def test_bad_wave_specs_say_what_is_wrong(spec: str, devices: int, message: str) -> None:
    with pytest.raises(RolloutPlanError) as caught:
        resolve_waves(spec, devices)
    assert message in caught.value.message
    assert caught.value.hint


def test_a_plan_with_a_bad_wave_spec_is_refused() -> None:
    with pytest.raises(RolloutPlanError, match="reach 1 of 3 devices"):
        make_plan(devices=3, waves="1")


def test_a_plan_refuses_duplicate_devices_and_a_rollback_to_the_release() -> None:
    plan = make_plan()
    with pytest.raises(ValidationError, match="a device is listed twice"):
        RolloutPlan.model_validate({**plan.model_dump(), "devices": ("dev-1", "dev-1")})
    with pytest.raises(ValidationError, match="the rollback names the release's own model"):
        RolloutPlan.model_validate({**plan.model_dump(), "rollback": RELEASE.model_dump()})
    with pytest.raises(ValidationError):
        RolloutPlan.model_validate({**plan.model_dump(), "surprise": 1})


def test_gates_are_read_from_the_conditions_that_must_hold() -> None:
    gates = parse_gates(
        ["success>=95%", "rollbacks<=1", "error_rate<=+0.5%", " latency_p99 <= 30% "],
        RolloutGates(min_soak_s=60),
    )

    assert gates == RolloutGates(
        min_success_ratio=0.95,
        max_probation_rollbacks=1,
        max_error_rate_increase=0.005,
        max_latency_p99_increase=0.3,
        min_soak_s=60,
    )
    assert parse_gates([]) == RolloutGates()


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["success"], "gate 'success' is not NAME<=VALUE or NAME>=VALUE"),
        (["speed>=1%"], "no gate 'speed' (there are success, rollbacks, error_rate, latency_p99)"),
        (["success<=95%"], "success is a minimum, write success>=95%"),
        (["rollbacks>=1"], "rollbacks is a maximum, write rollbacks<=1"),
        (["rollbacks<=one"], "rollbacks is a number of devices"),
        (["error_rate<=2"], "error_rate is a percentage, e.g. error_rate<=2%"),
        (["error_rate<=-2%"], "'-2%' is not a percentage"),
        (["success>=95"], "success is a percentage, e.g. success>=95%"),
        (["success>=120%"], "success is at most 100%"),
        (["success>=90%", "success>=95%"], "gate success is given twice"),
    ],
)
def test_bad_gates_say_what_is_wrong(specs: list[str], message: str) -> None:
    with pytest.raises(RolloutPlanError) as caught:
        parse_gates(specs)
    assert message in caught.value.message
    assert caught.value.hint


wave_items = st.one_of(
    st.integers(min_value=1, max_value=2000).map(str),
    st.integers(min_value=1, max_value=100).map(lambda p: f"{p}%"),
)


@given(items=st.lists(wave_items, min_size=0, max_size=5), devices=st.integers(1, 3000))
def test_resolved_waves_grow_strictly_and_end_with_every_device(
    items: list[str], devices: int
) -> None:
    spec = ",".join([*items, "100%"])
    try:
        waves = resolve_waves(spec, devices)
    except RolloutPlanError as exc:
        assert "shrink" in exc.message
        return
    assert waves[0] >= 1
    assert waves[-1] == devices
    assert all(a < b for a, b in itertools.pairwise(waves))
    assert len(waves) <= len(items) + 1


@given(st.text(max_size=30))
def test_any_text_parses_or_fails_with_a_plan_error(spec: str) -> None:
    try:
        items = parse_waves(spec)
    except RolloutPlanError:
        return
    assert items


# -- properties of decide ----------------------------------------------------------------

_STATES = [None, *UpdateState]


@st.composite
def device_facts(draw: st.DrawFn, device: str) -> DeviceFacts | None:
    if draw(st.booleans()) and draw(st.booleans()):
        return None
    state = draw(st.sampled_from(_STATES))
    manifest = draw(st.sampled_from([RELEASE, ROLLBACK]))
    rate = st.none() | st.floats(0, 1)
    latency = st.none() | st.floats(0, 1000)
    return DeviceFacts(
        device_id=device,
        online=draw(st.booleans()),
        update=None if state is None else report(state, T0 + draw(st.integers(0, 7200)), manifest),
        running_sha256=draw(st.sampled_from([None, OLD_SHA, NEW_SHA])),
        running_since=draw(st.none() | st.floats(T0, T0 + 7200)),
        error_rate=draw(rate),
        previous_error_rate=draw(rate),
        latency_p99_ms=draw(latency),
        previous_latency_p99_ms=draw(latency),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[RolloutPlan, list[dict[str, DeviceFacts]], list[float]]:
    count = draw(st.integers(1, 8))
    spec = ",".join([*draw(st.lists(wave_items, max_size=3)), "100%"])
    try:
        resolve_waves(spec, count)
    except RolloutPlanError:
        spec = "1,100%"
    plan = make_plan(
        devices=count,
        waves=spec,
        soak_s=draw(st.sampled_from([0, 60, 600])),
        deadline=T0 + draw(st.sampled_from([0, 600, 3600])),
        proceed_without_offline=draw(st.booleans()),
        max_probation_rollbacks=draw(st.integers(0, 2)),
        min_success_ratio=draw(st.sampled_from([0.0, 0.5, 1.0])),
    )
    snapshots = []
    for _ in range(draw(st.integers(1, 6))):
        facts = {}
        for device in plan.devices:
            fact = draw(device_facts(device))
            if fact is not None:
                facts[device] = fact
        snapshots.append(facts)
    times = sorted(
        draw(st.lists(st.floats(T0, T0 + 7200), min_size=len(snapshots), max_size=len(snapshots)))
    )
    return plan, snapshots, times


def _settle(
    plan: RolloutPlan, state: RolloutState, facts: dict[str, DeviceFacts], now: float
) -> Iterable[Decision]:
    """Decide over and over on unchanged inputs: one wave step per call at most."""
    for _ in range(len(plan.wave_targets()) + 3):
        decision = decide(plan, state, facts, now)
        yield decision
        state = decision.state


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_decide_is_pure_and_reaches_a_fixed_point_on_unchanged_facts(
    scenario: tuple[RolloutPlan, list[dict[str, DeviceFacts]], list[float]],
) -> None:
    plan, snapshots, times = scenario
    state = RolloutState()
    for facts, now in zip(snapshots, times, strict=True):
        assert decide(plan, state, facts, now) == decide(plan, state, facts, now)
        decisions = list(_settle(plan, state, facts, now))
        last = decisions[-1]
        assert last.records == ()
        assert last.state == decisions[-2].state
        state = last.state


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.lists(st.sampled_from([None, *OperatorCommandKind]), max_size=6))
def test_waves_never_regress_and_no_device_gets_two_desired_states_for_one_step(
    scenario: tuple[RolloutPlan, list[dict[str, DeviceFacts]], list[float]],
    commands: list[OperatorCommandKind | None],
) -> None:
    plan, snapshots, times = scenario
    state = RolloutState()
    seen: dict[tuple[str, int], DesiredTarget] = {}
    for i, (facts, now) in enumerate(zip(snapshots, times, strict=True)):
        kind = commands[i] if i < len(commands) else None
        order = (
            None
            if kind is None
            else OperatorCommand(id=f"c{i}", kind=kind, actor="alice", reason="test")
        )
        for decision in _calls(plan, state, facts, now, order):
            _check_step(plan, state, decision, seen)
            state = decision.state


def _calls(
    plan: RolloutPlan,
    state: RolloutState,
    facts: dict[str, DeviceFacts],
    now: float,
    order: OperatorCommand | None,
) -> Iterable[Decision]:
    if order is not None:
        try:
            first = decide(plan, state, facts, now, order)
        except CommandRefused:
            pass
        else:
            yield first
            state = first.state
    yield from _settle(plan, state, facts, now)


def _check_step(
    plan: RolloutPlan,
    before: RolloutState,
    decision: Decision,
    seen: dict[tuple[str, int], DesiredTarget],
) -> None:
    after = decision.state
    assert len(after.waves) >= len(before.waves)
    assert after.waves[: len(before.waves)] == before.waves
    assert after.decisions == (*before.decisions, *decision.records)
    if before.status is RolloutStatus.ROLLED_BACK:
        assert after.status is RolloutStatus.ROLLED_BACK
        assert after.waves == before.waves
    assigned = set(after.assigned)
    for device, desired in decision.desired.items():
        assert (desired.target is DesiredTarget.UNTOUCHED) == (device not in assigned)
        if desired.target is DesiredTarget.RELEASE:
            assert desired.manifest == plan.release
        if desired.target is DesiredTarget.ROLLBACK:
            assert desired.manifest == plan.rollback
        key = (device, desired.step)
        assert seen.setdefault(key, desired.target) is desired.target


def test_a_rollout_paused_before_its_first_wave_starts_it_on_resume() -> None:
    plan = make_plan()
    paused = decide(plan, RolloutState(), {}, T0, command(OperatorCommandKind.PAUSE))
    assert paused.state.waves == ()
    assert paused.records[0].reason == "paused by alice: night shift"

    resumed = decide(plan, paused.state, {}, T0 + 1, command(OperatorCommandKind.RESUME, "c2"))

    assert kinds(resumed) == [DecisionKind.RESUMED, DecisionKind.WAVE_STARTED]
    assert targets(resumed) == {"dev-1": R, "dev-2": U, "dev-3": U}
