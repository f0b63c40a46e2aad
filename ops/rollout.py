"""``edgefleet rollout``: staged rollouts of a release, through the controller's HTTP API.

::

    edgefleet rollout start MODEL_ID@VERSION --to SELECTOR [--to ...] --stream S
        --waves 1,10%,50%,100% [--gate COND ...] [--soak 10m] [--deadline 1h]
        [--proceed-without-offline] [--rollback-to MODEL_ID@VERSION] [--id ID]
        [--release-key KEYFILE | --fleet DIR] [--json] [controller options]
    edgefleet rollout status [ID] [--json]
    edgefleet rollout pause|resume|halt|rollback ID [--reason TEXT] [--json]

``start`` reads the release and the target devices from the controller, works out the
rollback (``--rollback-to``, else the release every target device runs on the stream now:
one release of ``GET /releases`` with that sha256; devices on different models, or on a
model no release holds, are refused, exit 3, naming them), and signs the rollback here,
on the operator's side: the rollback release's manifest with ``rollback_from`` naming the
release, valid for the deadline plus :data:`ROLLBACK_MARGIN_S`, numbered by the key's
``sequences.json`` (``releases.sign_rollback``). Both manifests it read from the
controller must verify with the signing key, or with the fleet's key set when there is
one, before anything is signed: a controller cannot get the operator to sign what the
operator never released. The key is ``--release-key`` or the fleet's newest release key
(``--fleet``, ``$EDGEFLEET_FLEET``), as for ``release create`` (whose ``--key`` is the
client certificate's key here, as for every controller command). Then it posts the rollout;
the controller's loop takes it from there.

Durations (``--soak``, ``--deadline``) are seconds or a number with s, m, h or d.
``status`` without an id is a table of the rollouts; with one, the plan, each decision with
its reason, the pending devices and each device's last desired write. The commands send a
new command id each run (``command_id``): the controller stores it once and applies it at
the rollout's next step. ``--json`` prints the API's answer.

Errors: the client's (``edgefleet.ops.apiclient``: 400/404/422 exit 2, 409 exit 3, the
controller unreachable exit 1), and::

    EdgefleetError
    ├── SettingError
    │   └── NoTargetDevices      the selectors match no device                   exit 2
    └── Refused
        ├── NoRollbackTarget     the devices run no single released model        exit 3
        └── UntrustedManifest    a manifest from the controller does not verify  exit 3

Threads: none.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.protocol import SignedManifest
from edgefleet.provisioning import (
    FleetDir,
    KeySetError,
    SigningError,
    TrustedKeys,
    load_private_key,
    load_public_key,
    open_key_set,
    read_key_set,
)
from edgefleet.runtime import EdgefleetError, SettingError

from .apiclient import (
    ControllerClient,
    add_controller_options,
    controller_client,
    parse_answer,
)
from .controller.releases import Release, sign_rollback
from .controller.rollouts import OperatorCommandKind, RolloutGates, RolloutPlanError, resolve_waves
from .devices import device_views
from .enroll import parse_duration
from .errors import Refused
from .fleet import SequenceCounter
from .provision import FLEET_ENV
from .release import release_key
from .text import table, utc

if TYPE_CHECKING:
    from .controller.reconcile import RolloutView
    from .controller.registry import DeviceView

ROLLBACK_MARGIN_S = 86_400.0
"""How long a rollback stays valid past the rollout's deadline."""
DEFAULT_DEADLINE = "1h"
DEFAULT_REASON = "no reason given"
_SHOWN_DEVICES = 5
_COMMAND_HELP = {
    OperatorCommandKind.PAUSE: "pause a running rollout: no wave starts (a failing gate "
    "still rolls back)",
    OperatorCommandKind.RESUME: "resume a paused rollout",
    OperatorCommandKind.HALT: "halt a rollout for good: every device keeps its desired state",
    OperatorCommandKind.ROLLBACK: "roll every device given the release back (the rollback "
    "signed at start)",
}


class NoTargetDevices(SettingError):
    """The rollout's selectors match no device the controller knows."""


class NoRollbackTarget(Refused):
    """The target devices do not all run one released model on the stream."""


class UntrustedManifest(Refused):
    """A release's manifest from the controller does not verify with the operator's keys."""


# -- argument parsing -------------------------------------------------------------------


def register(subcommands: Any) -> None:
    """Add ``rollout`` and its commands to the command parser."""
    rollout = subcommands.add_parser(
        "rollout", help="staged rollouts of a release to many devices, through the controller"
    )
    commands = rollout.add_subparsers(dest="rollout_command", required=True, metavar="COMMAND")
    _register_start(commands)

    status = commands.add_parser("status", help="the rollouts, or one with its decisions")
    status.add_argument("id", nargs="?", metavar="ID", help="one rollout (default: all)")
    status.add_argument("--json", action="store_true", help="the API's JSON (default: text)")
    add_controller_options(status)
    status.set_defaults(handler=_status)

    for kind in OperatorCommandKind:
        order = commands.add_parser(kind.value, help=_COMMAND_HELP[kind])
        order.add_argument("id", metavar="ID", help="the rollout")
        order.add_argument(
            "--reason", default=DEFAULT_REASON, metavar="TEXT", help="why (in the audit log)"
        )
        order.add_argument("--json", action="store_true", help="the API's JSON (default: text)")
        add_controller_options(order)
        order.set_defaults(handler=_command, kind=kind)


def _register_start(commands: Any) -> None:
    start = commands.add_parser(
        "start", help="roll a release out in waves, behind health gates, with a signed rollback"
    )
    start.add_argument("release", metavar="MODEL_ID@VERSION", help="the release to roll out")
    start.add_argument(
        "--to",
        action="append",
        required=True,
        metavar="SELECTOR",
        help="device:ID, group:NAME, tag:K=V or all; a comma intersects; repeat to unite",
    )
    start.add_argument("--stream", required=True, metavar="S", help="the stream to update")
    start.add_argument(
        "--waves",
        required=True,
        metavar="SPEC",
        help="cumulative wave sizes, counts or percentages, e.g. 1,10%%,50%%,100%%",
    )
    start.add_argument(
        "--gate",
        action="append",
        default=[],
        metavar="COND",
        help="a condition between waves: success>=95%%, rollbacks<=1, error_rate<=+2%%, "
        "latency_p99<=+20%%; repeat (default: all succeed, none rolled back, +2%%, +20%%)",
    )
    start.add_argument(
        "--soak",
        type=_duration(allow_zero=True),
        default=RolloutGates.model_fields["min_soak_s"].default,
        metavar="DURATION",
        help="time after a wave's last commit before the next wave, e.g. 10m "
        "(default: %(default)s s)",
    )
    start.add_argument(
        "--deadline",
        type=_duration(allow_zero=False),
        default=DEFAULT_DEADLINE,
        metavar="DURATION",
        help="after this long, offline devices no longer hold a wave back (default: 1h)",
    )
    start.add_argument(
        "--proceed-without-offline",
        action="store_true",
        help="past the deadline, go on without offline devices (default: halt)",
    )
    start.add_argument(
        "--rollback-to",
        metavar="MODEL_ID@VERSION",
        help="the release a rollback returns to (default: the one the devices run now)",
    )
    start.add_argument("--id", metavar="ID", help="the rollout's id (default: generated)")
    start.add_argument(
        "--release-key",
        type=Path,
        metavar="KEYFILE",
        help="the private release key that signs the rollback (default: the fleet's newest)",
    )
    start.add_argument(
        "--fleet",
        type=Path,
        metavar="DIR",
        help=f"the fleet whose key set must trust the key (default: ${FLEET_ENV})",
    )
    start.add_argument("--json", action="store_true", help="the API's JSON (default: text)")
    add_controller_options(start)
    start.set_defaults(handler=_start)


def _duration(*, allow_zero: bool) -> Any:
    def parse(text: str) -> float:
        if allow_zero and text.strip() in ("0", "0s"):
            return 0.0
        try:
            return parse_duration(text)
        except EdgefleetError as exc:
            raise argparse.ArgumentTypeError(f"{exc.message}; {exc.hint}") from None

    return parse


# -- start ------------------------------------------------------------------------------


def _start(args: argparse.Namespace) -> int:
    key_path, key = release_key(args.release_key, args.fleet, key_option="--release-key")
    with controller_client(args) as client:
        release = fetch_release(client, args.release)
        devices = _target_devices(client, args.to)
        if args.rollback_to is not None:
            back = fetch_release(client, args.rollback_to)
        else:
            back = running_release(client, devices, args.stream, release)
        trusted = _trusted_keys(key, args.fleet)
        for each in (release, back):
            _verify(each, trusted)
        lifetime_s = args.deadline + ROLLBACK_MARGIN_S
        counter = SequenceCounter.beside(key_path)
        rollback = sign_rollback(back, release, key, lifetime_s, counter)
        body = _start_body(args, release, back, rollback)
        answer = client.post("/rollouts", body)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    view = _rollout_view(answer)
    print(
        f"started rollout {view.id}: release {view.release_id} to {view.devices} devices, "
        f"stream {view.stream}, waves {view.waves}"
    )
    print(f"rollback       to {back.id} (signed here, valid {_duration_text(lifetime_s)})")
    print(f"follow         edgefleet rollout status {view.id}")
    return 0


def _start_body(
    args: argparse.Namespace, release: Release, back: Release, rollback: SignedManifest
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "release_id": release.id,
        "selector": list(args.to),
        "stream": args.stream,
        "waves": args.waves,
        "gates": list(args.gate),
        "soak_s": args.soak,
        "deadline_s": args.deadline,
        "proceed_without_offline": args.proceed_without_offline,
        "rollback_release_id": back.id,
        "rollback_manifest": rollback.model_dump(mode="json"),
    }
    if args.id is not None:
        body["rollout_id"] = args.id
    return body


def fetch_release(client: ControllerClient, release_id: str) -> Release:
    """The release ``MODEL_ID@VERSION`` as the controller's store holds it."""
    answer = client.get(f"/releases/{quote(release_id, safe='')}")
    return _parsed_release(answer, f"release {release_id}")


def _parsed_release(answer: Any, what: str) -> Release:
    fields = answer
    if isinstance(answer, dict):  # the API's view adds id, artifact: the record's fields only
        fields = {name: answer[name] for name in Release.model_fields if name in answer}
    release: Release = parse_answer(Release, fields, what)
    return release


def _target_devices(client: ControllerClient, selectors: Sequence[str]) -> list[DeviceView]:
    devices = device_views(client.get("/devices", params={"selector": list(selectors)}))
    if not devices:
        raise NoTargetDevices(
            f"no device matches {' or '.join(selectors)}",
            hint="'edgefleet devices list' shows the devices, their groups and tags",
        )
    return devices


def running_release(
    client: ControllerClient, devices: Sequence[DeviceView], stream: str, release: Release
) -> Release:
    """The one release every device in ``devices`` runs on ``stream`` (the rollback target);
    :class:`NoRollbackTarget` when they run different models, none, or an unreleased one."""
    running: dict[tuple[str | None, str | None, str | None], list[str]] = defaultdict(list)
    for device in devices:
        row = next((s for s in device.streams if s.stream == stream), None)
        model = (row.model_id, row.model_version, row.model_sha256) if row else (None,) * 3
        running[model].append(device.id)
    if len(running) > 1 or None in {sha for _, _, sha in running}:
        raise NoRollbackTarget(
            f"the devices do not all run one model on stream {stream}: "
            + "; ".join(_describe_group(model, ids) for model, ids in running.items()),
            hint="name the release to roll back to with --rollback-to MODEL_ID@VERSION, or "
            "select devices that run one model with a narrower --to",
        )
    ((model_id, version, sha256), ids) = next(iter(running.items()))
    if sha256 == release.sha256:
        raise NoRollbackTarget(
            f"the devices run release {release.id} on stream {stream} already "
            f"({_device_list(ids)})",
            hint="roll out a newer release, or name the way back with --rollback-to",
        )
    found = [_parsed_release(r, "release") for r in client.get("/releases")]
    matches = [r for r in found if r.sha256 == sha256]
    exact = [r for r in matches if (r.model_id, str(r.version)) == (model_id, version)]
    if len(exact) == 1 or len(matches) == 1:
        return (exact or matches)[0]
    named = f"{model_id} v{version} ({(sha256 or '')[:12]})"
    raise NoRollbackTarget(
        f"{_device_list(ids)} run {named} on stream {stream}, and "
        + (
            "no release in the controller's store holds that model"
            if not matches
            else f"releases {', '.join(r.id for r in matches)} all hold it"
        ),
        hint="name the release to roll back to with --rollback-to MODEL_ID@VERSION "
        "('edgefleet release list' shows them)",
    )


def _describe_group(model: tuple[str | None, str | None, str | None], ids: list[str]) -> str:
    model_id, version, sha256 = model
    if sha256 is None:
        return f"{_device_list(ids)}: no model known on it"
    return f"{_device_list(ids)}: {model_id} v{version} ({sha256[:12]})"


def _device_list(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_SHOWN_DEVICES])
    more = len(ids) - _SHOWN_DEVICES
    return f"{shown} and {more} more" if more > 0 else shown


def _trusted_keys(key: Ed25519PrivateKey, fleet: Path | None) -> TrustedKeys:
    """The keys a release's manifest may be signed by: the fleet's key set (a root-signed
    file the operator holds), else only the signing key itself."""
    named = fleet or _fleet_from_environment()
    if named is None:
        return TrustedKeys([key.public_key()])
    paths = FleetDir.load(named)
    root = (
        load_public_key(paths.root_pub)
        if paths.root_pub.exists()
        else load_private_key(paths.root_key).public_key()
    )
    try:
        return open_key_set(read_key_set(paths.keyset_path), root).trusted_keys()
    except KeySetError as exc:
        raise Refused(f"{paths.keyset_path}: {exc.message}", hint=exc.hint) from exc


def _fleet_from_environment() -> Path | None:
    import os

    named = os.environ.get(FLEET_ENV)
    return Path(named) if named else None


def _verify(release: Release, trusted: TrustedKeys) -> None:
    """Refuse a release whose manifest the operator's keys did not sign, or that says
    another model than the release record (what would be signed again)."""
    try:
        terms = trusted.verify(release.manifest)
    except SigningError as exc:
        raise UntrustedManifest(
            f"the manifest of release {release.id} from the controller does not verify: "
            f"{exc.message}",
            hint="pass --fleet DIR so the fleet's key set checks it (a release signed by an "
            "older key), or check that the controller is yours",
        ) from exc
    if (terms.model_id, terms.version, terms.sha256) != (
        release.model_id,
        release.version,
        release.sha256,
    ):
        raise UntrustedManifest(
            f"release {release.id}'s signed manifest names {terms.model_id} v{terms.version} "
            f"{terms.sha256[:12]}, its record {release.sha256[:12]}",
            hint="check the controller's release store",
        )


# -- status and commands ------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    with controller_client(args) as client:
        if args.id is None:
            answer = client.get("/rollouts")
        else:
            answer = client.get(f"/rollouts/{quote(args.id, safe='')}")
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.id is None:
        _print_table([_rollout_view(each) for each in answer])
    else:
        print("\n".join(describe(_rollout_view(answer))))
    return 0


def _command(args: argparse.Namespace) -> int:
    kind: OperatorCommandKind = args.kind
    body = {"reason": args.reason, "command_id": uuid.uuid4().hex}
    path = f"/rollouts/{quote(args.id, safe='')}/{kind.value}"
    with controller_client(args) as client:
        answer = client.post(path, body)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    view = _rollout_view(answer)
    print(
        f"{kind.value} of rollout {view.id} stored; the controller applies it at the "
        f"rollout's next step (now {view.status.value})"
    )
    return 0


def _rollout_view(answer: Any) -> RolloutView:
    from .controller.reconcile import RolloutView

    view: RolloutView = parse_answer(RolloutView, answer, "rollout")
    return view


def _print_table(views: Sequence[RolloutView]) -> None:
    if not views:
        print("no rollouts")
        return
    rows = [("ROLLOUT", "RELEASE", "STREAM", "STATUS", "WAVES", "DEVICES", "PENDING", "STARTED")]
    rows += [
        (
            v.id,
            v.release_id,
            v.stream,
            v.status.value,
            f"{v.waves_started}/{_wave_count(v)}",
            str(v.devices),
            str(len(v.pending)),
            utc(v.created_at),
        )
        for v in views
    ]
    print("\n".join(table(rows)))


def describe(view: RolloutView) -> list[str]:
    """A rollout for people: the plan, each decision with its reason, pending devices."""
    lines = [
        f"rollout        {view.id}  ({view.status.value})",
        f"release        {view.release_id} on stream {view.stream}, {view.devices} devices",
        f"waves          {view.waves}: {view.waves_started} of {_wave_count(view)} started",
        f"started        {utc(view.created_at)} by {view.created_by}",
        f"pending        {_device_list(view.pending) if view.pending else 'none'}",
    ]
    if view.decisions:
        lines.append("decisions")
        for d in view.decisions:
            wave = f"wave {d.wave} " if d.wave is not None else ""
            if d.reason.startswith(wave):  # "wave 1 of 2: ..." says it already
                wave = ""
            who = f" ({d.actor})" if d.actor else ""
            lines.append(f"  {utc(d.at, seconds=True)}  {d.kind}  {wave}{d.reason}{who}")
    else:
        lines.append("decisions      none yet (the controller's next step starts wave 1)")
    if view.writes:
        lines.append("devices")
        for w in view.writes:
            written = "written" if w.written_at is not None else "not written yet"
            lines.append(
                f"  {w.device_id}  {w.target} {w.manifest_sha256[:12]}  step {w.step}  "
                f"revision {w.revision}  {written}"
            )
    return lines


def _wave_count(view: RolloutView) -> str:
    try:
        return str(len(resolve_waves(view.waves, view.devices)))
    except RolloutPlanError:
        return "?"


def _duration_text(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes = rest // 60
    return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
