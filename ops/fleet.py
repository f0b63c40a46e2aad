"""``edgefleet manifest | transfer``: signed manifests, models over the broker.

::

    edgefleet manifest create MODEL --model-id ID --version N --url URL [--url URL ...] --key KEY
        [--sequence N] [--rollback-from V:SHA256|SIGNED_MANIFEST.json] [--replaces ID]
    edgefleet manifest verify SIGNED_MANIFEST.json (--key PUB | --keys-dir DIR) [--json]
    edgefleet transfer publish MODEL [--host H] [--port P] [--topic-root R] [--chunk-kib 64]
    edgefleet transfer clear SHA256 [--host H] [--port P] [--topic-root R]

``manifest create`` numbers the manifests of every model line: the counter is kept per
model id in ``sequences.json`` beside the signing key (replaced whole, atomically), and
the manifest gets the next number (``--sequence N`` sets it; the counter never goes
down). Devices accept a manifest only with a sequence above any they accepted for the
line, so signing with another counter (another copy of the key) needs ``--sequence``.
A rollback (``--rollback-from``) names the release installed now and expires after
``--rollback-expires-in`` (6 hours unless told), not after the 30 days of a release.

``manifest verify`` checks a signed manifest against the public keys given, as a device
trusting exactly those keys would, and prints what it says; a signature that does not
verify, or a manifest that expired, is refused (exit 3).

``transfer publish`` puts a model on the broker for devices that reach only the broker (a
manifest URL ``mqtt:``): retained chunks under ``<root>/_models/<sha256>/``, then the meta
that says they are all there (``edgefleet.agent.chunks`` is the device's side). It first
clears whatever an earlier publication of the same model left that this one does not
overwrite (another ``--chunk-kib``); a device fetching the model meanwhile has to start over.
``transfer clear`` removes every retained message of the model, the meta first.

Exit codes and the error tree: ``edgefleet.ops.errors``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgefleet.agent.protocol import (
    MQTT_MODEL_URL,
    SHA256_PATTERN,
    ChunkedModelMeta,
    Manifest,
    RollbackFrom,
    SignedManifest,
    TensorSpec,
    describe_errors,
    model_chunk_topic,
    model_meta_topic,
    model_transfer_topic,
)
from edgefleet.provisioning import (
    BadSignature,
    KeyFileError,
    MalformedManifest,
    TrustedKeys,
    UnknownSigningKey,
    key_id,
    load_private_key,
    sign_manifest,
)
from edgefleet.runtime import (
    ModelInfo,
    SettingError,
    TaskName,
    TensorInfo,
    inspect_model,
    read_model,
)

from .connection import BrokerConnection, sync_topic
from .deploy import read_signed
from .errors import NotPublished, Refused
from .keys import check_release_key
from .profile import ResolvedProfile, add_broker_options, broker_options, broker_profile
from .text import utc

DEFAULT_EXPIRES_IN_DAYS = 30.0
DEFAULT_ROLLBACK_EXPIRES_IN = "6h"
SEQUENCES_FILE = "sequences.json"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
SECONDS_PER_DAY = 86_400
URL_PREFIXES = ("http://", "https://")
DEFAULT_CHUNK_KIB = 64
KIB = 1024
# At most what a QoS 1 PUBLISH adds to its topic and payload: fixed header (5), topic length
# (2), packet id (2), MQTT 5 property length (1).
PUBLISH_OVERHEAD_BYTES = 10
# Manifest fields that come from an option, for messages that name what to change.
_OPTION_OF_FIELD = {
    "model_id": "--model-id",
    "version": "--version",
    "artifact": "--artifact",
    "urls": "--url",
    "max_latency_ms": "--max-latency-ms",
    "min_agent_version": "--min-agent-version",
    "expires_at": "--expires-in-days",
    "sequence": "--sequence",
    "replaces_model_id": "--replaces",
}


# -- argument parsing -------------------------------------------------------------------


def register(subcommands: Any) -> None:
    """Add ``manifest`` and ``transfer`` to the command parser (``keys``: ``ops/keys.py``)."""
    _register_manifest(subcommands)
    _register_transfer(subcommands)


def _register_manifest(subcommands: Any) -> None:
    manifest = subcommands.add_parser("manifest", help="signed model release manifests")
    commands = manifest.add_subparsers(dest="manifest_command", required=True, metavar="COMMAND")
    create = commands.add_parser("create", help="describe a model release and sign it")
    create.add_argument("model", type=Path, metavar="MODEL", help="the .tflite file")
    create.add_argument("--model-id", required=True, metavar="ID", help="model identifier")
    create.add_argument(
        "--version", type=int, required=True, metavar="N", help="release number (>= 1)"
    )
    create.add_argument(
        "--url",
        action="append",
        required=True,
        metavar="URL",
        help="download URL (http(s)://, mqtt:); repeat",
    )
    create.add_argument(
        "--key", type=Path, required=True, metavar="KEYFILE", help="the private signing key"
    )
    create.add_argument(
        "--fleet",
        type=Path,
        metavar="DIR",
        help="refuse a --key that the fleet's key set (DIR/keys/keyset.json) does not trust "
        "or revoked, whose manifests devices would refuse (default: no check)",
    )
    add_manifest_options(create)
    create.add_argument(
        "--sequence",
        type=_positive_int,
        metavar="N",
        help=f"the manifest's sequence (default: one above the last for the model id, kept in "
        f"{SEQUENCES_FILE} beside --key)",
    )
    create.add_argument(
        "--rollback-from",
        metavar="V:SHA256|FILE",
        help="make it a rollback from the release installed now, given as VERSION:SHA256 or "
        "as that release's signed manifest file (default: a release, newer versions only)",
    )
    create.add_argument(
        "--rollback-expires-in",
        type=_duration_s,
        metavar="DURATION",
        default=DEFAULT_ROLLBACK_EXPIRES_IN,
        help="a rollback expires after this long: N followed by s, m, h or d "
        "(default: %(default)s)",
    )
    create.add_argument(
        "--out", type=Path, metavar="FILE", help="write here (default: standard output)"
    )
    create.set_defaults(handler=_manifest_create)

    verify = commands.add_parser(
        "verify",
        help="check a signed manifest's signature with public keys and print what it says",
        description="Check a signed manifest as a device trusting the given public keys "
        "would: the signature, then expiry. Exit 3 when a device would refuse it.",
    )
    verify.add_argument(
        "manifest", type=Path, metavar="SIGNED_MANIFEST.json", help="the signed manifest"
    )
    verify.add_argument(
        "--key",
        type=Path,
        action="append",
        default=[],
        metavar="PUBFILE",
        help="a trusted public key (.pub); repeat (default: none, give --keys-dir)",
    )
    verify.add_argument(
        "--keys-dir",
        type=Path,
        metavar="DIR",
        help="trust every .pub file in this folder, as a device's trusted_keys (default: none)",
    )
    verify.add_argument(
        "--json", action="store_true", help="print the manifest's JSON (default: a summary)"
    )
    verify.set_defaults(handler=_manifest_verify)


def add_manifest_options(parser: argparse.ArgumentParser) -> None:
    """The options that say what a manifest promises beyond the model file (``manifest
    create``, ``release create``); :func:`manifest_terms` reads them back."""
    parser.add_argument(
        "--expires-in-days",
        type=_positive_float,
        metavar="DAYS",
        default=DEFAULT_EXPIRES_IN_DAYS,
        help="devices refuse it after this long (default: %(default)s)",
    )
    parser.add_argument(
        "--max-latency-ms",
        type=_positive_float,
        metavar="MS",
        help="median invoke time devices must reach; replaces the default check: within "
        "updates.max_slowdown (3x) of the running model's and fast enough for the stream's "
        "frame rate (default: that check)",
    )
    parser.add_argument(
        "--allow-slower",
        action="store_true",
        help="a bigger model on purpose: devices install it even if much slower than the "
        "running model or the frame rate, and probation does not roll it back for a lower "
        "frame rate (default: refused)",
    )
    parser.add_argument(
        "--task", choices=[t.value for t in TaskName], help="task (default: detected on device)"
    )
    parser.add_argument(
        "--replaces",
        metavar="ID",
        help="the model id this model replaces on the streams it is deployed to "
        "(default: the same model id only)",
    )
    parser.add_argument(
        "--artifact", metavar="NAME", help="file name on the device (default: the model's)"
    )
    parser.add_argument(
        "--min-agent-version", metavar="V", help="oldest agent that may run it (default: any)"
    )


def _register_transfer(subcommands: Any) -> None:
    transfer = subcommands.add_parser(
        "transfer", help="models over the broker, for devices that reach only the broker"
    )
    commands = transfer.add_subparsers(dest="transfer_command", required=True, metavar="COMMAND")
    publish = commands.add_parser(
        "publish", help=f"publish a model as retained chunks (manifest URL {MQTT_MODEL_URL})"
    )
    publish.add_argument("model", type=Path, metavar="MODEL", help="the .tflite file")
    publish.add_argument(
        "--chunk-kib",
        type=_positive_int,
        default=DEFAULT_CHUNK_KIB,
        metavar="KIB",
        help="chunk size in KiB; a chunk must fit the broker's packet limit (default: %(default)s)",
    )
    add_broker_options(publish)
    publish.set_defaults(handler=_transfer_publish)
    clear = commands.add_parser("clear", help="remove a published model from the broker")
    clear.add_argument(
        "sha256", metavar="SHA256", help="the model's sha256 ('transfer publish' printed it)"
    )
    add_broker_options(clear)
    clear.set_defaults(handler=_transfer_clear)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _duration_s(text: str) -> float:
    match = _DURATION.match(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (give a number and a unit: 90m, 6h, 2d)"
        )
    return float(match.group(1)) * _SECONDS_PER_UNIT[match.group(2)]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value


# -- keys and manifests -------------------------------------------------------------------


def _manifest_create(args: argparse.Namespace) -> int:
    key = load_private_key(args.key)
    if args.fleet is not None:
        check_release_key(args.fleet, key.public_key())
    counter = SequenceCounter.beside(args.key)
    sequence = args.sequence or counter.next(args.model_id)
    manifest = _manifest_from(args, sequence)
    text = sign_manifest(manifest, key).model_dump_json(indent=2) + "\n"
    # Counted before it is written out: a number is never handed out twice.
    counter.record(args.model_id, sequence)
    if args.out is None:
        sys.stdout.write(text)
    else:
        try:
            args.out.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise SettingError(
                f"cannot write {args.out}: {exc.strerror or exc}", hint="check --out"
            ) from exc
    expires = utc(manifest.expires_at)
    kind = "rollback" if manifest.rollback else "release"
    print(
        f"signed {manifest.model_id} version {manifest.version} sequence {manifest.sequence} "
        f"({kind}, sha256 {manifest.sha256[:12]}, {manifest.size} bytes) with key "
        f"{key_id(key.public_key())}, expires {expires}",
        file=sys.stderr,
    )
    return 0


@dataclass(frozen=True)
class SequenceCounter:
    """The signer's last sequence per model line, in a JSON object of model id to number.

    Kept beside the signing key (:meth:`beside`) so that every tool signing with that key
    (``manifest create``, ``release create``) counts on from the same number. Replaced
    whole, atomically; a number is recorded before the manifest leaves the signer.
    """

    path: Path

    @classmethod
    def beside(cls, key: Path) -> SequenceCounter:
        """The counter of the signing key at ``key``: ``sequences.json`` in its folder."""
        return cls(key.parent / SEQUENCES_FILE)

    def last(self, model_id: str) -> int:
        """The last sequence signed for ``model_id``; 0 before the first."""
        return _read_sequences(self.path).get(model_id, 0)

    def next(self, model_id: str, *, at_least: int = 0) -> int:
        """The sequence of the next manifest of ``model_id``: above the last and ``at_least``."""
        return max(self.last(model_id), at_least) + 1

    def record(self, model_id: str, sequence: int) -> None:
        """Count ``sequence`` as handed out for ``model_id`` (the counter never goes down)."""
        sequences = _read_sequences(self.path)
        last = sequences.get(model_id, 0)
        _write_sequences(self.path, {**sequences, model_id: max(sequence, last)})


def _read_sequences(path: Path) -> dict[str, int]:
    """The last sequence signed per model id; none before the first manifest."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise SettingError(
            f"cannot read the sequence counter {path}: {exc}",
            hint="restore it from a backup, or give --sequence above the last one devices "
            "accepted (their reported state shows it)",
        ) from exc
    if not isinstance(data, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in data.values()
    ):
        raise SettingError(
            f"{path} is not a sequence counter (an object of model id to number)",
            hint="restore it from a backup, or give --sequence",
        )
    return data


def _write_sequences(path: Path, sequences: dict[str, int]) -> None:
    """Replace the counter whole: a crash leaves the old one or the new one."""
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with temporary.open("w", encoding="utf-8") as file:
            json.dump(sequences, file, indent=2, sort_keys=True)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise SettingError(
            f"cannot write the sequence counter {path}: {exc.strerror or exc}",
            hint="check the permissions of the signing key's folder",
        ) from exc


def _rollback_from(value: str) -> RollbackFrom:
    """``--rollback-from``: VERSION:SHA256, or the signed manifest of the installed release."""
    path = Path(value)
    if path.is_file():
        try:
            installed = Manifest.model_validate_json(read_signed(path).payload)
        except ValidationError as exc:
            raise SettingError(
                f"--rollback-from {value}: not a manifest ({describe_errors(exc)})",
                hint="give the signed manifest of the release installed now, or VERSION:SHA256",
            ) from exc
        return RollbackFrom(version=installed.version, sha256=installed.sha256)
    version, _, sha = value.partition(":")
    if not version.isdigit() or int(version) < 1 or not re.fullmatch(SHA256_PATTERN, sha):
        raise SettingError(
            f"--rollback-from {value!r} is neither VERSION:SHA256 nor a manifest file",
            hint="give the installed release as 9:<its 64-digit sha256> "
            "(edgefleet status shows it), or its signed manifest file",
        )
    return RollbackFrom(version=int(version), sha256=sha)


@dataclass(frozen=True)
class ManifestTerms:
    """What a manifest promises beyond the model file: the signer's options, as data."""

    model_id: str
    version: int
    urls: tuple[str, ...]
    lifetime_s: float
    """Seconds from signing to expiry."""
    artifact: str | None = None
    """File name on the device; None: the model file's name."""
    task: str | None = None
    replaces_model_id: str | None = None
    max_latency_ms: float | None = None
    allow_slower: bool = False
    min_agent_version: str | None = None
    rollback_from: RollbackFrom | None = None


def manifest_terms(
    args: argparse.Namespace, urls: list[str], *, model_id: str | None = None
) -> ManifestTerms:
    """The terms that :func:`add_manifest_options` and ``--model-id``/``--version`` gave."""
    return ManifestTerms(
        model_id=model_id or args.model_id,
        version=args.version,
        urls=tuple(urls),
        lifetime_s=args.expires_in_days * SECONDS_PER_DAY,
        artifact=args.artifact,
        task=args.task,
        replaces_model_id=args.replaces,
        max_latency_ms=args.max_latency_ms,
        allow_slower=args.allow_slower,
        min_agent_version=args.min_agent_version,
    )


def check_urls(urls: list[str], option: str = "--url") -> None:
    """Refuse a URL a device cannot fetch from: http(s)://..., or exactly ``mqtt:``."""
    for url in urls:
        if not (url.startswith(URL_PREFIXES) or url == MQTT_MODEL_URL):
            raise SettingError(
                f"{option} {url!r} is not a download URL",
                hint=f"give a URL that starts with {', '.join(URL_PREFIXES)}, or exactly "
                f"{MQTT_MODEL_URL} for a transfer over the broker ('edgefleet transfer publish')",
            )


def _manifest_from(args: argparse.Namespace, sequence: int) -> Manifest:
    """The manifest for the model file and options; options that break it are named."""
    check_urls(args.url)
    terms = manifest_terms(args, args.url)
    if args.rollback_from is not None:
        terms = replace(
            terms, rollback_from=_rollback_from(args.rollback_from),
            lifetime_s=args.rollback_expires_in,
        )  # fmt: skip
    info = inspect_model(read_model(args.model))
    return build_manifest(info, args.model.name, terms, sequence)


def build_manifest(
    info: ModelInfo,
    file_name: str,
    terms: ManifestTerms,
    sequence: int,
    *,
    issued_at: float | None = None,
) -> Manifest:
    """The manifest of the model ``info`` describes (read from ``file_name``) on ``terms``.

    Fields that come out invalid are named by the option that sets them.
    """
    issued_at = time.time() if issued_at is None else issued_at
    fields: dict[str, Any] = {
        "model_id": terms.model_id,
        "version": terms.version,
        "sha256": info.sha256,
        "size": info.size,
        "artifact": terms.artifact or file_name,
        "urls": list(terms.urls),
        "inputs": [_tensor_spec(t) for t in info.inputs],
        "outputs": [_tensor_spec(t) for t in info.outputs],
        "task": {"task": terms.task},
        "issued_at": issued_at,
        "expires_at": issued_at + terms.lifetime_s,
        "sequence": sequence,
    }
    if terms.rollback_from is not None:
        fields["rollback_from"] = terms.rollback_from
    if terms.replaces_model_id is not None:
        fields["replaces_model_id"] = terms.replaces_model_id
    # Unset options keep the protocol's defaults.
    if terms.max_latency_ms is not None:
        fields["max_latency_ms"] = terms.max_latency_ms
    if terms.allow_slower:
        fields["allow_slower"] = True
    if terms.min_agent_version is not None:
        fields["min_agent_version"] = terms.min_agent_version
    try:
        return Manifest.model_validate(fields)
    except ValidationError as exc:
        raise SettingError(
            f"the manifest would be invalid: {describe_errors(exc, names=_OPTION_OF_FIELD)}",
            hint="fix the option named (--artifact defaults to the model's file name)",
        ) from exc


def _tensor_spec(tensor: TensorInfo) -> TensorSpec:
    """What the manifest promises about ``tensor``, from the model file alone.

    A tensor the file gives no shape (the outputs of TFLite_Detection_PostProcess: the op
    sets them at run time) is written with shape null, which the device checks by dtype
    only. Not the shape an interpreter here would allocate: that needs the model to load on
    this machine (an Edge TPU model does not), and an op may resize its outputs per invoke.
    """
    return TensorSpec(shape=tensor.shape or None, dtype=tensor.dtype)


# -- verifying manifests -------------------------------------------------


def _manifest_verify(args: argparse.Namespace) -> int:
    paths = [*args.key, *([args.keys_dir] if args.keys_dir is not None else [])]
    if not paths:
        raise SettingError(
            "no public key to verify with",
            hint="give --key FILE.pub (repeatable) or --keys-dir DIR, as the device trusts",
        )
    if args.keys_dir is not None and not args.keys_dir.is_dir():
        raise KeyFileError(f"--keys-dir {args.keys_dir}: no such folder", hint="check the path")
    trusted = TrustedKeys.from_paths(paths)
    signed = read_signed(args.manifest)
    try:
        manifest = trusted.verify(signed)
    except UnknownSigningKey as exc:
        known = ", ".join(sorted(trusted.key_ids))
        raise Refused(
            f"{args.manifest}: signed by key {signed.key_id}, not one of the keys given "
            f"({known}); a device trusting only these refuses it",
            hint="pass the fleet's public key; 'edgefleet keys list DIR' shows key ids",
        ) from exc
    except (BadSignature, MalformedManifest) as exc:
        raise Refused(f"{args.manifest}: {exc.message}", hint=exc.hint) from exc
    if args.json:
        print(json.dumps(json.loads(signed.payload), indent=2))
    else:
        print(_describe_manifest(signed, manifest))
    if manifest.expires_at <= time.time():
        raise Refused(
            f"{args.manifest}: the signature verifies, but it expired at "
            f"{utc(manifest.expires_at)}; devices refuse it",
            hint="sign a new one with 'edgefleet manifest create'",
        )
    return 0


def _describe_manifest(signed: SignedManifest, m: Manifest) -> str:
    left_s = m.expires_at - time.time()
    left = f"in {left_s / SECONDS_PER_DAY:.1f} days" if left_s > 0 else "EXPIRED"
    lines = [
        f"signature      ok, key {signed.key_id}",
        f"model          {m.model_id} version {m.version}"
        + (
            f"  (a rollback from version {m.rollback_from.version}, sha256 "
            f"{m.rollback_from.sha256[:12]})"
            if m.rollback_from
            else ""
        ),
        f"sequence       {m.sequence}"
        + (f"  (replaces model {m.replaces_model_id})" if m.replaces_model_id else ""),
        f"sha256         {m.sha256}",
        f"size           {m.size} bytes, artifact {m.artifact}",
        *(f"url            {url}" for url in m.urls),
        f"task           {m.task.task or 'detected on the device'}",
        *(f"input          {_spec(t)}" for t in m.inputs),
        *(f"output         {_spec(t)}" for t in m.outputs or []),
        f"max latency    {_pace(m)}",
        f"min agent      {m.min_agent_version}",
        f"issued         {utc(m.issued_at)}",
        f"expires        {utc(m.expires_at)} ({left})",
    ]
    return "\n".join(lines)


def _pace(m: Manifest) -> str:
    if m.max_latency_ms:
        return f"{m.max_latency_ms:g} ms"
    if m.allow_slower:
        return "no limit (allow_slower)"
    return "no budget: refused when much slower than the running model or the frame rate"


def _spec(spec: TensorSpec) -> str:
    shape = list(spec.shape) if spec.shape is not None else "(shape set at run time)"
    return f"{shape} {spec.dtype}"


# -- models over the broker ---------------------------------------------------------------


def model_chunks(content: bytes, chunk_bytes: int) -> tuple[ChunkedModelMeta, list[bytes]]:
    """A model cut for publishing over the broker: its meta, and its chunks in order."""
    chunks = [content[i : i + chunk_bytes] for i in range(0, len(content), chunk_bytes)]
    meta = ChunkedModelMeta(
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
        chunk_bytes=chunk_bytes,
        chunks=len(chunks),
    )
    return meta, chunks


def _transfer_publish(args: argparse.Namespace) -> int:
    model = read_model(args.model)
    resolved = broker_profile(args)
    meta, stale = publish_model_chunks(resolved, model.content, args.chunk_kib * KIB)
    root, sha256 = resolved.profile.topic_root, meta.sha256
    print(
        f"published {args.model.name}: {meta.size:,} bytes in {meta.chunks} chunks of "
        f"{args.chunk_kib} KiB, retained under {model_transfer_topic(root, sha256)}/"
        + (f" (cleared {stale} retained messages of one cut another way)" if stale else "")
    )
    print(f"sha256  {sha256}")
    print(f"url     {MQTT_MODEL_URL}    (edgefleet manifest create ... --url {MQTT_MODEL_URL})")
    print(f"remove  edgefleet transfer clear {sha256} {broker_options(args)}".rstrip())
    return 0


def publish_model_chunks(
    resolved: ResolvedProfile, content: bytes, chunk_bytes: int
) -> tuple[ChunkedModelMeta, int]:
    """Publish ``content`` retained as chunks, then its meta; the meta and how many stale
    retained messages (of an earlier publication cut another way) were cleared first."""
    meta, chunks = model_chunks(content, chunk_bytes)
    root, sha256 = resolved.profile.topic_root, meta.sha256
    messages = [(model_chunk_topic(root, sha256, i), chunk) for i, chunk in enumerate(chunks)]
    meta_topic, meta_payload = model_meta_topic(root, sha256), meta.model_dump_json().encode()
    with BrokerConnection(resolved) as broker:
        _check_chunks_fit(broker, messages[-1][0], meta.chunk_bytes)
        earlier = _published(broker, root, sha256)
        # What this publication will not overwrite goes first, the meta before the chunks: a
        # device never sees a meta beside chunks cut another way.
        kept = {topic for topic, _ in messages} | {meta_topic}
        stale = [topic for topic in earlier if topic not in kept]
        if earlier.get(meta_topic, meta_payload) != meta_payload:
            stale.insert(0, meta_topic)
        broker.publish_all([(topic, b"") for topic in stale], retain=True)
        broker.publish_all(messages, retain=True)
        broker.publish(meta_topic, meta_payload, retain=True)
    return meta, len(stale)


def _transfer_clear(args: argparse.Namespace) -> int:
    sha256 = args.sha256.lower()
    if not re.fullmatch(SHA256_PATTERN, sha256):
        raise SettingError(
            f"{args.sha256!r} is not a sha256", hint="give the 64 hex digits 'publish' printed"
        )
    resolved = broker_profile(args)
    root = resolved.profile.topic_root
    meta_topic = model_meta_topic(root, sha256)
    with BrokerConnection(resolved) as broker:
        published = _published(broker, root, sha256)
        if not published:
            raise NotPublished(
                f"nothing is published under {model_transfer_topic(root, sha256)}/ on the "
                f"broker at {resolved.profile.address}",
                hint="check the sha256 and --topic-root; 'edgefleet transfer publish' prints both",
            )
        # The meta first: it says every chunk is there, which stops being true now.
        topics = sorted(published, key=lambda topic: topic != meta_topic)
        broker.publish_all([(topic, b"") for topic in topics], retain=True)
    chunks = len(topics) - (meta_topic in published)
    meta = "the meta and " if meta_topic in published else ""
    print(f"cleared model {sha256}: {meta}{chunks} chunks ({len(topics)} retained messages)")
    return 0


def _published(broker: BrokerConnection, root: str, sha256: str) -> dict[str, bytes]:
    """The retained messages under ``<root>/_models/<sha256>/``, by topic."""
    # The marker topic is beside (not under) any model's subtree.
    return broker.retained([f"{model_transfer_topic(root, sha256)}/#"], sync_topic(root))


def _check_chunks_fit(broker: BrokerConnection, topic: str, chunk_bytes: int) -> None:
    """Refuse a chunk size whose packets the broker would drop us for."""
    limit = broker.max_packet_bytes
    overhead = len(topic.encode()) + PUBLISH_OVERHEAD_BYTES
    if limit is not None and chunk_bytes + overhead > limit:
        raise SettingError(
            f"--chunk-kib {chunk_bytes // KIB}: a chunk's packet can take "
            f"{chunk_bytes + overhead:,} bytes; the broker accepts packets up to {limit:,}",
            hint=f"use --chunk-kib {(limit - overhead) // KIB} or less",
        )
