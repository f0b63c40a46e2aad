"""``edgefleet broker config``: the generated Mosquitto configuration, for a quick start.

A fleet's production broker config (TLS, client certificates, ACL) comes from
``edgefleet.provisioning``; this command prints a plain loopback or LAN
listener with the fleet's limits, which is what a demo or a lab needs. Like
the production config it keeps retained state (every device's desired model)
across a broker restart, in Debian's /var/lib/mosquitto unless told otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgefleet.provisioning import BrokerListener, MosquittoSettings, render_mosquitto_conf
from edgefleet.provisioning.mosquitto import DEFAULT_PERSISTENCE_DIR
from edgefleet.runtime import SettingError


def register(subcommands: Any) -> None:
    """Add ``broker config`` to the top-level command parser."""
    broker = subcommands.add_parser("broker", help="Mosquitto configuration")
    commands = broker.add_subparsers(dest="broker_command", required=True, metavar="COMMAND")
    config = commands.add_parser("config", help="print a mosquitto.conf with the fleet's limits")
    config.add_argument("--port", type=int, default=1883, help="listener port (default: 1883)")
    config.add_argument("--bind", default="127.0.0.1", help="listener address (default: loopback)")
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
    try:
        settings = MosquittoSettings(
            listeners=[BrokerListener(port=args.port, bind_address=args.bind)],
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
