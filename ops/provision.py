"""``edgefleet provision``: make a fleet's identities, issue device bundles, revoke, list.

::

    edgefleet provision init DIR [--broker-name NAME ...] [--topic-root ROOT]
    edgefleet provision device NAME [--fleet DIR] [--days N] [--out DIR] [--replace]
    edgefleet provision operator NAME [--fleet DIR] [--days N]
    edgefleet provision revoke NAME [--fleet DIR]
    edgefleet provision crl [--fleet DIR]
    edgefleet provision list [--fleet DIR]

``--fleet`` defaults to ``$EDGEFLEET_FLEET``. The directory and what it holds are
described in ``edgefleet.provisioning.fleetdir``. Every refusal (an existing fleet, a name
that must never be signed, a live certificate or bundle in the way) is bad input, exit 2,
with nothing written.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.agent.protocol import TOPIC_ROOT
from edgefleet.provisioning import FleetDir, IssuedCertificate
from edgefleet.provisioning.fleetdir import (
    DEFAULT_BROKER_NAMES,
    DEVICE_INSTALL_DIR,
    DEVICE_STATE_DIR,
)
from edgefleet.provisioning.mosquitto import CLAIM_PORT, DEVICE_PORT, OPERATOR_PORT
from edgefleet.runtime import SettingError

from .text import table

FLEET_ENV = "EDGEFLEET_FLEET"
RELOAD_STEP = "systemctl reload mosquitto  (or: kill -HUP $(pidof mosquitto))"
"""Mosquitto 2.0 reads its CRL again on SIGHUP (tests/test_provision.py measures it)."""

_Handler = Callable[[argparse.Namespace], int]


def register(subcommands: Any) -> None:
    """Add ``provision`` and its commands to the top-level command parser."""
    provision = subcommands.add_parser(
        "provision",
        help="make the fleet's identities, device bundles; revoke",
        description="Make the fleet's certificate authorities, broker and operator "
        "certificates and signing keys (init), offline device bundles (device), operator "
        "identities (operator); revoke a certificate (revoke); list what was issued (list).",
    )
    commands = provision.add_subparsers(dest="provision_command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init",
        help="create a new fleet directory",
        description="Create a fleet in DIR (new or empty): the device, operator and claim "
        "CAs, the broker's server certificate, the controller's and the enrollment "
        "service's certificates, the shared claim certificate, the root and first release "
        "signing keys and the root-signed key set, fleet.yaml and an operator profile. "
        "Keep DIR offline and backed up: its CA keys sign every identity of the fleet.",
    )
    init.add_argument("directory", type=Path, metavar="DIR", help="the new fleet directory")
    init.add_argument(
        "--broker-name",
        action="append",
        dest="broker_names",
        metavar="NAME",
        help="host name or address in the broker's certificate, repeatable; the first is "
        f"the one clients connect to (default: {' '.join(DEFAULT_BROKER_NAMES)})",
    )
    init.add_argument("--topic-root", default=TOPIC_ROOT, metavar="ROOT", help="topic root")
    init.add_argument(
        "--ca-days", type=_positive, default=3650, metavar="N", help="lifetime of the CAs"
    )
    init.add_argument(
        "--cert-days",
        type=_positive,
        default=365,
        metavar="N",
        help="default lifetime of device and operator certificates",
    )
    for kind, default in (
        ("device", DEVICE_PORT),
        ("claim", CLAIM_PORT),
        ("operator", OPERATOR_PORT),
    ):
        init.add_argument(
            f"--{kind}-port",
            type=_positive,
            default=default,
            metavar="PORT",
            help=f"port of the broker's {kind} listener",
        )
    init.set_defaults(handler=_init)

    device = commands.add_parser(
        "device",
        help="issue an offline bundle for one device",
        description="Issue device NAME a key and certificate and write its bundle for "
        "factory flashing: device.key, device.crt, ca.crt, root.pub, keyset.json and a "
        f"starter agent.yaml naming them under {DEVICE_INSTALL_DIR}.",
    )
    device.add_argument("name", metavar="NAME", help="device id (its certificate CN)")
    add_fleet_option(device)
    device.add_argument(
        "--days", type=_positive, metavar="N", help="certificate lifetime (default: fleet.yaml)"
    )
    device.add_argument(
        "--out", type=Path, metavar="DIR", help="bundle directory (default: FLEET/devices/NAME)"
    )
    device.add_argument(
        "--replace",
        action="store_true",
        help="revoke NAME's live certificates and replace its bundle (default: refuse)",
    )
    device.set_defaults(handler=_device)

    operator = commands.add_parser(
        "operator",
        help="issue an operator identity",
        description="Issue operator identity NAME a certificate from the operator CA, in "
        "FLEET/operators/. Each person or service connects with an identity of its own.",
    )
    operator.add_argument("name", metavar="NAME", help="identity (its certificate CN)")
    add_fleet_option(operator)
    operator.add_argument(
        "--days", type=_positive, metavar="N", help="certificate lifetime (default: fleet.yaml)"
    )
    operator.set_defaults(handler=_operator)

    revoke = commands.add_parser(
        "revoke",
        help="revoke a device's or operator's certificates",
        description="Mark every unrevoked certificate of NAME revoked in the ledger and "
        "write the CA's CRL again; the broker refuses NAME once it has the new CRL and "
        "was reloaded.",
    )
    revoke.add_argument("name", metavar="NAME", help="device or operator identity")
    add_fleet_option(revoke)
    revoke.set_defaults(handler=_revoke)

    crl = commands.add_parser(
        "crl",
        help="write the CRLs again from the ledger",
        description="Write the device and operator CAs' CRLs again from the ledger, newly "
        "dated: after a revocation whose CRL could not be written, or well before the CRLs "
        "expire (Mosquitto refuses every client once its CRL has expired).",
    )
    add_fleet_option(crl)
    crl.set_defaults(handler=_crl)

    listing = commands.add_parser(
        "list",
        help="list every certificate the fleet issued",
        description="Every certificate in the ledger: name, kind, serial, expiry, revocation.",
    )
    add_fleet_option(listing)
    listing.set_defaults(handler=_list)


def add_fleet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fleet",
        type=Path,
        metavar="DIR",
        help=f"the fleet directory (default: ${FLEET_ENV})",
    )


def fleet_dir(args: argparse.Namespace) -> FleetDir:
    directory = args.fleet or os.environ.get(FLEET_ENV)
    if not directory:
        raise SettingError(
            "which fleet? no --fleet and no $" + FLEET_ENV,
            hint=f"pass --fleet DIR or export {FLEET_ENV}=DIR "
            "(the directory 'edgefleet provision init' made)",
        )
    return FleetDir.load(Path(directory))


def _init(args: argparse.Namespace) -> int:
    fleet = FleetDir.init(
        args.directory,
        broker_names=args.broker_names or DEFAULT_BROKER_NAMES,
        topic_root=args.topic_root,
        ca_days=args.ca_days,
        cert_days=args.cert_days,
        device_port=args.device_port,
        claim_port=args.claim_port,
        operator_port=args.operator_port,
    )
    settings = fleet.settings()
    print(f"fleet created in {fleet.root} (keep it offline and backed up):")
    for what, path in (
        ("device CA", fleet.ca_cert),
        ("operator CA", fleet.operator_ca_cert),
        ("claim CA", fleet.claim_ca_cert),
        (f"broker ({', '.join(settings.broker_names)})", fleet.broker_cert),
        (settings.controller_identity, fleet.operator_cert(settings.controller_identity)),
        (settings.enroll_identity, fleet.operator_cert(settings.enroll_identity)),
        (f"claim identity {settings.claim_identity!r}", fleet.claim_cert),
        ("root signing key (offline)", fleet.root_key),
        ("release signing key", fleet.release_key),
        ("release-key set", fleet.keyset_path),
        ("revocation list", fleet.crl_path),
        ("operator profile", fleet.operator_profile),
        ("fleet settings", fleet.settings_path),
    ):
        print(f"  {what}: {path}")
    print("next:")
    print(f"  export {FLEET_ENV}={fleet.root}")
    print("  edgefleet broker config --fleet ...   (the broker's configuration and files)")
    print("  edgefleet provision device NAME       (an offline bundle for a device)")
    print(f"  cp {fleet.operator_profile} ~/.config/edgefleet/operator.yaml")
    return 0


def _device(args: argparse.Namespace) -> int:
    fleet = fleet_dir(args)
    bundle = fleet.issue_device(args.name, days=args.days, out=args.out, replace=args.replace)
    entry = fleet.live_certificates(args.name)[-1]
    print(f"device {args.name}: certificate {entry.serial}, expires {_day(entry)}")
    print(f"bundle in {bundle}:")
    for path in sorted(bundle.iterdir()):
        print(f"  {path.name}")
    print(
        f"next: on the device, copy device.key and device.crt to {DEVICE_STATE_DIR}/ (the "
        "key mode 0600, both owned by the agent's user: renewal rewrites them), the other "
        f"files to {DEVICE_INSTALL_DIR}/, agent.yaml to /etc/edgefleet/agent/, and set its "
        "streams"
    )
    return 0


def _operator(args: argparse.Namespace) -> int:
    fleet = fleet_dir(args)
    certificate = fleet.issue_operator(args.name, days=args.days)
    print(f"operator {args.name}: {certificate} and {fleet.operator_key(args.name)}")
    print(
        "next: give it to its holder with a profile naming them (see "
        f"{fleet.operator_profile}), and run 'edgefleet broker config' again so the "
        "operators' ACL names it"
    )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    fleet = fleet_dir(args)
    revoked = fleet.revoke(args.name)
    for entry in revoked:
        print(f"revoked {entry.name} ({entry.kind}) certificate {entry.serial}")
    crl = fleet.crl_path if revoked[0].authority == "device" else fleet.operator_crl_path
    print(f"new CRL: {crl}")
    print("next: copy it to the broker (edgefleet broker config --fleet ... again), then")
    print(f"  {RELOAD_STEP}")
    print("the broker refuses new connections of the certificate after the reload; a")
    print("connection open before it stays until it drops (restart the broker to end it)")
    return 0


def _crl(args: argparse.Namespace) -> int:
    fleet = fleet_dir(args)
    fleet.refresh_crls()
    for path in (fleet.crl_path, fleet.operator_crl_path):
        print(f"wrote {path}")
    print("next: copy them to the broker (edgefleet broker config --fleet ... again), then")
    print(f"  {RELOAD_STEP}")
    return 0


def _list(args: argparse.Namespace) -> int:
    fleet = fleet_dir(args)
    rows = [("NAME", "KIND", "SERIAL", "EXPIRES", "REVOKED")]
    for entry in fleet.ledger().certificates:
        revoked = entry.revoked_at.strftime("%Y-%m-%d %H:%M") if entry.revoked_at else "-"
        rows.append((entry.name, entry.kind, entry.serial, _day(entry), revoked))
    print("\n".join(table(rows)))
    return 0


def _day(entry: IssuedCertificate) -> str:
    return entry.not_after.strftime("%Y-%m-%d")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value
