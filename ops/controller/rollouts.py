"""The rollout engine's decision: what each device's desired state should be now, and why.

``decide(plan, state, facts, now)`` is a pure function: no database, no MQTT, no clock
(``now`` is an input), no randomness. The loop that reads the registry, calls it, stores
the next state and writes the retained ``desired`` states lives elsewhere (design.md,
fleet controller); this module only decides.

Inputs: a :class:`RolloutPlan` (fixed when the rollout starts: the release's signed
manifest and the pre-signed rollback, the stream, the devices in a stable order, the
waves, the gates, the deadline), the :class:`RolloutState` the last decision left, and
:class:`DeviceFacts` per device from the registry. Output: a :class:`Decision`, the next
state, every device's :class:`DeviceDesired`, and the new :class:`DecisionRecord` items,
each with a reason written for a human.

Decision rules, in the order one call applies them:

1. **Operator command** (optional input, applied once by its id; an id already applied
   changes nothing): ``pause`` (running → paused: gates that fail still roll back, nothing
   advances), ``resume`` (paused → running), ``halt`` (running or paused → halted: nothing
   advances or rolls back any more, every device keeps its desired state), ``rollback``
   (any state but rolled back → rolled back). A command the state does not allow raises
   :class:`CommandRefused`.
2. **Start**: a running rollout with no wave yet starts wave 1.
3. **Convergence records** (in every status): a device recorded as pending (offline when
   its wave started, or left behind at the deadline) that has since settled is recorded
   once; after a rollback, every device that settles on the rollback is recorded once.
4. **Gates** (running or paused), over the devices of every wave so far; a device is
   *updated* when its update report for the release says ``committed`` (or, without such a
   report, it runs the release's sha256), *failed* when it says ``refused`` or
   ``rolled_back`` (the latter a *probation rollback*), *pending* otherwise.

   - Failing at once: probation rollbacks above ``max_probation_rollbacks``; or so many
     failed that the success ratio could not reach ``min_success_ratio`` even if every
     pending device updated. The rollout is rolled back (status ``rolled_back``, record
     ``gate_failed``): every device that was given the release gets the rollback
     manifest (devices of later waves are never touched).
   - Waiting: pending devices that are not left behind block the wave. Before the
     deadline, nothing happens. Past it (running only: a paused rollout waits for its
     resume), if every blocking device is offline and ``proceed_without_offline`` is set,
     they are left behind (recorded, still desired the release, they converge when they
     return and count in the gates once they settle); otherwise (one of them is online
     and still updating, or the setting is off) the rollout is halted, naming them.
   - Once nothing blocks: success ratio over the devices that settled (updated / updated
     + failed) ≥ ``min_success_ratio``; the error-rate increase (mean over the updated
     devices that have both figures, of the rate now minus the rate on the previous
     model, in fractions of frames) ≤ ``max_error_rate_increase``; the latency-p99 increase
     (mean relative increase over the same devices) ≤ ``max_latency_p99_increase``. A
     gate without any figures passes and says so. A failure rolls back as above.
   - Soak: ``min_soak_s`` since the last commit among the updated devices (the current
     wave's start, if later) must have passed, else wait; a health gate failing during
     the soak rolls back at once.
   - All pass (running only): the next wave starts, in the same decision; after the last
     wave the rollout is completed.

A device's desired state is ``release`` from its wave's step on, ``rollback`` from the
rollback's step on, and ``untouched`` (the controller writes nothing for this rollout)
before its wave. Steps number the changes of desired states: wave ``k`` (1-based) is step
``k``, a rollback the step after the last wave started; so a device never gets two
different desired states for one step, and the loop can write each step once.

Idempotent: the decision depends only on its inputs, and the next state records what was
decided (waves started, records made, commands applied, devices left behind), so calling
``decide`` again on the next state with the same facts and time changes nothing once
stable, and a restarted controller resumes without deciding a wave twice. One call takes
at most one wave step; the loop calls again.

Errors (all bad input, exit 2, except a refused command, exit 3)::

    EdgefleetError
    ├── SettingError
    │   └── RolloutPlanError   a wave spec, gate or plan that cannot work
    └── Refused
        └── CommandRefused     pause/resume/halt/rollback the rollout's status does not allow
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from enum import Enum
from fractions import Fraction

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefleet.agent.protocol import SHA256_PATTERN, UpdateReport, UpdateState
from edgefleet.ops.errors import Refused
from edgefleet.runtime import SettingError

__all__ = [
    "CommandRefused",
    "Decision",
    "DecisionKind",
    "DecisionRecord",
    "DesiredTarget",
    "DeviceDesired",
    "DeviceFacts",
    "ManifestRef",
    "OperatorCommand",
    "OperatorCommandKind",
    "RolloutGates",
    "RolloutPlan",
    "RolloutPlanError",
    "RolloutState",
    "RolloutStatus",
    "WaveRun",
    "decide",
    "parse_gates",
    "parse_waves",
    "resolve_waves",
]


# -- errors ------------------------------------------------------------------------------


class RolloutPlanError(SettingError):
    """A wave spec, gate or rollout plan that cannot work."""


class CommandRefused(Refused):
    """An operator command the rollout's status does not allow; nothing was changed."""


# -- waves -------------------------------------------------------------------------------

_WAVES_HINT = (
    "give cumulative wave sizes separated by commas, each a device count or a percentage "
    "of the rollout's devices, growing, the last 100%: e.g. 1,10%,50%,100%"
)


def parse_waves(spec: str) -> tuple[int | Fraction, ...]:
    """The items of a wave spec such as ``1,10%,50%,100%``: counts (int) or shares (Fraction).

    Shares are fractions of the rollout's devices, in (0, 1]. Raises RolloutPlanError.
    """
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip():
        raise RolloutPlanError("the wave spec is empty", hint=_WAVES_HINT)
    return tuple(_parse_wave_item(item, spec) for item in items)


def _parse_wave_item(item: str, spec: str) -> int | Fraction:
    if item.endswith("%"):
        share = _number(item[:-1])
        if share is None:
            raise RolloutPlanError(
                f"wave {item!r} in {spec!r} is not a percentage", hint=_WAVES_HINT
            )
        if not 0 < share <= 100:
            raise RolloutPlanError(
                f"wave {item!r} in {spec!r}: a percentage must be above 0% and at most 100%",
                hint=_WAVES_HINT,
            )
        return share / 100
    if not (item.isascii() and item.isdigit()):
        raise RolloutPlanError(
            f"wave {item!r} in {spec!r} is neither a device count nor a percentage",
            hint=_WAVES_HINT,
        )
    count = int(item)
    if count < 1:
        raise RolloutPlanError(
            f"wave {item!r} in {spec!r}: a wave needs at least 1 device", hint=_WAVES_HINT
        )
    return count


def _number(text: str) -> Fraction | None:
    """A plain decimal number (digits, at most one point), else None."""
    digits = text.replace(".", "", 1)
    return Fraction(text) if digits.isascii() and digits.isdigit() else None


def resolve_waves(spec: str, device_count: int) -> tuple[int, ...]:
    """Cumulative device counts per wave for ``device_count`` devices, strictly growing.

    A share is rounded up (10% of 3 devices is 1), a count above the devices is all of
    them, and a wave that adds no device is dropped. The last must reach every device.
    """
    if device_count < 1:
        raise RolloutPlanError(
            "the rollout has no devices", hint="check the selector: it matches no device"
        )
    targets: list[int] = []
    for item in parse_waves(spec):
        target = _wave_target(item, device_count)
        if targets and target < targets[-1]:
            raise RolloutPlanError(
                f"waves {spec!r} shrink on {device_count} devices ({targets[-1]} then "
                f"{target}): waves are cumulative",
                hint=_WAVES_HINT,
            )
        if not targets or target > targets[-1]:
            targets.append(target)
    if targets[-1] != device_count:
        raise RolloutPlanError(
            f"waves {spec!r} reach {targets[-1]} of {device_count} devices",
            hint="end the waves with 100%",
        )
    return tuple(targets)


def _wave_target(item: int | Fraction, device_count: int) -> int:
    if isinstance(item, Fraction):
        return max(1, math.ceil(item * device_count))
    return min(item, device_count)


# -- the plan ----------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManifestRef(_Frozen):
    """A signed manifest the release store holds, and the model it names."""

    ref: str = Field(min_length=1, description="The release store's key of the signed manifest.")
    model_id: str = Field(min_length=1, description="model_id of the manifest.")
    version: int = Field(ge=1, description="version of the manifest.")
    sha256: str = Field(pattern=SHA256_PATTERN, description="sha256 of the model it names.")

    def matches(self, report: UpdateReport) -> bool:
        """Whether an update report is about this manifest's model and version."""
        return (report.model_id, report.version, report.sha256) == (
            self.model_id,
            self.version,
            self.sha256,
        )


class RolloutGates(_Frozen):
    """What the devices of the waves so far must show before the next wave starts."""

    min_success_ratio: float = Field(
        1.0, ge=0, le=1, description="Updated devices over those that settled, at least."
    )
    max_probation_rollbacks: int = Field(
        0, ge=0, description="Devices that rolled the release back in probation, at most."
    )
    max_error_rate_increase: float = Field(
        0.02,
        ge=0,
        description="Mean error rate (fraction of frames) on the release minus on the "
        "previous model, over the same devices, at most (0.02: two percentage points).",
    )
    max_latency_p99_increase: float = Field(
        0.2,
        ge=0,
        description="Mean relative increase of latency p99 over the previous model, at "
        "most (0.2: 20% slower).",
    )
    min_soak_s: float = Field(
        600, ge=0, description="Seconds since the last device committed, at least."
    )


_GATES_HINT = (
    "write each gate as the condition that must hold: success>=95%, rollbacks<=1, "
    "error_rate<=+2% (percentage points over the previous model), latency_p99<=+20%"
)
_GATE = re.compile(r"\s*([a-z_0-9]+)\s*(<=|>=)\s*(\S+)\s*")
_GATE_FIELDS = {
    "success": ("min_success_ratio", ">="),
    "rollbacks": ("max_probation_rollbacks", "<="),
    "error_rate": ("max_error_rate_increase", "<="),
    "latency_p99": ("max_latency_p99_increase", "<="),
}


def parse_gates(specs: Sequence[str], base: RolloutGates | None = None) -> RolloutGates:
    """Gates from ``--gate`` conditions (``success>=95%``, ``rollbacks<=1``, ...) over ``base``.

    Soak has its own option. Raises RolloutPlanError for a condition it cannot read.
    """
    changes: dict[str, float | int] = {}
    for spec in specs:
        match = _GATE.fullmatch(spec)
        if match is None:
            raise RolloutPlanError(
                f"gate {spec!r} is not NAME<=VALUE or NAME>=VALUE", hint=_GATES_HINT
            )
        name, op, text = match.groups()
        if name not in _GATE_FIELDS:
            raise RolloutPlanError(
                f"gate {spec!r}: no gate {name!r} (there are {', '.join(_GATE_FIELDS)})",
                hint=_GATES_HINT,
            )
        field, wanted = _GATE_FIELDS[name]
        if op != wanted:
            kind = "a minimum" if wanted == ">=" else "a maximum"
            raise RolloutPlanError(
                f"gate {spec!r}: {name} is {kind}, write {name}{wanted}{text}", hint=_GATES_HINT
            )
        if field in changes:
            raise RolloutPlanError(f"gate {name} is given twice", hint="give each gate once")
        changes[field] = _gate_value(name, op, text, spec)
    gates = base or RolloutGates()
    try:
        return RolloutGates.model_validate({**gates.model_dump(), **changes})
    except ValueError as exc:
        raise RolloutPlanError(f"gates {', '.join(specs)}: {exc}", hint=_GATES_HINT) from exc


def _gate_value(name: str, op: str, text: str, spec: str) -> float | int:
    if name == "rollbacks":
        if not (text.isascii() and text.isdigit()):
            raise RolloutPlanError(
                f"gate {spec!r}: rollbacks is a number of devices", hint=_GATES_HINT
            )
        return int(text)
    number = text.removeprefix("+")
    if not number.endswith("%"):
        raise RolloutPlanError(
            f"gate {spec!r}: {name} is a percentage, e.g. {name}{op}{text}%", hint=_GATES_HINT
        )
    value = _number(number[:-1])
    if value is None:
        raise RolloutPlanError(f"gate {spec!r}: {text!r} is not a percentage", hint=_GATES_HINT)
    share = float(value) / 100
    if name == "success" and share > 1:
        raise RolloutPlanError(f"gate {spec!r}: success is at most 100%", hint=_GATES_HINT)
    return share


class RolloutPlan(_Frozen):
    """A rollout as the operator started it; it never changes while it runs."""

    rollout_id: str = Field(min_length=1, description="The rollout's id.")
    release_id: str = Field(min_length=1, description="The release rolled out.")
    stream: str = Field(min_length=1, description="The stream whose model is replaced.")
    release: ManifestRef = Field(description="The release's signed manifest.")
    rollback: ManifestRef = Field(
        description="The rollback manifest, signed when the rollout started."
    )
    devices: tuple[str, ...] = Field(
        min_length=1, description="Target devices, in the stable order waves take them."
    )
    waves: str = Field(description="Cumulative wave sizes, e.g. '1,10%,50%,100%'.")
    gates: RolloutGates = Field(
        default_factory=RolloutGates, description="What must pass between waves."
    )
    deadline: float = Field(
        description="Unix seconds after which offline devices no longer hold a wave back."
    )
    proceed_without_offline: bool = Field(
        False,
        description="Past the deadline, advance without offline devices (true) or halt.",
    )

    @model_validator(mode="after")
    def _check(self) -> RolloutPlan:
        if len(set(self.devices)) != len(self.devices):
            raise ValueError("a device is listed twice")
        if self.rollback.sha256 == self.release.sha256:
            raise ValueError("the rollback names the release's own model")
        resolve_waves(self.waves, len(self.devices))
        return self

    def wave_targets(self) -> tuple[int, ...]:
        """Cumulative device counts per wave."""
        return resolve_waves(self.waves, len(self.devices))

    def wave_devices(self, index: int) -> tuple[str, ...]:
        """The devices wave ``index`` (0-based) adds."""
        targets = self.wave_targets()
        start = targets[index - 1] if index else 0
        return self.devices[start : targets[index]]


# -- facts -------------------------------------------------------------------------------


class DeviceFacts(_Frozen):
    """What the registry knows of one device, for the rollout's stream."""

    model_config = ConfigDict(protected_namespaces=())

    device_id: str = Field(description="Device id.")
    online: bool = Field(description="Connected now (its status is online or degraded).")
    update: UpdateReport | None = Field(
        None, description="Its latest update report for the stream (state, model, reason)."
    )
    running_sha256: str | None = Field(None, description="sha256 of the model the stream runs.")
    running_version: str | None = Field(None, description="Version of the model it runs.")
    running_since: float | None = Field(
        None, description="Unix seconds when the stream started the model it runs."
    )
    error_rate: float | None = Field(
        None, ge=0, description="Failed frames over processed ones, on the model it runs."
    )
    latency_p99_ms: float | None = Field(None, ge=0, description="Latency p99 now, ms.")
    previous_error_rate: float | None = Field(
        None, ge=0, description="The error rate on the previous model."
    )
    previous_latency_p99_ms: float | None = Field(
        None, ge=0, description="Latency p99 on the previous model, ms."
    )


# -- state and decisions -----------------------------------------------------------------


class RolloutStatus(str, Enum):
    """Where a rollout stands."""

    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"


class DecisionKind(str, Enum):
    """What a decision record is about."""

    WAVE_STARTED = "wave_started"
    ADVANCED = "advanced"
    COMPLETED = "completed"
    LEFT_PENDING = "left_pending"
    CONVERGED = "converged"
    GATE_FAILED = "gate_failed"
    DEADLINE_HALTED = "deadline_halted"
    PAUSED = "paused"
    RESUMED = "resumed"
    HALTED = "halted"
    ROLLED_BACK = "rolled_back"


class DecisionRecord(_Frozen):
    """One decision, with its reason for a human."""

    at: float = Field(description="Unix seconds of the decision (the 'now' it was made at).")
    kind: DecisionKind = Field(description="What was decided.")
    wave: int | None = Field(None, description="The wave (1-based) it concerns, if any.")
    devices: tuple[str, ...] = Field((), description="The devices it concerns.")
    reason: str = Field(description="Why, in words.")
    actor: str | None = Field(None, description="The operator, for an operator's command.")


class WaveRun(_Frozen):
    """A wave that started: its devices and when."""

    devices: tuple[str, ...] = Field(description="The devices this wave gave the release.")
    started_at: float = Field(description="Unix seconds when it started.")


class RolloutState(_Frozen):
    """What the decisions so far left; stored by the controller between decisions."""

    status: RolloutStatus = Field(RolloutStatus.RUNNING, description="Where it stands.")
    waves: tuple[WaveRun, ...] = Field((), description="The waves started, in order.")
    rolled_back_at: float | None = Field(None, description="When it was rolled back.")
    pending: tuple[str, ...] = Field(
        (), description="Devices recorded pending (offline) whose convergence is not recorded."
    )
    left_behind: tuple[str, ...] = Field(
        (), description="Devices a wave proceeded without, past the deadline."
    )
    rollback_converged: tuple[str, ...] = Field(
        (), description="Devices recorded as settled on the rollback."
    )
    commands: tuple[str, ...] = Field((), description="Ids of the operator commands applied.")
    decisions: tuple[DecisionRecord, ...] = Field((), description="Every decision so far.")

    @property
    def assigned(self) -> tuple[str, ...]:
        """Every device given the release, in wave order."""
        return tuple(device for wave in self.waves for device in wave.devices)

    @property
    def rollback_step(self) -> int | None:
        """The step of the rollback, once rolled back."""
        return len(self.waves) + 1 if self.status is RolloutStatus.ROLLED_BACK else None


class OperatorCommandKind(str, Enum):
    """What an operator can ask of a rollout."""

    PAUSE = "pause"
    RESUME = "resume"
    HALT = "halt"
    ROLLBACK = "rollback"


class OperatorCommand(_Frozen):
    """An operator's command to a rollout, applied once by its id."""

    id: str = Field(min_length=1, description="Unique id; a command seen before is ignored.")
    kind: OperatorCommandKind = Field(description="pause, resume, halt or rollback.")
    actor: str = Field(min_length=1, description="Who asked (the operator's identity).")
    reason: str = Field(min_length=1, description="Why, in the operator's words.")


class DesiredTarget(str, Enum):
    """What a rollout wants a device's stream to run."""

    UNTOUCHED = "untouched"
    RELEASE = "release"
    ROLLBACK = "rollback"


class DeviceDesired(_Frozen):
    """One device's desired state for the rollout's stream."""

    target: DesiredTarget = Field(description="untouched, release or rollback.")
    manifest: ManifestRef | None = Field(description="The manifest to set; None: untouched.")
    step: int = Field(ge=0, description="The step that set it (0: untouched).")


class Decision(_Frozen):
    """What ``decide`` returns: the next state, every device's desired state, new records."""

    state: RolloutState = Field(description="The state to store for the next decision.")
    desired: dict[str, DeviceDesired] = Field(description="Per device of the plan.")
    records: tuple[DecisionRecord, ...] = Field(description="The decisions made in this call.")


# -- the decision ------------------------------------------------------------------------

_SETTLED = (UpdateState.COMMITTED, UpdateState.REFUSED, UpdateState.ROLLED_BACK)


class _Progress:
    """How the devices given the release stand, by the rules in the module docstring."""

    def __init__(
        self, plan: RolloutPlan, state: RolloutState, facts: Mapping[str, DeviceFacts]
    ) -> None:
        self.updated: list[str] = []
        self.refused: list[str] = []
        self.rolled_back: list[str] = []
        self.pending: list[str] = []
        self.reasons: dict[str, str] = {}
        self.commit_times: list[float] = []
        for device in state.assigned:
            self._classify(device, plan.release, facts.get(device))

    def _classify(self, device: str, release: ManifestRef, fact: DeviceFacts | None) -> None:
        report = fact.update if fact is not None else None
        if report is not None and release.matches(report):
            if report.state is UpdateState.COMMITTED:
                self.updated.append(device)
                self.commit_times.append(report.ts)
                return
            if report.state is UpdateState.REFUSED:
                self.refused.append(device)
                return
            if report.state is UpdateState.ROLLED_BACK:
                self.rolled_back.append(device)
                self.reasons[device] = report.reason or "no reason given"
                return
        elif fact is not None and fact.running_sha256 == release.sha256:
            self.updated.append(device)
            if fact.running_since is not None:
                self.commit_times.append(fact.running_since)
            return
        self.pending.append(device)

    @property
    def failed(self) -> int:
        return len(self.refused) + len(self.rolled_back)

    @property
    def settled(self) -> int:
        return len(self.updated) + self.failed


class _Builder:
    """The next state and the records, built up by one call of ``decide``."""

    def __init__(self, plan: RolloutPlan, state: RolloutState, now: float) -> None:
        self.plan = plan
        self.state = state
        self.now = now
        self.records: list[DecisionRecord] = []

    def record(
        self,
        kind: DecisionKind,
        reason: str,
        *,
        wave: int | None = None,
        devices: Sequence[str] = (),
        actor: str | None = None,
    ) -> None:
        record = DecisionRecord(
            at=self.now, kind=kind, wave=wave, devices=tuple(devices), reason=reason, actor=actor
        )
        self.records.append(record)

    def update(self, **changes: object) -> None:
        self.state = self.state.model_copy(update=changes)

    def finish(self) -> RolloutState:
        """The next state: the changes, and the records appended to the decisions so far."""
        return self.state.model_copy(update={"decisions": (*self.state.decisions, *self.records)})

    @property
    def wave_label(self) -> str:
        return f"wave {len(self.state.waves)} of {len(self.plan.wave_targets())}"


def decide(
    plan: RolloutPlan,
    state: RolloutState,
    facts: Mapping[str, DeviceFacts],
    now: float,
    command: OperatorCommand | None = None,
) -> Decision:
    """What every device's desired state should be now, the next state, and why.

    ``facts`` maps device ids to what the registry knows (a device missing is offline and
    never reported). ``command`` is an operator's command, applied once by its id.
    Raises CommandRefused for a command the rollout's status does not allow.
    """
    build = _Builder(plan, state, now)
    if command is not None and command.id not in state.commands:
        _apply_command(build, command)
    if build.state.status is RolloutStatus.RUNNING and not build.state.waves:
        _start_wave(build, facts)
    _record_convergence(build, facts)
    if build.state.status in (RolloutStatus.RUNNING, RolloutStatus.PAUSED):
        _judge_wave(build, facts)
        _record_convergence(build, facts)  # a rollback decided just now may have converged
    next_state = build.finish()
    return Decision(
        state=next_state, desired=_desired(plan, next_state), records=tuple(build.records)
    )


def _desired(plan: RolloutPlan, state: RolloutState) -> dict[str, DeviceDesired]:
    untouched = DeviceDesired(target=DesiredTarget.UNTOUCHED, manifest=None, step=0)
    desired = dict.fromkeys(plan.devices, untouched)
    rollback_step = state.rollback_step
    for step, wave in enumerate(state.waves, start=1):
        for device in wave.devices:
            if rollback_step is None:
                desired[device] = DeviceDesired(
                    target=DesiredTarget.RELEASE, manifest=plan.release, step=step
                )
            else:
                desired[device] = DeviceDesired(
                    target=DesiredTarget.ROLLBACK, manifest=plan.rollback, step=rollback_step
                )
    return desired


# -- operator commands -------------------------------------------------------------------

_ALLOWED: dict[OperatorCommandKind, tuple[RolloutStatus, ...]] = {
    OperatorCommandKind.PAUSE: (RolloutStatus.RUNNING,),
    OperatorCommandKind.RESUME: (RolloutStatus.PAUSED,),
    OperatorCommandKind.HALT: (RolloutStatus.RUNNING, RolloutStatus.PAUSED),
    OperatorCommandKind.ROLLBACK: (
        RolloutStatus.RUNNING,
        RolloutStatus.PAUSED,
        RolloutStatus.HALTED,
        RolloutStatus.COMPLETED,
    ),
}


def _apply_command(build: _Builder, command: OperatorCommand) -> None:
    status = build.state.status
    if status not in _ALLOWED[command.kind]:
        raise CommandRefused(
            f"rollout {build.plan.rollout_id} is {status.value}: it cannot {command.kind.value}",
            hint=f"{command.kind.value} applies to a rollout that is "
            + " or ".join(s.value for s in _ALLOWED[command.kind]),
        )
    build.update(commands=(*build.state.commands, command.id))
    said = f"{command.actor}: {command.reason}"
    if command.kind is OperatorCommandKind.ROLLBACK:
        _roll_back(build, DecisionKind.ROLLED_BACK, f"rolled back by {said}", actor=command.actor)
        return
    new_status, kind, verb = {
        OperatorCommandKind.PAUSE: (RolloutStatus.PAUSED, DecisionKind.PAUSED, "paused"),
        OperatorCommandKind.RESUME: (RolloutStatus.RUNNING, DecisionKind.RESUMED, "resumed"),
        OperatorCommandKind.HALT: (RolloutStatus.HALTED, DecisionKind.HALTED, "halted"),
    }[command.kind]
    build.update(status=new_status)
    wave = len(build.state.waves) or None
    where = f" at {build.wave_label}" if wave else ""
    build.record(kind, f"{verb}{where} by {said}", wave=wave, actor=command.actor)


# -- waves -------------------------------------------------------------------------------


def _start_wave(build: _Builder, facts: Mapping[str, DeviceFacts]) -> None:
    index = len(build.state.waves)
    devices = build.plan.wave_devices(index)
    offline = [d for d in devices if not _online(facts, d)]
    build.update(
        waves=(*build.state.waves, WaveRun(devices=devices, started_at=build.now)),
        pending=(*build.state.pending, *offline),
    )
    reason = (
        f"{build.wave_label} started: release {build.plan.release_id} "
        f"(v{build.plan.release.version}) to {_names(devices)}"
    )
    if offline:
        reason += f"; {_names(offline)} offline: pending, they converge when they return"
    build.record(DecisionKind.WAVE_STARTED, reason, wave=index + 1, devices=devices)


def _judge_wave(build: _Builder, facts: Mapping[str, DeviceFacts]) -> None:
    plan, gates = build.plan, build.plan.gates
    if not build.state.waves:  # paused before its first wave
        return
    progress = _Progress(plan, build.state, facts)
    failure = _early_failure(progress, gates)
    if failure is not None:
        _fail(build, failure, progress)
        return
    left_behind = set(build.state.left_behind)
    blocking = [d for d in progress.pending if d not in left_behind]
    if blocking:
        if build.now < plan.deadline or build.state.status is RolloutStatus.PAUSED:
            return
        if not _past_deadline(build, blocking, facts):
            return
    checks, failure = _health_checks(progress, gates, facts)
    if failure is not None:
        _fail(build, failure, progress)
        return
    soak_s = build.now - _soak_start(build.state, progress)
    if soak_s < gates.min_soak_s or build.state.status is RolloutStatus.PAUSED:
        return
    _advance(build, [*checks, f"soak {_duration(gates.min_soak_s)} passed"], facts)


def _early_failure(progress: _Progress, gates: RolloutGates) -> str | None:
    if len(progress.rolled_back) > gates.max_probation_rollbacks:
        return (
            f"{_names([f'{d} ({progress.reasons[d]})' for d in progress.rolled_back])} "
            f"rolled back in probation: {len(progress.rolled_back)} > "
            f"{gates.max_probation_rollbacks} allowed"
        )
    if progress.failed:
        total = progress.settled + len(progress.pending)
        best = (total - progress.failed) / total
        if best < gates.min_success_ratio:
            failed = sorted(progress.refused + progress.rolled_back)
            return (
                f"{_names(failed)} refused or rolled back the release: at most "
                f"{_percent(best)} of {total} can update, below {_percent(gates.min_success_ratio)}"
            )
    return None


def _past_deadline(build: _Builder, blocking: list[str], facts: Mapping[str, DeviceFacts]) -> bool:
    """Past the deadline with devices blocking: leave them behind (True) or halt (False)."""
    online = [d for d in blocking if _online(facts, d)]
    wave = len(build.state.waves)
    if online or not build.plan.proceed_without_offline:
        waiting = "; ".join(
            f"{d} {'online, still updating' if d in online else 'offline'}" for d in blocking
        )
        why = (
            "devices still updating are not left behind"
            if online
            else "proceed_without_offline is off"
        )
        build.update(status=RolloutStatus.HALTED)
        build.record(
            DecisionKind.DEADLINE_HALTED,
            f"{build.wave_label}: the deadline passed waiting for {waiting}; {why}: halted",
            wave=wave,
            devices=blocking,
        )
        return False
    already = set(build.state.pending)
    build.update(
        left_behind=(*build.state.left_behind, *blocking),
        pending=(*build.state.pending, *(d for d in blocking if d not in already)),
    )
    build.record(
        DecisionKind.LEFT_PENDING,
        f"{build.wave_label}: the deadline passed with {_names(blocking)} offline; "
        "proceed_without_offline: going on without them (they stay pending and converge "
        "when they return)",
        wave=wave,
        devices=blocking,
    )
    return True


def _health_checks(
    progress: _Progress, gates: RolloutGates, facts: Mapping[str, DeviceFacts]
) -> tuple[list[str], str | None]:
    """The passed checks in words, and the first failure (None: all pass)."""
    ratio = len(progress.updated) / progress.settled if progress.settled else 1.0
    checks = [f"{len(progress.updated)}/{progress.settled} updated"]
    if ratio < gates.min_success_ratio:
        return checks, f"{checks[0]}: {_percent(ratio)} < {_percent(gates.min_success_ratio)}"
    measured = [facts[d] for d in progress.updated if d in facts]
    errors = {
        f.device_id: f.error_rate - f.previous_error_rate
        for f in measured
        if f.error_rate is not None and f.previous_error_rate is not None
    }
    latencies = {
        f.device_id: f.latency_p99_ms / f.previous_latency_p99_ms - 1
        for f in measured
        if f.latency_p99_ms is not None and f.previous_latency_p99_ms
    }
    for name, deltas, limit in (
        ("error rate", errors, gates.max_error_rate_increase),
        ("latency p99", latencies, gates.max_latency_p99_increase),
    ):
        check, failure = _delta_gate(name, deltas, limit)
        if failure is not None:
            return checks, failure
        checks.append(check)
    return checks, None


def _delta_gate(name: str, deltas: Mapping[str, float], limit: float) -> tuple[str, str | None]:
    """The mean of per-device increases against ``limit``: the check in words, the failure."""
    if not deltas:
        return f"{name}: no figures", None
    mean = sum(deltas.values()) / len(deltas)
    if mean <= limit:
        return f"{name} {_signed_percent(mean)} ≤ {_percent(limit)}", None
    worst = max(deltas, key=lambda device: deltas[device])
    return "", (
        f"{name} {_signed_percent(mean)} > {_percent(limit)} against the previous model "
        f"(mean of {len(deltas)}; worst {worst} {_signed_percent(deltas[worst])})"
    )


def _soak_start(state: RolloutState, progress: _Progress) -> float:
    last_wave = state.waves[-1].started_at
    return max([last_wave, *progress.commit_times])


def _advance(build: _Builder, checks: list[str], facts: Mapping[str, DeviceFacts]) -> None:
    targets = build.plan.wave_targets()
    wave = len(build.state.waves)
    if wave == len(targets):
        build.update(status=RolloutStatus.COMPLETED)
        build.record(
            DecisionKind.COMPLETED,
            f"{build.wave_label}: {', '.join(checks)}: rollout completed",
            wave=wave,
        )
        return
    build.record(
        DecisionKind.ADVANCED,
        f"{build.wave_label}: {', '.join(checks)}: advancing to wave {wave + 1}",
        wave=wave,
    )
    _start_wave(build, facts)


def _fail(build: _Builder, failure: str, progress: _Progress) -> None:
    wave = len(build.state.waves)
    span = "wave 1" if wave == 1 else f"waves 1-{wave}"
    _roll_back(
        build,
        DecisionKind.GATE_FAILED,
        f"wave {wave} halted: {failure}: rolling {span} back",
        devices=sorted(progress.refused + progress.rolled_back),
    )


def _roll_back(
    build: _Builder,
    kind: DecisionKind,
    reason: str,
    *,
    devices: Sequence[str] = (),
    actor: str | None = None,
) -> None:
    assigned = build.state.assigned
    build.update(status=RolloutStatus.ROLLED_BACK, rolled_back_at=build.now)
    reason += (
        " (1 device gets the rollback)"
        if len(assigned) == 1
        else f" ({len(assigned)} devices get the rollback)"
    )
    build.record(
        kind, reason, wave=len(build.state.waves) or None, devices=devices or assigned, actor=actor
    )


# -- convergence -------------------------------------------------------------------------


def _record_convergence(build: _Builder, facts: Mapping[str, DeviceFacts]) -> None:
    if build.state.status is RolloutStatus.ROLLED_BACK:
        _record_rollback_convergence(build, facts)
        return
    waves = _wave_numbers(build.state)
    left_behind = set(build.state.left_behind)
    converged: set[str] = set()
    for device in build.state.pending:
        outcome = _release_outcome(build.plan.release, facts.get(device))
        if outcome is None:
            continue
        converged.add(device)
        behind = " (the rollout went on without it)" if device in left_behind else ""
        build.record(
            DecisionKind.CONVERGED,
            f"{device} returned and converged{behind}: {outcome}",
            wave=waves[device],
            devices=(device,),
        )
    if converged:
        build.update(pending=tuple(d for d in build.state.pending if d not in converged))


def _record_rollback_convergence(build: _Builder, facts: Mapping[str, DeviceFacts]) -> None:
    waves = _wave_numbers(build.state)
    done = set(build.state.rollback_converged)
    converged: list[str] = []
    for device in build.state.assigned:
        outcome = None if device in done else _rollback_outcome(build.plan, facts.get(device))
        if outcome is None:
            continue
        converged.append(device)
        build.record(
            DecisionKind.CONVERGED,
            f"{device} converged on the rollback: {outcome}",
            wave=waves[device],
            devices=(device,),
        )
    if converged:
        gone = set(converged)
        build.update(
            rollback_converged=(*build.state.rollback_converged, *converged),
            pending=tuple(d for d in build.state.pending if d not in gone),
        )


def _release_outcome(release: ManifestRef, fact: DeviceFacts | None) -> str | None:
    if fact is None:
        return None
    report = fact.update
    if report is not None and release.matches(report):
        if report.state not in _SETTLED:
            return None
        reason = f" ({report.reason})" if report.reason else ""
        return f"{report.state.value} release v{release.version}{reason}"
    if fact.running_sha256 == release.sha256:
        return f"runs release v{release.version}"
    return None


def _rollback_outcome(plan: RolloutPlan, fact: DeviceFacts | None) -> str | None:
    if fact is None:
        return None
    report = fact.update
    release_busy = (
        report is not None and plan.release.matches(report) and report.state not in _SETTLED
    )
    if report is not None and plan.rollback.matches(report) and report.state in _SETTLED:
        reason = f" ({report.reason})" if report.reason else ""
        return f"rollback manifest {report.state.value}{reason}, runs {_sha(fact.running_sha256)}"
    if fact.running_sha256 == plan.rollback.sha256 and not release_busy:
        return f"runs the previous model {_sha(fact.running_sha256)}"
    return None


# -- small words -------------------------------------------------------------------------


def _online(facts: Mapping[str, DeviceFacts], device: str) -> bool:
    fact = facts.get(device)
    return fact is not None and fact.online


def _wave_numbers(state: RolloutState) -> dict[str, int]:
    """Each device given the release, and its wave (1-based)."""
    return {d: number for number, wave in enumerate(state.waves, start=1) for d in wave.devices}


def _names(devices: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(devices[:limit])
    more = len(devices) - limit
    return f"{shown} and {more} more" if more > 0 else shown


def _percent(value: float) -> str:
    return f"{value * 100:.4g}%"


def _signed_percent(value: float) -> str:
    return f"{value * 100:+.3g}%"


def _sha(sha256: str | None) -> str:
    return sha256[:12] if sha256 else "an unknown model"


def _duration(seconds: float) -> str:
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{secs}s" if secs else "",
    ]
    return "".join(parts) or "0s"
