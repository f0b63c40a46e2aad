"""``edgefleet release``: model releases in the release store, signed by the operator.

::

    edgefleet release create MODEL --model-id ID --version N [--notes TEXT] [--store DIR]
        [--key KEYFILE] [--fleet DIR] [--url-base URL ...] [--mqtt] [manifest options]
    edgefleet release list [--store DIR] [--model-id ID] [--json]
    edgefleet release show MODEL_ID@VERSION [--store DIR] [--json | --manifest]
    edgefleet release publish-chunks MODEL_ID@VERSION [--store DIR] [--chunk-kib 64]
        [broker options]

``create`` validates the model file as the runtime reads it, stores it content-addressed
and signs its manifest here, with the operator's release key: ``--key``, or the fleet's
newest release key whose private file is in ``DIR/keys`` (``--fleet``, default
``$EDGEFLEET_FLEET``); with a fleet, a key its key set does not trust is refused (exit 3).
The manifest's URLs are ``<url-base>/artifacts/<sha256>`` for each ``--url-base``, where the
controller serves the artifact (with Range, so devices resume), and ``mqtt:`` with
``--mqtt`` for devices that reach only the broker. Its sequence comes from the key's
counter (``sequences.json`` beside it, as for ``manifest create``), above any this store
recorded for the model line. A model id and version that is stored already is refused
(exit 3): releases are never replaced. The store is ``--store`` or ``$EDGEFLEET_RELEASES``
(``edgefleet.ops.controller.releases`` describes its files).

``show --manifest`` prints the signed manifest (what ``edgefleet deploy`` takes).
``publish-chunks`` puts the release's artifact on the broker as retained chunks (as
``transfer publish`` does) for a release signed with ``--mqtt``; a release without the
``mqtt:`` URL is refused (exit 3): no device would fetch the chunks.

Exit codes and the error tree: ``edgefleet.ops.errors``, ``edgefleet.ops.controller.releases``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.protocol import MQTT_MODEL_URL
from edgefleet.provisioning import FleetDir, KeySet, load_private_key, read_key_set
from edgefleet.runtime import SettingError

from .controller.releases import (
    STORE_ENV,
    Release,
    ReleaseStore,
    StoreError,
    create_release,
)
from .errors import Refused
from .fleet import (
    DEFAULT_CHUNK_KIB,
    KIB,
    URL_PREFIXES,
    SequenceCounter,
    add_manifest_options,
    manifest_terms,
    publish_model_chunks,
)
from .keys import check_release_key
from .profile import add_broker_options, broker_profile
from .provision import FLEET_ENV
from .text import table, utc

URL_BASE_ENV = "EDGEFLEET_ARTIFACTS_URL"
PRIVATE_KEY_SUFFIX = ".key"


# -- argument parsing -------------------------------------------------------------------


def register(subcommands: Any) -> None:
    """Add ``release`` and its commands to the command parser."""
    release = subcommands.add_parser("release", help="model releases: stored, signed, served")
    commands = release.add_subparsers(dest="release_command", required=True, metavar="COMMAND")

    create = commands.add_parser(
        "create", help="store a model and sign its release manifest with the release key"
    )
    create.add_argument("model", type=Path, metavar="MODEL", help="the .tflite file")
    create.add_argument("--model-id", required=True, metavar="ID", help="model identifier")
    create.add_argument(
        "--version", type=_positive_int, required=True, metavar="N", help="release number (>= 1)"
    )
    create.add_argument("--notes", default="", metavar="TEXT", help="release notes (default: none)")
    _add_store_option(create)
    create.add_argument(
        "--key",
        type=Path,
        metavar="KEYFILE",
        help="the private release key (default: the fleet's newest release key)",
    )
    create.add_argument(
        "--fleet",
        type=Path,
        metavar="DIR",
        help=f"the fleet whose key set must trust the key (default: ${FLEET_ENV}; without "
        "either, no check and --key is needed)",
    )
    create.add_argument(
        "--url-base",
        action="append",
        default=[],
        metavar="URL",
        help=f"the controller's base URL; the manifest names URL/artifacts/<sha256>; repeat "
        f"(default: ${URL_BASE_ENV})",
    )
    create.add_argument(
        "--mqtt",
        action="store_true",
        help=f"add the URL '{MQTT_MODEL_URL}' for devices that reach only the broker: they "
        "fetch the chunks 'release publish-chunks' publishes (default: HTTP only)",
    )
    add_manifest_options(create)
    create.set_defaults(handler=_create)

    listing = commands.add_parser("list", help="the releases in the store")
    _add_store_option(listing)
    listing.add_argument("--model-id", metavar="ID", help="only this model line (default: all)")
    listing.add_argument("--json", action="store_true", help="JSON records (default: a table)")
    listing.set_defaults(handler=_list)

    show = commands.add_parser("show", help="one release and its signed manifest")
    show.add_argument("release", metavar="MODEL_ID@VERSION", help="the release")
    _add_store_option(show)
    output = show.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="the record (default: a summary)")
    output.add_argument(
        "--manifest",
        action="store_true",
        help="the signed manifest, as 'edgefleet deploy' takes it (default: a summary)",
    )
    show.set_defaults(handler=_show)

    chunks = commands.add_parser(
        "publish-chunks",
        help=f"publish the release's model as retained chunks (its {MQTT_MODEL_URL} URL)",
    )
    chunks.add_argument("release", metavar="MODEL_ID@VERSION", help="the release")
    _add_store_option(chunks)
    chunks.add_argument(
        "--chunk-kib",
        type=_positive_int,
        default=DEFAULT_CHUNK_KIB,
        metavar="KIB",
        help="chunk size in KiB; a chunk must fit the broker's packet limit (default: %(default)s)",
    )
    add_broker_options(chunks)
    chunks.set_defaults(handler=_publish_chunks)


def _add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", type=Path, metavar="DIR", help=f"the release store (default: ${STORE_ENV})"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value


def _store(args: argparse.Namespace) -> ReleaseStore:
    directory = args.store or os.environ.get(STORE_ENV)
    if not directory:
        raise SettingError(
            f"which release store? no --store and no ${STORE_ENV}",
            hint=f"pass --store DIR or export {STORE_ENV}=DIR (created on the first release)",
        )
    return ReleaseStore(Path(directory))


# -- commands ---------------------------------------------------------------------------


def _create(args: argparse.Namespace) -> int:
    store = _store(args)
    key_path, key = _release_key(args)
    bases = _url_bases(args)
    terms = manifest_terms(args, [MQTT_MODEL_URL] if args.mqtt else [])
    counter = SequenceCounter.beside(key_path)
    release = create_release(
        store, args.model, terms, key, counter, url_bases=bases, notes=args.notes
    )
    print(f"created release {release.id} in {store.root}")
    print(_describe(release, store))
    return 0


def _list(args: argparse.Namespace) -> int:
    releases = _store(args).releases(args.model_id)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in releases], indent=2))
        return 0
    if not releases:
        print("no releases")
        return 0
    rows = [("RELEASE", "SEQ", "SHA256", "BYTES", "CREATED", "EXPIRES", "NOTES")]
    rows += [
        (
            r.id,
            str(r.sequence),
            r.sha256[:12],
            f"{r.size:,}",
            utc(r.created_at),
            utc(r.expires_at),
            r.notes.splitlines()[0] if r.notes else "",
        )
        for r in releases
    ]
    print("\n".join(table(rows)))
    return 0


def _show(args: argparse.Namespace) -> int:
    store = _store(args)
    release = store.get(args.release)
    if args.manifest:
        print(release.manifest.model_dump_json(indent=2))
    elif args.json:
        print(release.model_dump_json(indent=2))
    else:
        print(_describe(release, store))
    return 0


def _publish_chunks(args: argparse.Namespace) -> int:
    store = _store(args)
    release = store.get(args.release)
    if MQTT_MODEL_URL not in release.signed_terms().urls:
        raise Refused(
            f"release {release.id} was not signed with the URL {MQTT_MODEL_URL}: no device "
            "would fetch its chunks from the broker",
            hint="create a release of the model with --mqtt (a new --version), then publish it",
        )
    content = _artifact(store, release)
    resolved = broker_profile(args)
    meta, stale = publish_model_chunks(resolved, content, args.chunk_kib * KIB)
    print(
        f"published release {release.id}: {meta.size:,} bytes in {meta.chunks} chunks of "
        f"{args.chunk_kib} KiB, retained on {resolved.profile.address}"
        + (f" (cleared {stale} retained messages of one cut another way)" if stale else "")
    )
    print(f"remove  edgefleet transfer clear {meta.sha256}")
    return 0


# -- keys, URLs, files --------------------------------------------------------------------


def _release_key(args: argparse.Namespace) -> tuple[Path, Ed25519PrivateKey]:
    return release_key(args.key, args.fleet)


def release_key(
    key: Path | None, fleet_dir: Path | None, *, key_option: str = "--key"
) -> tuple[Path, Ed25519PrivateKey]:
    """The signing key's file and key: ``key``, else the newest release key of the fleet
    (``fleet_dir``, else ``$EDGEFLEET_FLEET``); a key the fleet's key set would not have
    devices trust is refused. ``key_option`` is how the command names ``key``."""
    named = fleet_dir or os.environ.get(FLEET_ENV)
    fleet = Path(named) if named else None
    path: Path
    if key is not None:
        path = key
    elif fleet is not None:
        path = _newest_release_key(fleet)
    else:
        raise SettingError(
            f"which release key? no {key_option}, no --fleet and no ${FLEET_ENV}",
            hint=f"pass {key_option} KEYFILE (a release key's .key file) or --fleet DIR",
        )
    private = load_private_key(path)
    if fleet is not None:
        check_release_key(fleet, private.public_key())
    return path, private


def _newest_release_key(fleet: Path) -> Path:
    """The private key file of the newest key in the fleet's key set that has one."""
    paths = FleetDir.load(fleet)
    # Read only to pick a file; check_release_key verifies the set and the key.
    key_set = KeySet.model_validate_json(read_key_set(paths.keyset_path).payload)
    for entry in reversed(key_set.keys):
        if entry.name and (path := paths.keys_dir / f"{entry.name}{PRIVATE_KEY_SUFFIX}").is_file():
            return path
    raise SettingError(
        f"none of the release keys the key set of {fleet} trusts has its private key in "
        f"{paths.keys_dir}",
        hint="pass --key KEYFILE, or rotate to a new release key ('edgefleet keys rotate')",
    )


def _url_bases(args: argparse.Namespace) -> list[str]:
    """The controllers' base URLs the manifest names the artifact under."""
    bases = args.url_base or ([os.environ[URL_BASE_ENV]] if os.environ.get(URL_BASE_ENV) else [])
    for base in bases:
        if not base.startswith(URL_PREFIXES):
            raise SettingError(
                f"--url-base {base!r} is not an http(s) URL",
                hint="give the controller's address, e.g. https://controller.example:8443 "
                f"(--mqtt adds {MQTT_MODEL_URL})",
            )
    if not bases and not args.mqtt:
        raise SettingError(
            "the manifest would name no URL to download the model from",
            hint=f"pass --url-base http(s)://CONTROLLER (or export {URL_BASE_ENV}), --mqtt, "
            "or both",
        )
    return bases


def _artifact(store: ReleaseStore, release: Release) -> bytes:
    path = store.artifact_path(release.sha256)
    if path is None:
        raise StoreError(
            f"the store {store.root} has release {release.id} but not its artifact "
            f"{release.sha256}",
            hint="restore artifacts/ from a backup, or create the release again under a new "
            "version",
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StoreError(
            f"cannot read {path}: {exc.strerror or exc}", hint="check its permissions"
        ) from exc


def _describe(release: Release, store: ReleaseStore) -> str:
    manifest = release.signed_terms()
    lines = [
        f"release        {release.id}  (sequence {release.sequence})",
        f"sha256         {release.sha256}",
        f"size           {release.size:,} bytes, artifact {manifest.artifact}",
        *(f"url            {url}" for url in manifest.urls),
        f"task           {manifest.task.task or 'detected on the device'}",
        f"signed by      key {release.key_id}",
        f"created        {utc(release.created_at)}",
        f"expires        {utc(release.expires_at)}",
        f"stored         {store.root / 'artifacts' / release.sha256}",
    ]
    if manifest.replaces_model_id:
        lines.append(f"replaces       {manifest.replaces_model_id}")
    if release.notes:
        lines.append(f"notes          {release.notes}")
    return "\n".join(lines)
