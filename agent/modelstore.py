"""The on-device model store: content-addressed models and one pointer per stream.

A power cut at any instant leaves every stream on its old model or its new
one, never on a broken one. Layout under the root (e.g.
``/var/lib/edgefleet/store``)::

    models/<sha256>/model.tflite    the exact bytes (the name is fixed, never from the network)
    models/<sha256>/manifest.json   the SignedManifest it came with (absent for a model
                                    from the config file)
    streams/<stream>/current.json   pointer: {"sha256": ..., "previous": [sha, ...]},
                                    newest previous first
    streams/<stream>/current.json.prev  the pointer before the last switch (kept for repair)
    streams/<stream>/update.json    the update state machine's record (opaque here)
    staging/<sha256>.part           downloads in progress

Why every instant is safe:

- A model enters the store whole. :meth:`ModelStore.add` writes the files into
  ``models/.tmp-<random>``, fsyncs them and that directory, renames it to
  ``models/<sha256>`` and fsyncs ``models/``. A rename is atomic, so
  ``models/<sha256>`` is absent or complete; once ``add`` returns, no power cut
  can take it back. A model leaves the same way: renamed to ``.tmp-<random>``
  first, then deleted, so a half-deleted model never carries a sha256 name.
- Pointers and records are replaced whole: a temporary file beside the target
  is written and fsynced, ``os.replace`` swaps it in (atomic), and the
  directory is fsynced so the swap itself is durable. A reader sees the old
  file or the new one; a leftover ``*.tmp-*`` file has another name and is
  never read.
- The pointer is switched last: :meth:`ModelStore.activate` refuses a model
  that is not stored and verified, and the model was made durable by ``add``
  before, so a pointer never names bytes a crash could lose.
- Leftovers of a crash (``models/.tmp-*``, ``*.tmp-*`` beside a pointer or
  record, staging files of stored models) are ignored by every reader and
  removed by :meth:`ModelStore.prune`.

An unreadable pointer (disk damage: renames make a torn one impossible) is not
skipped silently: :meth:`ModelStore.current` logs it at ERROR, moves it aside as
``current.json.damaged`` and rebuilds it from the stream's committed update
record, or else from the highest manifest version among the verified models
the stream is known to have run (``current.json.prev``'s, leaving out the model
of an update record that is not committed: in flight or refused), with the
history of ``current.json.prev``. Only when none of those is usable
does the stream have no pointer (it runs its config file's model).

Verification: :meth:`ModelStore.has` hashes a model file once per instance and
remembers the file's inode, size and times; a file replaced or rewritten since
is hashed again. Bit rot changes none of those, which is why
:meth:`ModelStore.load` always hashes the bytes it returns and
:meth:`ModelStore.add` (the repair path) never trusts the cache.

The pointer and the record are two files, so no instant changes both: the
update state machine records its intent before it calls ``activate`` and, on
resume, compares its record with :meth:`ModelStore.current`.

Threads: one instance per root, shared by the agent's main thread (start-up
reads ``current``/``load``/``manifest``), its commands thread (the
``rollback_model`` and ``list_models`` commands) and its update thread
(``staging_path``, ``add``, ``activate``, ``rollback``, ``prune``, the record).
Every method that writes, or that fills or reads the verification cache
(``has``, ``load``), holds one :class:`threading.Lock`, so callers need not
serialize anything; reading a
pointer, a record or a manifest takes no lock, because each of those files is
only ever replaced whole by a rename. ``prune`` deletes staging files of
stored models: a downloader unlinks its staging file with ``missing_ok``.

Errors::

    EnvironmentProblem (edgefleet.runtime)
    └── StoreError              the store is unusable: unwritable root, disk full, I/O error
        ├── StoredModelCorrupt  a stored model's bytes no longer match their sha256
        ├── ModelNotStored      no model with that sha256 in the store
        └── NothingToRollBack   the stream has no previous model to go back to

A stream name that is not one topic level, a sha256 that is not 64 lowercase
hex digits, or a manifest of other bytes than the model's is a bug of the
caller and raises ``ValueError``: no path is ever built from an unchecked
string.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.runtime import EnvironmentProblem, ModelBytes

from .durable import TMP_INFIX, fsync_directory, write_atomically, write_durably
from .protocol import SHA256_PATTERN, TOPIC_LEVEL_PATTERN, Manifest, SignedManifest

__all__ = [
    "ModelNotStored",
    "ModelStore",
    "NothingToRollBack",
    "Pointer",
    "StoreError",
    "StoredModel",
    "StoredModelCorrupt",
]

log = logging.getLogger(__name__)

MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
POINTER_FILE = "current.json"
PREVIOUS_POINTER_FILE = "current.json.prev"
DAMAGED_POINTER_FILE = "current.json.damaged"
RECORD_FILE = "update.json"
STAGING_SUFFIX = ".part"
# Names of unfinished writes: never read, removed by prune().
_TMP_PREFIX = ".tmp-"
_HASH_CHUNK_BYTES = 1 << 20

_SHA256 = re.compile(SHA256_PATTERN)
_STREAM = re.compile(TOPIC_LEVEL_PATTERN)


class StoreError(EnvironmentProblem):
    """The model store is unusable (unwritable root, disk full, I/O error)."""


class StoredModelCorrupt(StoreError):
    """A stored model's bytes no longer match their sha256 (disk corruption)."""


class ModelNotStored(StoreError):
    """No model with the requested sha256 is in the store."""


class NothingToRollBack(StoreError):
    """The stream has no previous model to go back to."""


@dataclass(frozen=True)
class Pointer:
    """Which model a stream runs, and the models it ran before (newest first)."""

    sha256: str
    previous: tuple[str, ...]


@dataclass(frozen=True)
class StoredModel:
    """One model in the store, for listings."""

    sha256: str
    size: int
    manifest: SignedManifest | None
    streams: list[str]


class _PointerFile(BaseModel):
    """``current.json`` as written by :meth:`ModelStore.activate`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=SHA256_PATTERN, description="The model the stream runs.")
    previous: tuple[Annotated[str, Field(pattern=SHA256_PATTERN)], ...] = Field(
        description="Earlier models, newest first."
    )


# What a verified model file looked like; a different stat means it was replaced or rewritten.
_FileStamp = tuple[int, int, int, int]


class ModelStore:
    """Content-addressed models and per-stream pointers under one root directory."""

    def __init__(self, root: Path, *, keep_previous: int = 2) -> None:
        """Open the store at ``root``, creating its directories; ``keep_previous`` models
        per stream stay available for rollback."""
        if keep_previous < 0:
            raise ValueError(f"keep_previous must be >= 0, not {keep_previous}")
        self._root = root
        self._models = root / "models"
        self._streams = root / "streams"
        self._staging = root / "staging"
        self._keep_previous = keep_previous
        self._lock = threading.Lock()
        self._verified: dict[str, _FileStamp] = {}
        with self._translated("create its directories"):
            for directory in (self._models, self._streams, self._staging):
                _make_directory(directory)

    @property
    def root(self) -> Path:
        """The store's root directory."""
        return self._root

    def staging_path(self, sha256: str) -> Path:
        """Where a download of ``sha256`` is staged."""
        return self._staging / f"{_check_sha256(sha256)}{STAGING_SUFFIX}"

    # -- models --------------------------------------------------------------------------

    def has(self, sha256: str) -> bool:
        """True if the model is stored and its bytes match its sha256 (checked once per file)."""
        _check_sha256(sha256)
        with self._lock:
            return self._is_verified(sha256)

    def add(self, content: bytes, manifest: SignedManifest | None = None) -> str:
        """Store a model durably (with the manifest it came with); returns its sha256.

        Adding a stored model again only stores a new manifest; a stored copy that is
        corrupt is replaced.
        """
        sha256 = hashlib.sha256(content).hexdigest()
        if manifest is not None:
            _check_manifest(manifest, sha256, len(content))
        with self._lock, self._translated(f"store model {sha256}"):
            # The repair path: hash the file again rather than trust the cache.
            if self._is_verified(sha256, trust_cache=False):
                if manifest is not None:
                    self._store_manifest(sha256, manifest)
                return sha256
            if (self._models / sha256).exists():
                log.warning("model %s in the store is corrupt: replacing it", sha256)
                manifest = manifest or self._readable_manifest(sha256)
                self._retire(sha256)
            self._publish(sha256, content, manifest)
        log.info("model %s stored (%d bytes)", sha256, len(content))
        return sha256

    def add_staged(self, staging: Path, manifest: SignedManifest) -> str:
        """Move a verified download from ``staging`` (``staging_path``) into the store by
        renames, without a second copy of its bytes (which a nearly full disk may not hold);
        returns its sha256. A model stored already only gets the manifest; the staging file
        is gone afterwards either way."""
        sha256 = staging.name.removesuffix(STAGING_SUFFIX)
        _check_sha256(sha256)
        _check_manifest(manifest, sha256, None)
        with self._lock, self._translated(f"store model {sha256}"):
            actual = _file_sha256(staging)
            if actual != sha256:
                staging.unlink(missing_ok=True)
                raise StoreError(
                    f"staged download {staging} is not the model named (its sha256 is {actual})",
                    hint="it was deleted and is downloaded again at the next try",
                )
            if self._is_verified(sha256, trust_cache=False):
                self._store_manifest(sha256, manifest)
                staging.unlink(missing_ok=True)
                return sha256
            if (self._models / sha256).exists():
                self._retire(sha256)
            building = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self._models))
            try:
                with staging.open("rb+") as file:
                    os.fsync(file.fileno())
                staging.rename(building / MODEL_FILE)
                write_durably(building / MANIFEST_FILE, _manifest_bytes(manifest))
                fsync_directory(building)
                building.rename(self._models / sha256)
            except BaseException:
                if (building / MODEL_FILE).exists():  # keep the download for the next try
                    (building / MODEL_FILE).rename(staging)
                shutil.rmtree(building, ignore_errors=True)
                raise
            fsync_directory(self._models)
            fsync_directory(self._staging)
            self._verified[sha256] = _stamp((self._models / sha256 / MODEL_FILE).stat())
        log.info("model %s stored from its staging file", sha256)
        return sha256

    def load(self, sha256: str) -> ModelBytes:
        """The model's bytes, verified against their sha256."""
        path = self._model_path(sha256)
        with self._lock:
            try:
                with path.open("rb") as file:
                    stamp = _stamp(os.fstat(file.fileno()))
                    content = file.read()
            except FileNotFoundError:
                raise _not_stored(sha256, self._root) from None
            except OSError as exc:
                raise _store_error(self._root, f"read model {sha256}", exc) from exc
            model = ModelBytes.from_bytes(content, source=str(path))
            if model.sha256 != sha256:
                self._verified.pop(sha256, None)
                raise _corrupt(path, model.sha256)
            self._verified[sha256] = stamp
        return model

    def manifest(self, sha256: str) -> SignedManifest | None:
        """The manifest stored with the model; None for a model added without one (or none
        stored); a damaged manifest file raises StoreError."""
        path = self._models / _check_sha256(sha256) / MANIFEST_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _store_error(self._root, f"read the manifest of {sha256}", exc) from exc
        try:
            return SignedManifest.model_validate_json(text)
        except ValidationError as exc:
            raise StoreError(
                f"stored manifest {path} is corrupt ({exc.error_count()} errors)",
                hint="the storage may be failing (check the kernel log for I/O errors); "
                "the manifest is replaced when the model is added again with one",
            ) from exc

    def models(self) -> list[StoredModel]:
        """Every stored model (unverified: sizes from the file system), by sha256."""
        using: dict[str, list[str]] = {}
        for stream in self._stream_names():
            pointer = self.current(stream)
            if pointer is not None:
                using.setdefault(pointer.sha256, []).append(stream)
        listing = []
        for sha256 in self._model_names():
            try:
                size = (self._models / sha256 / MODEL_FILE).stat().st_size
            except FileNotFoundError:  # pruned meanwhile
                continue
            listing.append(
                StoredModel(sha256, size, self._listed_manifest(sha256), using.get(sha256, []))
            )
        return listing

    # -- streams -------------------------------------------------------------------------

    def current(self, stream: str) -> Pointer | None:
        """The stream's pointer; None if it has none. A damaged one is rebuilt (logged)."""
        directory = self._stream_dir(stream)
        pointer, damage = _load_pointer(directory / POINTER_FILE)
        if damage is None:
            return pointer
        return self._rebuild_pointer(stream, damage)

    def _rebuild_pointer(self, stream: str, damage: str) -> Pointer | None:
        """Rebuild an unreadable pointer from what else the store knows (see the module)."""
        directory = self._stream_dir(stream)
        previous_pointer, _ = _load_pointer(directory / PREVIOUS_POINTER_FILE)
        history = (previous_pointer.sha256, *previous_pointer.previous) if previous_pointer else ()
        record = _read_json(directory / RECORD_FILE)
        recorded = record.get("sha256") if isinstance(record, dict) else None
        recorded = recorded if isinstance(recorded, str) and _SHA256.fullmatch(recorded) else None
        sha256: str | None = None
        source = ""
        if recorded and record.get("state") == "committed" and self._intact(recorded):
            sha256, source = recorded, "the committed update record"
        else:
            # A record not committed names an update in flight or refused: not that one.
            versions = {
                candidate: version
                for candidate in dict.fromkeys(history)
                if candidate != recorded
                and (version := self._manifest_version(candidate)) is not None
                and self._intact(candidate)
            }
            if versions:
                sha256 = max(versions, key=lambda candidate: versions[candidate])
                source = f"the highest verified stored model of the stream (v{versions[sha256]})"
        try:
            os.replace(directory / POINTER_FILE, directory / DAMAGED_POINTER_FILE)
        except OSError as exc:
            log.error("cannot move the damaged pointer of stream %s aside: %s", stream, exc)
        if sha256 is None:
            log.error(
                "pointer %s of stream %s is unreadable (%s) and nothing in the store can "
                "rebuild it: the stream runs its config file's model",
                directory / POINTER_FILE,
                stream,
                damage,
                extra={"stream": stream},
            )
            return None
        left_out = {sha256} if source.startswith("the committed") else {sha256, recorded}
        previous = tuple(dict.fromkeys(s for s in history if s not in left_out and self._intact(s)))
        pointer = Pointer(sha256, previous[: self._keep_previous])
        try:
            self._write_pointer(stream, pointer, keep_old=False)
        except OSError as exc:  # disk full: this run uses the rebuilt pointer all the same
            log.error("rebuilt pointer of stream %s not written: %s", stream, exc)
        log.error(
            "pointer %s of stream %s is unreadable (%s): rebuilt from %s: model %s, previous %s",
            directory / POINTER_FILE,
            stream,
            damage,
            source,
            sha256,
            list(pointer.previous),
            extra={"stream": stream},
        )
        return pointer

    def _intact(self, sha256: str) -> bool:
        """The model file is there and its bytes match (hashed now, no cache, no lock)."""
        try:
            return _file_sha256(self._models / sha256 / MODEL_FILE) == sha256
        except OSError:
            return False

    def _manifest_version(self, sha256: str) -> int | None:
        manifest = self._readable_manifest(sha256)
        if manifest is None:
            return None
        try:
            version = json.loads(manifest.payload).get("version")
        except (ValueError, AttributeError):
            return None
        return version if isinstance(version, int) else None

    def activate(self, stream: str, sha256: str) -> Pointer:
        """Point the stream at a stored, verified model; the one it ran before becomes
        ``previous[0]``."""
        _check_sha256(sha256)
        with self._lock, self._translated(f"activate model {sha256} for stream {stream}"):
            self._require(sha256)
            old = self.current(stream)
            history = (old.sha256, *old.previous) if old else ()
            previous = tuple(dict.fromkeys(s for s in history if s != sha256))
            pointer = Pointer(sha256, previous[: self._keep_previous])
            self._write_pointer(stream, pointer)
        log.info("stream %s now runs model %s", stream, sha256, extra={"stream": stream})
        return pointer

    def rollback(self, stream: str) -> Pointer:
        """Point the stream back at ``previous[0]``, dropping it from the history."""
        with self._lock, self._translated(f"roll back stream {stream}"):
            old = self.current(stream)
            if old is None or not old.previous:
                raise _nothing_to_roll_back(stream)
            self._require(old.previous[0])
            pointer = Pointer(old.previous[0], old.previous[1:])
            self._write_pointer(stream, pointer)
        log.info(
            "stream %s rolled back from model %s to %s",
            stream,
            old.sha256,
            pointer.sha256,
            extra={"stream": stream},
        )
        return pointer

    def read_record(self, stream: str) -> dict[str, Any] | None:
        """The update record of the stream; None if it has none (or only a damaged one)."""
        data = _read_json(self._stream_dir(stream) / RECORD_FILE)
        if data is not None and not isinstance(data, dict):
            log.warning(
                "update record of stream %s is not a JSON object, ignoring it",
                stream,
                extra={"stream": stream},
            )
            return None
        return data

    def write_record(self, stream: str, record: dict[str, Any] | None) -> None:
        """Replace the stream's update record durably; None deletes it."""
        directory = self._stream_dir(stream)
        path = directory / RECORD_FILE
        with self._lock, self._translated(f"write the update record of stream {stream}"):
            if record is None:
                if path.exists():
                    path.unlink()
                    fsync_directory(directory)
                return
            self._make_stream_dir(directory)
            write_atomically(path, json.dumps(record).encode())

    # -- clean-up ------------------------------------------------------------------------

    def prune(self, *, keep: Collection[str] = ()) -> list[str]:
        """Delete the models no stream runs or may roll back to, and crash leftovers.

        ``keep`` names models stored but not activated yet (an update being validated).
        Returns the sha256 of every model deleted.
        """
        for sha256 in keep:
            _check_sha256(sha256)
        with self._lock, self._translated("prune"):
            used = set(keep)
            for stream in self._stream_names():
                pointer = self.current(stream)
                if pointer is not None:
                    used.update((pointer.sha256, *pointer.previous))
                _remove_temporary_files(self._stream_dir(stream))
            deleted = [sha256 for sha256 in self._model_names() if sha256 not in used]
            for sha256 in deleted:
                self._retire(sha256)
            self._remove_temporary_models()
            self._remove_staged_copies()
        if deleted:
            log.info("pruned %d models from the store: %s", len(deleted), ", ".join(deleted))
        return deleted

    # -- internals (lock held where they write or touch the cache) -----------------------

    def _is_verified(self, sha256: str, *, trust_cache: bool = True) -> bool:
        path = self._models / sha256 / MODEL_FILE
        try:
            stamp = _stamp(path.stat())
            if trust_cache and self._verified.get(sha256) == stamp:
                return True
            actual = _file_sha256(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("stored model %s cannot be read, treating it as absent: %s", path, exc)
            return False
        if actual != sha256:
            log.warning("stored model %s is corrupt: its sha256 is now %s", path, actual)
            self._verified.pop(sha256, None)
            return False
        self._verified[sha256] = stamp
        return True

    def _require(self, sha256: str) -> None:
        """Raise unless the model is stored and verified."""
        if self._is_verified(sha256):
            return
        path = self._models / sha256 / MODEL_FILE
        if not path.is_file():
            raise _not_stored(sha256, self._root)
        raise _corrupt(path, _file_sha256(path))

    def _publish(self, sha256: str, content: bytes, manifest: SignedManifest | None) -> None:
        """Write a model into a temporary directory, then rename it into place."""
        building = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self._models))
        try:
            write_durably(building / MODEL_FILE, content)
            if manifest is not None:
                write_durably(building / MANIFEST_FILE, _manifest_bytes(manifest))
            fsync_directory(building)
            building.rename(self._models / sha256)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        fsync_directory(self._models)
        self._verified[sha256] = _stamp((self._models / sha256 / MODEL_FILE).stat())

    def _retire(self, sha256: str) -> None:
        """Take a model out of the store atomically, then delete its files."""
        self._verified.pop(sha256, None)
        doomed = self._models / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        (self._models / sha256).rename(doomed)
        fsync_directory(self._models)
        shutil.rmtree(doomed)

    def _store_manifest(self, sha256: str, manifest: SignedManifest) -> None:
        path = self._models / sha256 / MANIFEST_FILE
        content = _manifest_bytes(manifest)
        try:
            if path.read_bytes() == content:
                return
        except FileNotFoundError:
            pass
        write_atomically(path, content)

    def _readable_manifest(self, sha256: str) -> SignedManifest | None:
        """The manifest of a corrupt model, if it survived, to keep across the repair."""
        try:
            manifest = self.manifest(sha256)
        except StoreError:
            return None
        if manifest is None:
            return None
        try:
            _check_manifest(manifest, sha256, None)
        except (ValueError, ValidationError):
            return None
        return manifest

    def _listed_manifest(self, sha256: str) -> SignedManifest | None:
        try:
            return self.manifest(sha256)
        except StoreError as exc:
            log.warning("listing model %s without its manifest: %s", sha256, exc)
            return None

    def _write_pointer(self, stream: str, pointer: Pointer, *, keep_old: bool = True) -> None:
        """Replace the pointer; the one it replaces (if sound) becomes ``current.json.prev``."""
        directory = self._stream_dir(stream)
        self._make_stream_dir(directory)
        if keep_old:
            old, damage = _load_pointer(directory / POINTER_FILE)
            if old is not None and damage is None and old != pointer:
                kept = _PointerFile(sha256=old.sha256, previous=old.previous)
                write_atomically(directory / PREVIOUS_POINTER_FILE, kept.model_dump_json().encode())
        data = _PointerFile(sha256=pointer.sha256, previous=pointer.previous)
        write_atomically(directory / POINTER_FILE, data.model_dump_json().encode())

    def _make_stream_dir(self, directory: Path) -> None:
        if not directory.is_dir():
            directory.mkdir(exist_ok=True)
            fsync_directory(self._streams)

    def _model_path(self, sha256: str) -> Path:
        return self._models / _check_sha256(sha256) / MODEL_FILE

    def _stream_dir(self, stream: str) -> Path:
        if not _STREAM.fullmatch(stream):
            raise ValueError(f"invalid stream name {stream!r}: must match {TOPIC_LEVEL_PATTERN}")
        return self._streams / stream

    def _stream_names(self) -> list[str]:
        return sorted(
            entry.name
            for entry in self._streams.iterdir()
            if entry.is_dir() and _STREAM.fullmatch(entry.name)
        )

    def _model_names(self) -> list[str]:
        """The sha256 of every model directory (not the ``.tmp-*`` ones)."""
        return sorted(
            entry.name
            for entry in self._models.iterdir()
            if _SHA256.fullmatch(entry.name) and (entry / MODEL_FILE).is_file()
        )

    def _remove_temporary_models(self) -> None:
        for entry in self._models.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                log.info("removing %s, left over from an interrupted write", entry)
                shutil.rmtree(entry)

    def _remove_staged_copies(self) -> None:
        for entry in self._staging.iterdir():
            sha256 = entry.name.removesuffix(STAGING_SUFFIX)
            staged = entry.name.endswith(STAGING_SUFFIX) and _SHA256.fullmatch(sha256)
            if staged and self._is_verified(sha256):
                entry.unlink(missing_ok=True)

    @contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """Turn a failing file system call into a StoreError that says what to do."""
        try:
            yield
        except OSError as exc:
            raise _store_error(self._root, action, exc) from exc


def _check_sha256(sha256: str) -> str:
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"invalid sha256 {sha256!r}: must be 64 lowercase hex digits")
    return sha256


def _check_manifest(manifest: SignedManifest, sha256: str, size: int | None) -> None:
    """Raise ValueError unless the (already verified) manifest describes these bytes."""
    described = Manifest.model_validate_json(manifest.payload)
    if described.sha256 != sha256 or (size is not None and described.size != size):
        raise ValueError(
            f"manifest of {described.model_id} v{described.version} describes model "
            f"{described.sha256} ({described.size} bytes), not {sha256} ({size} bytes)"
        )


def _manifest_bytes(manifest: SignedManifest) -> bytes:
    return manifest.model_dump_json().encode()


def _stamp(stat: os.stat_result) -> _FileStamp:
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _load_pointer(path: Path) -> tuple[Pointer | None, str | None]:
    """(the pointer, None); (None, None) if there is none; (None, why) if it is damaged."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot be read: {exc.strerror or exc}"
    try:
        data = _PointerFile.model_validate_json(content)
    except ValidationError as exc:
        first = exc.errors()[0]
        return None, f"not a valid pointer: {first['msg']}"
    return Pointer(data.sha256, data.previous), None


def _read_json(path: Path) -> Any:
    """A JSON file's content; None if absent, or unreadable or invalid (logged)."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        # Files are replaced whole, so a crash cannot leave this; disk corruption can.
        log.warning("ignoring %s, which cannot be read: %s", path, exc)
        return None


def _make_directory(directory: Path) -> None:
    if directory.is_dir():
        return
    directory.mkdir(parents=True, exist_ok=True)
    fsync_directory(directory.parent)


def _remove_temporary_files(directory: Path) -> None:
    for entry in directory.iterdir():
        if TMP_INFIX in entry.name and entry.is_file():
            entry.unlink(missing_ok=True)


def _corrupt(path: Path, actual: str) -> StoredModelCorrupt:
    return StoredModelCorrupt(
        f"stored model {path} is corrupt: its sha256 is now {actual}",
        hint="the storage may be failing (check the kernel log for I/O errors); the model "
        "is replaced when its bytes are added again, e.g. by the next update",
    )


def _not_stored(sha256: str, root: Path) -> ModelNotStored:
    return ModelNotStored(
        f"model {sha256} is not in the model store {root}",
        hint="add the model first (publish its manifest again to download it)",
    )


def _nothing_to_roll_back(stream: str) -> NothingToRollBack:
    return NothingToRollBack(
        f"stream {stream}: no previous model to roll back to",
        hint="publish a signed manifest of the model it should run instead",
    )


def _store_error(root: Path, action: str, exc: OSError) -> StoreError:
    """Say what stands between the store and the disk."""
    reason = exc.strerror or str(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    message = f"model store {root}: cannot {action} ({where}{reason})"
    if exc.errno == errno.ENOSPC:
        hint = f"free space on the filesystem holding {root}, or prune old models"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = f"the agent's user needs read and write permission on {root} and below"
    elif exc.errno == errno.EROFS:
        hint = f"{root} is on a read-only filesystem: remount it read-write or move the store"
    else:
        hint = f"check the storage device holding {root} (kernel log, free space)"
    return StoreError(message, hint=hint)
