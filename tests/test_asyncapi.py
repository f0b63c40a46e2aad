"""The published AsyncAPI document: generated from the protocol models, complete, and current."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import REPO

from edgefleet.agent.asyncapi import document
from edgefleet.agent.protocol import (
    TOPIC_ROOT,
    CommandName,
    Topics,
    model_meta_topic,
    model_transfer_topic,
)

PUBLISHED = REPO / "docs" / "asyncapi.json"
REGENERATE = "python -m edgefleet.agent.asyncapi > docs/asyncapi.json"


@pytest.fixture(scope="module")
def published() -> dict[str, Any]:
    """docs/asyncapi.json as committed."""
    loaded: dict[str, Any] = json.loads(PUBLISHED.read_text())
    return loaded


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(doc: dict[str, Any], ref: str) -> object:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: object = doc
    for escaped in ref[2:].split("/"):
        part = escaped.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), f"{ref}: {part!r} is inside a non-object"
        assert part in node, f"{ref} does not resolve: no {part!r}"
        node = node[part]
    return node


def test_the_published_document_is_the_generated_one(published: dict[str, Any]) -> None:
    assert published == document(), f"docs/asyncapi.json is stale: run {REGENERATE}"


def test_every_ref_in_the_published_document_resolves(published: dict[str, Any]) -> None:
    refs = set(_refs(published))

    assert len(refs) > 20
    for ref in refs:
        _resolve(published, ref)


def test_every_command_has_its_topic_arguments_and_reply(published: dict[str, Any]) -> None:
    for name in CommandName:
        key = f"cmd_{name.value}"
        channel = published["channels"][key]
        operation = published["operations"][f"receive_{key}"]
        message = published["components"]["messages"][key]

        assert channel["address"] == Topics("{device}").command(name.value)
        assert message["name"] == name.value
        assert _resolve(published, message["payload"]["allOf"][1]["properties"]["args"]["$ref"])
        assert operation["reply"]["channel"] == {"$ref": "#/channels/cmd_reply"}


def test_the_device_topics_are_addressed_as_the_protocol_names_them(
    published: dict[str, Any],
) -> None:
    topics = Topics("{device}")
    addresses = {key: channel["address"] for key, channel in published["channels"].items()}

    assert addresses["status"] == topics.status
    assert addresses["events"] == topics.events("{stream}")
    assert addresses["health"] == topics.health
    assert addresses["desired"] == topics.desired
    assert addresses["reported"] == topics.reported


def test_the_model_transfer_topics_are_addressed_as_the_protocol_names_them(
    published: dict[str, Any],
) -> None:
    channels = published["channels"]

    assert channels["model_meta"]["address"] == model_meta_topic(TOPIC_ROOT, "{sha256}")
    assert channels["model_chunk"]["address"] == (
        f"{model_transfer_topic(TOPIC_ROOT, '{sha256}')}/{{index}}"
    )
    assert set(channels["model_chunk"]["parameters"]) == {"sha256", "index"}


def test_the_device_receives_the_model_meta_as_json_and_chunks_as_raw_bytes_retained(
    published: dict[str, Any],
) -> None:
    messages = published["components"]["messages"]
    operations = published["operations"]

    assert (
        _resolve(published, messages["model_meta"]["payload"]["$ref"])
        == (published["components"]["schemas"]["ChunkedModelMeta"])
    )
    assert messages["model_chunk"]["contentType"] == "application/octet-stream"
    for key in ("model_meta", "model_chunk"):
        assert operations[f"receive_{key}"]["action"] == "receive"
        assert operations[f"receive_{key}"]["bindings"]["mqtt"]["retain"] is True


def test_schemas_carry_no_nested_defs(published: dict[str, Any]) -> None:
    schemas = published["components"]["schemas"]

    assert {"Manifest", "SignedManifest", "CommandRequest", "CommandReply"} <= schemas.keys()
    assert "$defs" not in json.dumps(schemas)


def test_another_topic_root_moves_every_address() -> None:
    channels = document("acme/v1")["channels"]

    addresses = [c["address"] for c in channels.values() if c["address"] is not None]
    models = model_transfer_topic("acme/v1", "{sha256}")
    assert addresses
    trust = "acme/v1/_trust/"
    assert all(a.startswith(("acme/v1/{device}/", f"{models}/", trust)) for a in addresses)
    assert any(a.startswith(f"{models}/") for a in addresses)
