"""The published OpenAPI document of the controller's HTTP API: generated from the app,
current, and describing every error as the one error body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from conftest import REPO, Assets
from controller_db import health_message, reported_message, status_message
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from edgefleet.ops.cli import main
from edgefleet.ops.controller import registry
from edgefleet.ops.controller.api import ApiContext, Authenticator, create_app, openapi_document
from edgefleet.ops.controller.db import open_database
from edgefleet.ops.controller.registry import Received
from edgefleet.ops.controller.releases import ReleaseStore
from edgefleet.ops.controller.service import HttpServer, HttpSettings, hash_token

PUBLISHED = REPO / "docs" / "openapi.json"
REGENERATE = "edgefleet controller openapi --output docs/openapi.json"
ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}
MODEL = "mobilenet_v1_0.25_128_quant.tflite"
T0 = 1_800_000_000.0


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


# -- schemathesis: the served API against its own document ----------------------------------

TOKEN = "schemathesis-token"
EXAMPLES = 25  # per operation and mode


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, assets: Assets) -> Iterator[str]:
    """The API on a SQLite registry with two devices and a release, by base URL."""
    directory = tmp_path_factory.mktemp("schemathesis")
    database = open_database(directory / "controller.sqlite3")
    with database.session() as session:
        registry.record(
            session,
            [
                Received(status_message("cam1", T0), T0),
                Received(health_message("cam1", T0 + 1), T0 + 1),
                Received(reported_message("cam1", T0 + 2), T0 + 2),
            ],
        )
        registry.add_to_group(session, "shops", ["cam1"])
    store = ReleaseStore(directory / "store")
    store.put_artifact(assets.model(MODEL).read_bytes())
    authenticator = Authenticator(tokens={hash_token(TOKEN): "schemathesis"})
    app = create_app(ApiContext(database, store, authenticator))
    server = HttpServer(app, HttpSettings(host="127.0.0.1", port=0))
    server.start()
    yield server.url
    server.stop()
    database.close()


@pytest.fixture(scope="module")
def api_schema(served: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{served}/openapi.json")


def call_and_check(case: schemathesis.Case) -> None:
    """One generated request: no 500, the status, type and body as documented, bad input
    refused, and every error the one error body."""
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            negative_data_rejection,
        ],
    )
    if response.status_code >= 400 and case.method != "HEAD":
        assert set(response.json()) == {"code", "message"}, response.text


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_api_answers_as_its_document_says_never_500(
    api_schema: schemathesis.BaseSchema, mode: GenerationMode
) -> None:
    # schemathesis's own pytest integration (from_fixture) does not run on this pytest:
    # each operation's strategy is driven by hypothesis here instead.
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and operation.path.startswith("/artifacts/"):
            continue  # its one parameter is any string: no request is invalid

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            call_and_check(case)

        check()
