"""The wire contract as an AsyncAPI 3.0 document, generated from the models in ``protocol``.

``python -m edgefleet.agent.asyncapi > docs/asyncapi.json`` regenerates the published copy;
a test fails when that copy differs from :func:`document`. Operations are the device's: it
*sends* status, events, health and reported state, and *receives* commands (answering each
on the request's MQTT 5 response topic) and desired state. Payload schemas are the pydantic
models' JSON Schemas, their ``$defs`` hoisted into ``components.schemas``.

Pure: builds a dict, no I/O except in :func:`main`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .protocol import (
    COMMAND_ARGS,
    SCHEMA_VERSION,
    TOPIC_LEVEL_PATTERN,
    TOPIC_ROOT,
    CommandName,
    CommandReply,
    CommandRequest,
    DesiredState,
    EventMessage,
    HealthMessage,
    Manifest,
    ReportedState,
    StatusMessage,
)

ASYNCAPI_VERSION = "3.0.0"
MQTT_BINDING_VERSION = "0.2.0"
SCHEMA_REF = "#/components/schemas/{model}"
REPLY_CHANNEL = "cmd_reply"
_LEVEL = f"one topic level matching {TOPIC_LEVEL_PATTERN}"
_PARAMETERS = {
    "device": {"description": f"Device id: {_LEVEL}."},
    "stream": {"description": f"Stream (camera) name: {_LEVEL}."},
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
        channels[topic.key] = _channel(topic_root, topic.suffix, topic.key, topic.description)
        operations[f"{topic.action}_{topic.key}"] = _operation(topic)
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
            topic_root, f"cmd/{name.value}", key, f"The {name.value} command, in."
        )
        operations[f"receive_{key}"] = _command_operation(key)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "edgefleet device MQTT API",
            "version": str(SCHEMA_VERSION),
            "description": "What an edgefleet device publishes and answers, one subtree per "
            f"device under {topic_root}/<device>/. Every payload is JSON with schema_version; "
            "consumers reject versions they do not know. Operations are the device's.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": _schemas(), "messages": messages},
    }


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


def _channel(root: str, suffix: str, key: str, description: str) -> dict[str, Any]:
    address = f"{root}/{{device}}/{suffix}"
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


def _operation(topic: _Topic) -> dict[str, Any]:
    return {
        "action": topic.action,
        "channel": {"$ref": f"#/channels/{topic.key}"},
        "messages": [{"$ref": f"#/channels/{topic.key}/messages/{topic.key}"}],
        "bindings": _mqtt_operation_bindings(topic.qos, topic.retain),
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
    models += [CommandRequest, CommandReply, Manifest, *COMMAND_ARGS.values()]
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
