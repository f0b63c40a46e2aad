"""Enrollment tokens and the enrollment decision: who may get a certificate, under which name.

A token is ``ef1.<id>.<secret>``: ``id`` names its record, ``secret`` proves the holder was
given it. The store (``DIR/enroll/tokens.json``, 0600, written whole) keeps per id only the
sha256 of the secret, the device name the token binds, when it expires and when it was
used, so a copy of the file enrolls nothing. A token is single use: once a certificate was
issued for it, it is refused with ``token_used``, except to the same key again (the device
retries after a lost answer with the key it kept, and gets the same certificate; a thief
holding only the token gains nothing from a certificate for a key it does not have).

The decision (:class:`Enrollment`) is pure: every call gets the time it is about, the store's
content comes in and goes out as a :class:`TokenFile`. Order of the checks: the rate limit
of the claim identity first (it also slows guessing), then the token (forged = unknown id or
wrong secret, told apart from neither in the answer), then expiry, then single use.

Errors::

    EdgefleetError
    └── EnrollmentError          root of this module's errors
        └── TokenStoreError      the token file is unreadable, damaged or cannot be written

A refused request is not an error: :class:`Refusal` carries the code and reason the
device logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.runtime import EdgefleetError

from .pki import PRIVATE_KEY_MODE, check_identity, write_file

TOKEN_PREFIX = "ef1"
TOKEN_PATTERN = re.compile(r"ef1\.([A-Za-z0-9_-]{8,32})\.([A-Za-z0-9_-]{16,128})")
"""A whole token: prefix, id, secret (both URL-safe base64 from :mod:`secrets`)."""
_ID_BYTES = 9
_SECRET_BYTES = 32
TOKEN_FILE_VERSION = 1


class EnrollmentError(EdgefleetError):
    """Root of the enrollment errors."""


class TokenStoreError(EnrollmentError):
    """The token file cannot be read, does not parse, or cannot be written."""


class RefusalCode(str, Enum):
    """Why an enrollment or renewal request was refused (the answer's ``code``)."""

    TOKEN_USED = "token_used"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_UNKNOWN = "token_unknown"
    RATE_LIMITED = "rate_limited"
    BAD_REQUEST = "bad_request"


@dataclass(frozen=True)
class Refusal:
    """A refused request: the code, one line the device logs, and when to try again."""

    code: RefusalCode
    reason: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Grant:
    """A token checked out: sign the request's key under ``device_id``.

    ``certificate``: the PEM issued earlier for this very key with this token (a retry after
    a lost answer), to send again instead of signing anew.
    """

    token_id: str
    device_id: str
    certificate: str | None = None


class TokenRecord(BaseModel):
    """One token as stored: never the secret itself."""

    model_config = ConfigDict(extra="forbid")

    secret_sha256: str = Field(description="hex sha256 of the token's secret part.")
    device_id: str = Field(description="The device name the token binds (the certificate CN).")
    created_at: float = Field(description="Unix seconds.")
    expires_at: float = Field(description="Unix seconds after which the token is refused.")
    used_at: float | None = Field(None, description="When a certificate was issued for it.")
    key_sha256: str | None = Field(
        None, description="sha256 of the public key (DER) the certificate was issued for."
    )
    certificate: str | None = Field(None, description="The certificate issued (PEM).")


class TokenFile(BaseModel):
    """The whole token store."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(TOKEN_FILE_VERSION, description="Version of this file.")
    tokens: dict[str, TokenRecord] = Field(default_factory=dict, description="By token id.")


@dataclass(frozen=True)
class NewToken:
    """A token just made: ``token`` is shown once and stored nowhere."""

    token: str
    token_id: str
    record: TokenRecord


def new_token(device_id: str, *, lifetime_s: float, now: float) -> NewToken:
    """A fresh token binding ``device_id`` (checked as an identity), valid ``lifetime_s``."""
    check_identity(device_id)
    if lifetime_s <= 0:
        raise EnrollmentError(
            f"a token lifetime of {lifetime_s:g} s", hint="give a positive lifetime, e.g. 24h"
        )
    token_id = secrets.token_urlsafe(_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    record = TokenRecord(
        secret_sha256=_digest(secret),
        device_id=device_id,
        created_at=now,
        expires_at=now + lifetime_s,
    )
    return NewToken(f"{TOKEN_PREFIX}.{token_id}.{secret}", token_id, record)


def parse_token(text: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed token, None otherwise."""
    match = TOKEN_PATTERN.fullmatch(text.strip())
    return (match.group(1), match.group(2)) if match else None


class RateLimit:
    """At most ``max_requests`` per ``window_s`` for each claim identity (a sliding window)."""

    def __init__(self, max_requests: int, window_s: float) -> None:
        if max_requests < 1 or window_s <= 0:
            raise EnrollmentError(
                f"rate limit {max_requests} per {window_s:g} s",
                hint="allow at least one request per positive window",
            )
        self.max_requests = max_requests
        self.window_s = window_s
        self._seen: dict[str, deque[float]] = {}

    def admit(self, identity: str, now: float) -> float | None:
        """Count a request at ``now``; None when admitted, else seconds until one would be."""
        seen = self._seen.setdefault(identity, deque())
        while seen and seen[0] <= now - self.window_s:
            seen.popleft()
        if len(seen) >= self.max_requests:
            return seen[0] + self.window_s - now
        seen.append(now)
        return None


class Enrollment:
    """The enrollment decision over a token file and one rate limit. Pure."""

    def __init__(self, rate: RateLimit) -> None:
        self.rate = rate

    def decide(
        self, tokens: TokenFile, claim_identity: str, token: str, key_sha256: str, now: float
    ) -> Grant | Refusal:
        """Whether ``token``, presented by ``claim_identity`` for the key ``key_sha256``
        at ``now``, may have a certificate."""
        wait_s = self.rate.admit(claim_identity, now)
        if wait_s is not None:
            return Refusal(
                RefusalCode.RATE_LIMITED,
                f"too many enrollment requests from {claim_identity!r} (at most "
                f"{self.rate.max_requests} per {self.rate.window_s:g} s); try again in "
                f"{wait_s:.0f} s",
                retry_after_s=wait_s,
            )
        parsed = parse_token(token)
        record = tokens.tokens.get(parsed[0]) if parsed else None
        if parsed is None or record is None or not _secret_matches(record, parsed[1]):
            return Refusal(
                RefusalCode.TOKEN_UNKNOWN,
                "the enrollment token is not one this fleet issued (mistyped, or forged)",
            )
        token_id = parsed[0]
        if record.used_at is not None:
            if record.key_sha256 is not None and hmac.compare_digest(record.key_sha256, key_sha256):
                return Grant(token_id, record.device_id, record.certificate)
            return Refusal(
                RefusalCode.TOKEN_USED,
                f"the enrollment token {token_id} was used already (for "
                f"{record.device_id!r}); ask the operator for a new one",
            )
        if now >= record.expires_at:
            return Refusal(
                RefusalCode.TOKEN_EXPIRED,
                f"the enrollment token {token_id} for {record.device_id!r} expired; ask the "
                "operator for a new one (edgefleet enroll token)",
            )
        return Grant(token_id, record.device_id)


def mark_used(
    tokens: TokenFile, token_id: str, *, key_sha256: str, certificate: str, now: float
) -> TokenFile:
    """``tokens`` with ``token_id`` used for ``certificate`` (of the key ``key_sha256``)."""
    record = tokens.tokens[token_id].model_copy(
        update={"used_at": now, "key_sha256": key_sha256, "certificate": certificate}
    )
    return tokens.model_copy(update={"tokens": {**tokens.tokens, token_id: record}})


class TokenStore:
    """The token file: read and written whole, under an advisory lock against other writers
    (``enroll token`` while ``enroll serve`` runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(f".{path.name}.lock")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (a read-modify-write inside is not interleaved)."""
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, PRIVATE_KEY_MODE)
        except OSError as exc:
            raise TokenStoreError(
                f"cannot open {self._lock_path}: {exc.strerror or exc}",
                hint="check the fleet directory exists and is writable",
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def load(self) -> TokenFile:
        """The tokens; an empty set when the file does not exist yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return TokenFile()
        except OSError as exc:
            raise TokenStoreError(
                f"cannot read {self.path}: {exc.strerror or exc}",
                hint="run as the user that owns the fleet directory",
            ) from exc
        try:
            return TokenFile.model_validate_json(text)
        except ValidationError as exc:
            raise TokenStoreError(
                f"{self.path} is not a token file edgefleet wrote ({exc.error_count()} problem(s))",
                hint="restore it from a backup, or move it away and issue new tokens",
            ) from exc

    def save(self, tokens: TokenFile) -> None:
        """Replace the file with ``tokens``, whole, mode 0600."""
        data = tokens.model_dump_json(indent=2, exclude_none=True).encode() + b"\n"
        try:
            write_file(self.path, data, mode=PRIVATE_KEY_MODE, replace=True)
        except EdgefleetError as exc:
            raise TokenStoreError(exc.message, hint=exc.hint) from exc

    def add(self, device_id: str, *, lifetime_s: float, now: float) -> NewToken:
        """Make a token for ``device_id`` and store it; returns it (shown once)."""
        made = new_token(device_id, lifetime_s=lifetime_s, now=now)
        with self.locked():
            tokens = self.load()
            self.save(
                tokens.model_copy(update={"tokens": {**tokens.tokens, made.token_id: made.record}})
            )
        return made


def key_digest(public_key_der: bytes) -> str:
    """hex sha256 of a public key's DER encoding: what a used token remembers of its key."""
    return hashlib.sha256(public_key_der).hexdigest()


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _secret_matches(record: TokenRecord, secret: str) -> bool:
    return hmac.compare_digest(record.secret_sha256, _digest(secret))
