"""ed25519 signatures on model manifests: the fleet signing key and the keys a device trusts.

The controller signs a :class:`~edgefleet.agent.protocol.Manifest` as bytes: the payload is
the manifest's JSON text, the signature covers exactly its UTF-8 bytes, and a device parses
that text into a ``Manifest`` only after the signature checked out (python-tuf's order:
nothing reads metadata before it is verified). The crypto is PyCA ``cryptography``.

Key files: ``<name>.key`` is the private key (PKCS#8 PEM, unencrypted, mode 0600: keep it off
the devices), ``<name>.pub`` the public key (SubjectPublicKeyInfo PEM) that devices trust. A
key is named on the wire by :func:`key_id`, the first 16 hex digits of the sha256 of its 32
raw bytes.

Errors, by whose fault they are::

    EdgefleetError
    └── SigningError              root of this module's errors
        ├── BadSignature          the signature does not verify (bad input: forged or altered)
        ├── UnknownSigningKey     signed by a key this device does not trust (bad input)
        ├── RevokedSigningKey     signed by a key the root-signed key set revoked (bad input)
        ├── KeysNotAccepting      the trusted keys admit no new manifest now (an expired key set)
        ├── MalformedManifest     signature not base64, or the signed text is not a Manifest
        └── KeyFileError          a key file missing, unreadable, not ed25519, or in the way

Pure functions and one immutable class; no threads.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from edgefleet.agent.protocol import Manifest, SignedManifest, describe_errors
from edgefleet.runtime import EdgefleetError

KEY_ID_HEX_DIGITS = 16
PRIVATE_KEY_SUFFIX = ".key"
PUBLIC_KEY_SUFFIX = ".pub"
PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644
# A key name becomes a file name: no directory parts, no leading dot.
KEY_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


class SigningError(EdgefleetError):
    """Root of the manifest-signing errors."""


class BadSignature(SigningError):
    """The signature does not verify: the manifest was altered, or signed by another key."""


class UnknownSigningKey(SigningError):
    """The manifest names a signing key that is not among the trusted keys."""


class RevokedSigningKey(SigningError):
    """The manifest names a signing key that the fleet's key set revoked: never accepted again."""


class KeysNotAccepting(SigningError):
    """The trusted keys admit no new manifest now (the key set they come from expired)."""


class MalformedManifest(SigningError):
    """The signature is not base64, or the signed payload is not a valid Manifest."""


class KeyFileError(SigningError):
    """A key file is missing, unreadable, not an ed25519 key, or would be overwritten."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key's name on the wire: the first 16 hex digits of sha256(raw public key bytes)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX_DIGITS]


def generate_signing_key(directory: Path, name: str = "fleet") -> tuple[Path, Path]:
    """Write a new key pair ``name.key`` (0600) and ``name.pub``; never overwrite either."""
    if not re.fullmatch(KEY_NAME_PATTERN, name):
        raise KeyFileError(
            f"key name {name!r} is not a plain file name",
            hint="use letters, digits, '_', '.' and '-', starting with a letter or digit",
        )
    private_path = directory / f"{name}{PRIVATE_KEY_SUFFIX}"
    public_path = directory / f"{name}{PUBLIC_KEY_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(
                f"{path} exists; refusing to overwrite a signing key",
                hint="choose another directory or --name; devices trust the existing key",
            )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_new(private_path, private_pem, PRIVATE_KEY_MODE)
        try:
            _write_new(public_path, public_pem, PUBLIC_KEY_MODE)
        except BaseException:
            private_path.unlink()
            raise
    except FileExistsError as exc:
        raise KeyFileError(
            f"{exc.filename} appeared while writing the key pair; nothing was overwritten",
            hint="choose another directory or --name",
        ) from exc
    except OSError as exc:
        raise KeyFileError(
            f"cannot write the key pair in {directory}: {exc.strerror or exc}",
            hint="choose a directory you can write to",
        ) from exc
    return private_path, public_path


def _write_new(path: Path, content: bytes, mode: int) -> None:
    # O_EXCL: creation fails rather than replacing a file that appeared since the check.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)  # the umask may have narrowed it; keep it exact
        file.write(content)
        file.flush()
        os.fsync(file.fileno())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The ed25519 private key in a PKCS#8 PEM file."""
    data = _read_key_file(path)
    if b"PUBLIC KEY-----" in data:
        raise KeyFileError(
            f"{path} holds a public key, not the private signing key",
            hint=f"pass the {PRIVATE_KEY_SUFFIX} file of the pair",
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(
            f"{path} is not an unencrypted PEM private key ({exc})",
            hint="pass a key written by 'edgefleet keys generate'",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{path} holds a {type(key).__name__}, not an ed25519 key",
            hint="manifests are signed with ed25519; make one with 'edgefleet keys generate'",
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The ed25519 public key in a SubjectPublicKeyInfo PEM file."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(
            f"{path} is not a PEM public key ({exc})",
            hint=f"pass the {PUBLIC_KEY_SUFFIX} file written by 'edgefleet keys generate'",
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(
            f"{path} holds a {type(key).__name__}, not an ed25519 key",
            hint="manifests are signed with ed25519; trust the fleet's .pub file",
        )
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file", hint="check the path") from None
    except IsADirectoryError:
        raise KeyFileError(
            f"{path} is a directory, not a key file", hint="check the path"
        ) from None
    except OSError as exc:
        raise KeyFileError(
            f"cannot read {path}: {exc.strerror or exc}", hint="check the file's permissions"
        ) from exc


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> SignedManifest:
    """Sign the manifest's JSON text; the signature covers exactly ``payload``'s UTF-8 bytes."""
    payload = manifest.model_dump_json()
    signature = key.sign(payload.encode("utf-8"))
    return SignedManifest(
        payload=payload,
        key_id=key_id(key.public_key()),
        signature=base64.b64encode(signature).decode("ascii"),
    )


@dataclass(frozen=True)
class Revocation:
    """A key the fleet's key set revoked: which set version revoked it, and why."""

    key_id: str
    version: int
    reason: str


class TrustedKeys:
    """The fleet public keys a device trusts, and the ones it must never trust again.

    ``revoked``: keys a root-signed key set revoked, by key id; a manifest they signed is
    refused with :class:`RevokedSigningKey`. ``refusal``: set when these keys admit no new
    manifest now (the key set expired); :meth:`verify` still checks stored manifests, and
    :meth:`verify_new` refuses with it.
    """

    def __init__(
        self,
        keys: Iterable[Ed25519PublicKey],
        *,
        revoked: Mapping[str, Revocation] | None = None,
        refusal: str | None = None,
    ) -> None:
        self._revoked = dict(revoked or {})
        self._keys = {key_id(key): key for key in keys}
        for revoked_id in self._revoked:
            self._keys.pop(revoked_id, None)  # a revoked key is never trusted, listed or not
        self.refusal = refusal

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> TrustedKeys:
        """Load ``.pub`` files; a directory contributes every ``*.pub`` file in it."""
        keys: list[Ed25519PublicKey] = []
        for path in paths:
            if path.is_dir():
                files = sorted(path.glob(f"*{PUBLIC_KEY_SUFFIX}"))
                if not files:
                    raise KeyFileError(
                        f"{path} holds no {PUBLIC_KEY_SUFFIX} files",
                        hint="copy the fleet's public key there",
                    )
                keys.extend(load_public_key(file) for file in files)
            else:
                keys.append(load_public_key(path))
        return cls(keys)

    @property
    def key_ids(self) -> frozenset[str]:
        """The ids of the trusted keys."""
        return frozenset(self._keys)

    @property
    def revoked(self) -> Mapping[str, Revocation]:
        """The revoked keys, by key id."""
        return dict(self._revoked)

    def verify_new(self, signed: SignedManifest) -> Manifest:
        """As :meth:`verify`, for a manifest not installed yet: refused while ``refusal`` is set."""
        if self.refusal is not None:
            raise KeysNotAccepting(
                f"manifest not accepted now: {self.refusal}",
                hint="publish a new key set signed by the root key ('edgefleet keys rotate' "
                "or 'edgefleet keys revoke', then 'edgefleet keys publish')",
            )
        return self.verify(signed)

    def verify(self, signed: SignedManifest) -> Manifest:
        """The manifest, once its signature verifies with a trusted key; else a SigningError."""
        revocation = self._revoked.get(signed.key_id)
        if revocation is not None:
            raise RevokedSigningKey(
                f"manifest signed by key {signed.key_id}, which key set version "
                f"{revocation.version} revoked ({revocation.reason})",
                hint="sign the manifest again with a current release key "
                "('edgefleet keys show' lists them)",
            )
        key = self._keys.get(signed.key_id)
        if key is None:
            raise UnknownSigningKey(
                f"manifest signed by key {signed.key_id!r}, which this device does not trust",
                hint="sign with the fleet key, or add its .pub file to the device's trusted keys",
            )
        try:
            signature = base64.b64decode(signed.signature, validate=True)
            payload = signed.payload.encode("utf-8")
        except ValueError as exc:  # binascii.Error, non-ASCII signature, unencodable text
            raise MalformedManifest(
                f"signed manifest does not decode: {exc}",
                hint="re-create it with 'edgefleet manifest create'",
            ) from exc
        try:
            key.verify(signature, payload)
        except InvalidSignature:
            raise BadSignature(
                f"manifest signature does not verify with key {signed.key_id}",
                hint="the manifest was altered or signed by another key; re-sign it",
            ) from None
        try:
            return Manifest.model_validate_json(payload)
        except ValidationError as exc:
            raise MalformedManifest(
                f"signed payload is not a valid manifest: {describe_errors(exc)}",
                hint="the signer produced a bad manifest; fix it and sign again",
            ) from exc
