"""One stream end to end: source -> latest frame -> model -> event filter -> outbox.

Threads per stream:

- ``capture-<stream>`` (``sources.capture.Capture``) reads frames into a
  ``FrameSlot``; a live source overwrites a frame inference has not taken yet
  (counted as skipped), so a slow model never builds a queue.
- ``infer-<stream>`` (``StreamRunner._infer``) takes the newest frame,
  pre-processes it straight into the interpreter's input, invokes, and hands
  the results on. Nothing else runs here: the interpreter is the bottleneck.
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
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from edgefleet.runtime import (
    RESULT_KEYS,
    EdgefleetError,
    Labels,
    Predictor,
    ResizeMode,
    TaskName,
    read_model,
)
from edgefleet.runtime.delegates import LoadedDelegate

from .config import StreamSettings
from .events import EventDraft, EventFilter
from .metrics import LatencyWindow
from .protocol import EventMessage, ModelRef, StreamHealth, Topics
from .sources import make_source
from .sources.capture import Capture, FrameSlot

log = logging.getLogger(__name__)

_FRAME_WAIT_S = 0.5
_RESULTS_QUEUE = 64
_FPS_WINDOW_S = 5.0
_FPS_SAMPLES = 2048  # room for 400 fps over the window


@dataclass(frozen=True)
class _Results:
    """One frame's results on their way from inference to the events thread."""

    results: list[Any]
    capture_ts: float
    inference_ts: float
    inference_ms: float


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


def model_ref(settings: StreamSettings, predictor: Predictor) -> ModelRef:
    """How events and status name the model a stream runs."""
    engine = predictor.engine
    delegate: LoadedDelegate = engine.delegate
    return ModelRef(
        id=settings.model.id or settings.model.path.stem,
        version=settings.model.version or engine.model.sha256[:12],
        sha256=engine.model.sha256,
        task=predictor.task.name.value,
        backend=engine.backend.label,
        delegate=delegate.description,
    )


class StreamRunner:
    """Owns one stream's capture, model, filter and inference thread."""

    def __init__(
        self,
        settings: StreamSettings,
        *,
        topics: Topics,
        sink: EventSink,
        on_result: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._topic = topics.events(settings.name)
        self._device_id = topics.device_id
        self._sink = sink
        self._on_result = on_result
        self.predictor = self._load_model()
        self.model = model_ref(settings, self.predictor)
        self._filter = EventFilter(settings.events)
        self._slot = FrameSlot()
        self._source = make_source(settings.source)
        inputs = self.predictor.engine.inputs[0].shape
        # Stretching: the source scales to the model's size (swscale, ISP); nothing resizes here.
        output_size = (
            (inputs[2], inputs[1]) if settings.model.resize is ResizeMode.STRETCH else None
        )
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

    def _load_model(self) -> Predictor:
        m = self.settings.model
        labels = Labels.from_file(m.labels) if m.labels else None
        return Predictor.open(
            read_model(m.path),
            task=m.task,
            labels=labels,
            delegate=m.delegate,
            threads=m.threads,
            backend=m.backend,
            resize=m.resize,
            min_score=m.min_score,
            top_k=m.top_k,
        )

    def start(self) -> None:
        """Start capture and inference."""
        self._stop.clear()
        self._events_thread = threading.Thread(
            target=self._events, name=f"events-{self.name}", daemon=True
        )
        self._events_thread.start()
        self.capture.start()
        self._infer_thread = threading.Thread(
            target=self._infer, name=f"infer-{self.name}", daemon=True
        )
        self._infer_thread.start()
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
            self._emit(drafts, inference_ts=time.time(), inference_ms=0.0)
        self.predictor.close()

    def health(self) -> StreamHealth:
        """Counters and latency percentiles, for the health message."""
        stats = self.capture.stats
        c = self._counters
        now = time.monotonic()
        recent = [t for t in tuple(self._done_at) if now - t <= _FPS_WINDOW_S]
        fps = len(recent) / _FPS_WINDOW_S
        latency, inference = self.latency.percentiles(), self.inference.percentiles()
        return StreamHealth(
            state=stats.state,
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
        )

    # -- the infer-<stream> thread ---------------------------------------------

    def _infer(self) -> None:
        while not self._stop.is_set():
            frame = self._slot.get(_FRAME_WAIT_S)
            if frame is None:
                continue
            try:
                prediction = self.predictor.predict(frame.pixels)
            except EdgefleetError as exc:
                self._failed(exc)
                continue
            done = time.time()
            self.latency.add((done - frame.capture_ts) * 1000.0)
            self.inference.add(prediction.latency_ms)
            handed = _Results(prediction.results, frame.capture_ts, done, prediction.latency_ms)
            while not self._stop.is_set():
                try:
                    self._results.put(handed, timeout=_FRAME_WAIT_S)
                    break
                except queue.Full:
                    continue
            self._counters.processed += 1
            self._done_at.append(time.monotonic())
            if self._on_result is not None:
                self._on_result()

    # -- the events-<stream> thread -----------------------------------------------

    def _events(self) -> None:
        while True:
            try:
                item = self._results.get(timeout=_FRAME_WAIT_S)
            except queue.Empty:
                continue  # stop() ends this thread with a None after the last result
            if item is None:
                return
            drafts = self._filter.process(item.results, item.capture_ts)
            if drafts:
                self._emit(drafts, inference_ts=item.inference_ts, inference_ms=item.inference_ms)

    def _failed(self, exc: EdgefleetError) -> None:
        c = self._counters
        c.failed += 1
        if c.last_error != exc.message:
            log.error(
                "stream %s: inference failed: %s", self.name, exc, extra={"stream": self.name}
            )
        c.last_error = exc.message

    def _emit(self, drafts: list[EventDraft], *, inference_ts: float, inference_ms: float) -> None:
        payloads = [self._serialize(d, inference_ts, inference_ms) for d in drafts]
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

    def _serialize(self, draft: EventDraft, inference_ts: float, inference_ms: float) -> bytes:
        self._seq += 1
        message = EventMessage(
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
            model=self.model,
            capture_ts=draft.capture_ts,
            inference_ts=inference_ts,
            latency_ms=round((inference_ts - draft.capture_ts) * 1000.0, 3),
            inference_ms=round(inference_ms, 3),
            first_seen_ts=draft.first_seen_ts,
            last_seen_ts=draft.last_seen_ts,
            **_results_fields(draft),
        )
        return message.model_dump_json(exclude_none=True).encode()


def _results_fields(draft: EventDraft) -> dict[str, Any]:
    """The event's results under the same key ``edgefleet model run --json`` uses."""
    if not draft.results:
        return {}
    return {RESULT_KEYS[TaskName(draft.kind)]: [asdict(r) for r in draft.results]}
