"""Fleet-wide commands: ``fan_out`` over a real Mosquitto to real agent processes, the
``POST /commands`` API on a real uvicorn over the registry (SQLite and PostgreSQL) that the
real ingest fills from those agents, and ``edgefleet cmd SELECTOR COMMAND`` against it.

The module shares one broker and four agents (the small classifier on a slow synthetic
pattern): cam-a, cam-b and cam-c answer; cam-gone ran once and was stopped, so the broker
holds its retained offline status and nothing answers for it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from agentproc import AgentProcess, wait_until
from broker import Mosquitto, MqttProbe, free_port
from conftest import Assets
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from edgefleet.agent.protocol import CommandName, CommandRequest, Topics
from edgefleet.ops.cli import main
from edgefleet.ops.controller import registry
from edgefleet.ops.controller.api import ApiContext, Authenticator, create_app
from edgefleet.ops.controller.db import Database, open_database
from edgefleet.ops.controller.fanout import (
    BAD_REPLY,
    BadCommandArgs,
    CommandAnswer,
    CommandsUnavailable,
    Outcome,
    fan_out,
)
from edgefleet.ops.controller.ingest import Ingest
from edgefleet.ops.controller.releases import ReleaseStore
from edgefleet.ops.controller.service import HttpServer, HttpSettings, hash_token
from edgefleet.ops.profile import OperatorProfile, ResolvedProfile

MODEL = "mobilenet_v1_0.25_128_quant.tflite"
STREAM = "cam"
ANSWERING = ("cam-a", "cam-b", "cam-c")
GONE = "cam-gone"
EVERY = (*ANSWERING, GONE)
TOKEN = "a-long-random-token-for-alice"
WAIT_S = 60.0
SHORT_S = 2.0  # the timeout of calls that wait for cam-gone


def plain(broker: Mosquitto) -> ResolvedProfile:
    """The test broker's plain listener."""
    return ResolvedProfile(OperatorProfile(host=broker.host, port=broker.port, insecure=True))


def agent_config(assets: Assets, device: str, port: int, workdir: Path) -> dict[str, Any]:
    """The small classifier on a slow, small test pattern: cheap enough for four."""
    return {
        "device_id": device,
        "broker": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 1},
        "streams": [
            {
                "name": STREAM,
                "source": {"type": "synthetic", "width": 160, "height": 120, "fps": 2},
                "model": {"path": str(assets.model(MODEL)), "threads": 1},
                "events": {"min_score": 0.99, "min_interval_s": 60},
            }
        ],
        "outbox": {"path": str(workdir / "outbox.sqlite3")},
        "updates": {"store_dir": str(workdir / "store"), "trusted_keys": []},
        "health": {"interval_s": 5},
    }


def wait_answering(broker: Mosquitto, devices: tuple[str, ...]) -> None:
    """Ping each device (reply_to in the payload) until it answers: a request sent before
    an agent subscribed is lost."""
    with MqttProbe(broker, timeout_s=WAIT_S) as probe:
        probe.subscribe("edgefleet/v1/+/reply/ready")
        deadline = time.monotonic() + WAIT_S
        for device in devices:
            topics = Topics(device)
            reply_to = f"{topics.base}/reply/ready"
            while not probe.messages(reply_to):
                assert time.monotonic() < deadline, f"{device} did not answer a ping"
                request = CommandRequest(id=uuid.uuid4().hex, expires_at=time.time() + 5,
                                         reply_to=reply_to)  # fmt: skip
                probe.publish(topics.command("ping"), request.model_dump_json())
                time.sleep(0.5)


@dataclass(frozen=True)
class Fleet:
    """The module's broker and its agents."""

    broker: Mosquitto
    agents: dict[str, AgentProcess]


@pytest.fixture(scope="module")
def fleet(
    assets: Assets, mosquitto_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fanout")
    with Mosquitto(workdir / "broker") as broker:
        agents = {
            device: AgentProcess(
                workdir / device, agent_config(assets, device, broker.port, workdir / device)
            ).start()
            for device in EVERY
        }
        try:
            wait_answering(broker, EVERY)
            assert agents[GONE].terminate() == 0  # its retained status: offline
            yield Fleet(broker, agents)
            for device in ANSWERING:
                process = agents[device].process
                assert process is not None
                assert process.poll() is None, f"{device} died:\n{agents[device].log()}"
        finally:
            for agent in agents.values():
                agent.kill()


# -- fan_out, without HTTP -------------------------------------------------------------------


def test_fan_out_answers_one_row_per_device_in_the_order_given(fleet: Fleet) -> None:
    rows = fan_out(plain(fleet.broker), ["cam-b", "nobody", "cam-a", "cam-b"], CommandName.PING,
                   {}, SHORT_S)  # fmt: skip

    assert [(r.device_id, r.outcome) for r in rows] == [
        ("cam-b", Outcome.OK),
        ("nobody", Outcome.NO_ANSWER),
        ("cam-a", Outcome.OK),
    ]
    assert all(r.result is not None and r.result["pong"] is True for r in rows if r.result)
    assert rows[1].message == f"no answer within {SHORT_S:g} s"
    assert rows[1].seconds >= SHORT_S - 0.01
    assert rows[0].seconds < rows[1].seconds


def test_each_device_answers_for_itself(fleet: Fleet) -> None:
    rows = fan_out(plain(fleet.broker), list(ANSWERING), CommandName.GET_STATUS, {}, WAIT_S)

    assert [r.outcome for r in rows] == [Outcome.OK] * 3
    assert [r.result["health"]["device_id"] for r in rows if r.result] == list(ANSWERING)


def test_a_device_that_says_no_is_an_error_row_with_its_code(fleet: Fleet) -> None:
    rows = fan_out(plain(fleet.broker), ["cam-a", "cam-c"], CommandName.RESTART_STREAM,
                   {"stream": "attic"}, WAIT_S)  # fmt: skip

    assert [(r.outcome, r.error) for r in rows] == [(Outcome.ERROR, "not_found")] * 2
    assert all("attic" in r.message for r in rows)


def test_a_reply_that_breaks_the_contract_is_a_bad_reply_row(fleet: Fleet) -> None:
    with MqttProbe(fleet.broker) as impostor, ThreadPoolExecutor(1) as pool:
        impostor.subscribe("edgefleet/v1/fake-1/cmd/+")
        sending = pool.submit(
            fan_out, plain(fleet.broker), ["fake-1", "cam-a"], CommandName.PING, {}, WAIT_S
        )
        request = CommandRequest.model_validate_json(
            impostor.wait_for_message("edgefleet/v1/fake-1/cmd/ping").payload
        )
        assert request.reply_to is not None
        impostor.publish(request.reply_to, b'{"ok": "perhaps"}')
        rows = sending.result(WAIT_S)

    assert (rows[0].outcome, rows[0].error) == (Outcome.ERROR, BAD_REPLY)
    assert "not a command reply" in rows[0].message
    assert rows[1].outcome is Outcome.OK


def test_args_the_device_would_refuse_are_refused_before_connecting(fleet: Fleet) -> None:
    unreachable = ResolvedProfile(OperatorProfile(host="127.0.0.1", port=free_port(),
                                                  insecure=True))  # fmt: skip

    with pytest.raises(BadCommandArgs, match="args for snapshot: stream: Field required"):
        fan_out(unreachable, ["cam-a"], CommandName.SNAPSHOT, {}, 1)
    with pytest.raises(CommandsUnavailable, match="cannot send ping to 1 device"):
        fan_out(unreachable, ["cam-a"], CommandName.PING, {}, 1)


# -- the API ---------------------------------------------------------------------------------


@pytest.fixture
def database(controller_db_url: str, fleet: Fleet) -> Iterator[Database]:
    """The registry as the real ingest fills it from the fleet; shops: cam-a and cam-b;
    hw=pi5: cam-a and cam-c."""
    with open_database(controller_db_url) as opened, Ingest(opened, plain(fleet.broker)):

        def everyone() -> bool:
            with opened.session() as session:
                views = {d.id: d.status for d in registry.list_devices(session)}
            return views == {**dict.fromkeys(ANSWERING, "online"), GONE: "offline"}

        wait_until(everyone, "every device's status in the registry", WAIT_S)
        with opened.session() as session:
            registry.add_to_group(session, "shops", ["cam-a", "cam-b"])
            registry.tag(session, "cam-a", "hw", "pi5")
            registry.tag(session, "cam-c", "hw", "pi5")
        yield opened


def serve(database: Database, broker: ResolvedProfile | None, tmp_path: Path) -> HttpServer:
    authenticator = Authenticator(tokens={hash_token(TOKEN): "alice"})
    context = ApiContext(database, ReleaseStore(tmp_path / "store"), authenticator, broker)
    server = HttpServer(create_app(context),
                        HttpSettings(host="127.0.0.1", port=0))  # fmt: skip
    server.start()
    return server


@pytest.fixture
def api(database: Database, fleet: Fleet, tmp_path: Path) -> Iterator[str]:
    server = serve(database, plain(fleet.broker), tmp_path)
    yield server.url
    server.stop()


@pytest.fixture
def http(api: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=api, headers=headers, timeout=WAIT_S + 30) as client:
        yield client


def command(http: httpx.Client, selector: list[str], name: str, **body: Any) -> CommandAnswer:
    response = http.post("/commands", json={"selector": selector, "name": name, **body})
    assert response.status_code == 200, response.text
    return CommandAnswer.model_validate(response.json())


def assert_error(response: httpx.Response, status: int, code: str, says: str = "") -> None:
    assert response.status_code == status, response.text
    assert set(response.json()) == {"code", "message"}
    assert response.json()["code"] == code
    assert says in response.json()["message"]


def test_a_group_is_pinged_one_row_per_device_by_id(http: httpx.Client) -> None:
    answer = command(http, ["group:shops"], "ping")

    assert (answer.name, answer.selector) == (CommandName.PING, ["group:shops"])
    assert [(r.device_id, r.outcome, r.status) for r in answer.devices] == [
        ("cam-a", Outcome.OK, "online"),
        ("cam-b", Outcome.OK, "online"),
    ]
    assert all(r.result is not None and r.result["uptime_s"] > 0 for r in answer.devices)


def test_selectors_unite_and_a_comma_intersects(http: httpx.Client) -> None:
    answer = command(http, ["group:shops,tag:hw=pi5", "device:cam-c"], "get_status")

    assert [r.device_id for r in answer.devices] == ["cam-a", "cam-c"]
    assert [r.result["health"]["device_id"] for r in answer.devices if r.result] == [
        "cam-a",
        "cam-c",
    ]


def test_an_offline_device_is_sent_to_and_its_row_says_since_when(
    http: httpx.Client, fleet: Fleet
) -> None:
    with MqttProbe(fleet.broker) as probe:
        probe.subscribe(f"{Topics(GONE).base}/cmd/#")
        answer = command(http, ["all"], "ping", timeout_s=SHORT_S)
        probe.wait_for_message(Topics(GONE).command("ping"))

    rows = {r.device_id: r for r in answer.devices}
    assert list(rows) == list(EVERY)
    assert [rows[d].outcome for d in ANSWERING] == [Outcome.OK] * 3
    gone = rows[GONE]
    assert (gone.outcome, gone.status, gone.result) == (Outcome.NO_ANSWER, "offline", None)
    assert gone.offline_since is not None
    assert gone.offline_since <= time.time()
    assert gone.seconds >= SHORT_S - 0.01
    assert all(rows[d].offline_since is None for d in ANSWERING)


def test_args_the_device_would_refuse_are_400_and_nothing_is_sent(
    http: httpx.Client, fleet: Fleet
) -> None:
    with MqttProbe(fleet.broker) as probe:
        probe.subscribe("edgefleet/v1/+/cmd/#")
        missing = http.post("/commands", json={"selector": ["all"], "name": "snapshot"})
        extra = http.post(
            "/commands", json={"selector": ["all"], "name": "ping", "args": {"stream": "cam"}}
        )
        nested = http.post("/commands", json={"selector": ["all"], "name": "set_config",
                                              "args": {"patch": {"a": "x" * 70_000}}})  # fmt: skip
        command(http, ["device:cam-b"], "ping")  # published after any the others sent

        sent = probe.wait_for_count(1)

    assert_error(missing, 400, "bad_command_args", "args for snapshot: stream: Field required")
    assert_error(extra, 400, "bad_command_args", "Extra inputs are not permitted")
    assert_error(nested, 400, "bad_command_args", "more than 65536")
    assert [m.topic for m in sent] == ["edgefleet/v1/cam-b/cmd/ping"]
    assert http.get("/audit").json()[0]["target"] == "device:cam-b"
    assert len(http.get("/audit").json()) == 1


@pytest.mark.parametrize(
    ("selector", "status", "code"),
    [
        ("device:nobody", 404, "unknown_device"),
        ("group:attic", 404, "unknown_group"),
        ("tag:hw=pi9", 400, "no_device_selected"),
        ("shelf", 400, "bad_selector"),
        ("group:shops,", 400, "bad_selector"),
    ],
)
def test_a_selector_that_selects_nothing_is_refused_and_not_audited(
    http: httpx.Client, selector: str, status: int, code: str
) -> None:
    response = http.post("/commands", json={"selector": [selector], "name": "ping"})

    assert_error(response, status, code)
    assert http.get("/audit").json() == []


@pytest.mark.parametrize(
    "body",
    [
        {"selector": [], "name": "ping"},
        {"selector": ["all"] * 33, "name": "ping"},
        {"selector": ["x" * 513], "name": "ping"},
        {"selector": ["all"], "name": "reboot"},
        {"selector": ["all"], "name": "ping", "timeout_s": 0.1},
        {"selector": ["all"], "name": "ping", "timeout_s": 121},
        {"selector": ["all"], "name": "ping", "args": []},
        {"selector": ["all"], "name": "ping", "colour": "red"},
        {"name": "ping"},
    ],
)
def test_a_body_that_does_not_validate_is_422(http: httpx.Client, body: dict[str, Any]) -> None:
    assert_error(http.post("/commands", json=body), 422, "invalid_request")


def test_a_command_is_audited_with_the_caller_before_it_is_sent(http: httpx.Client) -> None:
    command(http, ["group:shops", "tag:hw=pi5"], "restart_stream", args={"stream": STREAM})

    (entry,) = http.get("/audit").json()
    assert (entry["actor"], entry["action"], entry["target"]) == (
        "token:alice",
        "command",
        "group:shops tag:hw=pi5",
    )
    assert entry["details"] == {
        "name": "restart_stream",
        "args": {"stream": STREAM},
        "devices": 3,
        "online": 3,
        "offline": 0,
    }


def test_a_controller_without_a_broker_answers_503_and_audits_nothing(
    database: Database, tmp_path: Path
) -> None:
    server = serve(database, None, tmp_path)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            response = client.post("/commands", json={"selector": ["all"], "name": "ping"})
            audit = client.get("/audit").json()
    finally:
        server.stop()

    assert_error(response, 503, "commands_unavailable", "no broker")
    assert audit == []


def test_a_caller_without_a_token_is_401(api: str) -> None:
    response = httpx.post(f"{api}/commands", json={"selector": ["all"], "name": "ping"})

    assert_error(response, 401, "unauthenticated")


# -- edgefleet cmd SELECTOR ----------------------------------------------------------------


@pytest.fixture
def controller(api: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The CLI's options for the API, with alice's token in the environment."""
    monkeypatch.setenv("EDGEFLEET_TOKEN", TOKEN)
    return ["--controller", api]


def lines(text: str) -> list[list[str]]:
    return [line.split(maxsplit=2) for line in text.splitlines()]


def test_cmd_prints_one_row_per_device_and_exits_0_when_every_one_answered(
    controller: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["cmd", "group:shops", "ping", *controller])

    out = capsys.readouterr().out
    assert code == 0
    assert [row[:2] for row in lines(out)] == [["cam-a", "ok"], ["cam-b", "ok"]]
    assert all(row[2].startswith("pong, agent up ") for row in lines(out))


def test_cmd_exits_1_when_a_device_did_not_answer_and_says_since_when_it_is_offline(
    controller: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["cmd", "all", "get_config", "--timeout", str(SHORT_S), *controller])

    out, err = capsys.readouterr()
    assert code == 1
    rows = lines(out)
    assert [row[:2] for row in rows] == [
        ["cam-a", "ok"], ["cam-b", "ok"], ["cam-c", "ok"], [GONE, "no_answer"]
    ]  # fmt: skip
    assert rows[0][2] == f"device cam-a, streams: {STREAM}"
    assert rows[3][2].startswith(f"no answer in {SHORT_S:g} s; offline since 20")
    assert "1 of 4 devices did not carry out get_config" in err


def test_cmd_json_prints_the_controllers_answer(
    controller: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["cmd", "tag:hw=pi5", "restart_stream", "stream=attic", "--json", *controller])

    answer = CommandAnswer.model_validate(json.loads(capsys.readouterr().out))
    assert code == 1
    assert [(r.device_id, r.error) for r in answer.devices] == [
        ("cam-a", "not_found"),
        ("cam-c", "not_found"),
    ]


def test_cmd_snapshot_out_writes_one_jpeg_per_device_into_a_folder(
    controller: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = tmp_path / "shots"

    code = main(["cmd", "group:shops", "snapshot", f"stream={STREAM}", "--out", str(folder),
                 *controller])  # fmt: skip

    out = capsys.readouterr().out
    assert code == 0, out
    assert sorted(p.name for p in folder.iterdir()) == ["cam-a.jpg", "cam-b.jpg"]
    for path in folder.iterdir():
        with Image.open(path) as image:
            assert (image.format, image.size) == ("JPEG", (160, 120))
    assert "saved " in out
    assert str(folder / "cam-a.jpg") in out


def test_cmd_snapshot_out_a_file_with_a_selector_is_refused_before_sending(
    controller: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path, fleet: Fleet
) -> None:
    with MqttProbe(fleet.broker) as probe:
        probe.subscribe("edgefleet/v1/+/cmd/#")
        code = main(["cmd", "group:shops", "snapshot", f"stream={STREAM}", "--out",
                     str(tmp_path / "door.jpg"), *controller])  # fmt: skip
        command_code = main(["cmd", "device:cam-c", "ping", *controller])

        sent = probe.wait_for_count(1)

    assert code == 2
    assert "with a selector --out is a folder" in capsys.readouterr().err
    assert command_code == 0
    assert [m.topic for m in sent] == ["edgefleet/v1/cam-c/cmd/ping"]


def test_cmd_a_group_the_controller_does_not_know_exits_2(
    controller: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["cmd", "group:attic", "ping", *controller])

    assert code == 2
    assert "no group 'attic' (unknown_group, HTTP 404)" in capsys.readouterr().err


def test_cmd_a_device_id_still_goes_directly_over_the_broker(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["cmd", "cam-b", "ping", "--insecure", "--host", fleet.broker.host,
                 "--port", str(fleet.broker.port)])  # fmt: skip

    assert code == 0
    assert capsys.readouterr().out.startswith("cam-b ping: pong, agent up ")


# -- schemathesis: no input makes POST /commands fail ----------------------------------------


@pytest.fixture(scope="module")
def served_empty(tmp_path_factory: pytest.TempPathFactory, mosquitto_binary: Path) -> Iterator[str]:
    """The commands API with a broker and an empty registry: every request is answered
    without waiting on devices."""
    directory = tmp_path_factory.mktemp("schemathesis-commands")
    with (
        Mosquitto(directory / "broker") as broker,
        open_database(directory / "controller.sqlite3") as database,
    ):
        server = serve(database, plain(broker), directory)
        yield server.url
        server.stop()


def test_post_commands_answers_as_documented_never_500(served_empty: str) -> None:
    schema = schemathesis.openapi.from_url(f"{served_empty}/openapi.json")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        operation = schema["/commands"]["POST"]

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=50, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def check(case: schemathesis.Case) -> None:
            response = case.call(headers=headers, timeout=30)
            case.validate_response(response, checks=checks)
            if response.status_code >= 400:
                assert set(response.json()) == {"code", "message"}, response.text

        check()
