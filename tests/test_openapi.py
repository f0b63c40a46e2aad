"""The published OpenAPI document of the controller's HTTP API: generated from the app,
current, and describing every error as the one error body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import REPO

from edgefleet.ops.cli import main
from edgefleet.ops.controller.api import openapi_document

PUBLISHED = REPO / "docs" / "openapi.json"
REGENERATE = "edgefleet controller openapi --output docs/openapi.json"
ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}


@pytest.fixture(scope="module")
def published() -> dict[str, Any]:
    """docs/openapi.json as committed."""
    loaded: dict[str, Any] = json.loads(PUBLISHED.read_text())
    return loaded


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield method, path, operation


def test_the_published_document_is_the_generated_one(published: dict[str, Any]) -> None:
    assert published == openapi_document(), f"docs/openapi.json is stale: run {REGENERATE}"


def test_the_command_prints_the_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["controller", "openapi"]) == 0

    assert json.loads(capsys.readouterr().out) == openapi_document()


def test_every_error_answer_is_documented_as_the_error_body(published: dict[str, Any]) -> None:
    for method, path, operation in operations(published):
        for status, answer in operation["responses"].items():
            if int(status) >= 400:
                schema = answer["content"]["application/json"]["schema"]
                assert schema == ERROR_BODY, f"{method} {path} {status}"
    assert "HTTPValidationError" not in published["components"]["schemas"]


def test_every_operation_but_the_artifacts_needs_a_token_or_a_client_certificate(
    published: dict[str, Any],
) -> None:
    schemes = published["components"]["securitySchemes"]

    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    assert schemes["mutualTLS"]["type"] == "mutualTLS"
    for method, path, operation in operations(published):
        if path.startswith("/artifacts/"):
            assert "security" not in operation, f"{method} {path}"
        else:
            assert operation["security"] == [{"HTTPBearer": []}, {"mutualTLS": []}], path
            assert "401" in operation["responses"], f"{method} {path}"


def test_operation_ids_are_unique(published: dict[str, Any]) -> None:
    found = [operation["operationId"] for _, _, operation in operations(published)]

    assert len(found) == len(set(found))


def test_the_api_serves_the_devices_groups_releases_and_audit(published: dict[str, Any]) -> None:
    assert set(published["paths"]) >= {
        "/devices",
        "/devices/{device_id}",
        "/devices/{device_id}/tags/{key}",
        "/groups",
        "/groups/{name}/devices/{device_id}",
        "/releases",
        "/releases/{release_id}",
        "/audit",
        "/artifacts/{sha256}",
    }
