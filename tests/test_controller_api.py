"""The controller's HTTP API against a real uvicorn on a free loopback port, read with httpx,
over the registry on SQLite and PostgreSQL: devices recorded from real protocol messages,
groups, tags, releases, the audit log; bearer tokens and client certificates; error bodies."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import Assets
from controller_db import health_message, reported_message, status_message

from edgefleet.ops.cli import main
from edgefleet.ops.controller import registry
from edgefleet.ops.controller.api import ApiContext, Authenticator, create_app, error_answer
from edgefleet.ops.controller.db import Database, open_database
from edgefleet.ops.controller.reconcile import UnknownRollout
from edgefleet.ops.controller.registry import Received
from edgefleet.ops.controller.releases import ReleaseStore
from edgefleet.ops.controller.rollouts import CommandRefused
from edgefleet.ops.controller.service import HttpServer, HttpSettings, HttpTls, hash_token
from edgefleet.ops.errors import BrokerError, Refused
from edgefleet.provisioning import generate_signing_key, pki
from edgefleet.runtime import EdgefleetError, EnvironmentProblem, SettingError

TOKEN = "a-long-random-token-for-alice"
T0 = 1_800_000_000.0
MODEL = "mobilenet_v1_0.25_128_quant.tflite"
ERROR_KEYS = {"code", "message"}


@pytest.fixture
def database(controller_db_url: str) -> Iterator[Database]:
    with open_database(controller_db_url) as opened:
        with opened.session() as session:
            registry.record(
                session,
                [
                    Received(status_message("cam1", T0), T0),
                    Received(health_message("cam1", T0 + 1, temperature_c=63.0), T0 + 1),
                    Received(reported_message("cam1", T0 + 2, version="3"), T0 + 2),
                    Received(status_message("cam2", T0), T0),
                    Received(status_message("cam2", T0 + 5, "offline", reason="shutdown"), T0),
                ],
            )
        yield opened


@pytest.fixture
def store(tmp_path: Path, assets: Assets) -> ReleaseStore:
    """A store with one signed release, mobilenet@1, made by the operator's command."""
    key, _ = generate_signing_key(tmp_path / "keys", "release")
    store = tmp_path / "store"
    argv = [
        "release", "create", str(assets.model(MODEL)), "--model-id", "mobilenet",
        "--version", "1", "--store", str(store), "--key", str(key),
        "--url-base", "https://controller.lan:8443",
    ]  # fmt: skip
    assert main(argv) == 0
    return ReleaseStore(store)


def serve(
    database: Database,
    store: ReleaseStore,
    authenticator: Authenticator,
    tls: HttpTls | None = None,
) -> HttpServer:
    app = create_app(ApiContext(database, store, authenticator))
    server = HttpServer(app, HttpSettings(host="127.0.0.1", port=0, tls=tls))
    server.start()
    return server


@pytest.fixture
def api(database: Database, store: ReleaseStore) -> Iterator[str]:
    """The API with bearer tokens (alice's), by base URL."""
    server = serve(database, store, Authenticator(tokens={hash_token(TOKEN): "alice"}))
    yield server.url
    server.stop()


@pytest.fixture
def http(api: str) -> Iterator[httpx.Client]:
    """A client presenting alice's token."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=api, headers=headers, timeout=10) as client:
        yield client


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [device["id"] for device in response.json()]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert set(response.json()) == ERROR_KEYS
    assert response.json()["code"] == code
    assert response.json()["message"]


# -- devices ---------------------------------------------------------------------------------


def test_devices_lists_what_the_devices_messages_recorded(http: httpx.Client) -> None:
    response = http.get("/devices")

    assert ids(response) == ["cam1", "cam2"]
    cam1 = response.json()[0]
    assert cam1["states"] == ["online"]
    assert cam1["temperature_c"] == 63.0
    assert [(s["stream"], s["model_id"], s["model_version"]) for s in cam1["streams"]] == [
        ("door", "ssd", "3")
    ]


def test_devices_filters_by_state(http: httpx.Client) -> None:
    assert ids(http.get("/devices", params={"state": "offline"})) == ["cam2"]
    assert ids(http.get("/devices", params={"state": "online"})) == ["cam1"]


def test_several_selectors_unite_and_a_comma_intersects(http: httpx.Client) -> None:
    http.put("/devices/cam2/tags/hw", json={"value": "pi5"}).raise_for_status()

    united = http.get("/devices", params={"selector": ["device:cam1", "tag:hw=pi5"]})
    intersected = http.get("/devices", params={"selector": "device:cam1,tag:hw=pi5"})

    assert ids(united) == ["cam1", "cam2"]
    assert ids(intersected) == []


def test_one_device_is_shown_by_id(http: httpx.Client) -> None:
    response = http.get("/devices/cam2")

    assert response.status_code == 200
    assert response.json()["status"] == "offline"
    assert response.json()["status_reason"] == "shutdown"


def test_a_device_never_heard_from_is_404_unknown_device(http: httpx.Client) -> None:
    assert_error(http.get("/devices/cam9"), 404, "unknown_device")


# -- tags, groups and the audit log ------------------------------------------------------------


def test_a_tag_set_and_removed_is_audited_with_the_callers_identity(http: httpx.Client) -> None:
    tagged = http.put("/devices/cam1/tags/hw", json={"value": "pi5"})
    untagged = http.delete("/devices/cam1/tags/hw")
    audit = http.get("/audit").json()

    assert tagged.json()["tags"] == {"hw": "pi5"}
    assert untagged.json()["tags"] == {}
    assert [(e["actor"], e["action"], e["target"], e["details"]) for e in audit] == [
        ("token:alice", "untag", "device:cam1", {"key": "hw"}),
        ("token:alice", "tag", "device:cam1", {"key": "hw", "value": "pi5"}),
    ]


def test_a_write_is_committed_before_its_answer_is_sent(
    http: httpx.Client, database: Database
) -> None:
    for value in ("a", "b", "c", "d", "e"):
        http.put("/devices/cam1/tags/hw", json={"value": value}).raise_for_status()

        with database.session() as session:
            assert registry.show_device(session, "cam1").tags == {"hw": value}


def test_removing_a_tag_the_device_does_not_have_is_404_and_not_audited(
    http: httpx.Client,
) -> None:
    assert_error(http.delete("/devices/cam1/tags/hw"), 404, "unknown_tag")
    assert http.get("/audit").json() == []


def test_a_device_put_in_a_group_is_selected_by_it_until_taken_out(http: httpx.Client) -> None:
    added = http.put("/groups/shops/devices/cam1")
    selected = http.get("/devices", params={"selector": "group:shops"})
    removed = http.delete("/groups/shops/devices/cam1")

    assert added.json() == {"name": "shops", "devices": ["cam1"]}
    assert ids(selected) == ["cam1"]
    assert removed.json() == {"name": "shops", "devices": []}
    assert http.get("/groups").json() == [{"name": "shops", "devices": []}]
    actions = [(e["action"], e["target"]) for e in http.get("/audit").json()]
    assert actions == [("group.remove", "group:shops"), ("group.add", "group:shops")]


def test_a_failed_write_changes_nothing_and_records_no_audit_entry(http: httpx.Client) -> None:
    assert_error(http.put("/groups/shops/devices/cam9"), 404, "unknown_device")

    assert http.get("/groups").json() == []
    assert http.get("/audit").json() == []


# -- releases and artifacts -------------------------------------------------------------------


def test_releases_are_listed_and_shown_with_their_signed_manifest(
    http: httpx.Client, store: ReleaseStore
) -> None:
    (release,) = store.releases()

    listed = http.get("/releases").json()
    shown = http.get("/releases/mobilenet@1").json()

    assert [r["id"] for r in listed] == ["mobilenet@1"]
    assert shown["sha256"] == release.sha256
    assert shown["artifact"] == f"/artifacts/{release.sha256}"
    assert shown["manifest"] == release.manifest.model_dump(mode="json")


@pytest.mark.parametrize("release_id", ["mobilenet@2", "not-a-release-id"])
def test_a_release_not_stored_is_404_unknown_release(http: httpx.Client, release_id: str) -> None:
    assert_error(http.get(f"/releases/{release_id}"), 404, "unknown_release")


def test_artifacts_are_served_without_credentials(api: str, store: ReleaseStore) -> None:
    (release,) = store.releases()

    response = httpx.get(f"{api}/artifacts/{release.sha256}", headers={"Range": "bytes=0-9"})

    assert response.status_code == 206
    path = store.artifact_path(release.sha256)
    assert path is not None
    assert response.content == path.read_bytes()[:10]


# -- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-the-token"}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["none", "wrong token", "not bearer"],
)
def test_a_request_without_a_valid_token_is_401_and_changes_nothing(
    api: str, http: httpx.Client, headers: dict[str, str]
) -> None:
    with httpx.Client(base_url=api, headers=headers) as stranger:
        listing = stranger.get("/devices")
        write = stranger.put("/devices/cam1/tags/hw", json={"value": "pi5"})

    assert_error(listing, 401, "unauthenticated")
    assert_error(write, 401, "unauthenticated")
    assert listing.headers["www-authenticate"] == "Bearer"
    assert http.get("/devices/cam1").json()["tags"] == {}


@dataclass(frozen=True)
class Pki:
    """An operator CA, the API's server certificate, and client certificates."""

    directory: Path

    def pair(self, name: str) -> tuple[str, str]:
        return str(self.directory / f"{name}.crt"), str(self.directory / f"{name}.key")


def _issue(directory: Path, ca: pki.Issued, name: str, **kwargs: object) -> None:
    key = pki.generate_key()
    certificate = pki.issue_certificate(ca, key.public_key(), name, days=2, **kwargs)  # type: ignore[arg-type]
    pki.write_private_key(directory / f"{name}.key", key)
    pki.write_certificate(directory / f"{name}.crt", certificate)


@pytest.fixture
def certificates(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    operators = pki.create_ca("edgefleet operators", days=3)
    stranger = pki.create_ca("somebody else", days=3)
    pki.write_certificate(directory / "operator-ca.crt", operators.certificate)
    _issue(directory, operators, "api", server_names=["127.0.0.1"], client=False)
    _issue(directory, operators, "controller-ops")
    (directory / "stranger").mkdir()
    _issue(directory / "stranger", stranger, "controller-ops")
    return Pki(directory)


@pytest.fixture
def mtls_api(database: Database, store: ReleaseStore, certificates: Pki) -> Iterator[str]:
    """The API under mTLS (client certificates of the operator CA required), by base URL."""
    certfile, keyfile = certificates.pair("api")
    tls = HttpTls(
        certfile=Path(certfile),
        keyfile=Path(keyfile),
        client_cafile=certificates.directory / "operator-ca.crt",
    )
    server = serve(database, store, Authenticator(client_certificates=True), tls)
    yield server.url
    server.stop()


def client_context(certificates: Pki, pair: tuple[str, str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificates.directory / "operator-ca.crt"))
    if pair is not None:
        context.load_cert_chain(*pair)
    return context


def test_under_mtls_the_client_certificates_common_name_is_the_caller(
    mtls_api: str, certificates: Pki
) -> None:
    context = client_context(certificates, certificates.pair("controller-ops"))
    with httpx.Client(base_url=mtls_api, verify=context) as client:
        listing = client.get("/devices")
        client.put("/devices/cam1/tags/site", json={"value": "north"}).raise_for_status()
        audit = client.get("/audit").json()

    assert ids(listing) == ["cam1", "cam2"]
    assert [(e["actor"], e["action"]) for e in audit] == [("cert:controller-ops", "tag")]


@pytest.mark.parametrize("who", ["none", "stranger"])
def test_under_mtls_a_connection_without_an_operator_certificate_is_refused(
    mtls_api: str, certificates: Pki, who: str
) -> None:
    pair = None
    if who == "stranger":
        pair = (
            str(certificates.directory / "stranger" / "controller-ops.crt"),
            str(certificates.directory / "stranger" / "controller-ops.key"),
        )
    context = client_context(certificates, pair)
    with (
        httpx.Client(base_url=mtls_api, verify=context) as client,
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
    ):
        client.get("/devices")


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("GET", "/devices", {"params": {"selector": "shops"}}, 400, "bad_selector"),
        ("GET", "/devices", {"params": {"selector": "group:nosuch"}}, 404, "unknown_group"),
        ("GET", "/devices", {"params": {"state": "asleep"}}, 422, "invalid_request"),
        ("GET", "/audit", {"params": {"limit": "0"}}, 422, "invalid_request"),
        ("PUT", "/devices/cam1/tags/hw", {"json": {"value": "a,b"}}, 422, "invalid_request"),
        ("PUT", "/devices/cam1/tags/hw", {"json": {"value": "x", "y": 1}}, 422, "invalid_request"),
        ("PUT", "/devices/cam1/tags/hw", {"content": b"{not json"}, 422, "invalid_request"),
        ("PUT", "/devices/cam1/tags/-bad", {"json": {"value": "x"}}, 400, "bad_name"),
        ("PUT", "/groups/-bad/devices/cam1", {}, 400, "bad_name"),
        ("DELETE", "/groups/nosuch/devices/cam1", {}, 404, "unknown_group"),
        ("GET", "/releases", {"params": {"model_id": "../etc"}}, 400, "bad_input"),
        ("GET", "/nowhere", {}, 404, "not_found"),
        ("POST", "/devices", {}, 405, "method_not_allowed"),
    ],
)
def test_bad_input_is_a_4xx_with_the_error_body(
    http: httpx.Client,
    method: str,
    path: str,
    kwargs: dict[str, object],
    status: int,
    code: str,
) -> None:
    response = http.request(method, path, **kwargs)  # type: ignore[arg-type]

    assert_error(response, status, code)


@pytest.mark.parametrize(
    ("error", "answer"),
    [
        (registry.UnknownDevice("x"), (404, "unknown_device")),
        (UnknownRollout("x"), (404, "unknown_rollout")),
        (registry.BadSelector("x"), (400, "bad_selector")),
        (SettingError("x"), (400, "bad_input")),
        (CommandRefused("x"), (409, "command_refused")),
        (Refused("x"), (409, "refused")),
        (BrokerError("x"), (503, "broker_error")),
        (EnvironmentProblem("x"), (503, "unavailable")),
    ],
)
def test_the_controllers_errors_answer_with_their_class_as_the_code(
    error: EdgefleetError, answer: tuple[int, str]
) -> None:
    assert error_answer(error) == answer


# -- the operator's commands: edgefleet devices and edgefleet audit ----------------------------


Cli = Callable[..., int]


@pytest.fixture
def cli(api: str, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``edgefleet ARGS`` against the API, with alice's token in the environment."""
    monkeypatch.setenv("EDGEFLEET_TOKEN", TOKEN)

    def run(*argv: str) -> int:
        return main([*argv, "--controller", api])

    return run


def test_devices_list_prints_one_row_per_device_with_its_state_model_and_health(
    cli: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("devices", "list") == 0

    header, cam1, cam2 = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["DEVICE", "STATE", "SEEN", "AGENT", "MODELS"]
    assert cam1.split()[:2] == ["cam1", "online"]
    assert {"door=ssd@3", "63C", "15.0"} <= set(cam1.split())
    assert cam2.split()[:2] == ["cam2", "offline"]


def test_devices_list_filters_by_state_and_selector_and_says_when_none_match(
    cli: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("devices", "list", "--state", "offline") == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["cam2"]
    assert cli("devices", "list", "device:cam1", "--json") == 0
    assert [d["id"] for d in json.loads(capsys.readouterr().out)] == ["cam1"]
    assert cli("devices", "list", "device:cam1", "--state", "offline") == 0
    assert capsys.readouterr().out == "no devices in device:cam1 are offline\n"


def test_devices_show_prints_status_health_and_each_streams_model(
    cli: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("devices", "show", "cam1") == 0

    shown = capsys.readouterr().out
    assert "device         cam1  (online)" in shown
    assert "health         63.0 C throttled, cpu 40%, rss 110 MiB" in shown
    assert "stream door     ssd v3 (aaaaaaaaaaaa) on litert 2.3.0, cpu" in shown
    assert "  running, 15.0 fps, p50 21 ms, p99 35 ms, 890 frames, 0 failed" in shown


def test_devices_show_of_an_unknown_device_is_exit_2_naming_it(
    cli: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("devices", "show", "cam9") == 2

    assert "cam9" in capsys.readouterr().err


def test_devices_tag_and_untag_change_the_registry_and_the_audit_log_names_the_caller(
    cli: Cli, http: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("devices", "tag", "cam1", "site=shop12", "floor=2") == 0
    assert cli("devices", "untag", "cam1", "floor") == 0

    assert http.get("/devices/cam1").json()["tags"] == {"site": "shop12"}
    printed = capsys.readouterr().out
    assert "tagged cam1: site=shop12, floor=2" in printed
    assert "untagged cam1: floor" in printed
    assert cli("audit") == 0
    rows = [line.split()[3:7] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [
        ["token:alice", "tag", "device:cam1", "key=site"],
        ["token:alice", "tag", "device:cam1", "key=floor"],
        ["token:alice", "untag", "device:cam1", "key=floor"],
    ]


def test_a_tag_change_that_fails_names_the_ones_already_made(
    cli: Cli, http: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("devices", "tag", "cam1", "site=shop12", "floor=two words") == 2

    error = capsys.readouterr().err
    assert "(already done: site=shop12)" in error
    assert http.get("/devices/cam1").json()["tags"] == {"site": "shop12"}


def test_a_tag_without_a_value_is_refused_before_any_call(
    cli: Cli, http: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli("devices", "tag", "cam1", "site")

    assert exited.value.code == 2
    assert "'site' is not KEY=VALUE" in capsys.readouterr().err
    assert http.get("/audit").json() == []


def test_devices_group_add_and_remove_and_groups_lists_them(
    cli: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("devices", "group", "add", "shops", "cam1", "cam2") == 0
    assert cli("devices", "list", "group:shops", "--json") == 0
    capsys.readouterr()
    assert cli("devices", "group", "remove", "shops", "cam2") == 0
    assert cli("devices", "groups") == 0

    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "removed from group shops: cam2"
    assert printed[2].split() == ["shops", "1", "cam1"]


def test_adding_an_unknown_device_to_a_group_is_exit_2_and_audits_nothing(
    cli: Cli, http: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("devices", "group", "add", "shops", "cam9") == 2

    assert "cam9" in capsys.readouterr().err
    assert http.get("/audit").json() == []


def test_audit_limit_shows_the_newest_entries(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("devices", "tag", "cam1", "a=1", "b=2", "c=3") == 0
    capsys.readouterr()
    assert cli("audit", "--limit", "2") == 0

    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[6] for row in rows] == ["key=b", "key=c"]
