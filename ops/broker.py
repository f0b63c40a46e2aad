"""``edgefleet broker config``: the generated Mosquitto configuration, for a quick start.

A fleet's production broker config (TLS, client certificates, ACL) comes from
``edgefleet.provisioning``; this command prints a plain loopback or LAN
listener with the fleet's limits, which is what a demo or a lab needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgefleet.provisioning import BrokerListener, MosquittoSettings, render_mosquitto_conf
from edgefleet.runtime import SettingError


def register(subcommands: Any) -> None:
    """Add ``broker config`` to the top-level command parser."""
    broker = subcommands.add_parser("broker", help="Mosquitto configuration")
    commands = broker.add_subparsers(dest="broker_command", required=True, metavar="COMMAND")
    config = commands.add_parser("config", help="print a mosquitto.conf with the fleet's limits")
    config.add_argument("--port", type=int, default=1883, help="listener port (default: 1883)")
    config.add_argument("--bind", default="127.0.0.1", help="listener address (default: loopback)")
    config.add_argument("--persistence-dir", type=Path, help="keep sessions and queues here")
    config.add_argument(
        "--allow-anonymous", action="store_true", help="accept clients without credentials"
    )
    config.set_defaults(handler=_config)


def _config(args: argparse.Namespace) -> int:
    try:
        settings = MosquittoSettings(
            listeners=[BrokerListener(port=args.port, bind_address=args.bind)],
            persistence_dir=args.persistence_dir,
            allow_anonymous=args.allow_anonymous,
        )
    except ValidationError as exc:
        reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise SettingError(
            f"no broker config for these options: {reasons}",
            hint="add --allow-anonymous for a lab broker; a fleet's broker (TLS, client "
            "certificates, ACL) comes from edgefleet.provisioning",
        ) from exc
    print(render_mosquitto_conf(settings), end="")
    return 0
