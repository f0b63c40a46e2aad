"""``edgefleet controller run --config FILE`` as a process, with a real Mosquitto and a SQLite
file: what devices publish shows in the API, SIGTERM ends it with exit 0; the config file's
errors name the file and the field; a registry writer that ended is restarted."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker import Mosquitto, MqttProbe
from controller_db import health_message, status_message
from controllerproc import TOKEN, WAIT_S, ControllerProcess, eventually, write_config

from edgefleet.agent.protocol import Topics
from edgefleet.ops.cli import main
from edgefleet.ops.controller.service import (
    ControllerConfig,
    ControllerConfigError,
    ControllerService,
    HttpServer,
    HttpSettings,
    ServiceError,
    hash_token,
    load_config,
    read_tokens,
)


@pytest.fixture
def controller(tmp_path: Path, broker: Mosquitto) -> Iterator[ControllerProcess]:
    running = ControllerProcess(write_config(tmp_path, broker))
    yield running
    running.close()


def test_a_devices_status_and_health_appear_in_the_api_and_sigterm_exits_0(
    controller: ControllerProcess, broker: Mosquitto
) -> None:
    topics = Topics("cam1")
    now = time.time()
    url = controller.url()
    with MqttProbe(broker) as probe:
        probe.publish(topics.status, status_message("cam1", now).model_dump_json(), retain=True)
        probe.publish(topics.health, health_message("cam1", now + 1).model_dump_json())

    def cam1_with_health() -> dict[str, Any] | None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        devices = httpx.get(f"{url}/devices", headers=headers, timeout=5).json()
        return next((d for d in devices if d["health_ts"] == now + 1), None)

    cam1 = eventually(cam1_with_health, "cam1's health in GET /devices")
    code = controller.stop()

    assert cam1["status"] == "online"
    assert cam1["streams"][0]["fps"] == 15.0
    assert code == 0, controller.stderr()


def test_the_api_refuses_a_caller_without_a_token(controller: ControllerProcess) -> None:
    response = httpx.get(f"{controller.url()}/devices", timeout=5)

    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"
    assert controller.stop() == 0


# -- the config file ---------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_files_folder(
    tmp_path: Path, broker: Mosquitto
) -> None:
    config = load_config(write_config(tmp_path, broker))

    assert config.database == str(tmp_path / "controller.sqlite3")
    assert config.releases_dir == tmp_path / "releases"
    assert config.http.tokens_file == tmp_path / "tokens.txt"
    assert read_tokens(tmp_path / "tokens.txt") == {hash_token(TOKEN): "tester"}


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"http": {"prot": 1}}, "http.prot: unknown field"),
        ({"http": {"port": 70000}}, "http.port"),
        ({"ingest": {"batch_max_messages": 0}}, "ingest.batch_max_messages"),
        ({"broker": {"host": "x", "colour": "red"}}, "broker.colour: unknown field"),
        ({"http": {"port": 0}}, "no way for a caller to authenticate"),
        ({"broker": "missing.yaml"}, "missing.yaml: no such profile file"),
        ({"broker": {"host": "x"}}, "broker: no TLS certificates"),
        (
            {"http": {"tls": {"certfile": "no.crt", "keyfile": "no.key"}, "tokens_file": "t"}},
            "http.tls: cannot load the certificate",
        ),
    ],
)
def test_a_config_that_does_not_hold_exits_2_naming_the_file_and_the_field(
    tmp_path: Path,
    broker: Mosquitto,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, Any],
    says: str,
) -> None:
    path = write_config(tmp_path, broker, overrides)

    code = main(["controller", "run", "--config", str(path)])

    error = capsys.readouterr().err
    assert code == 2
    assert says in error
    assert f"error: {path}: " in error


def test_a_tokens_file_holding_a_plain_token_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text(f"{TOKEN} tester\n")

    with pytest.raises(ControllerConfigError, match="line 1"):
        read_tokens(path)


def test_the_token_command_appends_a_hash_and_prints_the_token_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens.txt"

    assert main(["controller", "token", "ci-bot", "--tokens-file", str(path)]) == 0

    token = capsys.readouterr().out.strip()
    assert read_tokens(path) == {hash_token(token): "ci-bot"}
    assert token not in path.read_text()
    assert path.stat().st_mode & 0o077 == 0


# -- supervision -----------------------------------------------------------------------------


def test_a_registry_writer_that_ended_is_restarted_and_writes_again(
    tmp_path: Path, broker: Mosquitto
) -> None:
    config = load_config(write_config(tmp_path, broker, {"writer_restart_backoff_s": 0.01}))
    service = ControllerService(config)
    service.start()
    try:
        assert service.ingest is not None
        service.ingest.writer.stop()  # the thread ends, as after an unexpected error
        eventually(lambda: _supervised(service), "a restarted writer")
        now = time.time()
        with MqttProbe(broker) as probe:
            probe.publish(Topics("cam2").health, health_message("cam2", now).model_dump_json())
        stats = service.ingest.writer.wait_for(lambda s: s.written >= 1, WAIT_S)
    finally:
        service.stop()

    assert stats.written >= 1


def _supervised(service: ControllerService) -> bool | None:
    service.supervise()
    assert service.ingest is not None
    return True if service.ingest.writer.alive else None


def test_the_config_schema_describes_every_field() -> None:
    def undescribed(schema: dict[str, Any], where: str) -> list[str]:
        missing = []
        for name, field in schema.get("properties", {}).items():
            if "description" not in field:
                missing.append(f"{where}.{name}")
        return missing

    schema = ControllerConfig.model_json_schema()
    missing = undescribed(schema, "")
    for name, section in schema.get("$defs", {}).items():
        missing += undescribed(section, name)

    assert missing == []


# -- the HTTP server --------------------------------------------------------------------------


def test_the_http_server_stops_with_a_request_still_in_flight() -> None:
    in_flight = threading.Event()

    async def never_answers(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            in_flight.set()
            await asyncio.Event().wait()

    server = HttpServer(never_answers, HttpSettings(port=0, stop_timeout_s=0.2))
    server.start()
    request = threading.Thread(
        target=_request_ignoring_errors, args=(f"{server.url}/slow",), name="slow-request"
    )
    request.start()
    assert in_flight.wait(WAIT_S)

    server.stop()
    request.join(WAIT_S)

    assert not server.alive
    assert not request.is_alive()


def _request_ignoring_errors(url: str) -> None:
    with contextlib.suppress(httpx.HTTPError):
        httpx.get(url, timeout=WAIT_S)


def test_a_port_in_use_is_a_service_error_naming_it() -> None:
    first = HttpServer(_nothing, HttpSettings(port=0))
    first.start()
    port = int(first.url.rsplit(":", 1)[1])
    try:
        with pytest.raises(ServiceError, match=f"127.0.0.1:{port}"):
            HttpServer(_nothing, HttpSettings(port=port))
    finally:
        first.stop()


async def _nothing(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app never called."""
