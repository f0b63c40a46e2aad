"""The release-key set: signed by the root, versioned, expiring; manifests verify against it."""

from __future__ import annotations

import base64
import datetime
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.asyncapi import document
from edgefleet.agent.protocol import TOPIC_ROOT, Manifest, TensorSpec, key_set_topic
from edgefleet.provisioning import (
    KeySet,
    KeySetChange,
    KeySetExpired,
    KeySetNotSigned,
    KeySetRollback,
    KeysNotAccepting,
    MalformedKeySet,
    RevokedSigningKey,
    UnknownSigningKey,
    key_id,
    new_key_set,
    read_key_set,
    renewed,
    revoked,
    rotated,
    sign_key_set,
    sign_manifest,
    verify_key_set,
    write_key_set,
)

NOW = datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture
def root() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def release() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def first(release: Ed25519PrivateKey) -> KeySet:
    return new_key_set([release.public_key()], names=["release-1"])


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


def test_a_new_set_is_version_one_and_expires_in_the_days_given(
    release: Ed25519PrivateKey,
) -> None:
    key_set = new_key_set([release.public_key()], days=30)
    assert key_set.version == 1
    assert [k.key_id for k in key_set.keys] == [key_id(release.public_key())]
    left = key_set.expires - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=29, hours=23) < left <= datetime.timedelta(days=30)


def test_a_set_signed_by_the_root_verifies(root: Ed25519PrivateKey, first: KeySet) -> None:
    signed = sign_key_set(first, root)
    assert signed.root_key_id == key_id(root.public_key())
    assert verify_key_set(signed, root.public_key(), installed=None, now=NOW) == first


def test_a_tampered_payload_is_not_signed_by_the_root(
    root: Ed25519PrivateKey, first: KeySet
) -> None:
    signed = sign_key_set(first, root)
    tampered = signed.model_copy(
        update={"payload": signed.payload.replace('"version":1', '"version":9')}
    )
    with pytest.raises(KeySetNotSigned, match="does not verify"):
        verify_key_set(tampered, root.public_key(), installed=None, now=NOW)


def test_a_set_signed_by_another_key_is_refused(root: Ed25519PrivateKey, first: KeySet) -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(KeySetNotSigned, match="not by the fleet's root key"):
        verify_key_set(sign_key_set(first, other), root.public_key(), installed=None, now=NOW)


def test_another_key_claiming_the_roots_id_is_refused(
    root: Ed25519PrivateKey, first: KeySet
) -> None:
    forged = sign_key_set(first, Ed25519PrivateKey.generate()).model_copy(
        update={"root_key_id": key_id(root.public_key())}
    )
    with pytest.raises(KeySetNotSigned, match="does not verify"):
        verify_key_set(forged, root.public_key(), installed=None, now=NOW)


def test_an_older_set_than_the_installed_is_a_rollback(
    root: Ed25519PrivateKey, first: KeySet
) -> None:
    newer = rotated(first, Ed25519PrivateKey.generate().public_key())
    with pytest.raises(KeySetRollback, match="version 1 is older than version 2"):
        verify_key_set(sign_key_set(first, root), root.public_key(), installed=newer, now=NOW)


def test_the_same_version_with_other_content_is_refused(
    root: Ed25519PrivateKey, first: KeySet
) -> None:
    other = new_key_set([Ed25519PrivateKey.generate().public_key()])
    with pytest.raises(KeySetRollback, match="differs from the installed set"):
        verify_key_set(sign_key_set(other, root), root.public_key(), installed=first, now=NOW)


def test_the_installed_set_again_is_accepted_as_it_is(
    root: Ed25519PrivateKey, first: KeySet
) -> None:
    again = verify_key_set(sign_key_set(first, root), root.public_key(), installed=first, now=NOW)
    assert again == first


def test_an_expired_set_is_refused(root: Ed25519PrivateKey, first: KeySet) -> None:
    later = first.expires + datetime.timedelta(seconds=1)
    with pytest.raises(KeySetExpired, match="version 1 expired at"):
        verify_key_set(sign_key_set(first, root), root.public_key(), installed=None, now=later)


def test_a_signed_payload_that_is_not_a_key_set_is_malformed(root: Ed25519PrivateKey) -> None:
    payload = '{"version": 1, "keys": []}'
    signed = sign_key_set(new_key_set([root.public_key()]), root).model_copy(
        update={
            "payload": payload,
            "signature": base64.b64encode(root.sign(payload.encode())).decode(),
        }
    )
    with pytest.raises(MalformedKeySet, match="not a valid key set"):
        verify_key_set(signed, root.public_key(), installed=None, now=NOW)


def test_a_key_id_that_is_not_its_keys_is_malformed(root: Ed25519PrivateKey, first: KeySet) -> None:
    wrong = first.model_dump(mode="json")
    wrong["keys"][0]["key_id"] = "0" * 16
    with pytest.raises(ValueError, match="is not the id of its public_key"):
        KeySet.model_validate(wrong)


def test_rotating_adds_the_key_in_the_next_version(first: KeySet) -> None:
    new = Ed25519PrivateKey.generate().public_key()
    second = rotated(first, new, days=10, name="release-2")
    assert second.version == 2
    assert [k.name for k in second.keys] == ["release-1", "release-2"]
    assert key_id(new) in second.trusted_keys().key_ids


def test_rotating_to_a_revoked_key_is_refused(first: KeySet, release: Ed25519PrivateKey) -> None:
    second = rotated(first, Ed25519PrivateKey.generate().public_key())
    third = revoked(second, key_id(release.public_key()), reason="leaked")
    with pytest.raises(KeySetChange, match="never trusted again"):
        rotated(third, release.public_key())


def test_revoking_moves_the_key_to_the_revoked_in_the_next_version(
    first: KeySet, release: Ed25519PrivateKey
) -> None:
    second = rotated(first, Ed25519PrivateKey.generate().public_key())
    third = revoked(second, "release-1", reason="laptop stolen")
    assert third.version == 3
    assert key_id(release.public_key()) not in third.trusted_keys().key_ids
    [entry] = third.revoked
    assert (entry.key_id, entry.version, entry.reason) == (
        key_id(release.public_key()),
        3,
        "laptop stolen",
    )


def test_revoking_the_last_key_is_refused(first: KeySet) -> None:
    with pytest.raises(KeySetChange, match="last trusted key"):
        revoked(first, "release-1", reason="x")


def test_revoking_a_key_not_in_the_set_is_refused(first: KeySet) -> None:
    with pytest.raises(KeySetChange, match="no key 'release-9'"):
        revoked(first, "release-9", reason="x")


def test_a_manifest_signed_by_a_revoked_key_is_refused_naming_the_key_and_version(
    first: KeySet, release: Ed25519PrivateKey
) -> None:
    second = rotated(first, Ed25519PrivateKey.generate().public_key())
    third = revoked(second, key_id(release.public_key()), reason="laptop stolen")
    signed = sign_manifest(_manifest(), release)
    with pytest.raises(RevokedSigningKey) as refusal:
        third.trusted_keys().verify(signed)
    assert refusal.value.message == (
        f"manifest signed by key {key_id(release.public_key())}, which key set version 3 "
        "revoked (laptop stolen)"
    )


def test_a_manifest_signed_by_the_new_key_verifies_only_in_the_rotated_set(
    first: KeySet,
) -> None:
    new = Ed25519PrivateKey.generate()
    signed = sign_manifest(_manifest(), new)
    assert rotated(first, new.public_key()).trusted_keys().verify(signed).version == 2
    with pytest.raises(UnknownSigningKey):
        first.trusted_keys().verify(signed)


def test_keys_that_admit_nothing_new_refuse_a_new_manifest_but_verify_a_stored_one(
    first: KeySet, release: Ed25519PrivateKey
) -> None:
    keys = first.trusted_keys(refusal="key set version 1 expired")
    signed = sign_manifest(_manifest(), release)
    with pytest.raises(KeysNotAccepting, match="key set version 1 expired"):
        keys.verify_new(signed)
    assert keys.verify(signed).model_id == "classifier"


def test_a_written_set_reads_back_and_is_not_writable_by_others(
    tmp_path: Path, root: Ed25519PrivateKey, first: KeySet
) -> None:
    path = tmp_path / "keyset.json"
    signed = sign_key_set(first, root)
    write_key_set(path, signed)
    assert read_key_set(path) == signed
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    write_key_set(path, sign_key_set(rotated(first, root.public_key()), root), replace=True)
    assert read_key_set(path).payload != signed.payload


def test_a_file_that_is_not_a_signed_set_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "keyset.json"
    path.write_text('{"payload": 3}')
    with pytest.raises(MalformedKeySet, match="is not a signed key set"):
        read_key_set(path)


def test_the_asyncapi_document_names_the_retained_key_set_channel() -> None:
    doc = document()
    channel = doc["channels"]["key_set"]
    assert channel["address"] == key_set_topic(TOPIC_ROOT)
    operation = doc["operations"]["receive_key_set"]
    assert operation["bindings"]["mqtt"] == {"qos": 1, "retain": True, "bindingVersion": "0.2.0"}
    assert doc["components"]["messages"]["key_set"]["payload"] == {
        "$ref": "#/components/schemas/SignedKeySet"
    }
    assert "KeySet" in doc["components"]["schemas"]


def test_renewing_keeps_the_keys_and_moves_the_expiry_in_the_next_version(
    root: Ed25519PrivateKey, first: KeySet
) -> None:
    later = first.expires + datetime.timedelta(days=1)
    renewal = renewed(first, days=400)
    assert (renewal.version, renewal.keys, renewal.revoked) == (2, first.keys, first.revoked)
    accepted = verify_key_set(
        sign_key_set(renewal, root), root.public_key(), installed=first, now=later
    )
    assert accepted == renewal
