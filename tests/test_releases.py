"""Releases: `edgefleet release create|list|show|publish-chunks` over a real store in tmp_path,
signed with real keys, and the pre-signed rollback a rollout holds."""

from __future__ import annotations

import hashlib
import json
import stat
import threading
import time
from pathlib import Path

import pytest
from broker import Mosquitto, MqttProbe
from conftest import Assets
from fleet import variant

from edgefleet.agent.acceptance import Clock, Installed, accept, refusal
from edgefleet.agent.protocol import (
    ChunkedModelMeta,
    Manifest,
    SignedManifest,
    StreamMarks,
    model_meta_topic,
)
from edgefleet.ops.cli import main
from edgefleet.ops.controller.releases import (
    Release,
    ReleaseExists,
    ReleaseStore,
    create_release,
    sign_rollback,
)
from edgefleet.ops.fleet import ManifestTerms, SequenceCounter
from edgefleet.provisioning import FleetDir, TrustedKeys, generate_signing_key, load_private_key

MODEL = "mobilenet_v1_0.25_128_quant.tflite"
BASE = "https://controller.example:8443"
TOPIC_ROOT = "edgefleet/v1"
HOUR_S = 3600.0


@pytest.fixture(autouse=True)
def no_fleet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests name their fleet and store: the developer's own settings stay out."""
    for name in ("EDGEFLEET_FLEET", "EDGEFLEET_RELEASES", "EDGEFLEET_ARTIFACTS_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def model(assets: Assets) -> Path:
    return assets.model(MODEL)


@pytest.fixture
def rebuilt(model: Path, tmp_path: Path) -> Path:
    """The same model with other bytes (another sha256), as a rebuilt release would be."""
    path = tmp_path / "rebuilt" / MODEL
    path.parent.mkdir()
    path.write_bytes(variant(model.read_bytes(), 16))
    return path


@pytest.fixture
def key(tmp_path: Path) -> Path:
    """A release key pair in tmp_path/keys; its sequences.json goes beside it."""
    private, _ = generate_signing_key(tmp_path / "keys", "release")
    return private


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


def edgefleet(*args: object) -> int:
    return main([str(a) for a in args])


def create(store_dir: Path, model: Path, key: Path, version: int, *extra: object) -> int:
    return edgefleet(
        "release", "create", model, "--model-id", "mobilenet", "--version", version,
        "--store", store_dir, "--key", key, "--url-base", BASE, *extra,
    )  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(key: Path, signed: SignedManifest) -> Manifest:
    return TrustedKeys.from_paths([key.with_suffix(".pub")]).verify(signed)


# -- create -------------------------------------------------------------------------------


def test_create_stores_the_model_by_sha256_and_signs_a_manifest_naming_the_controller(
    store_dir: Path, model: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = create(store_dir, model, key, 3, "--notes", "smaller input", "--task", "classification")

    assert code == 0, capsys.readouterr().err
    release = ReleaseStore(store_dir).get("mobilenet@3")
    artifact = store_dir / "artifacts" / sha256(model)
    assert artifact.read_bytes() == model.read_bytes()
    assert stat.S_IMODE(artifact.stat().st_mode) == 0o444
    manifest = verified(key, release.manifest)
    assert manifest.urls == [f"{BASE}/artifacts/{sha256(model)}"]
    assert (manifest.model_id, manifest.version, manifest.sequence) == ("mobilenet", 3, 1)
    assert (release.sha256, release.size) == (manifest.sha256, manifest.size)
    assert release.notes == "smaller input"
    assert manifest.task.task == "classification"
    assert "created release mobilenet@3" in capsys.readouterr().out


def test_create_with_mqtt_names_the_broker_after_the_controller(
    store_dir: Path, model: Path, key: Path
) -> None:
    assert create(store_dir, model, key, 1, "--mqtt") == 0

    manifest = ReleaseStore(store_dir).get("mobilenet@1").signed_terms()
    assert manifest.urls == [f"{BASE}/artifacts/{sha256(model)}", "mqtt:"]


def test_create_counts_on_from_the_keys_counter_that_manifest_create_keeps(
    store_dir: Path, model: Path, key: Path
) -> None:
    assert edgefleet(
        "manifest", "create", model, "--model-id", "mobilenet", "--version", 1,
        "--url", "mqtt:", "--key", key, "--out", key.parent / "m.json",
    ) == 0  # fmt: skip

    assert create(store_dir, model, key, 2) == 0

    assert ReleaseStore(store_dir).get("mobilenet@2").sequence == 2
    assert json.loads((key.parent / "sequences.json").read_text()) == {"mobilenet": 2}


def test_create_numbers_above_the_store_even_when_the_keys_counter_was_lost(
    store_dir: Path, model: Path, rebuilt: Path, key: Path
) -> None:
    assert create(store_dir, model, key, 1) == 0
    (key.parent / "sequences.json").unlink()

    assert create(store_dir, rebuilt, key, 2) == 0

    assert ReleaseStore(store_dir).get("mobilenet@2").sequence == 2


def test_the_same_model_in_two_releases_is_stored_once(
    store_dir: Path, model: Path, key: Path
) -> None:
    assert create(store_dir, model, key, 1) == 0
    assert create(store_dir, model, key, 2, "--replaces", "other") == 0

    assert [p.name for p in (store_dir / "artifacts").iterdir()] == [sha256(model)]
    assert [r.id for r in ReleaseStore(store_dir).releases()] == ["mobilenet@1", "mobilenet@2"]


def test_a_release_that_exists_is_refused_with_exit_3_and_nothing_changes(
    store_dir: Path, model: Path, rebuilt: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert create(store_dir, model, key, 1) == 0
    record = (store_dir / "releases" / "mobilenet" / "1.json").read_bytes()
    capsys.readouterr()

    code = create(store_dir, rebuilt, key, 1)

    assert code == 3
    assert "release mobilenet@1 exists already" in capsys.readouterr().err
    assert (store_dir / "releases" / "mobilenet" / "1.json").read_bytes() == record
    assert not (store_dir / "artifacts" / sha256(rebuilt)).exists()
    assert json.loads((key.parent / "sequences.json").read_text()) == {"mobilenet": 1}


def test_two_creates_of_one_release_at_once_store_exactly_one(
    store_dir: Path, model: Path, rebuilt: Path, key: Path
) -> None:
    store, signing = ReleaseStore(store_dir), load_private_key(key)
    terms = ManifestTerms(model_id="m", version=1, urls=("mqtt:",), lifetime_s=HOUR_S)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(path: Path) -> None:
        try:
            create_release(store, path, terms, signing, SequenceCounter.beside(key))
            outcome = "created"
        except ReleaseExists:
            outcome = "refused"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=attempt, args=(p,), name="create") for p in (model, rebuilt)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(outcomes) == ["created", "refused"]
    assert len(store.releases()) == 1


def test_a_file_that_is_not_a_model_is_bad_input_and_stores_nothing(
    store_dir: Path, key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer at all" * 10)

    code = create(store_dir, junk, key, 1)

    assert code == 2
    assert "junk.tflite" in capsys.readouterr().err
    assert not (store_dir / "releases").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--url-base", "ftp://x"], "--url-base 'ftp://x' is not an http(s) URL"),
        (["--model-id", "has space"], "--model-id 'has space' is not a model id"),
    ],
)
def test_options_that_break_the_release_exit_2_naming_the_option(
    store_dir: Path,
    model: Path,
    key: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    assert create(store_dir, model, key, 1, *extra) == 2
    assert message in capsys.readouterr().err


def test_create_without_a_url_or_without_a_store_exits_2(
    store_dir: Path, model: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_url = edgefleet("release", "create", model, "--model-id", "m", "--version", 1,
                       "--store", store_dir, "--key", key)  # fmt: skip
    no_store = edgefleet("release", "create", model, "--model-id", "m", "--version", 1,
                         "--key", key, "--mqtt")  # fmt: skip

    assert (no_url, no_store) == (2, 2)
    err = capsys.readouterr().err
    assert "would name no URL" in err
    assert "which release store?" in err


# -- keys of a fleet ---------------------------------------------------------------------


def test_with_a_fleet_and_no_key_the_fleets_newest_release_key_signs(
    store_dir: Path, model: Path, tmp_path: Path
) -> None:
    fleet = FleetDir.init(tmp_path / "fleet").root
    assert edgefleet("keys", "rotate", "--fleet", fleet) == 0

    code = edgefleet("release", "create", model, "--model-id", "m", "--version", 1,
                     "--store", store_dir, "--fleet", fleet, "--mqtt")  # fmt: skip

    assert code == 0
    newest = fleet / "keys" / "release-2.key"
    verified(newest, ReleaseStore(store_dir).get("m@1").manifest)
    assert (newest.parent / "sequences.json").is_file()


def test_a_key_the_fleet_does_not_trust_is_refused_with_exit_3(
    store_dir: Path, model: Path, key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = FleetDir.init(tmp_path / "fleet").root

    code = create(store_dir, model, key, 1, "--fleet", fleet)

    assert code == 3
    assert "is not in the fleet's key set" in capsys.readouterr().err
    assert not (store_dir / "releases").exists()


# -- list and show --------------------------------------------------------------------------


def test_list_shows_each_release_and_json_gives_the_records(
    store_dir: Path, model: Path, rebuilt: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert create(store_dir, model, key, 1, "--notes", "first\nsecond line") == 0
    assert create(store_dir, rebuilt, key, 2) == 0
    capsys.readouterr()

    assert edgefleet("release", "list", "--store", store_dir) == 0
    table = capsys.readouterr().out
    assert edgefleet("release", "list", "--store", store_dir, "--json") == 0
    records = [Release.model_validate(r) for r in json.loads(capsys.readouterr().out)]

    assert table.splitlines()[0].split() == [
        "RELEASE", "SEQ", "SHA256", "BYTES", "CREATED", "EXPIRES", "NOTES"
    ]  # fmt: skip
    assert "mobilenet@1" in table
    assert "first" in table
    assert "second line" not in table
    assert [(r.id, r.sha256) for r in records] == [
        ("mobilenet@1", sha256(model)),
        ("mobilenet@2", sha256(rebuilt)),
    ]


def test_show_manifest_prints_the_signed_manifest_deploy_takes(
    store_dir: Path, model: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert create(store_dir, model, key, 1) == 0
    capsys.readouterr()

    assert edgefleet("release", "show", "mobilenet@1", "--store", store_dir, "--manifest") == 0
    signed = SignedManifest.model_validate_json(capsys.readouterr().out)
    assert edgefleet("release", "show", "mobilenet@1", "--store", store_dir) == 0
    summary = capsys.readouterr().out

    assert verified(key, signed).sha256 == sha256(model)
    assert f"url            {BASE}/artifacts/{sha256(model)}" in summary


def test_list_of_a_model_id_that_cannot_be_one_exits_2(store_dir: Path) -> None:
    assert edgefleet("release", "list", "--store", store_dir, "--model-id", "../..") == 2


@pytest.mark.parametrize("name", ["mobilenet@9", "mobilenet", "a@b@1", "@1"])
def test_show_of_a_release_not_stored_or_not_a_release_id_exits_2(
    store_dir: Path, model: Path, key: Path, name: str
) -> None:
    assert create(store_dir, model, key, 1) == 0

    assert edgefleet("release", "show", name, "--store", store_dir) == 2


# -- rollbacks signed ahead ---------------------------------------------------------------


def test_a_presigned_rollback_is_accepted_by_a_device_running_the_release_it_undoes(
    store_dir: Path, model: Path, rebuilt: Path, key: Path
) -> None:
    assert create(store_dir, model, key, 1) == 0
    assert create(store_dir, rebuilt, key, 2) == 0
    store = ReleaseStore(store_dir)
    old, new = store.get("mobilenet@1"), store.get("mobilenet@2")
    # A device that installed 1, then 2.
    marks = StreamMarks()
    for installed in (old, new):
        marks = accept(installed.signed_terms(), marks, Installed(), installs=True)
    running = Installed(sha256=new.sha256, manifest=new.signed_terms())

    signed = sign_rollback(old, new, load_private_key(key), 2 * HOUR_S, SequenceCounter.beside(key))

    rollback = verified(key, signed)
    assert rollback.rollback_from is not None
    assert (rollback.rollback_from.version, rollback.rollback_from.sha256) == (2, new.sha256)
    assert (rollback.version, rollback.sha256, rollback.urls) == (
        1, old.sha256, old.signed_terms().urls
    )  # fmt: skip
    assert rollback.sequence == 3
    assert rollback.expires_at - rollback.issued_at == pytest.approx(2 * HOUR_S)
    clock = Clock(now=time.time())
    assert refusal(rollback, marks=marks, installed=running, clock=clock, agent_version="9") is None


def test_a_rollback_across_model_lines_says_it_replaces_the_line_it_undoes(
    store_dir: Path, model: Path, rebuilt: Path, key: Path
) -> None:
    assert create(store_dir, model, key, 1) == 0
    assert edgefleet("release", "create", rebuilt, "--model-id", "bigger", "--version", 1,
                     "--replaces", "mobilenet", "--store", store_dir, "--key", key,
                     "--mqtt") == 0  # fmt: skip
    store = ReleaseStore(store_dir)

    signed = sign_rollback(
        store.get("mobilenet@1"), store.get("bigger@1"), load_private_key(key), HOUR_S,
        SequenceCounter.beside(key),
    )  # fmt: skip

    rollback = verified(key, signed)
    assert (rollback.model_id, rollback.replaces_model_id, rollback.sequence) == (
        "mobilenet", "bigger", 2
    )  # fmt: skip


# -- chunks for broker-only devices ---------------------------------------------------------


def publish_chunks(broker: Mosquitto, store_dir: Path, release: str) -> int:
    return edgefleet(
        "release", "publish-chunks", release, "--store", store_dir, "--chunk-kib", 32,
        "--host", broker.host, "--port", broker.port, "--insecure",
    )  # fmt: skip


def test_publish_chunks_puts_the_release_on_the_broker_retained(
    broker: Mosquitto, store_dir: Path, model: Path, key: Path
) -> None:
    assert create(store_dir, model, key, 1, "--mqtt") == 0

    assert publish_chunks(broker, store_dir, "mobilenet@1") == 0

    meta_topic = model_meta_topic(TOPIC_ROOT, sha256(model))
    with MqttProbe(broker, "device") as device:
        device.subscribe(meta_topic)
        meta = ChunkedModelMeta.model_validate_json(device.wait_for_message(meta_topic).payload)
    assert (meta.sha256, meta.size, meta.chunk_bytes) == (
        sha256(model), model.stat().st_size, 32 * 1024
    )  # fmt: skip


def test_publish_chunks_of_a_release_signed_without_mqtt_is_refused_with_exit_3(
    broker: Mosquitto, store_dir: Path, model: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert create(store_dir, model, key, 1) == 0

    assert publish_chunks(broker, store_dir, "mobilenet@1") == 3
    assert "was not signed with the URL mqtt:" in capsys.readouterr().err
