"""The device's key-set trust (agent/trust.py) on real files, without a broker."""

from __future__ import annotations

import datetime
import logging
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.config import UpdateSettings
from edgefleet.agent.mqtt import Inbound
from edgefleet.agent.protocol import Manifest, TensorSpec, key_set_topic
from edgefleet.agent.trust import KeyFiles, KeySetTrust, device_trust
from edgefleet.provisioning import (
    KeySet,
    KeysNotAccepting,
    new_key_set,
    read_key_set,
    rotated,
    sign_key_set,
    sign_manifest,
    write_key_set,
)

TOPIC = key_set_topic("edgefleet/v1")


class Clock:
    """A settable clock for the trust's expiry checks."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def root() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def release() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def first(release: Ed25519PrivateKey) -> KeySet:
    return new_key_set([release.public_key()], days=10)


def _settings(tmp_path: Path, root: Ed25519PrivateKey, bundle: KeySet | None) -> UpdateSettings:
    root_pub = tmp_path / "root.pub"
    root_pub.write_bytes(
        root.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    key_set = None
    if bundle is not None:
        key_set = tmp_path / "bundle-keyset.json"
        write_key_set(key_set, sign_key_set(bundle, root))
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    return UpdateSettings(store_dir=store, root_key=root_pub, key_set=key_set)


def _manifest() -> Manifest:
    return Manifest(
        model_id="classifier",
        version=2,
        sha256="a" * 64,
        size=10,
        artifact="m.tflite",
        urls=["http://example.invalid/m.tflite"],
        inputs=[TensorSpec(shape=[1, 4], dtype="uint8")],
        issued_at=time.time(),
        expires_at=time.time() + 3600,
        sequence=1,
    )


def test_without_a_root_key_the_trusted_keys_are_the_key_files(tmp_path: Path) -> None:
    assert isinstance(device_trust(UpdateSettings(trusted_keys=[tmp_path])), KeyFiles)


def test_the_bundles_set_is_installed_in_the_store_at_first_start(
    tmp_path: Path, root: Ed25519PrivateKey, release: Ed25519PrivateKey, first: KeySet
) -> None:
    trust = KeySetTrust(_settings(tmp_path, root, first))
    trust.load()
    stored = tmp_path / "store" / "keyset.json"
    assert read_key_set(stored).payload == first.model_dump_json()
    assert stat.S_IMODE(stored.stat().st_mode) == 0o644
    assert trust().verify_new(sign_manifest(_manifest(), release)).version == 2
    assert trust.health().key_set_version == 1


def test_a_newer_retained_set_replaces_the_installed_one_and_is_kept_across_a_restart(
    tmp_path: Path, root: Ed25519PrivateKey, first: KeySet
) -> None:
    settings = _settings(tmp_path, root, first)
    trust = KeySetTrust(settings)
    trust.load()
    second = rotated(first, Ed25519PrivateKey.generate().public_key())
    trust.on_message(Inbound(TOPIC, sign_key_set(second, root).model_dump_json().encode()))
    assert trust.health().key_set_version == 2
    again = KeySetTrust(settings)  # the bundle still holds version 1
    again.load()
    assert again.health().key_set_version == 2


def test_a_malformed_message_is_refused_and_reported(
    tmp_path: Path, root: Ed25519PrivateKey, first: KeySet
) -> None:
    trust = KeySetTrust(_settings(tmp_path, root, first))
    trust.load()
    trust.on_message(Inbound(TOPIC, b"{not json"))
    health = trust.health()
    assert health.key_set_version == 1
    assert "is not a signed key set" in (health.last_refusal or "")


def test_without_any_set_no_new_manifest_is_accepted(
    tmp_path: Path, root: Ed25519PrivateKey, release: Ed25519PrivateKey
) -> None:
    trust = KeySetTrust(_settings(tmp_path, root, None))
    trust.load()
    with pytest.raises(KeysNotAccepting, match="no key set is installed"):
        trust().verify_new(sign_manifest(_manifest(), release))
    assert trust.health().problem is not None


def test_an_expired_set_refuses_new_manifests_keeps_stored_ones_and_logs_once(
    tmp_path: Path,
    root: Ed25519PrivateKey,
    release: Ed25519PrivateKey,
    first: KeySet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    trust = KeySetTrust(_settings(tmp_path, root, first), now=clock)
    trust.load()
    clock.now = (first.expires + datetime.timedelta(seconds=1)).timestamp()
    signed = sign_manifest(_manifest(), release)
    with caplog.at_level(logging.ERROR, logger="edgefleet.agent.trust"):
        for _ in range(3):
            with pytest.raises(KeysNotAccepting, match="key set version 1 expired at"):
                trust().verify_new(signed)
    assert trust().verify(signed).version == 2  # what is installed keeps verifying
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum("expired" in r.getMessage() for r in errors) == 1
    assert "expired" in (trust.health().problem or "")


def test_an_expired_retained_set_is_refused(
    tmp_path: Path, root: Ed25519PrivateKey, first: KeySet
) -> None:
    clock = Clock()
    trust = KeySetTrust(_settings(tmp_path, root, first), now=clock)
    trust.load()
    second = rotated(first, Ed25519PrivateKey.generate().public_key(), days=1)
    clock.now += 2 * 86400
    trust.on_message(Inbound(TOPIC, sign_key_set(second, root).model_dump_json().encode()))
    health = trust.health()
    assert health.key_set_version == 1
    assert "version 2 expired at" in (health.last_refusal or "")


def test_without_a_usable_root_key_nothing_is_trusted_and_a_set_is_not_installed(
    tmp_path: Path, root: Ed25519PrivateKey, first: KeySet
) -> None:
    settings = _settings(tmp_path, root, first)
    settings.root_key.write_text("not a key")  # type: ignore[union-attr]
    trust = KeySetTrust(settings)
    trust.load()
    trust.on_message(Inbound(TOPIC, sign_key_set(first, root).model_dump_json().encode()))
    health = trust.health()
    assert health.key_set_version is None
    assert "root key cannot be used" in (health.problem or "")
    assert "not checked" in (health.last_refusal or "")
    assert not (tmp_path / "store" / "keyset.json").exists()
