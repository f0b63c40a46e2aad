"""The rollouts' HTTP API: start a rollout, list and show them, pause, resume, halt, roll back.

Routes (a router for :func:`~.api.create_app`, which gives them its authentication and
error bodies)::

    POST /rollouts                       body RolloutRequest            201 RolloutView
    GET  /rollouts                       ?status=                       200 [RolloutView]
    GET  /rollouts/{id}                  with every decision and write  200 RolloutView
    POST /rollouts/{id}/pause            body CommandRequest            202 RolloutView
    POST /rollouts/{id}/resume           (the same)
    POST /rollouts/{id}/halt             (the same)
    POST /rollouts/{id}/rollback         (the same)

Starting: the release comes from the store (its signed manifest is the one devices get);
the selectors are resolved to devices through the registry (several unite, a comma
intersects, as ``GET /devices``), in a stable order by id; the plan's rollback is the
release ``rollback_release_id`` names, and ``rollback_manifest`` is that release's manifest
re-signed by the operator as a rollback from the new release (``edgefleet rollout start``
signs it with ``releases.sign_rollback``; the controller holds no key). It must name the
rollback release's model, say it rolls back from the release, and last past the deadline.
``reconcile.start_rollout`` stores it with the caller as its author; the controller's
rollout loop takes the first step. A command is stored by its ``command_id`` (one the
controller already has is not stored again, so a retry is harmless) and applied by the
next step; one the rollout's status does not allow is refused at once.

Errors (answered as :func:`~.api.error_answer` says; the others are reconcile's, the
release store's, the registry's and the engine's)::

    EdgefleetError
    └── SettingError
        ├── NoDevicesSelected     the selectors match no device                    400
        └── RolloutManifestError  (reconcile) the rollback manifest does not fit   400

Threads: none of its own; FastAPI runs the handlers on its worker threads, each with
its own database session.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session

from edgefleet.agent.protocol import (
    COMMAND_ID_PATTERN,
    TOPIC_LEVEL_PATTERN,
    Manifest,
    SignedManifest,
    describe_errors,
)
from edgefleet.runtime import SettingError

from . import registry
from .api import Caller, CallerDep, ContextDep, SessionDep, _errors
from .reconcile import (
    RolloutManifestError,
    RolloutView,
    command,
    list_rollouts,
    show_rollout,
    start_rollout,
)
from .releases import Release, ReleaseStore
from .rollouts import (
    ManifestRef,
    OperatorCommand,
    OperatorCommandKind,
    RolloutGates,
    RolloutPlan,
    RolloutPlanError,
    RolloutStatus,
    parse_gates,
)

log = logging.getLogger(__name__)

__all__ = [
    "RELEASE_ID_PATTERN",
    "ROLLOUT_ID_PATTERN",
    "CommandRequest",
    "NoDevicesSelected",
    "RolloutRequest",
    "rollouts_router",
]

RELEASE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}@[1-9][0-9]{0,8}$"
"""``MODEL_ID@VERSION``, as the release store names releases."""
ROLLOUT_ID_PATTERN = TOPIC_LEVEL_PATTERN
"""A rollout id: 1 to 64 of letters, digits, ``_ . -``, starting with a letter or digit."""
REASON_PATTERN = r"^[^\x00-\x1f\x7f]+$"
"""One line of text: no control characters."""
DEFAULT_DEADLINE_S = 3600.0
MAX_DURATION_S = 365 * 86400.0
"""A soak or a deadline longer than a year is a typo."""
SELECTORS_MAX = 32
SELECTOR_MAX_LENGTH = 256
GATES_MAX = 8
GATE_MAX_LENGTH = 64
WAVES_MAX_LENGTH = 256
REASON_MAX_LENGTH = 500
_GENERATED_PREFIX_MAX = 45  # + "-v" + 9 digits + "-" + 6 hex = 63, within a rollout id
_DEFAULT_SOAK_S = RolloutGates.model_fields["min_soak_s"].default


class NoDevicesSelected(SettingError):
    """The rollout's selectors match no device in the registry."""


# -- requests ------------------------------------------------------------------------------

Selector = Annotated[str, Field(min_length=1, max_length=SELECTOR_MAX_LENGTH)]
Gate = Annotated[str, Field(min_length=1, max_length=GATE_MAX_LENGTH)]


class RolloutRequest(BaseModel):
    """The body of ``POST /rollouts``: what to roll out where, how fast, and the way back."""

    model_config = ConfigDict(extra="forbid", strict=True)

    release_id: str = Field(
        pattern=RELEASE_ID_PATTERN, description="The release rolled out, MODEL_ID@VERSION."
    )
    selector: list[Selector] = Field(
        min_length=1,
        max_length=SELECTORS_MAX,
        description="The target devices: device:ID, group:NAME, tag:K=V or all; a comma "
        "intersects, several selectors unite (as GET /devices).",
    )
    stream: str = Field(
        pattern=TOPIC_LEVEL_PATTERN, description="The stream whose model is replaced."
    )
    waves: str = Field(
        min_length=1,
        max_length=WAVES_MAX_LENGTH,
        description="Cumulative wave sizes, device counts or percentages, the last 100%: "
        "e.g. 1,10%,50%,100%.",
    )
    gates: list[Gate] = Field(
        default_factory=list,
        max_length=GATES_MAX,
        description="Conditions that must hold before the next wave: success>=95%, "
        "rollbacks<=1, error_rate<=+2%, latency_p99<=+20% (the others keep their defaults).",
    )
    soak_s: float = Field(
        _DEFAULT_SOAK_S,
        ge=0,
        le=MAX_DURATION_S,
        allow_inf_nan=False,
        description="Seconds since the last device of a wave committed before the next.",
    )
    deadline_s: float = Field(
        DEFAULT_DEADLINE_S,
        gt=0,
        le=MAX_DURATION_S,
        allow_inf_nan=False,
        description="Seconds from now after which offline devices no longer hold a wave.",
    )
    proceed_without_offline: bool = Field(
        False,
        description="Past the deadline, go on without offline devices (true) or halt.",
    )
    rollback_release_id: str = Field(
        pattern=RELEASE_ID_PATTERN,
        description="The release a rollback returns to (what the devices run now).",
    )
    rollback_manifest: SignedManifest = Field(
        description="That release's manifest signed by the operator as a rollback from "
        "release_id, valid past the deadline."
    )
    rollout_id: str | None = Field(
        None,
        pattern=ROLLOUT_ID_PATTERN,
        description="The rollout's id (default: MODEL_ID-vVERSION-<6 hex>).",
    )


class CommandRequest(BaseModel):
    """The body of a command to a rollout: why, and an id that makes a retry harmless."""

    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field(
        max_length=REASON_MAX_LENGTH,
        pattern=REASON_PATTERN,
        description="Why, in the operator's words (one line); in the audit log.",
    )
    command_id: str | None = Field(
        None,
        pattern=COMMAND_ID_PATTERN,
        description="Unique id; a command whose id the controller has is not stored again "
        "(default: a new one).",
    )


# -- starting ------------------------------------------------------------------------------


def begin(session: Session, store: ReleaseStore, who: Caller, body: RolloutRequest) -> RolloutView:
    """Resolve ``body`` into a plan, check its manifests, store it; the stored rollout."""
    release = store.get(body.release_id)
    back = store.get(body.rollback_release_id)
    devices = _devices(session, body.selector)
    now = time.time()
    plan = _plan(body, release, back, devices, deadline=now + body.deadline_s)
    _check_rollback(body.rollback_manifest, release, plan.deadline)
    start_rollout(
        session, plan, who.identity, release=release.manifest, rollback=body.rollback_manifest,
        now=now,
    )  # fmt: skip
    log.info(
        "rollout %s started by %s: release %s to %d devices, stream %s",
        plan.rollout_id, who.identity, release.id, len(devices), plan.stream,
    )  # fmt: skip
    return show_rollout(session, plan.rollout_id)


def _devices(session: Session, selectors: list[str]) -> tuple[str, ...]:
    parsed = [registry.parse_selector(text) for text in selectors]
    found = tuple(registry.select_device_ids(session, parsed))
    if not found:
        raise NoDevicesSelected(
            f"no device matches {' or '.join(selectors)}",
            hint="'edgefleet devices list --selector ...' shows what a selector matches",
        )
    return found


def _plan(
    body: RolloutRequest,
    release: Release,
    back: Release,
    devices: tuple[str, ...],
    *,
    deadline: float,
) -> RolloutPlan:
    gates = parse_gates(body.gates, RolloutGates(min_soak_s=body.soak_s))
    try:
        return RolloutPlan(
            rollout_id=body.rollout_id or _new_id(release),
            release_id=release.id,
            stream=body.stream,
            release=_ref(release),
            rollback=_ref(back),
            devices=devices,
            waves=body.waves,
            gates=gates,
            deadline=deadline,
            proceed_without_offline=body.proceed_without_offline,
        )
    except ValidationError as exc:
        raise RolloutPlanError(
            f"the rollout cannot work: {describe_errors(exc)}",
            hint="roll back to a release other than the one rolled out",
        ) from exc


def _ref(release: Release) -> ManifestRef:
    return ManifestRef(
        ref=release.id, model_id=release.model_id, version=release.version, sha256=release.sha256
    )


def _new_id(release: Release) -> str:
    prefix = release.model_id[:_GENERATED_PREFIX_MAX]
    return f"{prefix}-v{release.version}-{secrets.token_hex(3)}"


def _check_rollback(signed: SignedManifest, release: Release, deadline: float) -> None:
    """The rollback must step back from ``release`` and outlive the deadline (its model is
    checked against the plan by ``start_rollout``)."""
    try:
        terms = Manifest.model_validate_json(signed.payload)
    except ValidationError as exc:
        raise RolloutManifestError(
            f"the rollback manifest does not parse ({describe_errors(exc)})",
            hint="give the signed rollback manifest itself ('edgefleet rollout start' signs it)",
        ) from exc
    source = terms.rollback_from
    if source is None or (source.version, source.sha256) != (release.version, release.sha256):
        named = f"v{source.version} {source.sha256[:12]}" if source else "no release"
        raise RolloutManifestError(
            f"the rollback manifest rolls back from {named}, not from release {release.id} "
            f"v{release.version} {release.sha256[:12]}; devices would refuse it",
            hint=f"sign the rollback with rollback_from naming release {release.id}",
        )
    if terms.expires_at < deadline:
        raise RolloutManifestError(
            f"the rollback manifest expires {deadline - terms.expires_at:.0f} s before the "
            "rollout's deadline; a late rollback would be refused",
            hint="sign it to last the deadline plus a margin",
        )


# -- commands ------------------------------------------------------------------------------


def order(
    session: Session,
    who: Caller,
    rollout_id: str,
    kind: OperatorCommandKind,
    body: CommandRequest,
) -> RolloutView:
    """Store the command for the rollout's next step (once per id); the rollout."""
    command_id = body.command_id or uuid.uuid4().hex
    given = OperatorCommand(id=command_id, kind=kind, actor=who.identity, reason=body.reason)
    if command(session, rollout_id, given):
        log.info("rollout %s: %s by %s (%s)", rollout_id, kind.value, who.identity, body.reason)
    return show_rollout(session, rollout_id)


_COMMAND_HELP = {
    OperatorCommandKind.PAUSE: (
        "Pause a running rollout: no wave starts; a failing gate still rolls back."
    ),
    OperatorCommandKind.RESUME: "Resume a paused rollout.",
    OperatorCommandKind.HALT: (
        "Halt a running or paused rollout for good: nothing advances or rolls back; every "
        "device keeps its desired state."
    ),
    OperatorCommandKind.ROLLBACK: (
        "Roll back: every device given the release gets the pre-signed rollback manifest."
    ),
}


# -- the router ----------------------------------------------------------------------------

_ROLLOUT_ID = PathParam(description="Rollout id.", max_length=64)


def rollouts_router() -> APIRouter:
    """``/rollouts``: start, list, show, and the four commands (the module docstring)."""
    router = APIRouter(tags=["rollouts"])

    @router.post("/rollouts", status_code=201, responses=_errors(400, 404, 409, 503))
    def create_rollout(
        session: SessionDep, context: ContextDep, who: CallerDep, body: RolloutRequest
    ) -> RolloutView:
        """Start a rollout of a release to the selected devices, in waves, behind gates."""
        return begin(session, context.store, who, body)

    @router.get("/rollouts", responses=_errors())
    def list_all_rollouts(
        session: SessionDep,
        who: CallerDep,
        status: Annotated[
            RolloutStatus | None, Query(description="Only rollouts in this status.")
        ] = None,
    ) -> list[RolloutView]:
        """Every rollout, newest first (without decisions or writes)."""
        return list_rollouts(session, status=status)

    @router.get("/rollouts/{rollout_id}", responses=_errors(404))
    def show_one_rollout(
        session: SessionDep, who: CallerDep, rollout_id: Annotated[str, _ROLLOUT_ID]
    ) -> RolloutView:
        """One rollout with every decision and its reason, and each device's last write."""
        return show_rollout(session, rollout_id)

    for kind in OperatorCommandKind:
        router.add_api_route(
            f"/rollouts/{{rollout_id}}/{kind.value}",
            _command_endpoint(kind),
            methods=["POST"],
            status_code=202,
            name=f"{kind.value}_rollout",
            summary=f"{kind.value.capitalize()} a rollout",
            description=f"{_COMMAND_HELP[kind]} Applied by the rollout's next step; a "
            "command its status does not allow is refused (409).",
            response_model=RolloutView,
            responses=_errors(400, 404, 409),
        )
    return router


def _command_endpoint(kind: OperatorCommandKind) -> Callable[..., Any]:
    def endpoint(
        session: SessionDep,
        who: CallerDep,
        rollout_id: Annotated[str, _ROLLOUT_ID],
        body: CommandRequest,
    ) -> RolloutView:
        return order(session, who, rollout_id, kind, body)

    return endpoint
