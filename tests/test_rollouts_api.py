"""Rollouts through the controller's HTTP API and ``edgefleet rollout``: a real uvicorn on a
free loopback port over the registry on SQLite and PostgreSQL, releases made by the
operator's own ``release create`` with a real key, devices recorded from real protocol
messages, the CLI run as a person runs it (a bearer token in the environment).

The engine's decisions are test_rollouts.py's and test_rollout_runner.py's; here: what the
operator's side signs, what the API stores and refuses, and what the commands print."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import Assets
from fleet import variant

from edgefleet.agent.protocol import ModelRef, ReportedState, SignedManifest, StatusMessage
from edgefleet.ops.cli import main
from edgefleet.ops.controller import registry
from edgefleet.ops.controller.api import ApiContext, Authenticator, create_app
from edgefleet.ops.controller.db import Database, open_database
from edgefleet.ops.controller.releases import Release, ReleaseStore
from edgefleet.ops.controller.rollout_tables import RolloutRow
from edgefleet.ops.controller.service import HttpServer, HttpSettings, hash_token
from edgefleet.provisioning import TrustedKeys, generate_signing_key, load_private_key

TOKEN = "a-long-random-token-for-alice"
MODEL = "mobilenet_v1_0.25_128_quant.tflite"
STREAM = "door"
DEVICES = ("cam1", "cam2", "cam3")
T0 = 1_800_000_000.0
ERROR_KEYS = {"code", "message"}


@dataclass
class Fleet:
    """The API's URL, the release key, the store, and an authenticated client."""

    url: str
    key: Path
    store: ReleaseStore
    database: Database
    http: httpx.Client
    tmp: Path

    def release(self, version: int) -> Release:
        return self.store.get(f"mobilenet@{version}")

    def cli(self, *argv: str) -> int:
        return main([*argv, "--controller", self.url])


@pytest.fixture
def fleet(
    tmp_path: Path, assets: Assets, controller_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Fleet]:
    key, _ = generate_signing_key(tmp_path / "keys", "release")
    store_dir = tmp_path / "store"
    model = assets.model(MODEL)
    rebuilt = tmp_path / "v2.tflite"
    rebuilt.write_bytes(variant(model.read_bytes(), 16))
    for version, path in ((1, model), (2, rebuilt)):
        argv = [
            "release", "create", str(path), "--model-id", "mobilenet", "--version",
            str(version), "--store", str(store_dir), "--key", str(key),
            "--url-base", "http://controller.lan:8080",
        ]  # fmt: skip
        assert main(argv) == 0
    store = ReleaseStore(store_dir)
    monkeypatch.setenv("EDGEFLEET_TOKEN", TOKEN)
    with open_database(controller_db_url) as database:
        running(database, DEVICES, store.get("mobilenet@1"))
        app = create_app(
            ApiContext(database, store, Authenticator(tokens={hash_token(TOKEN): "alice"}))
        )
        server = HttpServer(app, HttpSettings(host="127.0.0.1", port=0))
        server.start()
        headers = {"Authorization": f"Bearer {TOKEN}"}
        try:
            with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
                yield Fleet(server.url, key, store, database, http, tmp_path)
        finally:
            server.stop()


def running(database: Database, devices: tuple[str, ...], release: Release, at: float = T0) -> None:
    """Each device says, at ``at``, it is online and runs ``release`` on the stream."""
    ref = ModelRef(
        id=release.model_id, version=str(release.version), sha256=release.sha256,
        task="classification", backend="litert 2.3.0", delegate="cpu",
    )  # fmt: skip
    received = []
    for device in devices:
        status = StatusMessage(
            state="online", device_id=device, ts=at, agent_version="0.1.0", models=[ref],
            streams=[STREAM],
        )  # fmt: skip
        reported = ReportedState(
            device_id=device, ts=at + 1, agent_version="0.1.0", desired_revision=0,
            models={STREAM: ref},
        )  # fmt: skip
        received += [registry.Received(status, at), registry.Received(reported, at + 1)]
    with database.session() as session:
        registry.record(session, received)


def start(fleet: Fleet, *extra: str) -> int:
    return fleet.cli(
        "rollout", "start", "mobilenet@2", "--to", "all", "--stream", STREAM,
        "--waves", "1,100%", "--soak", "10m", "--release-key", str(fleet.key), *extra,
    )  # fmt: skip


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert set(response.json()) == ERROR_KEYS
    assert response.json()["code"] == code
    assert response.json()["message"]


# -- start -----------------------------------------------------------------------------------


def test_rollout_start_signs_the_way_back_to_what_the_devices_run_and_the_controller_stores_it(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert start(fleet, "--id", "r1", "--deadline", "2h") == 0

    printed = capsys.readouterr().out
    assert "started rollout r1: release mobilenet@2 to 3 devices, stream door" in printed
    assert "rollback       to mobilenet@1" in printed
    shown = fleet.http.get("/rollouts/r1").json()
    assert (shown["status"], shown["devices"], shown["waves"]) == ("running", 3, "1,100%")
    assert shown["created_by"] == "token:alice"
    with fleet.database.session() as session:
        stored = session.get(RolloutRow, "r1")
        assert stored is not None
        rollback = SignedManifest.model_validate(stored.rollback_manifest)
        plan = stored.plan
    old, new = fleet.release(1), fleet.release(2)
    # signed by the operator's key, on the operator's side
    terms = TrustedKeys([load_private_key(fleet.key).public_key()]).verify(rollback)
    assert (terms.model_id, terms.version, terms.sha256) == ("mobilenet", 1, old.sha256)
    assert terms.rollback_from is not None
    assert (terms.rollback_from.version, terms.rollback_from.sha256) == (2, new.sha256)
    assert terms.expires_at >= plan["deadline"] + 86_400 - 5  # the deadline plus a day
    assert plan["gates"]["min_soak_s"] == 600
    audit = fleet.http.get("/audit").json()
    assert [(e["actor"], e["action"]) for e in audit][:1] == [("token:alice", "rollout.start")]


def test_devices_on_different_models_have_no_single_way_back_and_are_named(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    running(fleet.database, ("cam3",), fleet.release(2), at=T0 + 10)

    assert start(fleet) == 3

    error = capsys.readouterr().err
    assert "do not all run one model on stream door" in error
    assert "cam1, cam2: mobilenet v1" in error
    assert "cam3: mobilenet v2" in error
    assert "--rollback-to" in error
    assert fleet.http.get("/rollouts").json() == []


def test_rollback_to_names_the_way_back_when_the_devices_differ(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    running(fleet.database, ("cam3",), fleet.release(2), at=T0 + 10)

    assert start(fleet, "--to", "device:cam1", "--rollback-to", "mobilenet@1", "--json") == 0

    answer = json.loads(capsys.readouterr().out)
    assert answer["release_id"] == "mobilenet@2"
    assert answer["devices"] == 4 - 1  # all (3) united with device:cam1


def test_a_selector_matching_no_device_is_refused_before_anything_is_signed(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    sequences = fleet.key.with_name("sequences.json")
    before = sequences.read_text() if sequences.exists() else None
    code = fleet.cli(
        "rollout", "start", "mobilenet@2", "--to", "tag:site=nowhere", "--stream", STREAM,
        "--waves", "100%", "--release-key", str(fleet.key),
    )  # fmt: skip

    assert code == 2
    assert "no device matches tag:site=nowhere" in capsys.readouterr().err
    assert (sequences.read_text() if sequences.exists() else None) == before


def test_a_release_the_operators_key_did_not_sign_is_refused(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    other, _ = generate_signing_key(fleet.tmp / "other-keys", "release")

    code = fleet.cli(
        "rollout", "start", "mobilenet@2", "--to", "all", "--stream", STREAM, "--waves",
        "100%", "--release-key", str(other),
    )  # fmt: skip

    assert code == 3
    assert "the manifest of release mobilenet@2 from the controller does not verify" in (
        capsys.readouterr().err
    )
    assert fleet.http.get("/rollouts").json() == []


def test_the_api_refuses_a_rollback_manifest_that_does_not_step_back_from_the_release(
    fleet: Fleet,
) -> None:
    body = {
        "release_id": "mobilenet@2", "selector": ["all"], "stream": STREAM, "waves": "100%",
        "rollback_release_id": "mobilenet@1",
        # the release's own manifest: signed, but not a rollback from it
        "rollback_manifest": fleet.release(1).manifest.model_dump(mode="json"),
    }  # fmt: skip

    answer = fleet.http.post("/rollouts", json=body)

    assert_error(answer, 400, "rollout_manifest_error")
    assert "rolls back from no release" in answer.json()["message"]


def test_the_api_answers_an_unknown_release_and_no_devices_with_their_codes(
    fleet: Fleet,
) -> None:
    body = {
        "release_id": "mobilenet@9", "selector": ["all"], "stream": STREAM, "waves": "100%",
        "rollback_release_id": "mobilenet@1",
        "rollback_manifest": fleet.release(1).manifest.model_dump(mode="json"),
    }  # fmt: skip
    assert_error(fleet.http.post("/rollouts", json=body), 404, "unknown_release")
    body |= {"release_id": "mobilenet@2", "selector": ["group:none"]}
    assert_error(fleet.http.post("/rollouts", json=body), 404, "unknown_group")
    body |= {"selector": ["tag:site=nowhere"]}
    assert_error(fleet.http.post("/rollouts", json=body), 400, "no_devices_selected")


def test_a_second_rollout_of_the_stream_to_the_same_devices_is_refused(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert start(fleet, "--id", "r1") == 0

    assert start(fleet, "--id", "r2") == 3

    assert "r1" in capsys.readouterr().err
    assert [r["id"] for r in fleet.http.get("/rollouts").json()] == ["r1"]


# -- status and commands -------------------------------------------------------------------


def test_status_lists_the_rollouts_and_shows_one_with_its_plan(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert start(fleet, "--id", "r1") == 0
    capsys.readouterr()

    assert fleet.cli("rollout", "status") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "ROLLOUT", "RELEASE", "STREAM", "STATUS", "WAVES", "DEVICES", "PENDING", "STARTED"
    ]  # fmt: skip
    assert table[1].split()[:7] == ["r1", "mobilenet@2", "door", "running", "0/2", "3", "0"]

    assert fleet.cli("rollout", "status", "r1") == 0
    shown = capsys.readouterr().out
    assert "rollout        r1  (running)" in shown
    assert "by token:alice" in shown
    assert "none yet (the controller's next step starts wave 1)" in shown


def test_a_command_is_stored_once_per_id_and_one_the_status_forbids_is_refused(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert start(fleet, "--id", "r1") == 0
    pause = {"reason": "lunch", "command_id": "c1"}

    first = fleet.http.post("/rollouts/r1/pause", json=pause)
    again = fleet.http.post("/rollouts/r1/pause", json=pause)  # a retry: harmless

    assert (first.status_code, again.status_code) == (202, 202)
    audit = [e for e in fleet.http.get("/audit").json() if e["action"] == "rollout.pause"]
    assert [(e["actor"], e["reason"]) for e in audit] == [("token:alice", "lunch")]
    # a second pause (another id) cannot apply once the first has paused it
    assert_error(
        fleet.http.post("/rollouts/r1/pause", json={"reason": "again", "command_id": "c2"}),
        409,
        "command_refused",
    )
    capsys.readouterr()
    assert fleet.cli("rollout", "resume", "r1", "--reason", "back from lunch") == 0
    assert "resume of rollout r1 stored" in capsys.readouterr().out
    audit = [e["action"] for e in fleet.http.get("/audit").json()]
    assert audit[:2] == ["rollout.resume", "rollout.pause"]


def test_an_unknown_rollout_is_a_404_and_exit_2(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_error(fleet.http.get("/rollouts/nope"), 404, "unknown_rollout")
    assert fleet.cli("rollout", "halt", "nope") == 2
    assert "nope" in capsys.readouterr().err


def test_a_command_reason_with_control_characters_is_a_422_with_the_error_body(
    fleet: Fleet,
) -> None:
    assert start(fleet, "--id", "r1") == 0
    answer = fleet.http.post("/rollouts/r1/halt", json={"reason": "line\nbreak"})
    assert answer.status_code == 422, answer.text
    assert set(answer.json()) == ERROR_KEYS
