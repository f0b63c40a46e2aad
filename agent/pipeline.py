"""One stream end to end: source -> latest frame -> model -> event filter -> outbox.

Threads per stream:

- ``capture-<stream>`` (``sources.capture.Capture``) reads frames into a
  ``FrameSlot``; a live source overwrites a frame inference has not taken yet
  (counted as skipped), so a slow model never builds a queue.
- ``infer-<stream>`` (``StreamRunner._infer``) takes the newest frame,
  pre-processes it straight into the interpreter's input, invokes, and hands
  the results on. Nothing else runs here: the interpreter is the bottleneck.
  Between two frames it takes a new model handed over by ``swap`` (loaded and
  warmed by the caller beforehand), so a model update costs no frame.
- ``events-<stream>`` (``StreamRunner._events``) filters and tracks the
  results, serializes the events and writes each frame's events to the outbox
  in one transaction.

Capture of frame n+1, inference of frame n and the events of frame n-1 overlap.
The hand-over to the events thread is a bounded queue that blocks when full, so
no result is ever dropped there; it is far faster than inference and stays
nearly empty.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from edgefleet.runtime import (
    RESULT_KEYS,
    EdgefleetError,
    EnvironmentProblem,
    Labels,
    ModelBytes,
    Prediction,
    Predictor,
    ResizeMode,
    Segment,
    SegmentationTask,
    TaskName,
    read_model,
    with_region_coverage,
)
from edgefleet.runtime.delegates import LoadedDelegate
from edgefleet.runtime.predictor import result_dict
from edgefleet.runtime.preprocess import Frame
from edgefleet.runtime.tasks import RawTensor, Result

from .clock import kernel_synchronised
from .config import ModelSettings, StreamSettings
from .events import EventDraft, EventFilter
from .fallback import FallbackChain
from .metrics import LatencyWindow
from .privacy import Redactor
from .protocol import (
    EVENT_MAX_BYTES,
    EventMessage,
    Manifest,
    ModelRef,
    SnapshotSize,
    StreamHealth,
    Topics,
)
from .snapshots import Snapshot, SnapshotRule, Trigger, take
from .sources import make_source
from .sources.capture import Capture, FrameSlot
from .stages import SecondStages
from .supervisor import SUPERVISOR, fault_point

log = logging.getLogger(__name__)

_FRAME_WAIT_S = 0.5
_RESULTS_QUEUE = 64
_FPS_WINDOW_S = 5.0
_FPS_SAMPLES = 2048  # room for 400 fps over the window
_SWAP_WAIT_S = 10.0


@dataclass(frozen=True)
class _Results:
    """One frame's results on their way from inference to the events thread."""

    results: list[Any]
    capture_ts: float
    taken_at: float  # monotonic: when inference took the frame, what tracking decides on
    inference_ts: float
    inference_ms: float
    model: ModelRef
    latency_ms: float  # capture to inference done, on the monotonic clock


class EventSink(Protocol):
    """Where a stream's serialized events go (the outbox, in the agent)."""

    def emit(self, stream: str, topic: str, payloads: list[bytes]) -> None:
        """Store one frame's events durably, in order."""


@dataclass
class _Counters:
    processed: int = 0
    failed: int = 0
    events: int = 0
    lost: int = 0
    last_error: str | None = None


@dataclass
class ModelStats:
    """What the current model did since it started on this stream (probation reads it)."""

    processed: int = 0
    failed: int = 0
    inference: LatencyWindow = field(default_factory=LatencyWindow)
    captured_at_start: int = 0  # the source's frame count when this model took over
    started_s: float = field(default_factory=time.monotonic)  # when it took over


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run on a stream, and how events name it."""

    predictor: Predictor
    ref: ModelRef


def load_model(
    settings: ModelSettings,
    content: ModelBytes | None = None,
    manifest: Manifest | None = None,
    *,
    warm_frame: Frame | None = None,
) -> LoadedModel:
    """Open a stream's model: the config's file, or ``content`` with its manifest's task config.

    ``warm_frame`` is run through it once, so the first real frame is not the slow one.
    """
    task, labels = settings.task, Labels.from_file(settings.labels) if settings.labels else None
    min_score, top_k = settings.min_score, settings.top_k
    if manifest is not None:
        spec = manifest.task
        task = spec.task or task
        if spec.labels is not None:
            labels = Labels.from_lines(spec.labels, f"manifest {manifest.model_id}")
        min_score = spec.min_score if spec.min_score is not None else min_score
        top_k = spec.top_k or top_k
    predictor = Predictor.open(
        content if content is not None else read_model(settings.path),
        task=task,
        labels=labels,
        delegate=settings.delegate,
        threads=settings.threads,
        backend=settings.backend,
        resize=settings.resize,
        min_score=min_score,
        top_k=top_k,
        anchors=settings.anchors,
        carry=settings.carry,
    )
    try:
        if warm_frame is not None:
            predictor.predict(warm_frame)
    except EdgefleetError:
        predictor.close()
        raise
    return LoadedModel(predictor, model_ref(settings, predictor, manifest))


def model_ref(
    settings: ModelSettings, predictor: Predictor, manifest: Manifest | None = None
) -> ModelRef:
    """How events and status name the model a stream runs."""
    engine = predictor.engine
    delegate: LoadedDelegate = engine.delegate
    if manifest is not None:
        model_id, version = manifest.model_id, str(manifest.version)
    else:
        model_id = settings.id or settings.path.stem
        version = settings.version or engine.model.sha256[:12]
    return ModelRef(
        id=model_id,
        version=version,
        sha256=engine.model.sha256,
        task=predictor.task.name.value,
        backend=engine.backend.label,
        delegate=delegate.description,
    )


def _is_config_model(settings: ModelSettings, loaded: LoadedModel) -> bool:
    """Whether ``loaded`` is the config's own model file (its fallbacks are builds of it),
    not a release an update installed."""
    try:
        return read_model(settings.path).sha256 == loaded.ref.sha256
    except EdgefleetError:
        return False


class StreamRunner:
    """Owns one stream's capture, model, filter and inference thread."""

    def __init__(
        self,
        settings: StreamSettings,
        *,
        topics: Topics,
        sink: EventSink,
        on_result: Callable[[], None] | None = None,
        model: LoadedModel | None = None,
        open_build: Callable[[ModelSettings], LoadedModel] | None = None,
        on_events: Callable[[Sequence[EventDraft]], None] | None = None,
        publish_snapshot: Callable[[str, Snapshot, Trigger], None] | None = None,
    ) -> None:
        """Set the stream up with ``model``, or the config's model file when None.

        ``open_build`` loads one build of the model (default ``load_model``): the seam
        where a test stands in for an accelerator this machine lacks. ``on_events`` sees
        each frame's event drafts as decided, before they are stored (Home Assistant's
        occupancy follows them); it runs on the events thread and must not block.
        ``publish_snapshot`` sends the snapshots of the stream's rule (``snapshots``), on
        the rule's own thread; without it the stream takes none by itself.
        """
        self._open_build = open_build or load_model
        self.settings = settings
        self.name = settings.name
        self._topic = topics.events(settings.name)
        self._device_id = topics.device_id
        self._sink = sink
        self._on_result = on_result
        self._on_events = on_events
        builds = 1 + len(settings.model.fallbacks)
        self._chain = FallbackChain(builds, settings.model.retry_s, settings.model.retry_max_s)
        loaded = model or self._load_first_that_runs()
        if model is not None and builds > 1 and not _is_config_model(settings.model, model):
            self._chain = FallbackChain(1, settings.model.retry_s, settings.model.retry_max_s)
        try:
            self.stages = SecondStages(
                settings.stages, lambda stage: load_model(stage).predictor, stream=settings.name
            )
        except BaseException:
            loaded.predictor.close()  # the stream is not made: nothing else would release it
            raise
        self.redactor = Redactor(settings.privacy)
        """Redacts this stream's snapshots (commands thread, snapshots thread)."""
        self.redacted_regions = 0
        """Faces (or people) hidden in this stream's snapshots so far."""
        self._snapshot_lock = threading.Lock()
        rule = settings.snapshots
        self._snapshots = (
            SnapshotRule(
                self.name,
                rule,
                take=lambda max_bytes: self.snapshot(max_bytes=max_bytes),
                publish=lambda shot, why: publish_snapshot(self.name, shot, why),
            )
            if rule.on_track_start and publish_snapshot is not None
            else None
        )
        self.predictor, self.model = loaded.predictor, loaded.ref
        self.model_stats = ModelStats()
        self._swap_lock = threading.Lock()
        self._pending: LoadedModel | None = None
        self._swapped = threading.Event()
        self._filter = EventFilter(settings.events)
        self._warned: str | None = None  # the tracking warning last logged (events thread)
        self._warned_large = False  # a raw event over EVENT_MAX_BYTES was logged (events thread)
        self._slot = FrameSlot()
        self._source = make_source(settings.source)
        pre = self.predictor.preprocess
        # Stretching: the source scales to the model's size (swscale, ISP); nothing resizes here.
        stretched = pre is not None and pre.resize is ResizeMode.STRETCH
        output_size = (pre.width, pre.height) if pre is not None and stretched else None
        self.capture = Capture(self.name, self._source, self._slot, output_size=output_size)
        self.latency = LatencyWindow()
        self.inference = LatencyWindow()
        self._counters = _Counters()
        self._seq = 0
        self._stop = threading.Event()
        self._results: queue.Queue[_Results | None] = queue.Queue(_RESULTS_QUEUE)
        self._infer_thread: threading.Thread | None = None
        self._events_thread: threading.Thread | None = None
        # Completion times of recent frames: fps is read from them, so reading it (health
        # topic, Prometheus scrape) changes nothing.
        self._done_at: deque[float] = deque(maxlen=_FPS_SAMPLES)

    # -- builds: the model, its fallbacks --------------------------------------------

    def _load_first_that_runs(self) -> LoadedModel:
        """The first build that loads; the first build's error if none does."""
        try:
            return self._open_build(self.settings.model)
        except EdgefleetError as exc:
            if not self._chain.can_fall_back:
                raise
            loaded = self._load_fallback(exc)
            if loaded is None:
                raise
            return loaded

    def _load_fallback(self, exc: EdgefleetError) -> LoadedModel | None:
        """After the running build failed with ``exc``: the next build that loads, or None."""
        model = self.settings.model
        for index in range(self._chain.active + 1, self._chain.builds):
            try:
                loaded = self._open_build(model.build(index))
            except EdgefleetError as failed:
                log.warning("stream %s: fallback build %d failed too: %s", self.name, index, failed)
                continue
            log.warning(
                "stream %s: %s; running %s (%s) instead",
                self.name,
                exc.message,
                model.build(index).path.name,
                loaded.predictor.engine.description,
                extra={"stream": self.name},
            )
            self._chain.fell_back(index, exc.message, time.monotonic())
            return loaded
        return None

    def _fall_back(self, exc: EdgefleetError) -> bool:  # infer thread
        """Replace the build that failed with ``exc`` by the next one; False where none is."""
        if not isinstance(exc, EnvironmentProblem) or not self._chain.can_fall_back:
            return False
        loaded = self._load_fallback(exc)
        if loaded is None:
            return False
        self._run_build(loaded)
        return True

    def _retry_first_build(self) -> None:  # infer thread
        """Load the first build again and run the latest frame on it; switch back if it runs."""
        now = time.monotonic()
        frame = self.capture.last_frame
        try:
            loaded = self._open_build(self.settings.model)
        except EdgefleetError as exc:
            log.debug("stream %s: first build still cannot load: %s", self.name, exc)
            self._chain.retry_failed(now)
            return
        try:
            if frame is not None:
                loaded.predictor.predict(frame.pixels)
        except EdgefleetError as exc:
            loaded.predictor.close()
            log.debug("stream %s: first build loads but does not run: %s", self.name, exc)
            self._chain.retry_failed(now)
            return
        self._chain.restored()
        log.warning(
            "stream %s: accelerator back: running %s (%s) again",
            self.name,
            self.settings.model.path.name,
            loaded.predictor.engine.description,
            extra={"stream": self.name},
        )
        self._run_build(loaded)

    def _run_build(self, loaded: LoadedModel) -> None:  # infer thread
        old = self.predictor
        self.predictor, self.model = loaded.predictor, loaded.ref
        old.close()

    @property
    def fallback_reason(self) -> str | None:
        """``accelerator lost: ...`` while a fallback build runs; None otherwise."""
        return self._chain.reason

    @property
    def latest_frame(self) -> Frame | None:
        """The most recent frame the source delivered (for snapshots and validation)."""
        frame = self.capture.last_frame
        return frame.pixels.copy() if frame is not None else None

    @property
    def _tracks_detections(self) -> bool:
        """Tracking applies: the model detects (its warnings mean nothing otherwise)."""
        return self.model.task == TaskName.DETECTION.value

    @property
    def captured_by_model(self) -> int:
        """Frames the source delivered since the current model took over."""
        return self.capture.stats.captured - self.model_stats.captured_at_start

    def swap(self, model: LoadedModel) -> bool:
        """Run ``model`` from the next frame on; the old one is closed. Any thread but infer.

        Returns False (and leaves ``model`` to the caller) when the inference thread did
        not take it within its wait, e.g. because it is stuck in a hung interpreter.
        """
        with self._swap_lock:
            self._swapped.clear()
            self._pending = model
        if self._infer_thread is None or not self._infer_thread.is_alive():
            self._take_pending()
        if self._swapped.wait(_SWAP_WAIT_S):
            return True
        with self._swap_lock:
            if self._pending is model:
                self._pending = None
                return False
        return True

    def _take_pending(self) -> None:
        with self._swap_lock:
            model, self._pending = self._pending, None
        if model is None:
            return
        old = self.predictor
        self.predictor, self.model = model.predictor, model.ref
        self.model_stats = ModelStats(captured_at_start=self.capture.stats.captured)
        if self._chain.builds > 1:
            log.info(
                "stream %s: the configured fallback builds do not apply to %s version %s",
                self.name,
                model.ref.id,
                model.ref.version,
                extra={"stream": self.name},
            )
        self._chain = FallbackChain(1, self._chain.retry_s, self._chain.retry_max_s)
        self._swapped.set()
        old.close()
        log.info(
            "stream %s: now running %s version %s (%s)",
            self.name,
            model.ref.id,
            model.ref.version,
            model.ref.sha256[:12],
            extra={"stream": self.name, "model": model.ref.id},
        )

    def snapshot(self, *, size: SnapshotSize = SnapshotSize.FRAME, max_bytes: int) -> Snapshot:
        """The latest frame, redacted, as a JPEG within ``max_bytes`` (any thread);
        ``SnapshotFailed`` when there is none or it cannot be redacted."""
        shot = take(self.capture.last_frame, self.redactor, size=size, max_bytes=max_bytes)
        with self._snapshot_lock:
            self.redacted_regions += shot.regions
        return shot

    def start(self) -> None:
        """Start capture and inference."""
        self._stop.clear()
        self._events_thread = SUPERVISOR.start(f"events-{self.name}", self._events, self._stop)
        self.capture.start()
        self._infer_thread = SUPERVISOR.start(f"infer-{self.name}", self._infer, self._stop)
        if self._snapshots is not None:
            self._snapshots.start()
        log.info(
            "stream %s: %s on %s (%s)",
            self.name,
            self.model.id,
            self._source.name,
            self.predictor.engine.description,
            extra={"stream": self.name, "model": self.model.id},
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop capture and inference, close open tracks (their end events), release the model."""
        self._stop.set()
        self.capture.stop(timeout_s)
        if self._infer_thread is not None:
            self._infer_thread.join(timeout_s)
            if self._infer_thread.is_alive():
                log.error("stream %s: inference did not stop (hung interpreter?)", self.name)
                return
        if self._events_thread is not None:
            try:
                self._results.put(None, timeout=timeout_s)  # queued after every result
            except queue.Full:
                log.error("stream %s: the events thread is stuck; events may be lost", self.name)
            self._events_thread.join(timeout_s)
        drafts = self._filter.flush(time.time())
        if drafts:
            self._emit(
                drafts, inference_ts=time.time(), inference_ms=0.0, model=self.model, latency_ms=0.0
            )
        if self._snapshots is not None:
            self._snapshots.stop(timeout_s)
        self.predictor.close()
        self.stages.close()
        self.redactor.close()

    def health(self) -> StreamHealth:
        """Counters and latency percentiles, for the health message."""
        # The counters downstream first, then the source's: each frame is counted captured
        # before inference can take it, so processed never appears above captured.
        c = replace(self._counters)
        stats = self.capture.stats
        now = time.monotonic()
        recent = [t for t in tuple(self._done_at) if now - t <= _FPS_WINDOW_S]
        fps = len(recent) / _FPS_WINDOW_S
        latency, inference = self.latency.percentiles(), self.inference.percentiles()
        tracking = self._filter.status
        interval_s = tracking.frame_interval_s
        chain = self._chain
        shots = self._snapshots
        degraded = chain.reason is not None and stats.state == "running"
        return StreamHealth(
            state="degraded" if degraded else stats.state,
            fallback=chain.reason,
            build_switches=chain.switches,
            redacted_regions=self.redacted_regions,
            snapshots_published=shots.published if shots else 0,
            snapshots_failed=shots.failed if shots else 0,
            stage_latency_p50_ms={
                name: window.percentiles()["p50_ms"] for name, window in self.stages.latency.items()
            },
            captured=stats.captured,
            processed=c.processed,
            skipped=stats.skipped,
            failed=c.failed,
            events=c.events,
            events_lost=c.lost,
            fps=round(fps, 2),
            latency_p50_ms=latency["p50_ms"],
            latency_p99_ms=latency["p99_ms"],
            inference_p50_ms=inference["p50_ms"],
            inference_p99_ms=inference["p99_ms"],
            source_failures=stats.failures,
            last_error=c.last_error or stats.last_error,
            frame_interval_s=None if interval_s is None else round(interval_s, 3),
            warnings=[tracking.warning] if self._tracks_detections and tracking.warning else [],
        )

    # -- the infer-<stream> thread ---------------------------------------------

    def _infer(self) -> None:
        while not self._stop.is_set():
            fault_point()
            if self._pending is not None:
                self._take_pending()
            if self._chain.retry_due(time.monotonic()):
                self._retry_first_build()
            frame = self._slot.get(_FRAME_WAIT_S)
            if frame is None:
                continue
            taken_at = time.monotonic()
            stats = self.model_stats
            try:
                prediction = self._predict(frame.pixels)
                results = self.stages.apply(self._with_zone_coverage(prediction), frame)
            except EdgefleetError as exc:
                stats.failed += 1
                self._failed(exc)
                continue
            done = time.time()
            latency_ms = (time.monotonic() - frame.captured_at) * 1000.0
            self.latency.add(latency_ms)
            self.inference.add(prediction.latency_ms)
            stats.processed += 1
            stats.inference.add(prediction.latency_ms)
            handed = _Results(
                results,
                frame.capture_ts,
                taken_at,
                done,
                prediction.latency_ms,
                self.model,
                latency_ms,
            )
            self._hand_over(handed)
            self._counters.processed += 1
            self._done_at.append(time.monotonic())
            if self._on_result is not None:
                self._on_result()

    def _hand_over(self, handed: _Results) -> None:  # infer thread
        """Queue a frame's results for the events thread, also while stopping: ``stop`` lets
        the events thread drain the queue, so no processed frame loses its events."""
        while True:
            try:
                self._results.put(handed, timeout=_FRAME_WAIT_S)
                return
            except queue.Full:
                if self._events_thread is None or not self._events_thread.is_alive():
                    log.error("stream %s: the events thread is gone; results lost", self.name)
                    return

    def _predict(self, pixels: Frame) -> Prediction:  # infer thread
        """Run the frame; where the build fails and a fallback loads, run it there instead."""
        while True:
            try:
                return self.predictor.predict(pixels)
            except EdgefleetError as exc:
                if not self._fall_back(exc):
                    raise

    def _with_zone_coverage(self, prediction: Prediction) -> list[Result]:  # infer thread
        """Segments with each zone's share added: the mask is this thread's, until the next
        frame replaces it."""
        task, zones = self.predictor.task, self.settings.events.zones
        if not zones or not isinstance(task, SegmentationTask):
            return prediction.results
        segments = [r for r in prediction.results if isinstance(r, Segment)]
        regions = {zone.name: zone.polygon for zone in zones}
        return list(with_region_coverage(segments, task.mask(), prediction.transform, regions))

    # -- the events-<stream> thread -----------------------------------------------

    def _events(self) -> None:
        while True:
            fault_point()
            try:
                item = self._results.get(timeout=_FRAME_WAIT_S)
            except queue.Empty:
                continue  # stop() ends this thread with a None after the last result
            if item is None:
                return
            drafts = self._filter.process(item.results, item.capture_ts, item.taken_at)
            self._log_tracking_warning()
            if drafts:
                self._emit(
                    drafts,
                    inference_ts=item.inference_ts,
                    inference_ms=item.inference_ms,
                    model=item.model,
                    latency_ms=item.latency_ms,
                )

    def _log_tracking_warning(self) -> None:  # events thread
        warning = self._filter.status.warning if self._tracks_detections else None
        if warning is not None and self._warned is None:  # once: its figures may wobble
            log.warning("stream %s: %s", self.name, warning, extra={"stream": self.name})
        self._warned = warning

    def _failed(self, exc: EdgefleetError) -> None:
        c = self._counters
        c.failed += 1
        if c.last_error != exc.message:
            log.error(
                "stream %s: inference failed: %s", self.name, exc, extra={"stream": self.name}
            )
        c.last_error = exc.message

    def _emit(
        self,
        drafts: list[EventDraft],
        *,
        inference_ts: float,
        inference_ms: float,
        model: ModelRef,
        latency_ms: float,
    ) -> None:
        if self._on_events is not None:
            self._on_events(drafts)
        if self._snapshots is not None:
            self._snapshots.offer(drafts)
        synced = kernel_synchronised()  # one adjtimex(2) read per frame with events
        payloads = [
            self._serialize(
                d, inference_ts, inference_ms, model, latency_ms=latency_ms, synced=synced
            )
            for d in drafts
        ]
        try:
            self._sink.emit(self.name, self._topic, payloads)
        except EdgefleetError as exc:  # disk full, I/O error: count it, keep the stream running
            self._counters.lost += len(payloads)
            if self._counters.last_error != exc.message:
                log.error(
                    "stream %s: events not stored: %s", self.name, exc, extra={"stream": self.name}
                )
            self._counters.last_error = exc.message
            return
        self._counters.events += len(payloads)

    def _serialize(
        self,
        draft: EventDraft,
        inference_ts: float,
        inference_ms: float,
        model: ModelRef,
        *,
        latency_ms: float,
        synced: bool | None,
    ) -> bytes:
        self._seq += 1
        fields: dict[str, Any] = dict(
            id=uuid.uuid4().hex,
            device_id=self._device_id,
            stream=self.name,
            seq=self._seq,
            kind=draft.kind,
            lifecycle=draft.lifecycle,
            track_id=draft.track_id,
            label=draft.label,
            score=draft.score,
            zones=list(draft.zones),
            model=model,
            capture_ts=draft.capture_ts,
            inference_ts=inference_ts,
            latency_ms=round(latency_ms, 3),
            clock_synced=synced,
            inference_ms=round(inference_ms, 3),
            first_seen_ts=draft.first_seen_ts,
            last_seen_ts=draft.last_seen_ts,
        )
        # A value takes two bytes or more in JSON: a raw event of more values than that
        # allows is over the bound without serialising it first.
        if draft.kind != "raw" or 2 * _raw_values(draft) <= EVENT_MAX_BYTES:
            message = EventMessage(**fields, **_results_fields(draft))
            payload = message.model_dump_json(exclude_none=True).encode()
            if len(payload) <= EVENT_MAX_BYTES or draft.kind != "raw":
                return payload
        if not self._warned_large:
            log.warning(
                "stream %s: raw events would be over %d bytes: their tensors' values are left "
                "out (omitted_values says how many); see them with `edgefleet model run --json` "
                "on a saved frame",
                self.name,
                EVENT_MAX_BYTES,
                extra={"stream": self.name},
            )
            self._warned_large = True
        fewer = EventMessage(**fields, **_results_fields(draft, values=False))
        return fewer.model_dump_json(exclude_none=True).encode()


def _results_fields(draft: EventDraft, *, values: bool = True) -> dict[str, Any]:
    """The event's results under the same key ``edgefleet model run --json`` uses; raw
    tensors without their values when ``values`` is False."""
    if not draft.results:
        return {}
    results = [
        _without_values(r) if not values and isinstance(r, RawTensor) else result_dict(r)
        for r in draft.results
    ]
    return {RESULT_KEYS[TaskName(draft.kind)]: results}


def _raw_values(draft: EventDraft) -> int:
    return sum(math.prod(r.shape) for r in draft.results if isinstance(r, RawTensor))


def _without_values(tensor: RawTensor) -> dict[str, Any]:
    shape = list(tensor.shape)
    return {"name": tensor.name, "shape": shape, "values": [], "omitted_values": math.prod(shape)}
