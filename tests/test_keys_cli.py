"""``edgefleet keys show | rotate | revoke | publish`` on a fleet directory, as the CLI runs."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from broker import Mosquitto, MqttProbe
from conftest import Assets

from edgefleet.agent.protocol import TOPIC_ROOT, key_set_topic
from edgefleet.provisioning import (
    FleetDir,
    KeySet,
    generate_signing_key,
    key_id,
    load_private_key,
    load_public_key,
    open_key_set,
    parse_signed_key_set,
    read_key_set,
)

EDGEFLEET = Path(sys.executable).with_name("edgefleet")
TOPIC = key_set_topic(TOPIC_ROOT)


def edgefleet(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_FLEET"}
    return subprocess.run(
        [str(EDGEFLEET), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environ, **(env or {})},
    )


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    """A fleet directory as 'edgefleet provision init' writes it."""
    return FleetDir.init(tmp_path / "fleet").root


def key_set(fleet: Path) -> KeySet:
    root = load_public_key(fleet / "keys" / "root.pub")
    return open_key_set(read_key_set(fleet / "keys" / "keyset.json"), root)


def test_rotate_writes_a_new_private_key_0600_and_the_next_root_signed_set(fleet: Path) -> None:
    result = edgefleet("keys", "rotate", "--fleet", fleet)
    assert result.returncode == 0, result.stderr
    private = fleet / "keys" / "release-2.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    rotated = key_set(fleet)
    assert rotated.version == 2
    assert [k.name for k in rotated.keys] == ["release-1", "release-2"]
    assert key_id(load_private_key(private).public_key()) in {k.key_id for k in rotated.keys}
    assert "key set version 2: added release-2" in result.stdout


def test_revoke_by_file_name_moves_the_key_to_the_revoked_with_the_reason(fleet: Path) -> None:
    assert edgefleet("keys", "rotate", "--fleet", fleet).returncode == 0
    by_env = {"EDGEFLEET_FLEET": str(fleet)}
    result = edgefleet("keys", "revoke", "release-1.pub", "--reason", "laptop stolen", env=by_env)
    assert result.returncode == 0, result.stderr
    revoked = key_set(fleet)
    assert revoked.version == 3
    assert [k.name for k in revoked.keys] == ["release-2"]
    [entry] = revoked.revoked
    assert (entry.name, entry.version, entry.reason) == ("release-1", 3, "laptop stolen")
    shown = edgefleet("keys", "show", "--fleet", fleet)
    assert shown.returncode == 0, shown.stderr
    assert "version        3" in shown.stdout
    assert "laptop stolen" in shown.stdout


def test_revoking_the_last_key_is_refused_and_nothing_changes(fleet: Path) -> None:
    before = (fleet / "keys" / "keyset.json").read_bytes()
    result = edgefleet("keys", "revoke", "release-1", "--fleet", fleet)
    assert result.returncode == 3, result.stderr
    assert "last trusted key" in result.stderr
    assert "what to do:" in result.stderr
    assert (fleet / "keys" / "keyset.json").read_bytes() == before


def test_revoking_a_key_not_in_the_set_is_bad_input(fleet: Path) -> None:
    result = edgefleet("keys", "revoke", "release-7", "--fleet", fleet)
    assert result.returncode == 2, result.stderr
    assert "no key 'release-7'" in result.stderr


def test_without_a_fleet_directory_the_commands_say_how_to_give_one() -> None:
    result = edgefleet("keys", "show")
    assert result.returncode == 2, result.stderr
    assert "EDGEFLEET_FLEET" in result.stderr


def test_a_tampered_key_set_is_refused(fleet: Path) -> None:
    path = fleet / "keys" / "keyset.json"
    path.write_text(path.read_text().replace('\\"version\\":1', '\\"version\\":5'))
    result = edgefleet("keys", "show", "--fleet", fleet)
    assert result.returncode == 3, result.stderr
    assert "does not verify with the root key" in result.stderr


def test_publish_retains_the_set_and_refuses_one_older_than_the_brokers(
    fleet: Path, mosquitto_binary: Path, tmp_path: Path
) -> None:
    first = (fleet / "keys" / "keyset.json").read_bytes()
    assert edgefleet("keys", "rotate", "--fleet", fleet).returncode == 0
    with Mosquitto(tmp_path / "broker") as broker:
        options = ["--insecure", "--host", broker.host, "--port", broker.port]
        result = edgefleet("keys", "publish", "--fleet", fleet, *options)
        assert result.returncode == 0, result.stderr
        with MqttProbe(broker, "reader") as probe:
            probe.subscribe(TOPIC)
            message = probe.wait_for_message(TOPIC)
        assert message.retain
        published = parse_signed_key_set(message.payload, source="test")
        assert published == read_key_set(fleet / "keys" / "keyset.json")
        (fleet / "keys" / "keyset.json").write_bytes(first)
        older = edgefleet("keys", "publish", "--fleet", fleet, *options)
        assert older.returncode == 3, older.stderr
        assert "the broker holds key set version 2, newer than version 1" in older.stderr


def _create(fleet: Path, key: Path, model: Path) -> subprocess.CompletedProcess[str]:
    return edgefleet(
        "manifest", "create", model, "--model-id", "m", "--version", 1,
        "--url", "http://example.invalid/m.tflite", "--key", key, "--fleet", fleet,
        "--out", key.parent / "m.json",
    )  # fmt: skip


def test_manifest_create_refuses_a_key_the_fleet_revoked_or_does_not_trust(
    fleet: Path, assets: Assets, tmp_path: Path
) -> None:
    model = assets.model("mobilenet_v1_0.25_128_quant.tflite")
    keys = fleet / "keys"
    assert _create(fleet, keys / "release-1.key", model).returncode == 0
    assert edgefleet("keys", "rotate", "--fleet", fleet).returncode == 0
    assert edgefleet("keys", "revoke", "release-1", "--fleet", fleet).returncode == 0
    revoked = _create(fleet, keys / "release-1.key", model)
    assert revoked.returncode == 3, revoked.stderr
    assert "was revoked by key set version 3" in revoked.stderr
    stranger, _ = generate_signing_key(tmp_path / "other", "stranger")
    unknown = _create(fleet, stranger, model)
    assert unknown.returncode == 3, unknown.stderr
    assert "is not in the fleet's key set version 3" in unknown.stderr
    assert _create(fleet, keys / "release-2.key", model).returncode == 0


def test_renew_writes_the_next_version_with_the_same_keys(fleet: Path) -> None:
    before = key_set(fleet)
    result = edgefleet("keys", "renew", "--fleet", fleet, "--days", 30)
    assert result.returncode == 0, result.stderr
    after = key_set(fleet)
    assert (after.version, after.keys) == (2, before.keys)
    assert after.expires < before.expires
