"""Over-the-air model updates: verify, download, validate, activate, watch, commit or roll back.

The controller's retained ``desired`` message names, per stream, a signed
manifest. For each stream whose desired model is not the one it runs, the
``updates`` thread walks one update through these states, writing the state
to the model store's record (fsynced) before doing the step, so a crash at
any instant resumes from a known state::

    verifying    signature against the fleet keys, then ``acceptance.refusal``: not
                 issued in the future, not expired, the stream's model line, sequence
                 and version newer than the high-water marks (``marks.py``), or a
                 rollback of the installed release; agent version. Accepted: the
                 marks go up, on disk, before anything else happens
    downloading  into the store's staging file, resumed, bounded, sha256 checked
    validating   in a separate process: loads the verified bytes, checks the
                 manifest's inputs/outputs, smoke inference, latency budget
    activating   load + warm the interpreter here, switch the store's current
                 pointer (rename), swap it into the stream between two frames
    probation    errors, latency, restarts watched for ``probation_s``
    committed    kept; older models beyond ``keep_previous`` are pruned
    refused      any check failed: the old model never stopped
    rolled_back  probation failed, or an operator asked: the previous model runs

A manifest that ended ``refused`` or ``rolled_back`` is settled: it is never tried again,
except one refused for an untrusted key (once the key is trusted) or for the clock (not
yet valid, expired by the clock alone: checked again every ``retry_s`` and whenever the
clock is set). A newer desired revision that names a settled one again gets it reported
``refused`` once more, with why (a rolled-back one: that it was rolled back), and a
WARNING; the record keeps the revision it was decided at (``_Record.revision``) so that
a restart does not repeat it. Any other manifest is judged against the marks, which
only go up: a replay, an older release, or two releases published in turn are refused
at verification, before a byte is downloaded. A desired revision older than the
highest seen is ignored. Stored manifests are verified again, against the keys trusted
now, whenever a stored model is loaded (at start, on a rollback).

The store's pointer is switched only after a complete, verified model is in
the store, and the pointer is what the agent loads at start: so a power cut
leaves each stream on the old or the new model. A crash loop during probation
(``max_probation_starts`` starts) rolls back at the next start, before the new
model is loaded again.

Threads: ``on_desired`` runs on the ``mqtt`` thread and only hands the
message over; ``_run`` (the ``updates`` thread) reconciles and ticks
probation; ``rollback`` runs on the ``commands`` thread; ``initial_model``
runs on the main thread before the streams start. ``_lock`` serializes every
change of a stream's model.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from edgefleet.provisioning.signing import (
    KeysNotAccepting,
    SigningError,
    TrustedKeys,
    UnknownSigningKey,
)
from edgefleet.runtime import EdgefleetError, ModelBytes, read_model

from . import acceptance
from .acceptance import Clock, Installed, usable_url
from .budgets import (
    MemoryRoom,
    configured_fps,
    memory_budget_bytes,
    memory_room,
    pace_refusal,
)
from .chunks import Subscriber, fetch_over_mqtt
from .clock import ClockWatch, kernel_synchronised
from .config import StreamSettings, UpdateSettings
from .download import DownloadError, DownloadFailed, DownloadIncomplete, download
from .durable import free_bytes
from .marks import Marks
from .modelstore import ModelStore, NothingToRollBack, StoreError
from .mqtt import Inbound
from .pipeline import LoadedModel, StreamRunner, load_model
from .probation import Throughput, probation_verdict
from .protocol import (
    MQTT_MODEL_URL,
    ClockHealth,
    DesiredState,
    Manifest,
    SignedManifest,
    UpdateReport,
    UpdateState,
)
from .supervisor import SUPERVISOR, fault_point
from .validation import ValidationLimits, ValidationRefused, validate_model

log = logging.getLogger(__name__)

_TICK_S = 1.0
_NICE = 10
_PROGRESS_EVERY_BYTES = 256 * 1024
# Free space a download must leave on the store's filesystem: the outbox's and journal's share.
_ROOM_MARGIN_BYTES = 8 * 1024 * 1024
_LOCK_WAIT_S = 30.0
_IN_PROGRESS = {
    UpdateState.VERIFYING,
    UpdateState.DOWNLOADING,
    UpdateState.VALIDATING,
    UpdateState.ACTIVATING,
}


class UpdateRefused(EdgefleetError):
    """An update that will not be installed; the message is the reason reported."""


class UpdateBusy(EdgefleetError):
    """Another change of the stream's model is under way."""


class _UntrustedKey(UpdateRefused):
    """Signed by a key this device does not trust (yet): tried again once it does."""


class _ClockRefused(UpdateRefused):
    """Refused for the clock (not yet valid, expired by the clock alone): checked again."""


class _NoRoom(EdgefleetError):
    """The store's filesystem cannot hold the download now: the update waits, retried."""


class _InSync(Exception):
    """The desired model is the one running already."""


class _Throughput(BaseModel):
    """``probation.Throughput`` as the record stores it."""

    model_config = ConfigDict(extra="forbid")

    processed: int
    captured: int
    elapsed_s: float


class _Record(BaseModel):
    """The store's record of a stream's latest update (the agent's own file)."""

    model_config = ConfigDict(extra="forbid")

    state: UpdateState
    signed: SignedManifest
    model_id: str
    version: int
    sha256: str
    reason: str | None = None
    bytes_done: int | None = None
    ts: float
    starts: int = 0
    untrusted_key: bool = False
    clock_dependent: bool = False  # refused for the clock: checked again when it changes
    accepted: bool = False  # passed acceptance: the marks name it (a resume skips that check)
    revision: int | None = None  # the desired revision that last asked for this manifest
    validated_p50_ms: float | None = None
    probation_started: float | None = None
    before: _Throughput | None = None  # the replaced model's throughput, at activation

    def report(self) -> UpdateReport:
        return UpdateReport(
            state=self.state,
            model_id=self.model_id,
            version=self.version,
            sha256=self.sha256,
            reason=self.reason,
            bytes_done=self.bytes_done,
            ts=self.ts,
        )


# -- decisions (pure) ---------------------------------------------------------------


def refused_again(
    state: UpdateState, reason: str | None, *, decided_at: int | None, revision: int
) -> str | None:
    """Why a manifest that is settled as refused or rolled back stays refused, when a newer
    desired ``revision`` than the one it was ``decided_at`` names it again; else None. Pure.

    Such a manifest is never tried again (a rolled-back model would be reinstalled), but the
    controller that deployed it again is told so, instead of silence.
    """
    if decided_at is None or revision <= decided_at:
        return None
    if state is UpdateState.ROLLED_BACK:
        return (
            f"this manifest was rolled back on this device ({reason or 'no reason recorded'}); "
            "sign a new manifest to try the model again"
        )
    if state is UpdateState.REFUSED:
        return reason or "refused before"
    return None


def _load_beside(runner: StreamRunner, content: ModelBytes, manifest: Manifest) -> LoadedModel:
    """Load and warm ``content`` for ``runner`` at low priority, beside its running model.

    A short-lived thread at nice 10 (Linux schedules threads as tasks, so the nice value
    is that thread's alone): the running interpreter keeps the CPU it needs meanwhile.
    Not the updates thread itself: a thread cannot take its priority back unprivileged,
    and the validation process it starts inherits it, which would skew its timing.
    """
    outcome: list[LoadedModel | EdgefleetError] = []

    def load() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        except OSError as exc:
            log.debug("model loads at normal priority: %s", exc)
        try:
            outcome.append(
                load_model(runner.settings.model, content, manifest, warm_frame=runner.latest_frame)
            )
        except EdgefleetError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=load, name=f"load-{runner.name}", daemon=True)
    thread.start()
    thread.join()
    if not outcome:  # a bug, already reported by the thread's excepthook
        raise UpdateRefused("loading the model failed unexpectedly; see the device log")
    if isinstance(outcome[0], EdgefleetError):
        raise outcome[0]
    return outcome[0]


def _throughput_of(runner: StreamRunner) -> _Throughput:
    """What the stream's current model processed of the frames delivered since it took over."""
    stats = runner.model_stats
    return _Throughput(
        processed=stats.processed,
        captured=runner.captured_by_model,
        elapsed_s=time.monotonic() - stats.started_s,
    )


def _parse_installed(signed: SignedManifest | None) -> Manifest | None:
    """A manifest from our own store: verified when it was installed."""
    if signed is None:
        return None
    try:
        return Manifest.model_validate_json(signed.payload)
    except ValidationError:
        return None


def _claims(signed: SignedManifest) -> dict[str, Any]:
    """What a manifest that failed its checks says about itself: for the report only."""
    try:
        claimed = json.loads(signed.payload)
    except (json.JSONDecodeError, RecursionError):
        return {}
    return claimed if isinstance(claimed, dict) else {}


# -- the updater -----------------------------------------------------------------------


class Updater:
    """Moves each stream toward its desired model, and back when the new one misbehaves."""

    def __init__(
        self,
        settings: UpdateSettings,
        *,
        store: ModelStore,
        keys: Callable[[], TrustedKeys],
        streams: Callable[[], Mapping[str, StreamRunner]],
        replace_stream: Callable[[str, LoadedModel], None],
        on_change: Callable[[], None],
        agent_version: str,
        broker: Subscriber,
        topic_root: str,
    ) -> None:
        self.settings = settings
        self._broker = broker
        self._topic_root = topic_root
        self.store = store
        self._keys = keys  # read at every verification: a key installed later counts
        self._streams = streams
        self._replace_stream = replace_stream
        self._on_change = on_change
        self._agent_version = agent_version
        self._lock = threading.Lock()
        self._desired: DesiredState | None = None
        self._desired_changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_retry = 0.0
        self.marks = Marks(store.root)
        self._clock_watch = ClockWatch()
        self._stale_revision: int | None = None
        self.desired_revision: int | None = None
        self.malformed_desired = 0
        self.reports: dict[str, UpdateReport] = {}

    # -- lifetime -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the ``updates`` thread."""
        self._stop.clear()
        self._thread = SUPERVISOR.start("updates", self._run, self._stop)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop after the current step (a download or validation is abandoned, resumable)."""
        self._stop.set()
        self._desired_changed.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def on_desired(self, message: Inbound) -> None:  # mqtt thread
        """Take a ``desired`` message; a malformed one is logged and counted."""
        if not message.payload:
            return  # the controller cleared it
        try:
            desired = DesiredState.model_validate_json(message.payload)
        except ValidationError as exc:
            self.malformed_desired += 1
            log.error("desired state ignored, it is malformed: %s", exc.errors()[0]["msg"])
            return
        self._desired = desired
        self._desired_changed.set()

    # -- at start (main thread) -------------------------------------------------------

    def initial_model(self, settings: StreamSettings) -> LoadedModel:
        """The model a stream starts with at agent start, after the crash-loop check."""
        name = settings.name
        record = self._record(name)
        if record is not None:
            self.reports[name] = record.report()
            if record.state in (UpdateState.ACTIVATING, UpdateState.PROBATION):
                self._count_start(name, record)
        loaded = self.current_model(settings)
        if (
            record is not None
            and record.state is UpdateState.COMMITTED
            and loaded.ref.sha256 != record.sha256
        ):
            # The committed model is not what runs (its stored copy or the pointer was lost):
            # the report says so instead of claiming it.
            reason = (
                f"v{record.version} was committed, but its stored model cannot run (damaged "
                f"or missing); running {loaded.ref.sha256[:12]} instead"
            )
            log.error("stream %s: %s", name, reason, extra={"stream": name})
            self.reports[name] = record.model_copy(
                update={"state": UpdateState.ROLLED_BACK, "reason": reason}
            ).report()
        return loaded

    def current_model(self, settings: StreamSettings) -> LoadedModel:
        """The store's current model of a stream (the config's file if it changed), loaded.

        A stored model that fails to load is stepped back from, down to the config's file.
        """
        name = settings.name
        self._adopt_config_model(settings)
        while True:
            pointer = self.store.current(name)
            if pointer is None:
                return load_model(settings.model)
            try:
                return self._load_stored(settings, pointer.sha256)
            except EdgefleetError as exc:
                log.error("stream %s: stored model %s unusable: %s", name, pointer.sha256, exc)
                if not self._step_back(name, f"stored model failed to load: {exc.message}"):
                    return load_model(settings.model)

    def _adopt_config_model(self, settings: StreamSettings) -> None:
        """Put the config file's model in the store as current, unless an update replaced it."""
        name = settings.name
        pointer = self.store.current(name)
        if pointer is not None and self.store.manifest(pointer.sha256) is not None:
            return  # an installed update runs; the config's file is its fallback
        try:
            config_model = read_model(settings.model.path)
        except EdgefleetError:
            if pointer is not None:
                return
            raise
        if pointer is not None and pointer.sha256 == config_model.sha256:
            return
        self.store.add(config_model.content)
        self.store.activate(name, config_model.sha256)

    def _count_start(self, name: str, record: _Record) -> None:
        """A start during probation: count it, and roll back a crash loop."""
        pointer = self.store.current(name)
        if record.state is UpdateState.ACTIVATING and (
            pointer is None or pointer.sha256 != record.sha256
        ):
            return  # the switch never happened: the update resumes from the top
        starts = record.starts + 1
        if starts >= self.settings.max_probation_starts:
            self._step_back(name, f"crash loop: the agent restarted {starts} times in probation")
            return
        self._write(
            name, record, state=UpdateState.PROBATION, starts=starts, probation_started=time.time()
        )

    def _load_stored(self, settings: StreamSettings, sha256: str) -> LoadedModel:
        """A stored model, loaded, once its manifest verifies with the keys trusted now."""
        content = self.store.load(sha256)
        signed = self.store.manifest(sha256)
        manifest = None
        if signed is not None:  # None: the config file's model, the operator's own
            try:
                manifest = self._keys().verify(signed)
            except SigningError as exc:
                raise UpdateRefused(
                    f"its manifest no longer verifies with the trusted keys: {exc.message}",
                    hint="deploy a release signed with a trusted key",
                ) from exc
        return load_model(settings.model, content, manifest)

    def _step_back(self, name: str, reason: str) -> bool:
        """Switch the pointer to the previous model and record why; False if there is none."""
        left = self.store.current(name)
        try:
            self.store.rollback(name)
        except NothingToRollBack:
            return False
        record = self._record(name)
        left_sha = left.sha256 if left is not None else None
        signed = self.store.manifest(left_sha) if left_sha is not None else None
        if (
            signed is not None
            and left_sha is not None
            and (record is None or record.sha256 != left_sha)
        ):
            # The record is about another manifest (one refused since): the report names
            # the model stepped back from, as its stored manifest claims it.
            claimed = _claims(signed)
            record = _Record(
                state=UpdateState.ROLLED_BACK,
                signed=signed,
                model_id=str(claimed.get("model_id", "?")),
                version=claimed["version"] if isinstance(claimed.get("version"), int) else 0,
                sha256=left_sha,
                ts=time.time(),
            )
        if record is not None:
            self._write(name, record, state=UpdateState.ROLLED_BACK, reason=reason)
        log.warning("stream %s: rolled back: %s", name, reason, extra={"stream": name})
        return True

    # -- the updates thread ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            changed = self._desired_changed.wait(_TICK_S)
            if self._stop.is_set():
                return
            if self._clock_watch.jumped():  # refusals for the clock are checked again now
                log.info("the clock was set: decisions that depend on it are checked again")
                changed = True
            fault_point()
            try:
                if changed or time.monotonic() >= self._next_retry:
                    self._desired_changed.clear()
                    self._next_retry = time.monotonic() + self.settings.retry_s
                    if self._desired is not None:
                        self._reconcile(self._desired)
                self._tick_probation()
            except EdgefleetError as exc:  # a full disk, a store gone read-only: try again later
                log.error(
                    "model update step failed, retrying in %.0f s: %s", self.settings.retry_s, exc
                )
                if self._desired is not None:  # the reported state says why it waits
                    for name, signed in self._desired.models.items():
                        self._note(
                            name,
                            signed,
                            f"{exc.message}; retrying in {self.settings.retry_s:.0f} s",
                            state=None,
                        )

    def _reconcile(self, desired: DesiredState) -> None:
        seen = self.marks.desired_revision
        if seen is not None and desired.revision < seen:
            if desired.revision != self._stale_revision:
                self._stale_revision = desired.revision
                log.warning(
                    "desired revision %d ignored: this device saw revision %d already (a "
                    "stale or replayed desired state); the controller publishes a higher one",
                    desired.revision,
                    seen,
                )
            return
        self.marks.see_revision(desired.revision)
        if desired.revision != self.desired_revision:
            self.desired_revision = desired.revision
            self._on_change()
        streams = self._streams()
        for name, signed in desired.models.items():
            if self._stop.is_set():
                return
            runner = streams.get(name)
            if runner is None:
                log.warning("desired state names stream %s, which this device does not run", name)
                continue
            with self._lock:  # the record may change under an operator's rollback
                record = self._record(name)
                if self._wanted(name, record, signed):
                    self._update(runner, signed, desired.revision)
                elif record is not None:
                    self._settled_again(name, record, desired.revision)

    def _wanted(self, name: str, record: _Record | None, signed: SignedManifest) -> bool:
        """Whether ``signed`` still needs work: new, unfinished, or refused for a key that
        this device has come to trust since."""
        if record is None or record.signed != signed:
            return True
        if record.state is UpdateState.REFUSED and record.untrusted_key:
            keys = self._keys()
            return signed.key_id in keys.key_ids and keys.refusal is None
        if record.state is UpdateState.REFUSED and record.clock_dependent:
            return self._clock_allows(name, signed)
        return record.state in _IN_PROGRESS

    def _clock_allows(self, name: str, signed: SignedManifest) -> bool:
        """Whether a manifest refused for the clock is no longer refused for it (then it is
        tried again, and whatever else decides is recorded)."""
        try:
            manifest = self._keys().verify(signed)
        except SigningError:
            return True  # decided again, and recorded, by the full check
        refused = acceptance.refusal(
            manifest,
            marks=self.marks.stream(name),
            installed=self._installed(name),
            clock=self._clock(),
            agent_version=self._agent_version,
        )
        return refused is None or not refused.clock_dependent

    def _settled_again(self, name: str, record: _Record, revision: int) -> None:
        """A settled manifest named by a desired revision: a refused or rolled-back one that
        a newer revision deploys again is reported refused, with why, once per revision."""
        if record.revision is None:  # a record from before revisions were kept: from now
            self._write(name, record, revision=revision)
            return
        reason = refused_again(
            record.state, record.reason, decided_at=record.revision, revision=revision
        )
        if reason is None:
            return
        log.warning(
            "stream %s: desired revision %d names %s v%d again, which stays refused: %s",
            name,
            revision,
            record.model_id,
            record.version,
            reason,
            extra={"stream": name},
        )
        self._write(name, record, state=UpdateState.REFUSED, reason=reason, revision=revision)

    def _update(self, runner: StreamRunner, signed: SignedManifest, revision: int) -> None:
        name = runner.name
        try:
            manifest = self._verify(name, signed, revision)
            content = self._download(name, signed, manifest)
            validated_p50_ms = self._validate(runner, signed, manifest, content)
            self._activate(runner, signed, manifest, content, validated_p50_ms)
        except _InSync:
            log.info("stream %s: the desired model runs already", name, extra={"stream": name})
            self._progress(name, signed, UpdateState.COMMITTED)
        except UpdateRefused as exc:
            self._refuse(
                name,
                signed,
                exc.message,
                revision=revision,
                untrusted_key=isinstance(exc, _UntrustedKey),
                clock_dependent=isinstance(exc, _ClockRefused),
            )
        except (DownloadFailed, DownloadIncomplete) as exc:
            if isinstance(exc, DownloadFailed) and exc.permanent:
                self._refuse(name, signed, f"download failed: {exc.message}", revision=revision)
                return
            # A flaky link or a server that is down: what is staged stays, the next try
            # resumes it (every retry_s, and at every start while the update is desired).
            log.warning("stream %s: download interrupted, resuming later: %s", name, exc)
            self._progress(
                name,
                signed,
                UpdateState.DOWNLOADING,
                reason=f"{exc.message}; retrying in {self.settings.retry_s:.0f} s",
            )
        except (_NoRoom, StoreError) as exc:  # a full disk, a failing card: said, retried
            log.error("stream %s: update waits: %s", name, exc, extra={"stream": name})
            self._note(
                name,
                signed,
                f"{exc.message}; retrying in {self.settings.retry_s:.0f} s",
                state=UpdateState.DOWNLOADING if isinstance(exc, _NoRoom) else None,
            )

    def _note(
        self, name: str, signed: SignedManifest, reason: str, *, state: UpdateState | None
    ) -> None:
        """Put ``reason`` (and ``state``) in the reported state, also when the record cannot
        be written (a full disk)."""
        record = self._record(name)
        persist = record is not None and record.signed == signed
        if record is None or not persist:  # its first record was not written: memory only
            claimed = _claims(signed)
            record = _Record(
                state=state or UpdateState.VERIFYING,
                signed=signed,
                model_id=str(claimed.get("model_id", "?")),
                version=claimed["version"] if isinstance(claimed.get("version"), int) else 0,
                sha256=str(claimed.get("sha256", "?")),
                ts=time.time(),
            )
        changes: dict[str, Any] = {"reason": reason, "ts": time.time()}
        if state is not None:
            changes["state"] = state
        updated = record.model_copy(update=changes)
        try:
            if persist:
                self.store.write_record(name, updated.model_dump(mode="json"))
        except StoreError as exc:
            log.warning("stream %s: update record not written: %s", name, exc)
        self.reports[name] = updated.report()
        self._on_change()

    def _verify(self, name: str, signed: SignedManifest, revision: int) -> Manifest:
        try:
            manifest = self._keys().verify_new(signed)
        except (UnknownSigningKey, KeysNotAccepting) as exc:  # tried again once trusted
            raise _UntrustedKey(f"manifest rejected: {exc.message}") from exc
        except SigningError as exc:
            raise UpdateRefused(f"manifest rejected: {exc.message}") from exc
        record = self._write_new(name, signed, manifest, revision)
        installed = self._installed(name)
        if installed.manifest == manifest:  # resumed after its switch
            raise _InSync
        if not record.accepted:
            self._accept(name, signed, manifest, installed)
        # Accepted before (a resumed update): the marks name it already; raising them
        # again is a no-op, unless a crash came between the record and the marks.
        runs_it = installed.sha256 == manifest.sha256
        self._raise_marks(name, manifest, installed, installs=runs_it)
        if runs_it:
            # The bytes run already: from now on under this manifest (a rollback names it).
            self.store.add(self.store.load(manifest.sha256).content, signed)
            raise _InSync
        return manifest

    def _raise_marks(
        self, name: str, manifest: Manifest, installed: Installed, *, installs: bool
    ) -> None:
        marks = acceptance.accept(manifest, self.marks.stream(name), installed, installs=installs)
        self.marks.accept(name, marks, issued_at=manifest.issued_at)

    def _accept(
        self, name: str, signed: SignedManifest, manifest: Manifest, installed: Installed
    ) -> None:
        """Refuse ``manifest`` unless the decision accepts it; else record that it did,
        before the marks go up (so a crash between the two resumes, not refuses)."""
        refused = acceptance.refusal(
            manifest,
            marks=self.marks.stream(name),
            installed=installed,
            clock=self._clock(),
            agent_version=self._agent_version,
        )
        if refused is not None:
            error = _ClockRefused if refused.clock_dependent else UpdateRefused
            raise error(refused.reason)
        self._progress(name, signed, UpdateState.VERIFYING, accepted=True)

    def _installed(self, name: str) -> Installed:
        pointer = self.store.current(name)
        if pointer is None:
            return Installed()
        return Installed(pointer.sha256, _parse_installed(self.store.manifest(pointer.sha256)))

    def _clock(self) -> Clock:
        return Clock(
            now=time.time(),
            floor=self.marks.clock_floor,
            max_skew_s=self.settings.max_clock_skew_s,
        )

    def clock_health(self) -> ClockHealth:
        """What health says about the clock."""
        floor = self.marks.clock_floor or None
        behind = (floor - time.time()) if floor is not None else 0.0
        return ClockHealth(
            synchronised=kernel_synchronised(),
            trusted_floor=floor,
            behind_floor_s=round(max(behind, 0.0), 1),
        )

    def _download(self, name: str, signed: SignedManifest, manifest: Manifest) -> ModelBytes:
        if self.store.has(manifest.sha256):
            return self.store.load(manifest.sha256)
        self._check_room(manifest)
        self._progress(name, signed, UpdateState.DOWNLOADING, bytes_done=0)
        last = [0]

        def progress(done: int) -> None:
            if done - last[0] >= _PROGRESS_EVERY_BYTES:
                last[0] = done
                self._progress(name, signed, UpdateState.DOWNLOADING, bytes_done=done)

        urls = [u for u in manifest.urls if usable_url(u)]
        for i, url in enumerate(urls):
            try:
                content = self._fetch(url, manifest, progress)
            except DownloadFailed as exc:
                if i + 1 < len(urls) and exc.permanent:
                    log.warning("stream %s: %s; trying the next URL", name, exc)
                    continue
                raise
            except DownloadError as exc:
                if isinstance(exc, DownloadIncomplete):
                    raise
                raise UpdateRefused(f"download refused: {exc.message}") from exc
            staging = self.store.staging_path(manifest.sha256)
            if staging.exists():  # renamed into the store: no second copy of the bytes
                self.store.add_staged(staging, signed)
            else:
                self.store.add(content, signed)
            return self.store.load(manifest.sha256)
        raise UpdateRefused("no URL could be downloaded")

    def _check_room(self, manifest: Manifest) -> None:
        """Raise _NoRoom unless the store's filesystem holds the rest of the download plus
        a margin left for the outbox and the command journal."""
        staging = self.store.staging_path(manifest.sha256)
        try:
            staged = staging.stat().st_size
        except OSError:
            staged = 0
        needed = max(manifest.size - staged, 0) + _ROOM_MARGIN_BYTES
        try:
            free = free_bytes(self.store.root)
        except OSError as exc:
            log.warning("free space of %s unknown (%s); downloading anyway", self.store.root, exc)
            return
        if free < needed:
            raise _NoRoom(
                f"not enough space for the download: needs {needed / 1e6:.1f} MB "
                f"({max(manifest.size - staged, 0) / 1e6:.1f} MB of model, "
                f"{_ROOM_MARGIN_BYTES / 1e6:.0f} MB kept for the outbox), has "
                f"{free / 1e6:.1f} MB free in {self.store.root}",
                hint="free space on that filesystem; the update goes on by itself",
            )

    def _fetch(self, url: str, manifest: Manifest, progress: Callable[[int], None]) -> bytes:
        """The model's bytes from ``url``: HTTP(S) with resume, or chunks over the broker."""
        staging = self.store.staging_path(manifest.sha256)
        if url == MQTT_MODEL_URL:
            return fetch_over_mqtt(
                self._broker,
                self._topic_root,
                sha256=manifest.sha256,
                size=manifest.size,
                staging=staging,
                timeout_s=self.settings.download_timeout_s,
                stop=self._stop,
                on_progress=progress,
            )
        return download(
            url,
            staging,
            size=manifest.size,
            sha256=manifest.sha256,
            timeout_s=self.settings.download_timeout_s,
            attempts=self.settings.download_attempts,
            on_progress=progress,
            stop=self._stop,
        )

    def _validate(
        self, runner: StreamRunner, signed: SignedManifest, manifest: Manifest, content: ModelBytes
    ) -> float:
        """Validate in a separate process, within the budgets (``budgets.py``); returns the
        median invoke time it measured."""
        self._progress(runner.name, signed, UpdateState.VALIDATING)
        model = runner.settings.model
        room = memory_room()
        limits = self._limits(room)
        try:
            report = validate_model(
                content.content,
                manifest=manifest,
                delegate=model.delegate,
                threads=model.threads,
                backend=model.backend,
                frame=runner.latest_frame,
                bench_runs=self.settings.bench_runs,
                timeout_s=self.settings.validation_timeout_s,
                limits=limits,
                reference=self._running_bytes(runner),
            )
        except ValidationRefused as exc:
            where = f" ({room.describe()})" if exc.code in ("load_failed", "too_big") else ""
            raise UpdateRefused(f"validation failed ({exc.code}): {exc.message}{where}") from exc
        log.info(
            "stream %s: model %s v%d validated, median invoke %.1f ms (running model %s ms), "
            "+%d MiB resident",
            runner.name,
            manifest.model_id,
            manifest.version,
            report.latency_p50_ms,
            "?" if report.reference_p50_ms is None else f"{report.reference_p50_ms:.1f}",
            report.memory_bytes >> 20,
        )
        slow = pace_refusal(
            manifest,
            p50_ms=report.latency_p50_ms,
            running_p50_ms=report.reference_p50_ms,
            fps=configured_fps(runner.settings.source),
            max_slowdown=self.settings.max_slowdown,
        )
        if slow is not None:
            raise UpdateRefused(f"validation failed (too_slow): {slow}")
        return report.latency_p50_ms

    def _limits(self, room: MemoryRoom) -> ValidationLimits:
        return ValidationLimits(
            memory_budget_bytes=memory_budget_bytes(self.settings, room),
            address_space_headroom_bytes=self.settings.address_space_headroom_mib << 20,
            cpu_s=self.settings.validation_cpu_s,
        )

    def _running_bytes(self, runner: StreamRunner) -> bytes | None:
        """The running model's bytes, for validation to time it beside the candidate."""
        try:
            return self.store.load(runner.model.sha256).content
        except (EdgefleetError, OSError) as exc:
            log.warning("stream %s: the running model is not compared: %s", runner.name, exc)
            return None

    def _activate(
        self,
        runner: StreamRunner,
        signed: SignedManifest,
        manifest: Manifest,
        content: ModelBytes,
        validated_p50_ms: float,
    ) -> None:
        name = runner.name
        self._progress(name, signed, UpdateState.ACTIVATING)
        try:
            loaded = _load_beside(runner, content, manifest)
        except EdgefleetError as exc:
            raise UpdateRefused(f"the model failed to load in the agent: {exc.message}") from exc
        before = _throughput_of(runner)
        installed = self._installed(name)
        if self.store.manifest(manifest.sha256) != signed:
            # Bytes stored before (a rollback to them): from now on under this manifest.
            self.store.add(content.content, signed)
        self.store.activate(name, manifest.sha256)
        self._raise_marks(name, manifest, installed, installs=True)
        self._install(runner, loaded)
        record = self._record(name)
        assert record is not None
        self._write(
            name,
            record,
            state=UpdateState.PROBATION,
            starts=0,
            validated_p50_ms=validated_p50_ms,
            probation_started=time.time(),
            before=before,
        )

    def _install(self, runner: StreamRunner, loaded: LoadedModel) -> None:
        """Swap live when the input size is unchanged; restart the stream when it changed."""
        new_input, old_input = loaded.predictor.engine.inputs[0], runner.predictor.engine.inputs[0]
        same_input = new_input.shape == old_input.shape
        if same_input and runner.swap(loaded):
            return
        self._replace_stream(runner.name, loaded)

    # -- probation and rollback -------------------------------------------------------------

    def _tick_probation(self) -> None:
        for name, runner in self._streams().items():
            record = self._record(name)
            if record is None or record.state is not UpdateState.PROBATION:
                continue
            if runner.model.sha256 != record.sha256:
                continue
            before = record.before
            manifest = _parse_installed(record.signed)
            verdict = probation_verdict(
                runner.model_stats,
                captured=runner.captured_by_model,
                # The monotonic clock: a wall-clock step must neither end probation early nor
                # stretch it (a restart in probation starts the window again, as ``starts`` does).
                elapsed_s=time.monotonic() - runner.model_stats.started_s,
                validated_p50_ms=record.validated_p50_ms,
                settings=self.settings,
                before=None if before is None else Throughput(**before.model_dump()),
                allow_slower=manifest is not None and manifest.allow_slower,
            )
            with self._lock:  # an operator's rollback may have decided meanwhile
                if self._record(name) != record:
                    continue
                if verdict.commit:
                    self._write(name, record, state=UpdateState.COMMITTED)
                    log.info(
                        "stream %s: model %s v%d committed", name, record.model_id, record.version
                    )
                    self._prune()
                elif verdict.rollback_reason is not None:
                    self._roll_back(runner, f"probation failed: {verdict.rollback_reason}")

    def rollback(self, name: str, reason: str) -> str:  # commands thread
        """Go back to the previous model of ``name`` now; returns its sha256."""
        runner = self._streams().get(name)
        if runner is None:
            raise KeyError(name)
        if not self._lock.acquire(timeout=_LOCK_WAIT_S):
            raise UpdateBusy(
                f"stream {name}: an update is under way", hint="try again when it is done"
            )
        try:
            return self._roll_back(runner, reason)
        finally:
            self._lock.release()

    def _roll_back(self, runner: StreamRunner, reason: str) -> str:
        name = runner.name
        pointer = self.store.current(name)
        if pointer is None or not pointer.previous:
            raise NothingToRollBack(
                f"stream {name}: no previous model to go back to",
                hint="deploy the model you want with a signed manifest",
            )
        try:
            loaded = self._load_stored(runner.settings, pointer.previous[0])
        except UpdateRefused as exc:
            raise UpdateRefused(
                f"stream {name}: not rolled back to model {pointer.previous[0][:12]}: "
                f"{exc.message}",
                hint=exc.hint,
            ) from exc
        self.store.rollback(name)
        self._install(runner, loaded)
        record = self._record(name)
        if record is not None and record.sha256 == pointer.sha256:
            self._write(name, record, state=UpdateState.ROLLED_BACK, reason=reason)
        log.warning(
            "stream %s: rolled back to %s: %s",
            name,
            loaded.ref.sha256[:12],
            reason,
            extra={"stream": name},
        )
        return loaded.ref.sha256

    def _prune(self) -> None:
        try:
            removed = self.store.prune()
        except StoreError as exc:
            log.warning("old models not cleaned up: %s", exc)
            return
        if removed:
            log.info("removed %d old model(s) from the store", len(removed))

    # -- records and reports ------------------------------------------------------------------

    def _record(self, name: str) -> _Record | None:
        raw = self.store.read_record(name)
        if raw is None:
            return None
        try:
            return _Record.model_validate(raw)
        except ValidationError:
            log.warning("stream %s: unreadable update record ignored", name)
            return None

    def _write(self, name: str, record: _Record, **changes: Any) -> _Record:
        updated = record.model_copy(update={**changes, "ts": time.time()})
        self.store.write_record(name, updated.model_dump(mode="json"))
        self.reports[name] = updated.report()
        self._on_change()
        return updated

    def _write_new(
        self, name: str, signed: SignedManifest, manifest: Manifest, revision: int
    ) -> _Record:
        record = _Record(
            state=UpdateState.VERIFYING,
            signed=signed,
            model_id=manifest.model_id,
            version=manifest.version,
            sha256=manifest.sha256,
            ts=time.time(),
        )
        current = self._record(name)
        if current is not None and current.signed == signed:
            record = current  # a resumed update keeps its history
        return self._write(
            name,
            record,
            state=UpdateState.VERIFYING,
            reason=None,
            revision=revision,
            clock_dependent=False,
        )

    def _progress(
        self, name: str, signed: SignedManifest, state: UpdateState, **changes: Any
    ) -> None:
        record = self._record(name)
        if record is not None and record.signed == signed:
            self._write(name, record, state=state, **changes)

    def _refuse(
        self,
        name: str,
        signed: SignedManifest,
        reason: str,
        *,
        revision: int,
        untrusted_key: bool = False,
        clock_dependent: bool = False,
    ) -> None:
        # WARNING, not ERROR: the device is fine and keeps its model; the release is at fault.
        log.warning("stream %s: update refused: %s", name, reason, extra={"stream": name})
        record = self._record(name)
        if record is None or record.signed != signed:
            claimed = _claims(signed)
            record = _Record(
                state=UpdateState.REFUSED,
                signed=signed,
                model_id=str(claimed.get("model_id", "?")),
                version=claimed["version"] if isinstance(claimed.get("version"), int) else 0,
                sha256=str(claimed.get("sha256", "?")),
                ts=time.time(),
            )
        self._write(
            name,
            record,
            state=UpdateState.REFUSED,
            reason=reason,
            untrusted_key=untrusted_key,
            clock_dependent=clock_dependent,
            revision=revision,
        )
