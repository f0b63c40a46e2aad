"""The capture thread of a stream: read a source into a one-frame slot, survive outages.

Threads:

- ``Capture`` owns one thread, ``capture-<stream>``, which runs ``_run``: it
  opens the source, reads frames and puts each into the ``FrameSlot``. The
  owner calls ``start()`` and ``stop()``; ``stats`` may be read from any
  thread.
- ``FrameSlot.put`` runs on the capture thread, ``FrameSlot.get`` on the
  inference thread of the stream.

A slow model never builds a queue: a live source overwrites the frame the
inference thread has not taken yet and counts it skipped; a non-live source
(a file read as fast as possible) waits instead, so no frame is lost.

A lost source (``SourceError`` on open or read) makes the state ``degraded``
and logs one warning per outage; the thread closes the source and reopens it
after an exponential backoff with full jitter, until frames flow again (one
info line says after how long) or the capture is stopped. Every wait is on
the stop event or bounded, so ``stop()`` returns within its timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Literal

from edgefleet.agent.supervisor import SUPERVISOR, fault_point

from .base import CapturedFrame, Size, Source, SourceError

log = logging.getLogger(__name__)

CaptureState = Literal["starting", "running", "degraded", "ended", "stopped"]

# How often a blocked put() looks at the stop event (it cannot wait on two things at once).
_STOP_POLL_S = 0.05
# Past this many doublings the backoff is at its maximum anyway (and 2**n stays a small number).
_MAX_DOUBLINGS = 32


class FrameSlot:
    """Hands the newest frame from the capture thread to the inference thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: CapturedFrame | None = None
        self._skipped = 0

    @property
    def skipped(self) -> int:
        """Frames overwritten before anyone took them."""
        with self._cond:
            return self._skipped

    def put(self, frame: CapturedFrame, *, wait: bool, stop: threading.Event) -> None:
        """Offer ``frame``: overwrite an untaken one (``wait=False``) or wait until it was taken.

        With ``wait=True`` the call returns without storing the frame once
        ``stop`` is set.
        """
        with self._cond:
            if wait:
                while self._frame is not None:
                    if stop.is_set():
                        return
                    self._cond.wait(_STOP_POLL_S)
            elif self._frame is not None:
                self._skipped += 1
            self._frame = frame
            self._cond.notify_all()

    def get(self, timeout_s: float) -> CapturedFrame | None:
        """Take the newest frame, waiting up to ``timeout_s``; None if none came."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._frame is not None, timeout_s):
                return None
            frame, self._frame = self._frame, None
            self._cond.notify_all()
            return frame


@dataclass
class CaptureStats:
    """What the capture thread did so far; ``Capture.stats`` hands out copies."""

    state: CaptureState = "starting"
    captured: int = 0
    skipped: int = 0
    failures: int = 0
    last_error: str | None = None
    degraded_since: float | None = None  # monotonic


class Capture:
    """Owns the capture thread of one stream."""

    def __init__(
        self,
        stream: str,
        source: Source,
        slot: FrameSlot,
        *,
        output_size: Size | None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.stream = stream
        self.source = source
        self.slot = slot
        self.output_size = output_size
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stats = CaptureStats()
        self._thread: threading.Thread | None = None
        self._extra = {"stream": stream}  # the structured-log context of every line
        # The newest frame read, for snapshots and model validation (one reference swap).
        self.last_frame: CapturedFrame | None = None

    @property
    def stats(self) -> CaptureStats:
        """A consistent copy of the counters and state."""
        with self._lock:
            return dataclasses.replace(self._stats, skipped=self.slot.skipped)

    def start(self) -> None:
        """Start the capture thread."""
        if self._thread is not None:
            raise RuntimeError(f"capture of stream {self.stream} was already started")
        # A daemon like every agent thread: stop() joins with a timeout, and a source stuck
        # past it must not keep the process alive after SIGTERM.
        self._thread = SUPERVISOR.start(f"capture-{self.stream}", self._run, self._stop)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and close the source, waiting up to ``timeout_s``."""
        self._stop.set()
        self.source.interrupt()
        if self._thread is None:
            self._set_state("stopped")
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning(
                "stream %s: capture from %s did not stop within %.1f s",
                self.stream, self.source.name, timeout_s, extra=self._extra,
            )  # fmt: skip

    def _run(self) -> None:
        opened = False
        attempt = 0
        try:
            while not self._stop.is_set():
                try:
                    if not opened:
                        self.source.open(self.output_size)
                        opened = True
                        continue  # look at the stop event between open and the first read
                    frame = self.source.read()
                    fault_point()
                except SourceError as exc:
                    self.source.close()
                    opened = False
                    self._outage(exc, attempt)
                    attempt += 1
                    continue
                if frame is None:
                    self._set_state("ended")
                    log.info(
                        "stream %s: %s ended", self.stream, self.source.name, extra=self._extra
                    )
                    return
                self._flowing()
                attempt = 0
                self.last_frame = frame
                # Counted before the hand-over: a frame inference holds is always counted, so
                # no reader ever sees more frames processed than captured.
                with self._lock:
                    self._stats.captured += 1
                self.slot.put(frame, wait=not self.source.live, stop=self._stop)
        finally:
            self.source.close()
            with self._lock:
                if self._stats.state != "ended":
                    self._stats.state = "stopped"

    def _outage(self, exc: SourceError, attempt: int) -> None:
        """Record the error, warn once per outage, then wait out the backoff."""
        with self._lock:
            first = self._stats.state != "degraded"
            self._stats.last_error = str(exc)
            if first:
                self._stats.state = "degraded"
                self._stats.failures += 1
                self._stats.degraded_since = time.monotonic()
        if first:
            log.warning(
                "stream %s: source lost, retrying until it is back: %s",
                self.stream, exc, extra=self._extra,
            )  # fmt: skip
        doublings = min(attempt, _MAX_DOUBLINGS)
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2**doublings)
        delay = random.uniform(0, ceiling)
        log.debug(
            "stream %s: retry %d in %.2f s (%s)",
            self.stream, attempt + 1, delay, exc, extra=self._extra,
        )  # fmt: skip
        self._stop.wait(delay)

    def _flowing(self) -> None:
        """A frame arrived: leave ``starting`` or ``degraded``, saying so once."""
        with self._lock:
            previous = self._stats.state
            if previous == "running":
                return
            since = self._stats.degraded_since
            self._stats.state = "running"
            self._stats.degraded_since = None
        if previous == "degraded" and since is not None:
            log.info(
                "stream %s: %s recovered after %.1f s", self.stream, self.source.name,
                time.monotonic() - since, extra=self._extra,
            )  # fmt: skip
        else:
            log.info(
                "stream %s: capturing from %s%s", self.stream, self.source.name,
                "" if self.source.live else " (every frame, no skipping)", extra=self._extra,
            )  # fmt: skip

    def _set_state(self, state: CaptureState) -> None:
        with self._lock:
            self._stats.state = state
