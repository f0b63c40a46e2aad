"""The wire contract as an AsyncAPI 3.0 document, generated from the models in ``protocol``.

``python -m edgefleet.agent.asyncapi > docs/asyncapi.json`` regenerates the published copy;
a test fails when that copy differs from :func:`document`. Operations are the device's: it
*sends* status, events, health and reported state, and *receives* commands (answering each
on the request's MQTT 5 response topic) and desired state; it also *receives* the models
published for transfer over the broker (``<root>/_models/<sha256>/meta`` and its raw chunks),
which are fleet-wide, not per device, and the root-signed release-key set
(``<root>/_trust/keyset``, ``provisioning.keyset``). Payload schemas are the pydantic models'
JSON Schemas, their ``$defs`` hoisted into ``components.schemas``.

Pure: builds a dict, no I/O except in :func:`main`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from edgefleet.provisioning.keyset import KeySet, SignedKeySet

from .protocol import (
    COMMAND_ARGS,
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
    EventMessage,
    HealthMessage,
    Manifest,
    ReportedState,
    SnapshotMessage,
    StatusMessage,
    key_set_topic,
    model_meta_topic,
    model_transfer_topic,
)

ASYNCAPI_VERSION = "3.0.0"
MQTT_BINDING_VERSION = "0.2.0"
SCHEMA_REF = "#/components/schemas/{model}"
REPLY_CHANNEL = "cmd_reply"
MODEL_META_CHANNEL = "model_meta"
MODEL_CHUNK_CHANNEL = "model_chunk"
KEY_SET_CHANNEL = "key_set"
_LEVEL = f"one topic level matching {TOPIC_LEVEL_PATTERN}"
_PARAMETERS = {
    "device": {"description": f"Device id: {_LEVEL}."},
    "stream": {"description": f"Stream (camera) name: {_LEVEL}."},
    "sha256": {"description": f"sha256 of the model, matching {SHA256_PATTERN}."},
    "index": {"description": "Chunk index: 0, 1, ... up to the meta's chunks - 1, in decimal."},
}


@dataclass(frozen=True)
class _Topic:
    """One device topic: what flows on it, which way, and how it is published."""

    key: str
    suffix: str
    model: type[BaseModel]
    action: str  # the device's: send or receive
    qos: int
    retain: bool
    description: str


_TOPICS = (
    _Topic("status", "status", StatusMessage, "send", 1, True,
           "Retained: online (birth, with capabilities) on every connect; offline as the last "
           "will or on shutdown."),
    _Topic("events", "events/{stream}", EventMessage, "send", 1, False,
           "Inference events from the durable outbox; QoS 1 can deliver twice, so consumers "
           "drop duplicates by id."),
    _Topic("snapshots", "snapshots/{stream}", SnapshotMessage, "send", 1, False,
           "Redacted snapshots a stream takes by itself (streams[].snapshots: when a tracked "
           "object starts), sent only while connected: none is stored for later."),
    _Topic("health", "health", HealthMessage, "send", 0, False,
           "Periodic metrics while connected."),
    _Topic("desired", "desired", DesiredState, "receive", 1, True,
           "Retained: what the controller wants the device to run. Each models[stream] is a "
           "SignedManifest whose payload is a Manifest (components.schemas.Manifest) as JSON "
           "text, parsed only after its ed25519 signature verified."),
    _Topic("reported", "reported", ReportedState, "send", 1, True,
           "Retained: what the device runs, and how its model updates go."),
)  # fmt: skip


def document(topic_root: str = TOPIC_ROOT) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the device topics under ``topic_root``."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for topic in _TOPICS:
        messages[topic.key] = _message(topic.model, _ref(topic.model))
        address = _device_address(topic_root, topic.suffix)
        channels[topic.key] = _channel(address, topic.key, topic.description)
        operations[f"{topic.action}_{topic.key}"] = _operation(
            topic.key, topic.action, qos=topic.qos, retain=topic.retain
        )
    messages[REPLY_CHANNEL] = _message(CommandReply, _ref(CommandReply), _reply_bindings())
    channels[REPLY_CHANNEL] = {
        "address": None,
        "title": "Command replies",
        "description": "The MQTT 5 response topic of the request (or its reply_to under MQTT "
        "3.1.1). edgefleet's CLI asks for <root>/<device>/reply/<request id>: the generated "
        "broker ACL lets a device write only its own subtree.",
        "messages": {REPLY_CHANNEL: {"$ref": f"#/components/messages/{REPLY_CHANNEL}"}},
    }
    for name in CommandName:
        key = f"cmd_{name.value}"
        messages[key] = _command_message(name)
        channels[key] = _channel(
            _device_address(topic_root, f"cmd/{name.value}"), key, f"The {name.value} command, in."
        )
        operations[f"receive_{key}"] = _command_operation(key)
    _add_model_transfer(topic_root, channels, operations, messages)
    messages[KEY_SET_CHANNEL] = _message(SignedKeySet, _ref(SignedKeySet))
    channels[KEY_SET_CHANNEL] = _channel(
        key_set_topic(topic_root),
        KEY_SET_CHANNEL,
        "Retained: the release keys that may sign manifests, as a SignedKeySet whose payload "
        "is a KeySet (components.schemas.KeySet) as JSON text, signed by the fleet's root "
        "key. A device with updates.root_key installs it only when the root signed it and "
        "its version is newer than the installed set's.",
    )
    operations[f"receive_{KEY_SET_CHANNEL}"] = _operation(
        KEY_SET_CHANNEL, "receive", qos=1, retain=True
    )
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "edgefleet device MQTT API",
            "version": str(SCHEMA_VERSION),
            "description": "What an edgefleet device publishes and answers, one subtree per "
            f"device under {topic_root}/<device>/, and the models it fetches over the broker, "
            f"under {topic_root}/_models/. Every JSON payload has schema_version; consumers "
            "reject versions they do not know. Operations are the device's.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": _schemas(), "messages": messages},
    }


def _add_model_transfer(
    root: str, channels: dict[str, Any], operations: dict[str, Any], messages: dict[str, Any]
) -> None:
    """The two fleet-wide channels of a model published over the broker, retained, QoS 1."""
    meta, chunk = MODEL_META_CHANNEL, MODEL_CHUNK_CHANNEL
    messages[meta] = _message(ChunkedModelMeta, _ref(ChunkedModelMeta))
    messages[chunk] = {
        "name": "ModelChunk",
        "summary": "Raw bytes of one chunk: chunk_bytes long (the last chunk: the rest).",
        "contentType": "application/octet-stream",
        "payload": {"type": "string", "format": "binary"},
    }
    channels[meta] = _channel(
        model_meta_topic(root, "{sha256}"),
        meta,
        "Retained: how the model is cut, published after every chunk (its presence says they "
        f"are all there). Devices whose manifest URL is {MQTT_MODEL_URL} subscribe to "
        f"{model_transfer_topic(root, '{sha256}')}/# and receive this and every chunk, "
        "again after any reconnect: the retained messages are the resume.",
    )
    channels[chunk] = _channel(
        f"{model_transfer_topic(root, '{sha256}')}/{{index}}",
        chunk,
        "Retained: the model's bytes from index * chunk_bytes. An empty payload clears it.",
    )
    for key in (meta, chunk):
        operations[f"receive_{key}"] = _operation(key, "receive", qos=1, retain=True)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": SCHEMA_REF.format(model=model.__name__)}


def _summary(model: type[BaseModel]) -> str:
    return (model.__doc__ or model.__name__).strip().splitlines()[0]


def _message(
    model: type[BaseModel], payload: dict[str, Any], bindings: dict[str, Any] | None = None
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": model.__name__,
        "summary": _summary(model),
        "contentType": "application/json",
        "payload": payload,
    }
    if bindings:
        message["bindings"] = bindings
    return message


def _device_address(root: str, suffix: str) -> str:
    return f"{root}/{{device}}/{suffix}"


def _channel(address: str, key: str, description: str) -> dict[str, Any]:
    return {
        "address": address,
        "description": description,
        "parameters": {
            name: spec for name, spec in _PARAMETERS.items() if f"{{{name}}}" in address
        },
        "messages": {key: {"$ref": f"#/components/messages/{key}"}},
    }


def _mqtt_operation_bindings(qos: int, retain: bool) -> dict[str, Any]:
    return {"mqtt": {"qos": qos, "retain": retain, "bindingVersion": MQTT_BINDING_VERSION}}


def _operation(key: str, action: str, *, qos: int, retain: bool) -> dict[str, Any]:
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{key}"},
        "messages": [{"$ref": f"#/channels/{key}/messages/{key}"}],
        "bindings": _mqtt_operation_bindings(qos, retain),
    }


def _command_message(name: CommandName) -> dict[str, Any]:
    args = COMMAND_ARGS[name]
    payload = {
        "allOf": [
            _ref(CommandRequest),
            {"type": "object", "properties": {"args": _ref(args)}},
        ]
    }
    message = _message(CommandRequest, payload, _request_bindings())
    message["name"] = name.value
    message["title"] = f"{name.value} command"
    message["summary"] = f"A CommandRequest whose args are {args.__name__}: {_summary(args)}"
    return message


def _command_operation(key: str) -> dict[str, Any]:
    return {
        "action": "receive",
        "channel": {"$ref": f"#/channels/{key}"},
        "messages": [{"$ref": f"#/channels/{key}/messages/{key}"}],
        "reply": {
            "address": {
                "location": "$message.header#/responseTopic",
                "description": "The MQTT 5 response topic property; MQTT 3.1.1 clients put "
                "it in the payload's reply_to instead.",
            },
            "channel": {"$ref": f"#/channels/{REPLY_CHANNEL}"},
            "messages": [{"$ref": f"#/channels/{REPLY_CHANNEL}/messages/{REPLY_CHANNEL}"}],
        },
        "bindings": _mqtt_operation_bindings(1, False),
    }


def _correlation_data() -> dict[str, Any]:
    return {"type": "string", "description": "The request's id, UTF-8."}


def _request_bindings() -> dict[str, Any]:
    return {
        "mqtt": {
            "responseTopic": {"type": "string", "description": "Where to send the reply."},
            "correlationData": _correlation_data(),
            "bindingVersion": MQTT_BINDING_VERSION,
        }
    }


def _reply_bindings() -> dict[str, Any]:
    return {
        "mqtt": {"correlationData": _correlation_data(), "bindingVersion": MQTT_BINDING_VERSION}
    }


def _payload_models() -> list[type[BaseModel]]:
    models: list[type[BaseModel]] = [topic.model for topic in _TOPICS]
    models += [CommandRequest, CommandReply, Manifest, ChunkedModelMeta, *COMMAND_ARGS.values()]
    models += [SignedKeySet, KeySet]
    return list(dict.fromkeys(models))


def _schemas() -> dict[str, Any]:
    """Every payload model's JSON Schema by name, with the ``$defs`` of each hoisted beside it."""
    schemas: dict[str, Any] = {}
    for model in _payload_models():
        schema = model.model_json_schema(ref_template=SCHEMA_REF)
        found = {**schema.pop("$defs", {}), model.__name__: schema}
        for name, definition in found.items():
            if schemas.setdefault(name, definition) != definition:
                raise ValueError(f"two different schemas are both named {name!r}")
    return dict(sorted(schemas.items()))


def main(argv: list[str] | None = None) -> int:
    """Print the document as JSON (``python -m edgefleet.agent.asyncapi > docs/asyncapi.json``)."""
    parser = argparse.ArgumentParser(
        prog="python -m edgefleet.agent.asyncapi", description="Print the AsyncAPI document."
    )
    parser.add_argument("--topic-root", default=TOPIC_ROOT, help="default: %(default)s")
    args = parser.parse_args(argv)
    print(json.dumps(document(args.topic_root), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
