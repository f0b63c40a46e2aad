"""Which release keys this device trusts: the root-signed key set, or plain key files.

Two sources, chosen by ``updates.root_key``:

- :class:`KeySetTrust` (``root_key`` set): the fleet's root public key from the bundle,
  and the key set installed at ``<store_dir>/keyset.json``. At start the bundle's set
  (``updates.key_set``) is installed when the store holds none, or an older one. The
  retained message on ``<root>/_trust/keyset`` brings newer sets: one is installed only
  when ``provisioning.keyset.verify_key_set`` accepts it (signed by the root, newer than
  the installed set, not expired); a refused one is logged with why and reported in
  health (``trust``), and the installed set stays. An installed set that expired still
  verifies the models installed under it, but admits no new manifest until a newer set
  arrives (``TrustedKeys.refusal``).
- :class:`KeyFiles` (no ``root_key``): the ``.pub`` files of ``updates.trusted_keys``,
  read again at every call, as before key sets.

Both are called per manifest (``Updater``'s ``keys``) and return a ``TrustedKeys``.

Threads: ``load`` runs on the main thread at start; ``on_message`` on the ``mqtt``
thread (verifying and writing a small file); ``__call__`` on the ``updates`` and main
threads; ``health`` on the ``health`` thread. The installed set is one slot guarded by
``_lock``; each reader takes it whole.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.provisioning.keyset import (
    KeySet,
    KeySetError,
    KeySetRollback,
    SignedKeySet,
    describe_key_set,
    open_key_set,
    parse_signed_key_set,
    read_key_set,
    verify_key_set,
    write_key_set,
)
from edgefleet.provisioning.pki import PkiFileError
from edgefleet.provisioning.signing import SigningError, TrustedKeys, load_public_key

from .config import UpdateSettings
from .mqtt import Inbound
from .protocol import TrustHealth

log = logging.getLogger(__name__)

INSTALLED_FILE = "keyset.json"
_DEFAULT_TRUSTED_KEYS = UpdateSettings.model_fields["trusted_keys"].default


class KeyFiles:
    """The fleet keys found at ``paths``, read again at each call; changes are logged once."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = paths
        self._seen: frozenset[str] | None = None

    def load(self) -> None:
        """Nothing to load ahead: the files are read at each call."""

    def __call__(self) -> TrustedKeys:
        present = [p for p in self._paths if p.exists()]
        problem = None
        try:
            keys = TrustedKeys.from_paths(present)
        except SigningError as exc:
            keys, problem = TrustedKeys([]), exc
        if keys.key_ids != self._seen:
            self._seen = keys.key_ids
            if keys.key_ids:
                log.info("trusted fleet keys: %s", ", ".join(sorted(keys.key_ids)))
            else:
                where = ", ".join(str(p) for p in self._paths) or "(none configured)"
                log.warning(
                    "no fleet public key trusted (%s): model updates will be refused",
                    problem or f"none at {where}",
                )
        return keys

    def health(self) -> TrustHealth | None:
        """Nothing to report: no key set."""
        return None


class KeySetTrust:
    """The installed root-signed key set, replaced only by a newer one the root signed."""

    def __init__(self, settings: UpdateSettings, *, now: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._now = now
        self._path = settings.store_dir / INSTALLED_FILE
        self._lock = threading.Lock()
        self._root: Ed25519PublicKey | None = None
        self._problem: str | None = None  # why nothing can be trusted (no root key, no set)
        self._installed: KeySet | None = None
        self._last_refusal: str | None = None
        self._expiry_logged = False

    # -- at start (main thread) ------------------------------------------------------

    def load(self) -> None:
        """Read the root key and the installed set; install the bundle's set when newer."""
        settings = self._settings
        assert settings.root_key is not None
        if settings.trusted_keys != _DEFAULT_TRUSTED_KEYS:
            log.warning(
                "updates.trusted_keys is ignored: updates.root_key is set, so the keys that "
                "may sign manifests are the root-signed key set's"
            )
        try:
            self._root = load_public_key(settings.root_key)
        except SigningError as exc:
            self._problem = f"the fleet's root key cannot be used: {exc.message}"
            log.error("%s; model updates will be refused", self._problem)
            return
        self._installed = stored = self._read_installed()
        if settings.key_set is not None:
            self._install_bundle(settings.key_set)
        if self._installed is None:
            self._problem = "no key set is installed (none in the store, none from the bundle)"
            log.warning("%s: model updates are refused until one arrives", self._problem)
        elif self._installed is stored:  # a set the bundle brought was logged as installed
            log.info("trusted key set: %s", describe_key_set(self._installed))

    def _read_installed(self) -> KeySet | None:
        if not self._path.exists():
            return None
        assert self._root is not None
        try:
            return open_key_set(read_key_set(self._path), self._root)
        except KeySetError as exc:
            log.error("the installed key set %s is unusable, ignored: %s", self._path, exc.message)
            return None

    def _install_bundle(self, path: Path) -> None:
        try:
            signed = read_key_set(path)
        except KeySetError as exc:
            self._refused(f"the bundle's key set: {exc.message}")
            return
        self._consider(signed, source=str(path), quiet_if_older=True)

    # -- messages (mqtt thread) --------------------------------------------------------

    def on_message(self, message: Inbound) -> None:
        """A key set from the retained ``_trust/keyset`` message: installed if accepted."""
        if not message.payload:
            return  # cleared by the controller: the installed set stays
        if self._root is None:  # set once, at start
            self._refused(f"key set from {message.topic} not checked: {self._problem}")
            return
        try:
            signed = parse_signed_key_set(message.payload, source=f"the message on {message.topic}")
        except KeySetError as exc:
            self._refused(exc.message)
            return
        self._consider(signed, source=message.topic)

    def _consider(self, signed: SignedKeySet, *, source: str, quiet_if_older: bool = False) -> None:
        """Install ``signed`` when ``verify_key_set`` accepts it; else log and report why."""
        assert self._root is not None
        with self._lock:
            installed = self._installed
        try:
            key_set = verify_key_set(signed, self._root, installed=installed, now=self._utc_now())
        except KeySetRollback as exc:
            if quiet_if_older:  # the store holds a newer set than the bundle: as expected
                log.info("the bundle's key set is not installed: %s", exc.message)
                return
            self._refused(f"key set from {source}: {exc.message}")
            return
        except KeySetError as exc:
            self._refused(f"key set from {source}: {exc.message}")
            return
        if installed is not None and key_set.version == installed.version:
            log.debug("key set version %d again, from %s", key_set.version, source)
            return
        try:
            write_key_set(self._path, signed, replace=True)
        except PkiFileError as exc:
            self._refused(f"key set version {key_set.version} not stored: {exc.message}")
            return
        with self._lock:
            self._installed = key_set
            self._problem = None
            self._expiry_logged = False
        log.info("key set installed from %s: %s", source, describe_key_set(key_set))

    def _refused(self, reason: str) -> None:
        with self._lock:
            self._last_refusal = reason
            version = self._installed.version if self._installed is not None else None
        kept = f"keeping version {version}" if version is not None else "none is installed"
        log.warning("key set refused, %s: %s", kept, reason)

    # -- readers -------------------------------------------------------------------

    def __call__(self) -> TrustedKeys:
        """The keys of the installed set; admitting no new manifest when it expired."""
        with self._lock:
            installed, problem = self._installed, self._problem
        if installed is None:
            return TrustedKeys([], refusal=problem or "no key set is installed")
        if not installed.expired(self._utc_now()):
            return installed.trusted_keys()
        refusal = (
            f"the installed key set version {installed.version} expired at "
            f"{installed.expires:%Y-%m-%d %H:%M} UTC; no new manifest is accepted until a "
            "newer key set is installed"
        )
        with self._lock:
            first = not self._expiry_logged
            self._expiry_logged = True
        if first:
            log.error("%s (the running models stay)", refusal)
        return installed.trusted_keys(refusal=refusal)

    def health(self) -> TrustHealth:
        """The installed set's version and expiry, and the last refusal."""
        with self._lock:
            installed, refusal, problem = self._installed, self._last_refusal, self._problem
        if installed is not None and installed.expired(self._utc_now()):
            problem = f"key set version {installed.version} expired: no new manifest accepted"
        return TrustHealth(
            key_set_version=installed.version if installed is not None else None,
            expires_at=installed.expires.timestamp() if installed is not None else None,
            last_refusal=refusal,
            problem=problem,
        )

    def _utc_now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._now(), datetime.timezone.utc)


Trust = KeyFiles | KeySetTrust


def device_trust(settings: UpdateSettings, *, now: Callable[[], float] = time.time) -> Trust:
    """The trust source ``settings`` configure: the key set with ``root_key``, else files."""
    if settings.root_key is not None:
        return KeySetTrust(settings, now=now)
    if settings.key_set is not None:
        log.warning("updates.key_set is ignored without updates.root_key")
    return KeyFiles(settings.trusted_keys)
