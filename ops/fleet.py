"""``edgefleet keys | manifest | deploy | cmd | transfer``: sign, deploy, command, publish models.

::

    edgefleet keys generate DIR [--name fleet]
    edgefleet manifest create MODEL --model-id ID --version N --url URL [--url URL ...] --key KEY
    edgefleet deploy DEVICE STREAM SIGNED_MANIFEST.json --host H [--port P]
    edgefleet cmd DEVICE NAME [--args JSON] [--timeout S] --host H [--port P]
    edgefleet transfer publish MODEL --host H [--port P] [--topic-root R] [--chunk-kib 64]
    edgefleet transfer clear SHA256 --host H [--port P] [--topic-root R]

``transfer publish`` puts a model on the broker for devices that reach only the broker (a
manifest URL ``mqtt:``): retained chunks under ``<root>/_models/<sha256>/``, then the meta
that says they are all there (``edgefleet.agent.chunks`` is the device's side). It first
clears whatever an earlier publication of the same model left that this one does not
overwrite (another ``--chunk-kib``); a device fetching the model meanwhile has to start over.
``transfer clear`` removes every retained message of the model, the meta first.

``deploy`` is a read-modify-write of the device's retained ``desired`` state: it assumes one
operator (or controller) writes a device's desired state at a time; two concurrent deploys
to one device can lose one of the changes.

Exit codes: 0 done; 2 bad input (an option, a model, a key or manifest file); 1 anything
else: the broker cannot be reached or refuses, a device does not answer or says no. Errors
print as ``edgefleet: error: ...`` plus what to do, never a traceback. The tree here::

    EdgefleetError
    ├── SettingError, ModelError, KeyFileError     bad input (exit 2)
    └── EnvironmentProblem
        └── FleetError                             the broker or a device did not do its part
            ├── BrokerError                        unreachable, refused, dropped, or too slow
            ├── NoReply                            a command went unanswered in its timeout
            ├── NotPublished                       no model with that sha256 is on the broker
            └── ContractBroken                     a device's reply or the retained desired
                                                   state does not parse

Threads: each command runs in the CLI's main thread. ``_Connection`` starts paho's network
thread (``loop_start``) and stops it on exit; its callbacks only record acknowledgements
under one condition variable and put messages on a queue, which the main thread waits on
with a deadline.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import queue
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import ValidationError

from edgefleet.agent.protocol import (
    COMMAND_ARGS,
    MODELS_LEVEL,
    MQTT_MODEL_URL,
    SCHEMA_VERSION,
    SHA256_PATTERN,
    TOPIC_LEVEL_PATTERN,
    TOPIC_ROOT,
    ChunkedModelMeta,
    CommandName,
    CommandReply,
    CommandRequest,
    DesiredState,
    Manifest,
    SignedManifest,
    TensorSpec,
    Topics,
    describe_errors,
    model_chunk_topic,
    model_meta_topic,
    model_transfer_topic,
)
from edgefleet.provisioning import (
    KeyFileError,
    generate_signing_key,
    key_id,
    load_private_key,
    load_public_key,
    sign_manifest,
)
from edgefleet.runtime import (
    EnvironmentProblem,
    ModelError,
    SettingError,
    TaskName,
    TensorInfo,
    inspect_model,
    read_model,
)
from edgefleet.runtime.cli import report_error

DEFAULT_PORT = 1883
ACK_TIMEOUT_S = 10.0
RETAINED_WAIT_S = 2.0
DEFAULT_COMMAND_TIMEOUT_S = 10.0
DEFAULT_EXPIRES_IN_DAYS = 30.0
SECONDS_PER_DAY = 86_400
KEEPALIVE_S = 30
URL_PREFIXES = ("http://", "https://")
DEFAULT_CHUNK_KIB = 64
KIB = 1024
# At most what a QoS 1 PUBLISH adds to its topic and payload: fixed header (5), topic length
# (2), packet id (2), MQTT 5 property length (1).
PUBLISH_OVERHEAD_BYTES = 10
_BAD_INPUT = (SettingError, ModelError, KeyFileError)
# Manifest fields that come from an option, for messages that name what to change.
_OPTION_OF_FIELD = {
    "model_id": "--model-id",
    "version": "--version",
    "artifact": "--artifact",
    "urls": "--url",
    "max_latency_ms": "--max-latency-ms",
    "min_agent_version": "--min-agent-version",
    "expires_at": "--expires-in-days",
}
_T = TypeVar("_T")
Handler = Callable[[argparse.Namespace], int]


class FleetError(EnvironmentProblem):
    """The broker or a device did not do its part."""


class BrokerError(FleetError):
    """The broker cannot be reached, refused a request, dropped us, or did not answer in time."""


class NoReply(FleetError):
    """A command went unanswered within its timeout."""


class NotPublished(FleetError):
    """No model with the sha256 asked for is published on the broker."""


class ContractBroken(FleetError):
    """What a device sent, or the broker holds for it, does not parse as the wire contract says."""


# -- argument parsing -------------------------------------------------------------------


def register(subcommands: Any) -> None:
    """Add ``keys``, ``manifest``, ``deploy``, ``cmd`` and ``transfer`` to the command parser."""
    _register_keys(subcommands)
    _register_manifest(subcommands)
    _register_transfer(subcommands)

    deploy = subcommands.add_parser("deploy", help="set the model a device's stream should run")
    deploy.add_argument("device", help="device id")
    deploy.add_argument("stream", help="stream name on that device")
    deploy.add_argument(
        "manifest",
        type=Path,
        metavar="SIGNED_MANIFEST.json",
        help="signed manifest (from 'manifest create')",
    )
    _add_broker_options(deploy)
    deploy.set_defaults(handler=_reporting_bad_input(_deploy))

    cmd = subcommands.add_parser("cmd", help="send a device a command and print its reply")
    cmd.add_argument("device", help="device id")
    cmd.add_argument("name", choices=[c.value for c in CommandName], help="the command")
    cmd.add_argument("--args", default="{}", help="the command's arguments as a JSON object")
    cmd.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_COMMAND_TIMEOUT_S,
        help="seconds to wait for the reply; the device refuses it after that too "
        "(default: %(default)s)",
    )
    _add_broker_options(cmd)
    cmd.set_defaults(handler=_reporting_bad_input(_cmd))


def _register_keys(subcommands: Any) -> None:
    keys = subcommands.add_parser("keys", help="manifest signing keys")
    commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    generate = commands.add_parser("generate", help="write a new ed25519 signing key pair")
    generate.add_argument("directory", type=Path, help="where to write NAME.key and NAME.pub")
    generate.add_argument("--name", default="fleet", help="file name stem (default: fleet)")
    generate.set_defaults(handler=_reporting_bad_input(_keys_generate))


def _register_manifest(subcommands: Any) -> None:
    manifest = subcommands.add_parser("manifest", help="signed model release manifests")
    commands = manifest.add_subparsers(dest="manifest_command", required=True, metavar="COMMAND")
    create = commands.add_parser("create", help="describe a model release and sign it")
    create.add_argument("model", type=Path, help="the .tflite file")
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
        "--expires-in-days",
        type=_positive_float,
        metavar="DAYS",
        default=DEFAULT_EXPIRES_IN_DAYS,
        help="devices refuse it after this long (default: %(default)s)",
    )
    create.add_argument(
        "--max-latency-ms",
        type=_positive_float,
        metavar="MS",
        help="median invoke time devices must reach",
    )
    create.add_argument(
        "--task", choices=[t.value for t in TaskName], help="task (default: detected on device)"
    )
    create.add_argument(
        "--rollback", action="store_true", help="a signed return to an older version"
    )
    create.add_argument(
        "--artifact", metavar="NAME", help="file name on the device (default: the model's)"
    )
    create.add_argument("--min-agent-version", metavar="V", help="oldest agent that may run it")
    create.add_argument(
        "--out", type=Path, metavar="FILE", help="write here (default: standard output)"
    )
    create.set_defaults(handler=_reporting_bad_input(_manifest_create))


def _register_transfer(subcommands: Any) -> None:
    transfer = subcommands.add_parser(
        "transfer", help="models over the broker, for devices that reach only the broker"
    )
    commands = transfer.add_subparsers(dest="transfer_command", required=True, metavar="COMMAND")
    publish = commands.add_parser(
        "publish", help=f"publish a model as retained chunks (manifest URL {MQTT_MODEL_URL})"
    )
    publish.add_argument("model", type=Path, help="the .tflite file")
    publish.add_argument(
        "--chunk-kib",
        type=_positive_int,
        default=DEFAULT_CHUNK_KIB,
        metavar="KIB",
        help="chunk size in KiB; a chunk must fit the broker's packet limit (default: %(default)s)",
    )
    _add_broker_options(publish)
    publish.set_defaults(handler=_reporting_bad_input(_transfer_publish))
    clear = commands.add_parser("clear", help="remove a published model from the broker")
    clear.add_argument("sha256", help="the model's sha256 ('transfer publish' printed it)")
    _add_broker_options(clear)
    clear.set_defaults(handler=_reporting_bad_input(_transfer_clear))


def _add_broker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", required=True, help="broker host")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"broker port (default: {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--topic-root", default=TOPIC_ROOT, help=f"topic root (default: {TOPIC_ROOT})"
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value


def _reporting_bad_input(handler: Handler) -> Handler:
    """Exit 2 for bad input; everything else goes to the caller (exit 1)."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except _BAD_INPUT as exc:
            report_error(exc)
            return 2

    return run


# -- keys and manifests -------------------------------------------------------------------


def _keys_generate(args: argparse.Namespace) -> int:
    private_path, public_path = generate_signing_key(args.directory, args.name)
    print(f"key id       {key_id(load_public_key(public_path))}")
    print(f"private key  {private_path}  (signs manifests: keep it secret, off the devices)")
    print(f"public key   {public_path}  (install on every device that should trust it)")
    return 0


def _manifest_create(args: argparse.Namespace) -> int:
    key = load_private_key(args.key)
    manifest = _manifest_from(args)
    text = sign_manifest(manifest, key).model_dump_json(indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        try:
            args.out.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise SettingError(
                f"cannot write {args.out}: {exc.strerror or exc}", hint="check --out"
            ) from exc
    expires = _utc(manifest.expires_at)
    print(
        f"signed {manifest.model_id} version {manifest.version} (sha256 {manifest.sha256[:12]}, "
        f"{manifest.size} bytes) with key {key_id(key.public_key())}, expires {expires}",
        file=sys.stderr,
    )
    return 0


def _manifest_from(args: argparse.Namespace) -> Manifest:
    """The manifest for the model file and options; options that break it are named."""
    for url in args.url:
        if not (url.startswith(URL_PREFIXES) or url == MQTT_MODEL_URL):
            raise SettingError(
                f"--url {url!r} is not a download URL",
                hint=f"give a URL that starts with {', '.join(URL_PREFIXES)}, or exactly "
                f"{MQTT_MODEL_URL} for a transfer over the broker ('edgefleet transfer publish')",
            )
    info = inspect_model(read_model(args.model))
    issued_at = time.time()
    fields: dict[str, Any] = {
        "model_id": args.model_id,
        "version": args.version,
        "sha256": info.sha256,
        "size": info.size,
        "artifact": args.artifact or args.model.name,
        "urls": args.url,
        "inputs": [_tensor_spec(t) for t in info.inputs],
        "outputs": [_tensor_spec(t) for t in info.outputs],
        "task": {"task": args.task},
        "issued_at": issued_at,
        "expires_at": issued_at + args.expires_in_days * SECONDS_PER_DAY,
        "rollback": args.rollback,
    }
    # Unset options keep the protocol's defaults.
    if args.max_latency_ms is not None:
        fields["max_latency_ms"] = args.max_latency_ms
    if args.min_agent_version is not None:
        fields["min_agent_version"] = args.min_agent_version
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


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# -- deploy -------------------------------------------------------------------------------


def _deploy(args: argparse.Namespace) -> int:
    _check_topic_level("device id", args.device)
    _check_topic_level("stream name", args.stream)
    signed, manifest = _read_signed_manifest(args.manifest)
    topics = Topics(args.device, args.topic_root)
    with _Connection(args.host, args.port) as broker:
        current = _current_desired(broker, topics.desired)
        desired = DesiredState(
            revision=current.revision + 1, models={**current.models, args.stream: signed}
        )
        broker.publish(topics.desired, desired.model_dump_json(), retain=True)
    print(
        f"{args.device}/{args.stream}: {manifest.model_id} version {manifest.version}; "
        f"desired revision {desired.revision}"
    )
    return 0


def _check_topic_level(what: str, value: str) -> None:
    if not re.fullmatch(TOPIC_LEVEL_PATTERN, value):
        raise SettingError(
            f"{what} {value!r} cannot be a topic level",
            hint="use up to 64 letters, digits, '_', '.' and '-', starting with a letter or digit",
        )


def _read_signed_manifest(path: Path) -> tuple[SignedManifest, Manifest]:
    """The signed manifest in ``path`` and its (unverified) manifest, for checks and messages.

    Not a trust decision: the device verifies the signature. This only stops an operator
    from deploying a file that is not a manifest, or one every device would refuse as expired.
    """
    hint = "pass the file 'edgefleet manifest create' wrote"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError(f"cannot read {path}: {exc}", hint=hint) from exc
    try:
        signed = SignedManifest.model_validate_json(text)
        manifest = Manifest.model_validate_json(signed.payload)
    except ValidationError as exc:
        raise SettingError(
            f"{path} is not a signed manifest: {describe_errors(exc)}", hint=hint
        ) from exc
    if manifest.expires_at <= time.time():
        raise SettingError(
            f"{path} expired at {_utc(manifest.expires_at)}; devices would refuse it",
            hint="sign a new one with 'edgefleet manifest create'",
        )
    return signed, manifest


def _current_desired(broker: _Connection, topic: str) -> DesiredState:
    """The retained desired state on ``topic``; revision 0 with no models when there is none."""
    broker.subscribe(topic)
    message = broker.receive(RETAINED_WAIT_S)
    if message is None or not message.payload:
        return DesiredState(revision=0)
    try:
        state = DesiredState.model_validate_json(message.payload)
    except ValidationError as exc:
        raise ContractBroken(
            f"the retained message on {topic} is not a desired state: {describe_errors(exc)}",
            hint=f"inspect it (mosquitto_sub -t {topic} -C 1); clear it with "
            f"mosquitto_pub -t {topic} -r -n, then deploy every stream again",
        ) from exc
    if state.schema_version != SCHEMA_VERSION:
        raise ContractBroken(
            f"the desired state on {topic} has schema version {state.schema_version}; "
            f"this edgefleet writes {SCHEMA_VERSION}",
            hint="deploy with the edgefleet version that wrote it",
        )
    return state


# -- commands -----------------------------------------------------------------------------


def _cmd(args: argparse.Namespace) -> int:
    _check_topic_level("device id", args.device)
    name = CommandName(args.name)
    topics = Topics(args.device, args.topic_root)
    request_id = uuid.uuid4().hex
    # Under the device's own subtree: the generated ACL lets a device write only there.
    reply_topic = f"{topics.base}/reply/{request_id}"
    request = CommandRequest(
        id=request_id,
        expires_at=time.time() + args.timeout,
        args=_command_args(name, args.args),
        reply_to=reply_topic,  # for a device on MQTT 3.1.1, which gets no response topic
    )
    deadline = time.monotonic() + args.timeout
    with _Connection(args.host, args.port) as broker:
        broker.subscribe(reply_topic)
        broker.publish(
            topics.command(name.value),
            request.model_dump_json(),
            properties=_request_properties(reply_topic, request.id, args.timeout),
        )
        reply = _await_reply(broker, request.id, deadline)
    if reply is None:
        raise NoReply(
            f"no reply from {args.device} to {name.value} within {args.timeout:g} s",
            hint=f"check that {args.device} is online (edgefleet watch --device {args.device} "
            "--host ...) and runs an agent that answers commands, or raise --timeout",
        )
    print(reply.model_dump_json(indent=2))
    if not reply.ok:
        error = reply.error.value if reply.error else "error"
        print(
            f"edgefleet: {args.device} did not carry out {name.value}: {error}: {reply.message}",
            file=sys.stderr,
        )
        return 1
    return 0


def _command_args(name: CommandName, text: str) -> dict[str, Any]:
    """``--args`` as a JSON object, checked against the command's argument model."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingError(
            f"--args is not JSON: {exc}", hint='pass an object, e.g. {"stream": "door"}'
        ) from exc
    if not isinstance(value, dict):
        raise SettingError(
            "--args must be a JSON object", hint='pass an object, e.g. {"stream": "door"}'
        )
    model = COMMAND_ARGS[name]
    try:
        model.model_validate(value)
    except ValidationError as exc:
        fields = ", ".join(model.model_fields) or "none"
        raise SettingError(
            f"--args for {name.value}: {describe_errors(exc)}",
            hint=f"{name.value} takes these arguments: {fields}",
        ) from exc
    return value


def _request_properties(reply_topic: str, request_id: str, timeout_s: float) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.ResponseTopic = reply_topic
    properties.CorrelationData = request_id.encode()
    # The broker drops it for a device that comes back too late to answer in time.
    properties.MessageExpiryInterval = math.ceil(timeout_s)
    return properties


def _await_reply(broker: _Connection, request_id: str, deadline: float) -> CommandReply | None:
    """The reply correlated with ``request_id``, or None once ``deadline`` (monotonic) passed."""
    while (message := broker.receive(deadline - time.monotonic())) is not None:
        correlation = getattr(message.properties, "CorrelationData", None)
        if correlation is not None and correlation != request_id.encode():
            continue  # someone else's reply on our topic: not ours to read
        try:
            return CommandReply.model_validate_json(message.payload)
        except ValidationError as exc:
            raise ContractBroken(
                f"the reply on {message.topic} is not a command reply: {describe_errors(exc)}",
                hint="the device's agent breaks the wire contract; check its version",
            ) from exc
    return None


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
    meta, chunks = model_chunks(model.content, args.chunk_kib * KIB)
    root, sha256 = args.topic_root, meta.sha256
    messages = [(model_chunk_topic(root, sha256, i), chunk) for i, chunk in enumerate(chunks)]
    meta_topic, meta_payload = model_meta_topic(root, sha256), meta.model_dump_json().encode()
    with _Connection(args.host, args.port) as broker:
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
    print(
        f"published {args.model.name}: {meta.size:,} bytes in {meta.chunks} chunks of "
        f"{args.chunk_kib} KiB, retained under {model_transfer_topic(root, sha256)}/"
        + (f" (cleared {len(stale)} retained messages of one cut another way)" if stale else "")
    )
    print(f"sha256  {sha256}")
    print(f"url     {MQTT_MODEL_URL}    (edgefleet manifest create ... --url {MQTT_MODEL_URL})")
    print(f"remove  edgefleet transfer clear {sha256} {_broker_options(args)}")
    return 0


def _transfer_clear(args: argparse.Namespace) -> int:
    sha256 = args.sha256.lower()
    if not re.fullmatch(SHA256_PATTERN, sha256):
        raise SettingError(
            f"{args.sha256!r} is not a sha256", hint="give the 64 hex digits 'publish' printed"
        )
    root = args.topic_root
    meta_topic = model_meta_topic(root, sha256)
    with _Connection(args.host, args.port) as broker:
        published = _published(broker, root, sha256)
        if not published:
            raise NotPublished(
                f"nothing is published under {model_transfer_topic(root, sha256)}/ on the "
                f"broker at {args.host}:{args.port}",
                hint="check the sha256 and --topic-root; 'edgefleet transfer publish' prints both",
            )
        # The meta first: it says every chunk is there, which stops being true now.
        topics = sorted(published, key=lambda topic: topic != meta_topic)
        broker.publish_all([(topic, b"") for topic in topics], retain=True)
    chunks = len(topics) - (meta_topic in published)
    meta = "the meta and " if meta_topic in published else ""
    print(f"cleared model {sha256}: {meta}{chunks} chunks ({len(topics)} retained messages)")
    return 0


def _published(broker: _Connection, root: str, sha256: str) -> dict[str, bytes]:
    """The retained messages under ``<root>/_models/<sha256>/``, by topic."""
    # A topic only this call uses, beside (not under) any model's subtree.
    marker = f"{root}/{MODELS_LEVEL}/_sync/{uuid.uuid4().hex}"
    return broker.retained(f"{model_transfer_topic(root, sha256)}/#", marker)


def _check_chunks_fit(broker: _Connection, topic: str, chunk_bytes: int) -> None:
    """Refuse a chunk size whose packets the broker would drop us for."""
    limit = broker.max_packet_bytes
    overhead = len(topic.encode()) + PUBLISH_OVERHEAD_BYTES
    if limit is not None and chunk_bytes + overhead > limit:
        raise SettingError(
            f"--chunk-kib {chunk_bytes // KIB}: a chunk's packet can take "
            f"{chunk_bytes + overhead:,} bytes; the broker accepts packets up to {limit:,}",
            hint=f"use --chunk-kib {(limit - overhead) // KIB} or less",
        )


def _broker_options(args: argparse.Namespace) -> str:
    """The broker options of ``args``, as typed on a command line (the root if not default)."""
    options = f"--host {args.host} --port {args.port}"
    if args.topic_root != TOPIC_ROOT:
        options += f" --topic-root {args.topic_root}"
    return options


# -- MQTT ---------------------------------------------------------------------------------


class _Connection:
    """One MQTT 5 connection for one command; each call waits, with a deadline, for its ack."""

    def __init__(self, host: str, port: int, timeout_s: float = ACK_TIMEOUT_S) -> None:
        self._host, self._port = host, port
        self._timeout_s = timeout_s
        self._changed = threading.Condition()
        self._connack: ReasonCode | None = None
        self._max_packet_bytes: int | None = None
        self._closed: ReasonCode | None = None
        self._acks: dict[int, ReasonCode] = {}  # by message id: first SUBACK code, or PUBACK
        self._messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, reconnect_on_failure=False
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._client = client

    def __enter__(self) -> _Connection:
        try:
            self._client.connect(self._host, self._port, keepalive=KEEPALIVE_S)
        except OSError as exc:
            raise BrokerError(
                f"cannot reach the broker at {self._host}:{self._port} ({exc})",
                hint="check --host and --port, and that the broker runs",
            ) from exc
        self._client.loop_start()
        try:
            connack = self._wait(lambda: self._connack, "CONNACK")
            self._check(connack, "refused the connection")
        except BrokerError:
            self._client.loop_stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def max_packet_bytes(self) -> int | None:
        """The largest packet the broker accepts, when it said (MQTT 5 CONNACK)."""
        return self._max_packet_bytes

    def subscribe(self, topic: str, *, no_local: bool = False) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK; ``no_local``: not to our own messages."""
        options = SubscribeOptions(qos=1, noLocal=no_local)
        result, mid = self._client.subscribe(topic, options=options)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise self._lost(f"subscribing to {topic}")
        self._check(self._wait(lambda: self._acks.get(mid), "SUBACK"), f"refused {topic}")

    def publish(
        self,
        topic: str,
        payload: str | bytes,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        """Publish at QoS 1 and wait for the PUBACK."""
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise self._lost(f"publishing to {topic}")
        self._check(self._wait(lambda: self._acks.get(info.mid), "PUBACK"), f"refused {topic}")

    def publish_all(self, messages: Sequence[tuple[str, bytes]], *, retain: bool = False) -> None:
        """Publish each (topic, payload) at QoS 1, all at once, then wait for every PUBACK.

        Each wait has the full timeout: a slow link is fine while the acks keep coming.
        """
        sent = []
        for topic, payload in messages:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise self._lost(f"publishing to {topic}")
            sent.append((topic, info.mid))
        for topic, mid in sent:
            ack = self._wait(functools.partial(self._acks.get, mid), "PUBACK")
            self._check(ack, f"refused {topic}")

    def retained(self, topic_filter: str, marker_topic: str) -> dict[str, bytes]:
        """The retained messages on ``topic_filter`` now, by topic (cleared ones left out).

        The broker sends a subscription's retained messages before anything published after
        it: once our own QoS 1 message on ``marker_topic`` is back, every one of them is in.
        """
        self.subscribe(topic_filter, no_local=True)
        self.subscribe(marker_topic)
        marker = uuid.uuid4().hex
        self.publish(marker_topic, marker)
        found: dict[str, bytes] = {}
        deadline = time.monotonic() + self._timeout_s
        while (message := self.receive(deadline - time.monotonic())) is not None:
            if message.topic == marker_topic and message.payload == marker.encode():
                return found
            if message.retain and message.payload:
                found[message.topic] = bytes(message.payload)
        raise BrokerError(
            f"the broker at {self._host}:{self._port} did not send back our message on "
            f"{marker_topic} within {self._timeout_s:g} s",
            hint="check that this identity may read and write it (the broker ACL) and the "
            "broker's load",
        )

    def receive(self, timeout_s: float) -> mqtt.MQTTMessage | None:
        """The next message of the subscriptions, or None after ``timeout_s``."""
        try:
            return self._messages.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            return None

    def _wait(self, ready: Callable[[], _T | None], what: str) -> _T:
        with self._changed:
            self._changed.wait_for(
                lambda: ready() is not None or self._closed is not None, self._timeout_s
            )
            result = ready()
            if result is not None:
                return result
            if self._closed is not None:
                raise self._lost(f"waiting for its {what}")
        raise BrokerError(
            f"no {what} from the broker at {self._host}:{self._port} within {self._timeout_s:g} s",
            hint="check the broker's load and the network",
        )

    def _check(self, code: ReasonCode, what: str) -> None:
        if code.is_failure:
            raise BrokerError(
                f"the broker at {self._host}:{self._port} {what}: {code}",
                hint="check that this identity may read and write these topics (the broker ACL)",
            )

    def _lost(self, doing: str) -> BrokerError:
        return BrokerError(
            f"the broker at {self._host}:{self._port} closed the connection while {doing} "
            f"({self._closed})",
            hint="check the broker log: it drops clients it does not accept",
        )

    # paho's network thread from here on.

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._connack = reason_code
            self._max_packet_bytes = getattr(properties, "MaximumPacketSize", None)
            self._changed.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._closed = reason_code
            self._changed.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._acks[mid] = reason_codes[0]
            self._changed.notify_all()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._acks[mid] = reason_code
            self._changed.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self._messages.put(message)
