"""Manifest signatures: what a device accepts, and the named error for everything it refuses."""

from __future__ import annotations

import base64
import json
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given
from hypothesis import strategies as st

from edgefleet.agent.protocol import Manifest, SignedManifest, TensorSpec
from edgefleet.provisioning import (
    BadSignature,
    KeyFileError,
    MalformedManifest,
    SigningError,
    TrustedKeys,
    UnknownSigningKey,
    generate_signing_key,
    key_id,
    load_private_key,
    load_public_key,
    sign_manifest,
)

# One key pair for the property tests: hypothesis runs each example in the same process.
FLEET_KEY = Ed25519PrivateKey.generate()
FLEET_TRUST = TrustedKeys([FLEET_KEY.public_key()])


def _manifest(**overrides: object) -> Manifest:
    fields: dict[str, object] = {
        "model_id": "mobilenet",
        "version": 3,
        "sha256": "ab" * 32,
        "size": 491_520,
        "artifact": "mobilenet_v1_0.25_128_quant.tflite",
        "urls": ["https://models.example/mobilenet/3.tflite"],
        "inputs": [TensorSpec(shape=(1, 128, 128, 3), dtype="uint8")],
        "issued_at": 1_800_000_000.0,
        "expires_at": 1_802_592_000.0,
        **overrides,
    }
    return Manifest.model_validate(fields)


def _sign_text(payload: str, key: Ed25519PrivateKey = FLEET_KEY) -> SignedManifest:
    """A valid signature over any text, as a compromised or buggy signer would produce."""
    signature = base64.b64encode(key.sign(payload.encode("utf-8"))).decode()
    return SignedManifest(payload=payload, key_id=key_id(key.public_key()), signature=signature)


def test_a_signed_manifest_verifies_to_the_same_manifest() -> None:
    manifest = _manifest()

    signed = sign_manifest(manifest, FLEET_KEY)

    assert FLEET_TRUST.verify(signed) == manifest
    assert signed.key_id == key_id(FLEET_KEY.public_key())


def test_one_changed_character_in_the_payload_is_a_bad_signature() -> None:
    signed = sign_manifest(_manifest(version=3), FLEET_KEY)
    tampered = signed.model_copy(
        update={"payload": signed.payload.replace('"version":3', '"version":4')}
    )
    assert tampered.payload != signed.payload

    with pytest.raises(BadSignature, match="does not verify"):
        FLEET_TRUST.verify(tampered)


def test_a_signature_by_another_key_claiming_the_trusted_key_id_is_a_bad_signature() -> None:
    forger = Ed25519PrivateKey.generate()
    forged = sign_manifest(_manifest(), forger).model_copy(
        update={"key_id": key_id(FLEET_KEY.public_key())}
    )

    with pytest.raises(BadSignature):
        FLEET_TRUST.verify(forged)


def test_a_manifest_signed_by_an_untrusted_key_names_the_key() -> None:
    stranger = Ed25519PrivateKey.generate()
    signed = sign_manifest(_manifest(), stranger)

    with pytest.raises(UnknownSigningKey, match=signed.key_id):
        FLEET_TRUST.verify(signed)


def test_a_signature_that_is_not_base64_is_a_malformed_manifest() -> None:
    signed = sign_manifest(_manifest(), FLEET_KEY).model_copy(update={"signature": "not*base64!"})

    with pytest.raises(MalformedManifest, match="does not decode"):
        FLEET_TRUST.verify(signed)


def test_a_validly_signed_payload_that_is_not_a_manifest_names_the_field() -> None:
    payload = (
        _manifest()
        .model_dump_json()
        .replace("mobilenet_v1_0.25_128_quant.tflite", "../../etc/passwd")
    )

    with pytest.raises(MalformedManifest, match=r"artifact: String should match pattern"):
        FLEET_TRUST.verify(_sign_text(payload))


def test_a_validly_signed_payload_that_is_not_json_is_a_malformed_manifest() -> None:
    with pytest.raises(MalformedManifest, match="not a valid manifest"):
        FLEET_TRUST.verify(_sign_text("hello"))


def test_generated_key_files_load_and_the_private_key_is_readable_by_its_owner_only(
    tmp_path: Path,
) -> None:
    private_path, public_path = generate_signing_key(tmp_path / "keys", "fleet")

    assert (private_path.name, public_path.name) == ("fleet.key", "fleet.pub")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    private, public = load_private_key(private_path), load_public_key(public_path)
    assert key_id(private.public_key()) == key_id(public)


def test_generating_a_key_over_an_existing_one_is_refused_and_leaves_it_alone(
    tmp_path: Path,
) -> None:
    private_path, public_path = generate_signing_key(tmp_path)
    before = private_path.read_bytes(), public_path.read_bytes()

    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_signing_key(tmp_path)

    assert (private_path.read_bytes(), public_path.read_bytes()) == before


def test_an_existing_public_key_alone_also_refuses_generation(tmp_path: Path) -> None:
    (tmp_path / "fleet.pub").write_text("the key devices trust")

    with pytest.raises(KeyFileError, match=r"fleet\.pub exists"):
        generate_signing_key(tmp_path)

    assert not (tmp_path / "fleet.key").exists()


def test_trusted_keys_from_a_directory_load_every_pub_file(tmp_path: Path) -> None:
    generate_signing_key(tmp_path, "old")
    generate_signing_key(tmp_path, "new")
    new_key = load_private_key(tmp_path / "new.key")

    trust = TrustedKeys.from_paths([tmp_path])

    assert len(trust.key_ids) == 2
    assert trust.verify(sign_manifest(_manifest(), new_key)).model_id == "mobilenet"


def test_loading_a_missing_key_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no such key file"):
        load_private_key(tmp_path / "absent.key")


def test_passing_the_public_key_as_the_signing_key_says_which_file_to_use(tmp_path: Path) -> None:
    _, public_path = generate_signing_key(tmp_path)

    with pytest.raises(KeyFileError, match="holds a public key"):
        load_private_key(public_path)


def test_a_key_of_another_algorithm_is_refused_by_name(tmp_path: Path) -> None:
    ec_key = generate_private_key(SECP256R1())
    path = tmp_path / "ec.key"
    path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    with pytest.raises(KeyFileError, match="not an ed25519 key"):
        load_private_key(path)


def test_a_key_name_with_a_directory_part_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not a plain file name"):
        generate_signing_key(tmp_path, "../fleet")


# -- properties: whatever the signed text, only SigningError comes out -----------------


@given(payload=st.text(max_size=2000))
def test_any_validly_signed_text_verifies_or_raises_a_signing_error(payload: str) -> None:
    try:
        manifest = FLEET_TRUST.verify(_sign_text(payload))
    except SigningError as exc:
        assert isinstance(exc, MalformedManifest)
    else:
        assert manifest.model_dump_json() == Manifest.model_validate_json(payload).model_dump_json()


@given(
    # Surrogates included: a SignedManifest built in Python may hold text that has no UTF-8.
    payload=st.text(alphabet=st.characters(exclude_categories=()), max_size=500),
    signature=st.text(max_size=200),
)
def test_any_payload_and_signature_text_raise_only_signing_errors(
    payload: str, signature: str
) -> None:
    # Built unchecked: pydantic refuses lone surrogates, verify() must not rely on that.
    signed = SignedManifest.model_construct(
        payload=payload, key_id=key_id(FLEET_KEY.public_key()), signature=signature
    )

    with pytest.raises(SigningError):
        FLEET_TRUST.verify(signed)


SIGNED = sign_manifest(_manifest(), FLEET_KEY)


@given(index=st.integers(min_value=0, max_value=len(SIGNED.payload) - 1), char=st.characters())
def test_any_one_character_change_to_a_signed_manifest_is_a_bad_signature(
    index: int, char: str
) -> None:
    payload = SIGNED.payload
    assume(payload[index] != char)
    tampered = SIGNED.model_copy(update={"payload": payload[:index] + char + payload[index + 1 :]})

    with pytest.raises(BadSignature):
        FLEET_TRUST.verify(tampered)


# -- the fields that order releases: sequence, rollback_from, replaces_model_id ------------

SHA256S = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
MODEL_IDS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
ROLLBACKS = st.none() | st.fixed_dictionaries(
    {"version": st.integers(min_value=1, max_value=2**53), "sha256": SHA256S}
)


@given(
    sequence=st.integers(min_value=0, max_value=2**53),
    rollback_from=ROLLBACKS,
    replaces=st.none() | MODEL_IDS,
)
def test_any_sequence_rollback_and_replaced_line_survive_signing(
    sequence: int, rollback_from: dict[str, object] | None, replaces: str | None
) -> None:
    manifest = _manifest(sequence=sequence, rollback_from=rollback_from, replaces_model_id=replaces)

    verified = FLEET_TRUST.verify(sign_manifest(manifest, FLEET_KEY))

    assert verified == manifest
    assert verified.rollback is (rollback_from is not None)


BAD_ORDER_FIELDS = st.one_of(
    st.tuples(
        st.just("sequence"),
        st.integers(max_value=-1)
        | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
        | st.lists(st.integers(), max_size=2),
    ),
    st.tuples(
        st.just("rollback_from"),
        st.fixed_dictionaries({"version": st.integers(max_value=0), "sha256": SHA256S})
        | st.fixed_dictionaries(
            {"version": st.integers(min_value=1), "sha256": st.text(max_size=70)}
        ).filter(lambda d: len(d["sha256"]) != 64)
        | st.just({"version": 3}),
    ),
    st.tuples(
        st.just("replaces_model_id"),
        st.text(max_size=70).filter(
            lambda t: not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", t)
        ),
    ),
)


@given(field=BAD_ORDER_FIELDS)
def test_a_validly_signed_manifest_with_a_bad_ordering_field_names_it(
    field: tuple[str, object],
) -> None:
    name, value = field
    payload = json.dumps({**json.loads(SIGNED.payload), name: value})

    with pytest.raises(MalformedManifest, match=name):
        FLEET_TRUST.verify(_sign_text(payload))
