"""Snapshots: a stream's latest frame, redacted, as a size-bounded JPEG.

Two ways ask for one: the ``snapshot`` command (the reply carries it) and a stream's
per-event rule (``streams[].snapshots``: when a tracked object of a chosen label starts,
at most once per ``min_interval_s``), whose snapshots go to the stream's ``snapshots``
topic and, with Home Assistant discovery on, to its ``image`` entity.

``take`` is the one place a snapshot is made: the frame at the source's own resolution
(or as the model got it), redacted as the stream's ``privacy`` says (``Redactor``; a frame
that cannot be redacted is never encoded), then JPEG-encoded at the highest quality that
fits ``max_bytes``, halved in size when even the lowest does not.

``SnapshotRule`` runs the per-event rule on a thread of its own (``snapshots-<stream>``),
so redaction and encoding never hold up a stream's events: ``offer`` (the events thread)
decides and leaves at most one request waiting, the thread takes and publishes it. A
snapshot that cannot be taken or sent is counted (health) and its reason logged; nothing
is queued for later, since a snapshot is a picture of the moment the track started.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from edgefleet.runtime import EdgefleetError

from .config import SnapshotRuleSettings
from .events import EventDraft
from .privacy import Redact, RedactionFailed, Redactor
from .protocol import ErrorCode, SnapshotSize
from .sources import CapturedFrame, SourceError
from .supervisor import SUPERVISOR

log = logging.getLogger(__name__)

JPEG_QUALITIES = (90, 75, 60, 45, 30, 15)
# A snapshot too large at the lowest quality is halved, at most this often, never below this.
_MAX_HALVINGS = 3
_MIN_SIDE = 64
_WAIT_S = 0.5  # how often the rule's thread looks at its stop flag while idle
# What a snapshot's reply or message holds besides the JPEG's base64, at most: its other
# fields, the topic, the MQTT 5 properties.
_MESSAGE_SPACE = 4096


class SnapshotFailed(EdgefleetError):
    """No snapshot: ``code`` says whether it was refused (retry later, ask differently) or
    failed (redaction, the source)."""

    def __init__(self, code: ErrorCode, message: str, *, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.code = code


class SnapshotTooLarge(SnapshotFailed):
    """Even the smallest JPEG tried is over the budget."""


def jpeg_budget(max_bytes: int, max_packet_size: int | None) -> int:
    """The largest JPEG, up to ``max_bytes``, whose base64 message still fits in one packet
    of a broker that accepts ``max_packet_size`` bytes (None: no limit)."""
    if max_packet_size is None:
        return max_bytes
    return max(0, min(max_bytes, (max_packet_size - _MESSAGE_SPACE) * 3 // 4))


@dataclass(frozen=True)
class Snapshot:
    """A redacted JPEG of one frame."""

    jpeg: bytes
    capture_ts: float
    frame_width: int
    frame_height: int
    width: int
    """Of the JPEG: smaller than the frame's when halving made it fit."""
    height: int
    quality: int
    redact: Redact
    regions: int
    """Faces (or people) hidden."""


def take(
    frame: CapturedFrame | None,
    redactor: Redactor,
    *,
    size: SnapshotSize = SnapshotSize.FRAME,
    max_bytes: int,
) -> Snapshot:
    """``frame`` redacted and encoded within ``max_bytes``; ``SnapshotFailed`` if it cannot be."""
    if frame is None:
        raise SnapshotFailed(ErrorCode.REFUSED, "no frame yet")
    pixels = frame.pixels
    if size is SnapshotSize.FRAME and frame.full is not None:
        try:
            pixels = frame.full()
        except SourceError as exc:
            raise SnapshotFailed(
                ErrorCode.FAILED, f"no full-size frame: {exc.message}", hint=exc.hint
            ) from exc
    try:
        redacted = redactor.redact(pixels)
    except RedactionFailed as exc:
        raise SnapshotFailed(ErrorCode.FAILED, exc.message, hint=exc.hint) from exc
    image = Image.fromarray(redacted.pixels)
    jpeg, quality, scaled = _jpeg_within(image, max_bytes)
    if jpeg is None:
        raise SnapshotTooLarge(
            ErrorCode.REFUSED,
            f"the frame does not fit in {max_bytes} bytes even at quality "
            f"{JPEG_QUALITIES[-1]} and {scaled.width}x{scaled.height}",
            hint="ask with a larger max_bytes",
        )
    return Snapshot(
        jpeg=jpeg,
        capture_ts=frame.capture_ts,
        frame_width=image.width,
        frame_height=image.height,
        width=scaled.width,
        height=scaled.height,
        quality=quality,
        redact=redacted.mode,
        regions=redacted.regions,
    )


def _jpeg_within(image: Image.Image, max_bytes: int) -> tuple[bytes | None, int, Image.Image]:
    """The best JPEG of ``image`` within ``max_bytes``: quality drops first, then size halves.

    Returns the JPEG (None when even the smallest try is too large), its quality, and the
    image it encodes.
    """
    for _ in range(_MAX_HALVINGS + 1):
        for quality in JPEG_QUALITIES:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            if buffer.tell() <= max_bytes:
                return buffer.getvalue(), quality, image
        if min(image.size) < 2 * _MIN_SIDE:
            break
        image = image.reduce(2)
    return None, JPEG_QUALITIES[-1], image


def snapshot_fields(shot: Snapshot) -> dict[str, Any]:
    """What the ``snapshot`` reply and ``SnapshotMessage`` both carry of ``shot``."""
    return {
        "frame_width": shot.frame_width,
        "frame_height": shot.frame_height,
        "width": shot.width,
        "height": shot.height,
        "quality": shot.quality,
        "redacted": {"mode": shot.redact.value, "regions": shot.regions},
        "jpeg_base64": base64.b64encode(shot.jpeg).decode(),
    }


@dataclass(frozen=True)
class Trigger:
    """The event that asked for a snapshot: a tracked object's start."""

    track_id: int
    label: str


def trigger(rule: SnapshotRuleSettings, drafts: Sequence[EventDraft]) -> Trigger | None:
    """The first start among ``drafts`` that ``rule`` takes a snapshot of, if any. Pure."""
    if not rule.on_track_start:
        return None
    for draft in drafts:
        if draft.lifecycle != "start" or draft.track_id is None or draft.label is None:
            continue
        if rule.labels is None or draft.label in rule.labels:
            return Trigger(draft.track_id, draft.label)
    return None


Publish = Callable[[Snapshot, Trigger], None]
"""Sends a rule's snapshot; raises ``EdgefleetError`` when it cannot (broker down)."""


class SnapshotRule:
    """One stream's per-event snapshots, taken and published on their own thread."""

    def __init__(
        self,
        stream: str,
        rule: SnapshotRuleSettings,
        *,
        take: Callable[[int], Snapshot],
        publish: Publish,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``take(max_bytes)`` makes the snapshot, ``publish`` sends it."""
        self.stream = stream
        self.rule = rule
        self._take = take
        self._publish = publish
        self._clock = clock
        self._last: float | None = None  # when the last request was accepted (events thread)
        self._lock = threading.Lock()
        self._pending: Trigger | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0
        self.failed = 0
        self.last_error: str | None = None

    def offer(self, drafts: Sequence[EventDraft]) -> None:
        """Ask for a snapshot if ``drafts`` (one frame's events) start an object the rule
        wants and the last one was long enough ago. The events thread; never blocks."""
        wanted = trigger(self.rule, drafts)
        if wanted is None:
            return
        now = self._clock()
        if self._last is not None and now - self._last < self.rule.min_interval_s:
            return
        self._last = now
        with self._lock:
            self._pending = wanted  # a request still waiting is replaced: the newer start wins
        self._wake.set()

    def start(self) -> None:
        self._stop.clear()
        self._thread = SUPERVISOR.start(f"snapshots-{self.stream}", self._run, self._stop)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; a snapshot being taken finishes first."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:  # snapshots-<stream> thread
        while not self._stop.is_set():
            if not self._wake.wait(_WAIT_S):
                continue
            self._wake.clear()
            with self._lock:
                wanted, self._pending = self._pending, None
            if wanted is not None and not self._stop.is_set():
                self._send(wanted)

    def _send(self, wanted: Trigger) -> None:
        try:
            snapshot = self._take(self.rule.max_bytes)
            self._publish(snapshot, wanted)
        except EdgefleetError as exc:
            self.failed += 1
            if exc.message != self.last_error:
                log.warning(
                    "stream %s: no snapshot for %s track %d: %s",
                    self.stream,
                    wanted.label,
                    wanted.track_id,
                    exc,
                    extra={"stream": self.stream},
                )
            self.last_error = exc.message
            return
        self.published += 1
        self.last_error = None
