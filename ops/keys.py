"""``edgefleet keys``: manifest signing keys and the fleet's root-signed release-key set.

::

    edgefleet keys generate DIR [--name fleet]
    edgefleet keys list DIR
    edgefleet keys show [--fleet DIR] [--json]
    edgefleet keys rotate [--fleet DIR] [--name release-N] [--days 365]
    edgefleet keys revoke KEY [--fleet DIR] [--reason TEXT] [--days 365]
    edgefleet keys renew [--fleet DIR] [--days 365]
    edgefleet keys publish [--fleet DIR] [broker options]

``generate`` and ``list`` work on any folder of key files. The others work on a fleet
directory (``edgefleet provision init DIR``; ``--fleet`` defaults to ``$EDGEFLEET_FLEET``):
its ``keys/root.key`` is the offline root key that signs ``keys/keyset.json``, the versioned,
expiring set of release keys devices trust (``edgefleet.provisioning.keyset``).

``rotate`` writes a new release key pair (``keys/release-N.key``, 0600, and ``.pub``) and
the next version of the set trusting it; ``revoke`` moves a key (its id, its name, or its
file name) from the trusted keys to the revoked ones, in the next version: devices then
refuse every manifest it signed, naming the revocation. Revoking the last trusted key is
refused (exit 3): rotate first. ``renew`` makes the next version with the same keys:
devices accept no new manifest once their set has expired, so publish a renewed set before
then. Each writes the set whole (temporary file, fsync, rename)
and renews its expiry (``--days``). ``publish`` puts the set on the broker, retained, on
``<root>/_trust/keyset``, where every device reads it and installs it only when the root
signed it and it is newer than its own; a set older than the one the broker holds, or one
that does not verify or has expired, is refused (exit 3). Devices flashed later get the set
in their bundle (``edgefleet provision device``).

Exit codes and the error tree: ``edgefleet.ops.errors``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.agent.protocol import key_set_topic
from edgefleet.provisioning import (
    FleetDir,
    KeyFileError,
    KeySet,
    KeySetChange,
    KeySetError,
    LastKey,
    SignedKeySet,
    describe_key_set,
    generate_signing_key,
    key_id,
    load_private_key,
    load_public_key,
    open_key_set,
    parse_signed_key_set,
    read_key_set,
    renewed,
    revoked,
    rotated,
    sign_key_set,
    write_key_set,
)
from edgefleet.provisioning.keyset import DEFAULT_KEY_SET_DAYS
from edgefleet.runtime import SettingError

from .connection import BrokerConnection, sync_topic
from .errors import Refused
from .profile import add_broker_options, broker_profile
from .provision import add_fleet_option, fleet_dir

RELEASE_PREFIX = "release-"
PUBLIC_KEY_SUFFIX = ".pub"
PRIVATE_KEY_SUFFIX = ".key"
DEFAULT_REASON = "revoked by the operator"


# -- argument parsing -------------------------------------------------------------------


def register(subcommands: Any) -> None:
    """Add ``keys`` and its commands to the command parser."""
    keys = subcommands.add_parser("keys", help="manifest signing keys and the fleet's key set")
    commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    generate = commands.add_parser("generate", help="write a new ed25519 signing key pair")
    generate.add_argument(
        "directory", type=Path, metavar="DIR", help="where to write NAME.key and NAME.pub"
    )
    generate.add_argument("--name", default="fleet", help="file name stem (default: fleet)")
    generate.set_defaults(handler=_keys_generate)
    listing = commands.add_parser(
        "list", help="the key id of every .pub and .key file in a folder, as devices compute it"
    )
    listing.add_argument("directory", type=Path, metavar="DIR", help="the folder of key files")
    listing.set_defaults(handler=_keys_list)

    show = commands.add_parser("show", help="the fleet's key set: version, expiry, keys, revoked")
    add_fleet_option(show)
    show.add_argument("--json", action="store_true", help="print the set's JSON (default: a table)")
    show.set_defaults(handler=_keys_show)

    rotate = commands.add_parser(
        "rotate", help="add a new release key: a new key pair and the next version of the set"
    )
    add_fleet_option(rotate)
    rotate.add_argument(
        "--name",
        metavar="NAME",
        help=f"the new key's file name stem (default: {RELEASE_PREFIX}N, the next number)",
    )
    _add_days_option(rotate)
    rotate.set_defaults(handler=_keys_rotate)

    revoke = commands.add_parser(
        "revoke", help="revoke a release key: devices refuse every manifest it signed"
    )
    revoke.add_argument(
        "key", metavar="KEY", help="the key's id, name, or file name (release-1, release-1.pub)"
    )
    add_fleet_option(revoke)
    revoke.add_argument(
        "--reason", default=DEFAULT_REASON, help="why, as devices report it (default: %(default)s)"
    )
    _add_days_option(revoke)
    revoke.set_defaults(handler=_keys_revoke)

    renew = commands.add_parser(
        "renew", help="the next version of the set with the same keys and a new expiry"
    )
    add_fleet_option(renew)
    _add_days_option(renew)
    renew.set_defaults(handler=_keys_renew)

    publish = commands.add_parser(
        "publish", help="put the fleet's key set on the broker, retained, for every device"
    )
    add_fleet_option(publish)
    add_broker_options(publish)
    publish.set_defaults(handler=_keys_publish)


def _add_days_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--days",
        type=_positive_int,
        default=DEFAULT_KEY_SET_DAYS,
        metavar="DAYS",
        help="the new set expires after this many days (default: %(default)s)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value


# -- the fleet's key set ----------------------------------------------------------------


class _FleetKeys:
    """The key files of a fleet directory."""

    def __init__(self, paths: FleetDir) -> None:
        self.directory = paths.keys_dir
        self.root_key_path = paths.root_key
        self.root_pub_path = paths.root_pub
        self.key_set_path = paths.keyset_path

    def root_key(self) -> Ed25519PrivateKey:
        """The root private key (keys/root.key)."""
        return load_private_key(self.root_key_path)

    def root_public(self) -> Ed25519PublicKey:
        """The root public key: keys/root.pub, else the private key's."""
        if self.root_pub_path.exists():
            return load_public_key(self.root_pub_path)
        return self.root_key().public_key()

    def signed(self) -> SignedKeySet:
        """keys/keyset.json as it is."""
        try:
            return read_key_set(self.key_set_path)
        except KeySetError as exc:
            raise SettingError(exc.message, hint="check --fleet") from exc

    def key_set(self) -> KeySet:
        """keys/keyset.json, once the root's signature over it checks out."""
        signed = self.signed()
        try:
            return open_key_set(signed, self.root_public())
        except KeySetError as exc:
            raise Refused(f"{self.key_set_path}: {exc.message}", hint=exc.hint) from exc

    def write(self, key_set: KeySet) -> None:
        """Sign ``key_set`` with the root key and replace keys/keyset.json with it."""
        write_key_set(self.key_set_path, sign_key_set(key_set, self.root_key()), replace=True)

    def next_release_name(self, key_set: KeySet) -> str:
        """``release-N``, N one above every release number in the folder and the set."""
        names = [p.stem for p in self.directory.iterdir()]
        names += [k.name for k in key_set.keys if k.name]
        names += [r.name for r in key_set.revoked if r.name]
        numbers = [int(m.group(1)) for n in names if (m := re.fullmatch(r"release-(\d+)", n))]
        return f"{RELEASE_PREFIX}{max(numbers, default=0) + 1}"

    def key_id_of_file(self, key: str) -> str | None:
        """The key id of keys/KEY (a .pub or .key file, with or without its suffix)."""
        stem = key.removesuffix(PUBLIC_KEY_SUFFIX).removesuffix(PRIVATE_KEY_SUFFIX)
        public = self.directory / f"{stem}{PUBLIC_KEY_SUFFIX}"
        private = self.directory / f"{stem}{PRIVATE_KEY_SUFFIX}"
        if "/" in stem or not stem:
            return None
        if public.is_file():
            return key_id(load_public_key(public))
        if private.is_file():
            return key_id(load_private_key(private).public_key())
        return None


# -- commands ------------------------------------------------------------------------


def _keys_show(args: argparse.Namespace) -> int:
    fleet = _FleetKeys(fleet_dir(args))
    key_set = fleet.key_set()
    if args.json:
        print(json.dumps(json.loads(key_set.model_dump_json()), indent=2))
        return 0
    now = datetime.datetime.now(datetime.timezone.utc)
    left = (key_set.expires - now).total_seconds() / 86_400
    expiry = f"in {left:.0f} days" if left > 0 else "EXPIRED: devices refuse new manifests"
    print(f"key set        {fleet.key_set_path}")
    print(f"signature      ok, root key {key_id(fleet.root_public())}")
    print(f"version        {key_set.version}")
    print(f"expires        {key_set.expires:%Y-%m-%d %H:%M} UTC ({expiry})")
    print(f"{'TRUSTED':<14} {'KEY ID':<16}  NAME")
    for key in key_set.keys:
        print(f"{'':<14} {key.key_id:<16}  {key.name or '-'}")
    if key_set.revoked:
        print(f"{'REVOKED':<14} {'KEY ID':<16}  {'NAME':<12}  {'IN':<4}  {'WHEN':<16}  REASON")
        for r in key_set.revoked:
            print(
                f"{'':<14} {r.key_id:<16}  {r.name or '-':<12}  v{r.version:<3}  "
                f"{r.revoked_at:%Y-%m-%d %H:%M}  {r.reason}"
            )
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    fleet = _FleetKeys(fleet_dir(args))
    current = fleet.key_set()
    fleet.root_key()  # the root key must sign: fail before a key pair is written
    name = args.name or fleet.next_release_name(current)
    private_path, public_path = generate_signing_key(fleet.directory, name)
    public = load_public_key(public_path)
    try:
        new = rotated(current, public, days=args.days, name=name)
    except KeySetChange as exc:
        raise Refused(exc.message, hint=exc.hint) from exc
    fleet.write(new)
    print(f"key set version {new.version}: added {name} ({key_id(public)})")
    print(f"private key    {private_path}  (signs manifests: keep it secret, off the devices)")
    print(f"key set        {fleet.key_set_path}  ({describe_key_set(new)})")
    print(f"next           edgefleet keys publish --fleet {args.fleet}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    fleet = _FleetKeys(fleet_dir(args))
    current = fleet.key_set()
    key = args.key
    if current.find(key) is None:
        key = fleet.key_id_of_file(args.key) or args.key
    try:
        new = revoked(current, key, reason=args.reason, days=args.days)
    except LastKey as exc:
        raise Refused(exc.message, hint=exc.hint) from exc
    except KeySetChange as exc:
        raise SettingError(exc.message, hint=exc.hint) from exc
    fleet.write(new)
    gone = new.revoked[-1]
    print(
        f"key set version {new.version}: revoked {gone.name or gone.key_id} ({gone.key_id}): "
        f"{gone.reason}"
    )
    print(f"key set        {fleet.key_set_path}  ({describe_key_set(new)})")
    print(f"next           edgefleet keys publish --fleet {args.fleet}")
    return 0


def _keys_renew(args: argparse.Namespace) -> int:
    fleet = _FleetKeys(fleet_dir(args))
    new = renewed(fleet.key_set(), days=args.days)
    fleet.write(new)
    print(f"key set version {new.version}: renewed ({describe_key_set(new)})")
    print(f"next           edgefleet keys publish --fleet {args.fleet}")
    return 0


def _keys_publish(args: argparse.Namespace) -> int:
    fleet = _FleetKeys(fleet_dir(args))
    signed = fleet.signed()
    key_set = fleet.key_set()
    if key_set.expired(datetime.datetime.now(datetime.timezone.utc)):
        raise Refused(
            f"{fleet.key_set_path}: version {key_set.version} expired at "
            f"{key_set.expires:%Y-%m-%d %H:%M} UTC; devices would refuse it",
            hint="renew it with 'edgefleet keys rotate' (or revoke), then publish",
        )
    resolved = broker_profile(args)
    topic = key_set_topic(resolved.profile.topic_root)
    with BrokerConnection(resolved) as broker:
        held = broker.retained([topic], sync_topic(resolved.profile.topic_root)).get(topic)
        _check_not_older(held, key_set, fleet)
        broker.publish(topic, signed.model_dump_json().encode(), retain=True)
    print(f"published key set version {key_set.version}, retained on {topic}")
    return 0


def _check_not_older(held: bytes | None, key_set: KeySet, fleet: _FleetKeys) -> None:
    """Refuse to replace a newer set the broker holds (devices would refuse this one)."""
    if held is None:
        return
    try:
        signed = parse_signed_key_set(held, source="the broker's retained key set")
        on_broker = open_key_set(signed, fleet.root_public())
    except KeySetError:
        return  # not ours, or damaged: replacing it is the fix
    if on_broker.version > key_set.version:
        raise Refused(
            f"the broker holds key set version {on_broker.version}, newer than version "
            f"{key_set.version} in {fleet.key_set_path}; devices would refuse this one",
            hint="check --fleet: this directory's set is behind the one published",
        )


def check_release_key(fleet: Path, public: Ed25519PublicKey) -> None:
    """Refuse (:class:`Refused`) a signing key devices on ``fleet``'s key set would refuse:
    revoked, not in the set, or any key while the set has expired."""
    keys = _FleetKeys(FleetDir.load(fleet))
    key_set = keys.key_set()
    ident = key_id(public)
    gone = next((r for r in key_set.revoked if r.key_id == ident), None)
    if gone is not None:
        raise Refused(
            f"key {ident} was revoked by key set version {gone.version} ({gone.reason}); "
            "devices refuse every manifest it signs",
            hint="sign with a trusted release key ('edgefleet keys show --fleet DIR')",
        )
    if key_set.find(ident) is None:
        raise Refused(
            f"key {ident} is not in the fleet's key set version {key_set.version} "
            f"({describe_key_set(key_set)}); devices would refuse the manifest",
            hint="sign with a trusted release key, or add this one with 'edgefleet keys rotate'",
        )
    if key_set.expired(datetime.datetime.now(datetime.timezone.utc)):
        raise Refused(
            f"the fleet's key set version {key_set.version} expired at "
            f"{key_set.expires:%Y-%m-%d %H:%M} UTC; devices accept no new manifest",
            hint="renew it with 'edgefleet keys rotate', publish it, then sign",
        )


# -- plain key files ------------------------------------------------------------------


def _keys_generate(args: argparse.Namespace) -> int:
    private_path, public_path = generate_signing_key(args.directory, args.name)
    print(f"key id       {key_id(load_public_key(public_path))}")
    print(f"private key  {private_path}  (signs manifests: keep it secret, off the devices)")
    print(f"public key   {public_path}  (install on every device that should trust it)")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    if not directory.is_dir():
        raise KeyFileError(f"{directory}: no such folder", hint="give the folder of key files")
    files = sorted(
        p for p in directory.iterdir() if p.suffix in (PUBLIC_KEY_SUFFIX, PRIVATE_KEY_SUFFIX)
    )
    if not files:
        raise KeyFileError(
            f"{directory} holds no {PUBLIC_KEY_SUFFIX} or {PRIVATE_KEY_SUFFIX} files",
            hint="make a pair with 'edgefleet keys generate DIR'",
        )
    bad = 0
    print(f"{'KEY ID':<16}  {'KIND':<7}  FILE")
    for path in files:
        try:
            if path.suffix == PUBLIC_KEY_SUFFIX:
                kind, ident = "public", key_id(load_public_key(path))
            else:
                kind, ident = "private", key_id(load_private_key(path).public_key())
        except KeyFileError as exc:
            bad += 1
            print(f"{'-':<16}  {'?':<7}  {path}  ({exc.message})")
            continue
        print(f"{ident:<16}  {kind:<7}  {path}")
    if bad:
        print(
            f"edgefleet: error: {bad} of {len(files)} files are not usable keys",
            file=sys.stderr,
        )
        return 2
    return 0
