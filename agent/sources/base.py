"""The interface every frame source implements, its error, and the pacing clock.

A source is opened, read and closed by one thread, the capture thread of its
stream (see ``capture.py``). The only method another thread may call is
``Source.interrupt()``, which cuts short a pacing wait inside ``read()`` so a
stop never waits for the next frame of a slow source.

Errors::

    EdgefleetError
    └── SourceError        the camera, stream, file or folder cannot be opened or was lost
                           (our environment: the capture thread retries it with backoff)
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from edgefleet.runtime import EdgefleetError
from edgefleet.runtime.preprocess import Frame

Size = tuple[int, int]
"""``(width, height)`` in pixels."""


class SourceError(EdgefleetError):
    """A source cannot be opened or was lost; the message names the source."""

    def __init__(self, source: str, message: str, *, hint: str = "") -> None:
        super().__init__(f"{source}: {message}", hint=hint)
        self.source = source


@dataclass(frozen=True)
class CapturedFrame:
    """One frame as captured: RGB pixels, wall-clock capture time, number since open.

    ``capture_ts`` (wall clock) is what events report; ``captured_at`` (monotonic, taken when
    the frame is made, right after capture) is what latency is measured from, so a stepped
    wall clock (NTP after boot) never shows as a negative or hour-long latency.

    ``full``, when the source scaled ``pixels`` to the model's size, makes the same frame at
    the source's own resolution on request (a snapshot), from what the source still holds:
    the decoded picture, the image file, the camera's full-size stream. It may raise
    ``SourceError`` and may be called from any thread. None: ``pixels`` is full size.
    """

    pixels: Frame
    capture_ts: float
    index: int
    full: Callable[[], Frame] | None = None
    captured_at: float = field(default_factory=time.monotonic)


class BaseSourceSettings(BaseModel):
    """Base of every source's settings: immutable, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(ABC):
    """A camera, stream, file, folder or pattern that yields RGB frames.

    ``live`` sources (cameras, streams, paced files) run at their own rate and
    the newest frame wins; non-live ones wait until the consumer took a frame.
    """

    def __init__(self, name: str, *, live: bool) -> None:
        self.name = name
        self.live = live
        self._wake = threading.Event()

    @abstractmethod
    def open(self, output_size: Size | None) -> None:
        """Open the source, delivering frames at ``output_size`` (None: native size)."""

    @abstractmethod
    def read(self) -> CapturedFrame | None:
        """The next frame; None when a finite source ended; SourceError when it is lost."""

    @abstractmethod
    def close(self) -> None:
        """Release the device, connection or file; safe to call when not open."""

    def interrupt(self) -> None:
        """Cut short any pacing wait in ``read()`` until the next ``open()``; any thread."""
        self._wake.set()

    def _rearm(self) -> None:
        """Called by ``open()``: pacing waits last their full time again."""
        self._wake.clear()

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` unless interrupted."""
        if seconds > 0:
            self._wake.wait(seconds)


class Pacer:
    """Holds frames back to their media time, so a file plays at its own rate.

    Media time is anchored to the monotonic clock at the first frame. When
    delivery falls more than ``max_lag_s`` behind (a slow decoder, a long
    pause) or media time jumps backwards, the clock is re-anchored instead of
    bursting frames to catch up.
    """

    def __init__(self, pause: Callable[[float], None], *, max_lag_s: float = 0.5) -> None:
        self._pause = pause
        self._max_lag_s = max_lag_s
        self._origin: float | None = None
        self._last_media_s = 0.0

    def reset(self) -> None:
        """Forget the anchor: the next frame is delivered at once."""
        self._origin = None

    def wait_for(self, media_s: float) -> None:
        """Pause until the frame at ``media_s`` is due."""
        now = time.monotonic()
        if self._origin is None or media_s < self._last_media_s:
            self._origin = now - media_s
        self._last_media_s = media_s
        delay = self._origin + media_s - now
        if delay < -self._max_lag_s:
            self._origin = now - media_s
            return
        self._pause(delay)
