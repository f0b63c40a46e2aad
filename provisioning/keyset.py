"""The root of trust for release keys: a versioned, expiring key set the offline root signs.

python-tuf's idea, cut down to one role: the fleet's **root key** (ed25519, kept offline)
signs a :class:`KeySet`, the release keys that may sign model manifests and the ones
revoked. A device holds the root's public key from its bundle and accepts a new set only
when the root signed it, its version is newer than the one installed (or the same set
again), and it has not expired (:func:`verify_key_set`). Manifests then verify against
the installed set (:meth:`KeySet.trusted_keys`); one signed by a revoked key is refused
with :class:`~edgefleet.provisioning.signing.RevokedSigningKey`, naming the set version
that revoked it.

Wire format, like a signed manifest: :class:`SignedKeySet` carries the set's JSON text as
``payload``, the root's key id, and an ed25519 signature over exactly the payload's UTF-8
bytes; nothing reads the payload before the signature checked out.

Errors, by whose fault they are (all bad input from outside)::

    EdgefleetError
    └── KeySetError            root of this module's errors
        ├── KeySetNotSigned    not signed by the root: another key id, or a bad signature
        ├── KeySetRollback     older than the installed set, or its version with other content
        ├── KeySetExpired      past its ``expires``
        ├── MalformedKeySet    not base64, not JSON, or not a valid KeySet
        └── KeySetChange       a rotation or revocation that cannot be made (a key unknown)
            └── LastKey        revoking the set's last trusted key

Pure functions and immutable models, plus one read and one atomic write of a file.
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edgefleet.agent.protocol import describe_errors
from edgefleet.runtime import EdgefleetError

from .pki import PUBLIC_FILE_MODE, write_file
from .signing import Revocation, TrustedKeys, key_id

DEFAULT_KEY_SET_DAYS = 365
RAW_KEY_BYTES = 32
KEY_ID_PATTERN = r"^[0-9a-f]{16}$"


class KeySetError(EdgefleetError):
    """Root of the key-set errors."""


class KeySetNotSigned(KeySetError):
    """The key set is not signed by the fleet's root key (another key id, or a bad signature)."""


class KeySetRollback(KeySetError):
    """The key set is older than the installed one, or has its version with other content."""


class KeySetExpired(KeySetError):
    """The key set is past its expiry."""


class MalformedKeySet(KeySetError):
    """The signature is not base64, or the payload is not a valid KeySet."""


class KeySetChange(KeySetError):
    """A rotation or revocation that cannot be made: the last key, or a key not in the set."""


class LastKey(KeySetChange):
    """Revoking the last trusted key would leave no key that may sign a manifest."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReleaseKey(_Model):
    """A release key the set trusts to sign manifests."""

    key_id: Annotated[str, Field(pattern=KEY_ID_PATTERN)] = Field(
        description="signing.key_id of the key: 16 hex digits of sha256(raw public key)."
    )
    public_key: str = Field(description="The raw 32-byte ed25519 public key, base64.")
    name: str | None = Field(None, description="The key's file name stem, e.g. release-2.")

    @model_validator(mode="after")
    def _id_matches_key(self) -> ReleaseKey:
        if key_id(self.public()) != self.key_id:
            raise ValueError(f"key_id {self.key_id} is not the id of its public_key")
        return self

    def public(self) -> Ed25519PublicKey:
        """The public key."""
        try:
            raw = base64.b64decode(self.public_key, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"public_key is not base64: {exc}") from None
        if len(raw) != RAW_KEY_BYTES:
            raise ValueError(f"public_key has {len(raw)} bytes, an ed25519 key {RAW_KEY_BYTES}")
        return Ed25519PublicKey.from_public_bytes(raw)

    @classmethod
    def of(cls, public_key: Ed25519PublicKey, name: str | None = None) -> ReleaseKey:
        """The entry for ``public_key``."""
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(key_id=key_id(public_key), public_key=base64.b64encode(raw).decode(), name=name)


class RevokedKey(_Model):
    """A release key the set revoked: a manifest it signed is refused."""

    key_id: Annotated[str, Field(pattern=KEY_ID_PATTERN)] = Field(description="The key's id.")
    revoked_at: AwareDatetime = Field(description="When it was revoked (UTC).")
    reason: str = Field(description="Why, as the operator gave it; devices report it.")
    version: int = Field(ge=1, description="The key-set version that revoked it.")
    name: str | None = Field(None, description="The key's file name stem, when it had one.")

    @field_validator("revoked_at")
    @classmethod
    def _in_utc(cls, value: datetime.datetime) -> datetime.datetime:
        return value.astimezone(datetime.timezone.utc)


class KeySet(_Model):
    """The release keys a fleet trusts, as the root key signs them."""

    version: int = Field(ge=1, description="Goes up by one with every change; never down.")
    expires: AwareDatetime = Field(description="Devices accept no new set past this (UTC).")
    keys: list[ReleaseKey] = Field(min_length=1, description="The trusted release keys.")
    revoked: list[RevokedKey] = Field(
        default_factory=list, description="Keys revoked, never trusted again."
    )

    @field_validator("expires")
    @classmethod
    def _in_utc(cls, value: datetime.datetime) -> datetime.datetime:
        return value.astimezone(datetime.timezone.utc)

    @model_validator(mode="after")
    def _ids_distinct(self) -> KeySet:
        trusted = [k.key_id for k in self.keys]
        revoked = {r.key_id for r in self.revoked}
        if len(set(trusted)) != len(trusted):
            raise ValueError("a key is listed twice in keys")
        both = revoked.intersection(trusted)
        if both:
            raise ValueError(f"key {sorted(both)[0]} is both trusted and revoked")
        return self

    def expired(self, now: datetime.datetime) -> bool:
        """Whether ``now`` is past the set's expiry."""
        return now >= self.expires

    def trusted_keys(self, *, refusal: str | None = None) -> TrustedKeys:
        """The keys that verify manifests, knowing the revoked ones (``refusal``: see
        ``TrustedKeys``)."""
        revoked = {r.key_id: Revocation(r.key_id, r.version, r.reason) for r in self.revoked}
        return TrustedKeys([k.public() for k in self.keys], revoked=revoked, refusal=refusal)

    def find(self, key: str) -> ReleaseKey | None:
        """The trusted key with this id or name."""
        return next((k for k in self.keys if key in (k.key_id, k.name)), None)


class SignedKeySet(_Model):
    """A key set as it travels: its JSON text, signed by the root key."""

    payload: str = Field(description="The KeySet's JSON text; the signature covers its UTF-8.")
    root_key_id: Annotated[str, Field(pattern=KEY_ID_PATTERN)] = Field(
        description="signing.key_id of the root key that signed it."
    )
    signature: str = Field(description="ed25519 signature over the payload, base64.")


# -- making and changing sets --------------------------------------------------------------


def new_key_set(
    public_keys: list[Ed25519PublicKey],
    *,
    days: int = DEFAULT_KEY_SET_DAYS,
    names: Sequence[str | None] = (),
) -> KeySet:
    """Version 1 of a fleet's key set, trusting ``public_keys``, expiring in ``days``.

    ``names``: the keys' file name stems, in the same order (shown by ``keys show``).
    """
    named = [*names, *[None] * (len(public_keys) - len(names))]
    try:
        return KeySet(
            version=1,
            expires=_in_days(days),
            keys=[ReleaseKey.of(k, n) for k, n in zip(public_keys, named, strict=True)],
        )
    except ValidationError as exc:
        raise KeySetChange(
            f"not a key set: {describe_errors(exc)}", hint="give at least one distinct key"
        ) from exc


def sign_key_set(key_set: KeySet, root_key: Ed25519PrivateKey) -> SignedKeySet:
    """Sign the set's JSON text with the root key."""
    payload = key_set.model_dump_json()
    return SignedKeySet(
        payload=payload,
        root_key_id=key_id(root_key.public_key()),
        signature=base64.b64encode(root_key.sign(payload.encode("utf-8"))).decode("ascii"),
    )


def rotated(
    key_set: KeySet,
    new_public_key: Ed25519PublicKey,
    *,
    days: int = DEFAULT_KEY_SET_DAYS,
    name: str | None = None,
) -> KeySet:
    """The next version of ``key_set``, trusting ``new_public_key`` too."""
    entry = ReleaseKey.of(new_public_key, name)
    if key_set.find(entry.key_id) is not None:
        raise KeySetChange(
            f"key {entry.key_id} is in key set version {key_set.version} already",
            hint="make a new key to rotate to",
        )
    if any(r.key_id == entry.key_id for r in key_set.revoked):
        raise KeySetChange(
            f"key {entry.key_id} was revoked; a revoked key is never trusted again",
            hint="make a new key to rotate to",
        )
    return key_set.model_copy(
        update={
            "version": key_set.version + 1,
            "expires": _in_days(days),
            "keys": [*key_set.keys, entry],
        }
    )


def renewed(key_set: KeySet, *, days: int = DEFAULT_KEY_SET_DAYS) -> KeySet:
    """The next version of ``key_set``, the same keys, expiring ``days`` from now."""
    return key_set.model_copy(update={"version": key_set.version + 1, "expires": _in_days(days)})


def revoked(key_set: KeySet, key: str, *, reason: str, days: int = DEFAULT_KEY_SET_DAYS) -> KeySet:
    """The next version of ``key_set``, with ``key`` (an id or name) moved to the revoked."""
    entry = key_set.find(key)
    if entry is None:
        raise KeySetChange(
            f"no key {key!r} in key set version {key_set.version} "
            f"(trusted: {', '.join(_shown(k) for k in key_set.keys)})",
            hint="give a key id or name from 'edgefleet keys show'",
        )
    if len(key_set.keys) == 1:
        raise LastKey(
            f"key {_shown(entry)} is the last trusted key of the set; revoking it would leave "
            "the fleet with no key that may sign a manifest",
            hint="rotate to a new key first ('edgefleet keys rotate'), then revoke this one",
        )
    version = key_set.version + 1
    revocation = RevokedKey(
        key_id=entry.key_id,
        revoked_at=datetime.datetime.now(datetime.timezone.utc),
        reason=reason,
        version=version,
        name=entry.name,
    )
    return key_set.model_copy(
        update={
            "version": version,
            "expires": _in_days(days),
            "keys": [k for k in key_set.keys if k.key_id != entry.key_id],
            "revoked": [*key_set.revoked, revocation],
        }
    )


# -- verifying -----------------------------------------------------------------------------


def open_key_set(signed: SignedKeySet, root: Ed25519PublicKey) -> KeySet:
    """The set, once the root's signature over it checks out; no freshness check.

    For a set this device installed itself (its freshness was checked then); a set from
    outside goes through :func:`verify_key_set`.
    """
    root_id = key_id(root)
    if signed.root_key_id != root_id:
        raise KeySetNotSigned(
            f"key set signed by key {signed.root_key_id}, not by the fleet's root key {root_id}",
            hint="sign the key set with the fleet's root key (keys/root.key)",
        )
    try:
        signature = base64.b64decode(signed.signature, validate=True)
        payload = signed.payload.encode("utf-8")
    except ValueError as exc:  # binascii.Error, non-ASCII signature, unencodable text
        raise MalformedKeySet(
            f"signed key set does not decode: {exc}", hint="sign it again"
        ) from exc
    try:
        root.verify(signature, payload)
    except InvalidSignature:
        raise KeySetNotSigned(
            f"key set signature does not verify with the root key {root_id}",
            hint="the key set was altered or signed by another key; sign it again",
        ) from None
    try:
        return KeySet.model_validate_json(payload)
    except ValidationError as exc:
        raise MalformedKeySet(
            f"signed payload is not a valid key set: {describe_errors(exc)}",
            hint="the signer produced a bad key set; fix it and sign again",
        ) from exc


def verify_key_set(
    signed: SignedKeySet,
    root: Ed25519PublicKey,
    *,
    installed: KeySet | None,
    now: datetime.datetime,
) -> KeySet:
    """The set, when a device may install it: signed by ``root``, not older than (nor a
    different set of the same version as) ``installed``, and not expired at ``now``.

    The same set as ``installed`` is returned as it is (nothing to do).
    """
    key_set = open_key_set(signed, root)
    if installed is not None:
        if key_set.version < installed.version:
            raise KeySetRollback(
                f"key set version {key_set.version} is older than version "
                f"{installed.version}, the one installed",
                hint="publish the newest key set ('edgefleet keys publish')",
            )
        if key_set.version == installed.version and key_set != installed:
            raise KeySetRollback(
                f"key set version {key_set.version} differs from the installed set of the "
                "same version",
                hint="every change of the set needs a new version: make it with "
                "'edgefleet keys rotate' or 'edgefleet keys revoke'",
            )
    if key_set.expired(now):
        raise KeySetExpired(
            f"key set version {key_set.version} expired at {_utc(key_set.expires)}",
            hint="sign a new version with the root key ('edgefleet keys rotate' or "
            "'edgefleet keys revoke') and publish it",
        )
    return key_set


# -- files ---------------------------------------------------------------------------------


def read_key_set(path: Path) -> SignedKeySet:
    """The signed key set in the JSON file at ``path`` (not verified: that needs the root)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MalformedKeySet(f"{path}: no such key set file", hint="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MalformedKeySet(f"cannot read {path}: {exc}", hint="check the file") from exc
    return parse_signed_key_set(text, source=str(path))


def parse_signed_key_set(text: str | bytes, *, source: str) -> SignedKeySet:
    """A :class:`SignedKeySet` from JSON text (a file or a message from ``source``)."""
    try:
        return SignedKeySet.model_validate_json(text)
    except ValidationError as exc:
        raise MalformedKeySet(
            f"{source} is not a signed key set: {describe_errors(exc)}",
            hint="publish the fleet's keys/keyset.json as it was written",
        ) from exc


def write_key_set(path: Path, signed: SignedKeySet, *, replace: bool = False) -> None:
    """Write ``signed`` to ``path`` whole (temporary file, fsync, rename), mode 0644."""
    data = (signed.model_dump_json(indent=2) + "\n").encode("utf-8")
    write_file(path, data, mode=PUBLIC_FILE_MODE, replace=replace)


def describe_key_set(key_set: KeySet) -> str:
    """A one-line summary: version, expiry, trusted key ids."""
    keys = ", ".join(_shown(k) for k in key_set.keys)
    return f"version {key_set.version}, expires {_utc(key_set.expires)}, keys {keys}"


def _shown(key: ReleaseKey) -> str:
    return f"{key.key_id} ({key.name})" if key.name else key.key_id


def _in_days(days: int) -> datetime.datetime:
    if days < 1:
        raise KeySetChange(f"a key set must last at least a day, not {days}", hint="give --days")
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return now + datetime.timedelta(days=days)


def _utc(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
