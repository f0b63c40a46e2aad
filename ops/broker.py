"""``edgefleet broker config``: the generated Mosquitto configuration.

Without ``--fleet`` it prints a plain loopback or LAN listener with the fleet's limits, which
is what a demo or a lab needs. With ``--fleet DIR --out OUT`` it writes the fleet's broker:
three TLS listeners (devices, claim, operators; ``provisioning.mosquitto.fleet_listeners``),
their ACLs, and copies of the certificates, CRLs and the broker's key the broker reads, so
the broker box never holds the fleet directory's CA or signing keys. Run it again after a
revocation to refresh the CRLs, then reload the broker (SIGHUP). Both keep retained state
(every device's desired model) across a broker restart, in Debian's /var/lib/mosquitto
unless told otherwise.
"""

from __future__ import annotations

import argparse
import os
import pwd
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgefleet.provisioning import BrokerListener, MosquittoSettings, pki, render_mosquitto_conf
from edgefleet.provisioning.fleetdir import FleetDir
from edgefleet.provisioning.mosquitto import (
    DEFAULT_PERSISTENCE_DIR,
    FleetBrokerFiles,
    fleet_listeners,
    render_claim_acl,
    render_device_acl,
    render_operator_acl,
)
from edgefleet.runtime import SettingError

from .provision import add_fleet_option, fleet_dir


def register(subcommands: Any) -> None:
    """Add ``broker config`` to the top-level command parser."""
    broker = subcommands.add_parser("broker", help="Mosquitto configuration")
    commands = broker.add_subparsers(dest="broker_command", required=True, metavar="COMMAND")
    config = commands.add_parser("config", help="print a mosquitto.conf with the fleet's limits")
    config.add_argument(
        "--port", type=int, default=1883, help="listener port, without --fleet (default: 1883)"
    )
    config.add_argument(
        "--bind",
        help="listener address (default: loopback; with --fleet every interface, 0.0.0.0)",
    )
    add_fleet_option(config)
    config.add_argument(
        "--out",
        type=Path,
        metavar="OUT",
        help="with --fleet: write mosquitto.conf, the ACLs and the certificates the broker "
        "reads into OUT, replacing what is there; run as root, the files go to the broker's "
        "user (--user) (default: none; --fleet needs it)",
    )
    persistence = config.add_mutually_exclusive_group()
    persistence.add_argument(
        "--persistence-dir",
        type=Path,
        default=DEFAULT_PERSISTENCE_DIR,
        metavar="DIR",
        help="keep retained messages (desired states), sessions and queues in DIR/mosquitto.db "
        "across restarts; it must exist and be writable by the broker's user "
        f"(default: {DEFAULT_PERSISTENCE_DIR}, as Debian's mosquitto package)",
    )
    persistence.add_argument(
        "--no-persistence",
        action="store_true",
        help="keep everything in memory: a broker restart forgets every device's desired state",
    )
    changes = MosquittoSettings.model_fields["autosave_changes"].default
    config.add_argument(
        "--autosave-changes",
        type=int,
        default=changes,
        metavar="N",
        help="save the database after N changes (retained messages, queued messages, "
        "subscriptions); 1 saves after each, so a crash loses no acknowledged desired "
        "state, at the cost of a whole-database write per event; larger N loses up to N "
        "changes on a crash; 0: save by time (--autosave-interval) instead "
        f"(default: {changes})",
    )
    autosave = MosquittoSettings.model_fields["autosave_interval_s"].default
    config.add_argument(
        "--autosave-interval",
        type=int,
        default=autosave,
        metavar="SECONDS",
        help="with --autosave-changes 0: save the database this often while running; a "
        "clean stop (SIGTERM) always saves, a crash loses what changed since the last "
        f"save; 0: on stop only (default: {autosave})",
    )
    config.add_argument(
        "--user",
        metavar="NAME",
        help="user a broker started as root switches to, who must be able to write the "
        "persistence directory (default: mosquitto's own, 'mosquitto')",
    )
    config.add_argument(
        "--allow-anonymous", action="store_true", help="accept clients without credentials"
    )
    config.set_defaults(handler=_config)


def _config(args: argparse.Namespace) -> int:
    if args.fleet is not None or args.out is not None:
        return _fleet_config(args)
    try:
        settings = MosquittoSettings(
            listeners=[BrokerListener(port=args.port, bind_address=args.bind or "127.0.0.1")],
            persistence_dir=None if args.no_persistence else args.persistence_dir,
            autosave_changes=args.autosave_changes,
            autosave_interval_s=args.autosave_interval,
            allow_anonymous=args.allow_anonymous,
            run_as_user=args.user,
        )
    except ValidationError as exc:
        raise _refusal(exc) from exc
    print(render_mosquitto_conf(settings), end="")
    return 0


def _fleet_config(args: argparse.Namespace) -> int:
    if args.out is None:
        raise SettingError(
            "--fleet writes several files", hint="name the broker's folder with --out OUT"
        )
    fleet = fleet_dir(args)
    settings_of_fleet = fleet.settings()
    out = args.out.resolve()
    files = _copy_fleet_files(fleet, out, settings_of_fleet.topic_root)
    owner = _broker_owner(args.user)
    try:
        settings = MosquittoSettings(
            listeners=fleet_listeners(
                files,
                bind_address=args.bind or "0.0.0.0",
                device_port=settings_of_fleet.device_port,
                claim_port=settings_of_fleet.claim_port,
                operator_port=settings_of_fleet.operator_port,
            ),
            persistence_dir=None if args.no_persistence else args.persistence_dir,
            autosave_changes=args.autosave_changes,
            autosave_interval_s=args.autosave_interval,
            allow_anonymous=False,
            run_as_user=args.user,
        )
    except ValidationError as exc:
        raise _refusal(exc) from exc
    _write(out / "mosquitto.conf", render_mosquitto_conf(settings).encode(), 0o644)
    if owner is not None:  # the broker reads the CRLs again, as this user, on SIGHUP
        for path in (out / "certs", out / "acl", *files.model_dump().values()):
            if path is not None:
                os.chown(path, *owner)
    print(f"wrote the fleet broker's configuration to {out}/ (mosquitto.conf, acl/, certs/)")
    print(
        f"next: run 'mosquitto -c {out}/mosquitto.conf' (or include it from the broker's "
        "config); after 'edgefleet provision revoke', run this command again and reload the "
        "broker: systemctl reload mosquitto (SIGHUP)"
    )
    return 0


def _copy_fleet_files(fleet: FleetDir, out: Path, topic_root: str) -> FleetBrokerFiles:
    """Copy what the broker reads from the fleet directory into ``out``, and write the ACLs."""
    pki.make_private_dir(out / "certs")
    pki.make_private_dir(out / "acl")
    out.chmod(0o755)
    (out / "acl").chmod(0o755)
    copies = {
        "certfile": (fleet.broker_cert, "certs/broker.crt", 0o644),
        "keyfile": (fleet.broker_key, "certs/broker.key", pki.PRIVATE_KEY_MODE),
        "device_cafile": (fleet.ca_cert, "certs/devices-ca.crt", 0o644),
        "crlfile": (fleet.crl_path, "certs/devices.crl", 0o644),
        "operator_cafile": (fleet.operator_ca_cert, "certs/operators-ca.crt", 0o644),
        "operator_crlfile": (fleet.operator_crl_path, "certs/operators.crl", 0o644),
        "claim_cafile": (fleet.claim_ca_cert, "certs/claim-ca.crt", 0o644),
    }
    paths: dict[str, Path] = {}
    for field, (source, name, mode) in copies.items():
        paths[field] = out / name
        _write(paths[field], _read(source), mode)
    acls = {
        "device_acl": ("acl/devices.acl", render_device_acl(topic_root)),
        "operator_acl": (
            "acl/operators.acl",
            render_operator_acl(topic_root, fleet.operator_identities()),
        ),
        "claim_acl": ("acl/claim.acl", render_claim_acl(topic_root)),
    }
    for field, (name, text) in acls.items():
        paths[field] = out / name
        _write(paths[field], text.encode(), 0o644)
    return FleetBrokerFiles(**paths)


def _broker_owner(user: str | None) -> tuple[int, int] | None:
    """Who the broker reads its files as: the user it switches to, when we may chown to it."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user or "mosquitto")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SettingError(
            f"cannot read {path}: {exc.strerror or exc}",
            hint="pass the fleet directory 'edgefleet provision init' wrote",
        ) from exc


def _write(path: Path, data: bytes, mode: int) -> None:
    pki.write_file(path, data, mode=mode, replace=True)


_OPTIONS = {
    "port": "--port",
    "bind_address": "--bind",
    "persistence_dir": "--persistence-dir",
    "autosave_changes": "--autosave-changes",
    "autosave_interval_s": "--autosave-interval",
    "run_as_user": "--user",
}


def _refusal(exc: ValidationError) -> SettingError:
    """The settings' refusal as the options the user typed."""
    reasons = []
    for error in exc.errors():
        option = next((_OPTIONS[str(part)] for part in error["loc"] if part in _OPTIONS), None)
        message = error["msg"].removeprefix("Value error, ")
        reasons.append(f"{option}: {message}" if option else message)
    anonymous = any("no client could ever connect" in reason for reason in reasons)
    return SettingError(
        f"no broker config for these options: {'; '.join(reasons)}",
        hint="add --allow-anonymous for a lab broker; a fleet's broker (TLS, client "
        "certificates, ACL) comes from edgefleet.provisioning"
        if anonymous
        else "correct the option named above",
    )
