"""The release store: content-addressed model artifacts and signed release records, in files.

::

    <store>/
      artifacts/<sha256>                 the model's bytes, read-only, written once
      releases/<model_id>/<version>.json a :class:`Release` (pydantic JSON)
      .lock                              held while a release is added

An artifact is written to a temporary file, fsynced and renamed to its sha256: a crash
leaves it whole or absent, and the same model given twice is stored once. A release
record is linked into place only if none exists for its model id and version, so two
``release create`` runs never overwrite each other's release (the lock also orders their
sequence numbers).

Signing happens on the operator's side (``edgefleet release create``, ``ops/release.py``)
with the operator's release key: :func:`create_release` and :func:`sign_rollback` take
the key as an argument and the controller, which only reads the store (``artifacts.py``
serves it), never calls them. Sequences come from the key's own counter
(``edgefleet.ops.fleet.SequenceCounter``, shared with ``manifest create``), raised above
the highest this store recorded for the model line.

Errors::

    EdgefleetError
    ├── ReleaseExists (Refused)         that model id and version is stored     exit 3
    ├── UnknownRelease (SettingError)   no such release id                        exit 2
    └── StoreError (EnvironmentProblem) the store's files cannot be read/written  exit 1
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.agent.protocol import (
    SHA256_PATTERN,
    TOPIC_LEVEL_PATTERN,
    Manifest,
    RollbackFrom,
    SignedManifest,
    describe_errors,
)
from edgefleet.ops.errors import Refused
from edgefleet.ops.fleet import ManifestTerms, SequenceCounter, build_manifest
from edgefleet.provisioning import sign_manifest
from edgefleet.runtime import EnvironmentProblem, SettingError, inspect_model, read_model

__all__ = [
    "RELEASE_SCHEMA_VERSION",
    "STORE_ENV",
    "Release",
    "ReleaseExists",
    "ReleaseStore",
    "StoreError",
    "UnknownRelease",
    "artifact_url",
    "create_release",
    "parse_release_id",
    "sign_rollback",
]

STORE_ENV = "EDGEFLEET_RELEASES"
"""The environment variable naming the release store when ``--store`` is not given."""
RELEASE_SCHEMA_VERSION = 1
ARTIFACTS_DIR = "artifacts"
RELEASES_DIR = "releases"
LOCK_FILE = ".lock"
ARTIFACTS_PATH = "/artifacts"
"""Where the controller serves artifacts: ``<url-base>/artifacts/<sha256>``."""
_ARTIFACT_MODE = 0o444
_RELEASE_ID = re.compile(r"^(?P<model_id>[^@]+)@(?P<version>[1-9][0-9]*)$")


class ReleaseExists(Refused):
    """A release with that model id and version is in the store already; nothing written."""


class UnknownRelease(SettingError):
    """No release with that id is in the store."""


class StoreError(EnvironmentProblem):
    """The store's files cannot be read or written (permissions, a full disk, damage)."""


class Release(BaseModel):
    """One release as the store records it: the artifact, who signed it, and the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    schema_version: int = Field(
        RELEASE_SCHEMA_VERSION, description="Version of this record's schema."
    )
    model_id: str = Field(pattern=TOPIC_LEVEL_PATTERN, description="The model line.")
    version: int = Field(ge=1, description="Release number within the model line.")
    sha256: str = Field(pattern=SHA256_PATTERN, description="sha256 of the model's bytes.")
    size: int = Field(gt=0, description="Size of the model in bytes.")
    notes: str = Field("", max_length=4096, description="The operator's release notes.")
    created_at: float = Field(description="Unix seconds when the release was created.")
    key_id: str = Field(description="The release key that signed the manifest.")
    sequence: int = Field(ge=1, description="The manifest's sequence in its model line.")
    expires_at: float = Field(description="Unix seconds after which devices refuse it.")
    manifest: SignedManifest = Field(description="The signed manifest devices are given.")

    @property
    def id(self) -> str:
        """``<model_id>@<version>``: how the CLI and rollouts name the release."""
        return f"{self.model_id}@{self.version}"

    def signed_terms(self) -> Manifest:
        """The manifest the signature covers (parsed from its payload, not verified)."""
        return Manifest.model_validate_json(self.manifest.payload)


def parse_release_id(text: str) -> tuple[str, int]:
    """``MODEL_ID@VERSION`` as (model id, version); :class:`UnknownRelease` when malformed."""
    match = _RELEASE_ID.fullmatch(text.strip())
    if match is None or not re.fullmatch(TOPIC_LEVEL_PATTERN, match["model_id"]):
        raise UnknownRelease(
            f"{text!r} is not a release id",
            hint="name a release as MODEL_ID@VERSION ('edgefleet release list' shows them)",
        )
    return match["model_id"], int(match["version"])


def artifact_url(url_base: str, sha256: str) -> str:
    """Where the controller at ``url_base`` serves the artifact ``sha256``."""
    return f"{url_base.rstrip('/')}{ARTIFACTS_PATH}/{sha256}"


@dataclass(frozen=True)
class ReleaseStore:
    """A release store directory (created on first write)."""

    root: Path

    # -- artifacts ---------------------------------------------------------------------

    def artifact_path(self, sha256: str) -> Path | None:
        """The file of artifact ``sha256``, or None when the store does not hold it."""
        if not re.fullmatch(SHA256_PATTERN, sha256):
            return None
        path = self.root / ARTIFACTS_DIR / sha256
        return path if path.is_file() else None

    def put_artifact(self, content: bytes) -> str:
        """Store ``content`` under its sha256 (once: an artifact already there is kept)."""
        sha256 = hashlib.sha256(content).hexdigest()
        if self.artifact_path(sha256) is not None:
            return sha256
        directory = self.root / ARTIFACTS_DIR
        temporary = directory / f".{sha256}.tmp-{os.getpid()}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with temporary.open("wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            temporary.chmod(_ARTIFACT_MODE)
            os.replace(temporary, directory / sha256)
            _fsync_directory(directory)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise _store_failed(f"write the artifact {sha256}", directory, exc) from exc
        return sha256

    # -- releases ----------------------------------------------------------------------

    def add(self, release: Release) -> None:
        """Record ``release``; :class:`ReleaseExists` if its model id and version are taken."""
        path = self._release_path(release.model_id, release.version)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with temporary.open("w", encoding="utf-8") as file:
                file.write(release.model_dump_json(indent=2) + "\n")
                file.flush()
                os.fsync(file.fileno())
            # link, unlike rename, refuses to replace: the first record of a release stays.
            os.link(temporary, path)
            _fsync_directory(path.parent)
        except FileExistsError:
            raise _exists(release.model_id, release.version) from None
        except OSError as exc:
            raise _store_failed(f"write release {release.id}", path.parent, exc) from exc
        finally:
            temporary.unlink(missing_ok=True)

    def get(self, release_id: str) -> Release:
        """The release ``MODEL_ID@VERSION``; :class:`UnknownRelease` if not stored."""
        model_id, version = parse_release_id(release_id)
        path = self._release_path(model_id, version)
        if not path.is_file():
            raise UnknownRelease(
                f"no release {model_id}@{version} in the store {self.root}",
                hint="'edgefleet release list' shows the releases; check --store",
            )
        return self._read(path)

    def exists(self, model_id: str, version: int) -> bool:
        """Whether a release of ``model_id`` version ``version`` is stored."""
        return self._release_path(model_id, version).is_file()

    def releases(self, model_id: str | None = None) -> list[Release]:
        """Every release (of ``model_id`` only, if given), by model id then version."""
        if model_id is not None and not re.fullmatch(TOPIC_LEVEL_PATTERN, model_id):
            raise SettingError(
                f"{model_id!r} is not a model id",
                hint="use letters, digits, '_', '.' and '-', starting with a letter or digit",
            )
        top = self.root / RELEASES_DIR
        lines = [top / model_id] if model_id is not None else sorted(top.glob("*"))
        found = [self._read(p) for line in lines for p in line.glob("*.json")]
        return sorted(found, key=lambda r: (r.model_id, r.version))

    def highest_sequence(self, model_id: str) -> int:
        """The highest manifest sequence this store recorded for ``model_id``; 0 if none."""
        return max((r.sequence for r in self.releases(model_id)), default=0)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock: one release is added at a time."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = (self.root / LOCK_FILE).open("a")
        except OSError as exc:
            raise _store_failed("open the store's lock", self.root, exc) from exc
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _release_path(self, model_id: str, version: int) -> Path:
        return self.root / RELEASES_DIR / model_id / f"{version}.json"

    def _read(self, path: Path) -> Release:
        try:
            return Release.model_validate_json(path.read_bytes())
        except OSError as exc:
            raise _store_failed("read a release", path.parent, exc) from exc
        except ValidationError as exc:
            raise StoreError(
                f"{path} is not a release record ({describe_errors(exc)})",
                hint="restore the file from a backup, or move it out of the store",
            ) from exc


# -- signing (the operator's side) --------------------------------------------------------


def create_release(
    store: ReleaseStore,
    model: Path,
    terms: ManifestTerms,
    key: Ed25519PrivateKey,
    counter: SequenceCounter,
    *,
    url_bases: Sequence[str] = (),
    notes: str = "",
) -> Release:
    """Validate the model file, sign its manifest on ``terms`` and store artifact and release.

    The manifest names the artifact at each controller of ``url_bases``
    (:func:`artifact_url`), then ``terms.urls`` (``mqtt:``, another server). A bad model
    file raises the runtime's model errors (bad input); a taken model id and version
    :class:`ReleaseExists`, before anything is signed.
    """
    if not re.fullmatch(TOPIC_LEVEL_PATTERN, terms.model_id):
        raise SettingError(
            f"--model-id {terms.model_id!r} is not a model id",
            hint="use letters, digits, '_', '.' and '-', starting with a letter or digit",
        )
    content = read_model(model)
    info = inspect_model(content)
    with store.locked():
        if store.exists(terms.model_id, terms.version):
            raise _exists(terms.model_id, terms.version)
        sequence = counter.next(terms.model_id, at_least=store.highest_sequence(terms.model_id))
        urls = (*(artifact_url(b, info.sha256) for b in url_bases), *terms.urls)
        manifest = build_manifest(info, model.name, replace(terms, urls=urls), sequence)
        signed = sign_manifest(manifest, key)
        counter.record(terms.model_id, sequence)
        store.put_artifact(content.content)
        release = Release(
            model_id=manifest.model_id,
            version=manifest.version,
            sha256=manifest.sha256,
            size=manifest.size,
            notes=notes,
            created_at=manifest.issued_at,
            key_id=signed.key_id,
            sequence=sequence,
            expires_at=manifest.expires_at,
            manifest=signed,
        )
        store.add(release)
    return release


def sign_rollback(
    release: Release,
    undoing: Release,
    key: Ed25519PrivateKey,
    lifetime_s: float,
    counter: SequenceCounter,
    *,
    now: float | None = None,
) -> SignedManifest:
    """The pre-signed manifest that takes a stream from ``undoing`` back to ``release``.

    A rollout holds it from its start, so the controller can roll a wave back without a
    key. It is ``release``'s manifest with ``rollback_from`` naming ``undoing``, a fresh
    sequence of ``release``'s line from ``counter`` (above ``undoing``'s when both are
    one line), expiring ``lifetime_s`` after signing (the rollout's deadline plus a
    margin); when ``undoing`` changed the line, it says it replaces ``undoing``'s.
    """
    if lifetime_s <= 0:
        raise ValueError(f"a rollback needs a lifetime above 0 s, not {lifetime_s}")
    back = release.signed_terms()
    issued_at = time.time() if now is None else now
    floor = max(release.sequence, undoing.sequence if undoing.model_id == back.model_id else 0)
    sequence = counter.next(back.model_id, at_least=floor)
    fields = {
        **back.model_dump(),
        "rollback_from": RollbackFrom(version=undoing.version, sha256=undoing.sha256),
        "issued_at": issued_at,
        "expires_at": issued_at + lifetime_s,
        "sequence": sequence,
    }
    if undoing.model_id != back.model_id:
        fields["replaces_model_id"] = undoing.model_id
    signed = sign_manifest(Manifest.model_validate(fields), key)
    counter.record(back.model_id, sequence)
    return signed


# -- helpers ------------------------------------------------------------------------------


def _exists(model_id: str, version: int) -> ReleaseExists:
    return ReleaseExists(
        f"release {model_id}@{version} exists already; a release is never replaced",
        hint="give the new model another --version ('edgefleet release list' shows the "
        "versions taken)",
    )


def _store_failed(action: str, where: Path, exc: OSError) -> StoreError:
    return StoreError(
        f"cannot {action} in {where}: {exc.strerror or exc}",
        hint=f"check the permissions and free space of {where}",
    )


def _fsync_directory(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
