"""Which inference results become events: label and score filters, zones, intervals, tracking.

Pure decisions, no I/O: no threads, no clock reads, no sockets. Every call
receives the times it is about: a frame's capture time (wall clock, reported
in events) and the monotonic time every decision is made on (track ends,
updates, intervals), so a stepped wall clock (NTP on a board without a
real-time clock) changes nothing, tests drive the filter frame by frame, and
a replayed recording behaves like the live camera.

Threads: one ``EventFilter`` per stream and model, owned by that stream's
events thread, which calls ``process()`` once per inferred frame and ``flush()``
on an orderly shutdown or before a model swap. The class holds no lock and is
not shared between threads, except ``status``: a frozen value replaced whole
after each frame, which the health thread may read.

What becomes an event, per frame:

- detections pass the label filter, ``min_score`` and, when zones are set,
  at least one zone (the centre of the box's bottom edge, where a person
  stands, must lie inside the zone's polygon). With tracking, a detection
  continues the open track of the same label it overlaps most (greedy by IoU,
  highest first) and otherwise opens a new track: one ``start`` event, an
  ``update`` at most every ``update_interval_s``, one ``end`` once the track
  has been unseen for ``end_after_s``. Unset (the default), ``end_after_s``
  follows the stream's measured frame interval (``end_after_frames`` of them,
  never under 1 s), so a slow board (SSD at 0.2 fps) still sees a track again
  before it ends; ``status`` carries a warning when explicit settings cannot
  be met at the measured rate. Without tracking, every passing
  detection is an event, at most one per label per ``min_interval_s``;
- classification: the best class passing the label filter and ``min_score``,
  at most one event per label per ``min_interval_s``;
- pose: the keypoints, when their mean score reaches ``min_score``, at most
  one event per ``min_interval_s``; landmarks (a face mesh, a hand) the same,
  by their presence score;
- segmentation: the classes covering at least ``min_coverage`` of the frame or
  of a zone (each class's share of every zone rides along; ``background`` only
  when listed in ``labels``), at most one event per top class per
  ``min_interval_s``;
- raw tensors: every frame, at most one event per ``min_interval_s``.

A capture time that goes backwards (a source restarted its clock, the wall
clock was stepped) starts a new timeline: open tracks end and the interval
gates forget what they saw, so nothing stays suppressed or open until the
clock catches up.
"""

from __future__ import annotations

import itertools
import logging
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgefleet.runtime import (
    Classification,
    Detection,
    Keypoint,
    Landmarks,
    RawTensor,
    Segment,
)
from edgefleet.runtime.tasks import Result

log = logging.getLogger(__name__)

Point = tuple[float, float]
Box = tuple[float, float, float, float]
BACKGROUND = "background"  # the segmentation class no one wants an event about, by default
EventKind = Literal["detection", "classification", "pose", "segmentation", "landmarks", "raw"]
Lifecycle = Literal["start", "update", "end"]

# Tolerance for "on an edge" in normalised coordinates (a millionth of a pixel on a 4K frame).
_EDGE_EPSILON = 1e-9

_Coordinate = Annotated[float, Field(ge=0.0, le=1.0)]

# The frame interval is the median of this many recent ones: one stall does not move it.
_INTERVAL_SAMPLES = 15
# end_after_s when unset never goes below the fixed default it replaces (right at 3 fps and up).
MIN_AUTO_END_AFTER_S = 1.0
# An explicit end_after_s under this many frame intervals ends tracks between two frames
# (or at the first late one): tracking cannot work as set.
MIN_END_AFTER_FRAMES = 1.5


class Zone(BaseModel):
    """A named area of the frame, a simple polygon in normalised ``(x, y)`` coordinates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="Name of the zone, reported in events.")
    polygon: list[tuple[_Coordinate, _Coordinate]] = Field(
        min_length=3,
        description="Corners of the zone in order, as (x, y) fractions of the frame's width and "
        "height from its top-left corner (0..1); at least 3 points, edges must not cross.",
    )

    @field_validator("polygon")
    @classmethod
    def _simple_polygon_with_area(cls, polygon: list[Point]) -> list[Point]:
        n = len(polygon)
        for i in range(n):
            if polygon[i] == polygon[i - 1]:
                raise ValueError(f"corner {i % n} repeats corner {(i - 1) % n}")
        if abs(_signed_area(polygon)) < _EDGE_EPSILON:
            raise ValueError("the polygon encloses no area (its corners are collinear)")
        crossing = _crossing_edges(polygon)
        if crossing is not None:
            first, second = crossing
            raise ValueError(
                f"the edges from corner {first} to {(first + 1) % n} and from corner {second} "
                f"to {(second + 1) % n} touch or cross; list the corners in order around the zone"
            )
        return polygon

    def contains(self, x: float, y: float) -> bool:
        """Whether the point ``(x, y)`` is inside the zone; a point on an edge or corner is inside.

        Even-odd ray casting, which is exact for concave polygons too (the
        validator guarantees a simple polygon, so even-odd and nonzero agree).
        Points on the boundary are tested first and count as inside, so a zone
        drawn along the frame's border includes objects standing on it, and two
        zones sharing an edge both contain a point on that edge.
        """
        return _point_in_polygon(x, y, self.polygon)


class TrackingSettings(BaseModel):
    """Simple IoU tracking, so an object that stays in view is a few events, not one per frame."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True, description="Follow detections across frames and report start/update/end events."
    )
    iou_threshold: float = Field(
        0.3,
        gt=0.0,
        le=1.0,
        description="A detection continues an open track of the same label when their boxes' "
        "intersection over union is at least this (0..1].",
    )
    end_after_s: float | None = Field(
        None,
        gt=0.0,
        allow_inf_nan=False,
        description="A track unseen for this many seconds ends with one 'end' event. Unset: "
        "end_after_frames times the stream's measured interval between inferred frames, and "
        "at least 1 s (1 s at 3 fps and faster, 15 s at 0.2 fps). Set, it must stay well "
        "above that interval; health warns when it does not.",
    )
    end_after_frames: float = Field(
        3.0,
        gt=1.0,
        allow_inf_nan=False,
        description="When end_after_s is unset, a track ends once unseen for this many frame "
        "intervals (so an object missed in one or two frames keeps its track).",
    )
    update_interval_s: float = Field(
        10.0,
        ge=0.0,
        allow_inf_nan=False,
        description="While a track lives, at most one 'update' event per this many seconds "
        "(0 = no updates, only start and end).",
    )
    min_hits: int = Field(
        3,
        ge=1,
        description="A track starts (its 'start' event) once seen in this many frames; an "
        "object that flickers in and out for fewer frames makes no event at all (1 = start "
        "on the first sighting). Counted in frames, it scales with the frame rate by itself: "
        "at 0.2 fps a track starts once the object was in view for 10 s.",
    )


class EventFilterSettings(BaseModel):
    """Which of a model's results become events."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: list[str] | None = Field(
        None,
        min_length=1,
        description="Only results with these labels become events (detections and "
        "classifications); unset means every label.",
    )
    min_score: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Lowest score (0..1) of a result that becomes an event; for poses, the "
        "lowest mean keypoint score.",
    )
    zones: list[Zone] = Field(
        default_factory=list,
        description="When set, a detection counts only when the centre of its box's bottom "
        "edge lies in at least one of these zones.",
    )
    min_coverage: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Segmentation: lowest share (0..1) of the frame, or of a zone, that a class "
        "must cover to be in an event; 'background' counts only when listed in labels.",
    )
    min_interval_s: float = Field(
        0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="Untracked results: at most one event per label per this many seconds "
        "(0 = every frame).",
    )
    tracking: TrackingSettings = Field(
        default_factory=TrackingSettings, description="Tracking of detections across frames."
    )

    @model_validator(mode="after")
    def _unique_zone_names(self) -> EventFilterSettings:
        names = [zone.name for zone in self.zones]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"zone names must be unique: {', '.join(duplicates)} repeated")
        return self


@dataclass(frozen=True)
class EventDraft:
    """An event decided from one frame's results, before ids and transport are added."""

    kind: EventKind
    lifecycle: Lifecycle | None
    """Track lifecycle; None for untracked events."""
    track_id: int | None
    label: str | None
    score: float | None
    zones: tuple[str, ...]
    results: tuple[Result, ...]
    """What the event is about: the track's detection, the passing classes, the keypoints..."""
    first_seen_ts: float | None
    """Tracks: capture time of the frame that started the track."""
    capture_ts: float
    """Capture time of the frame this event was decided on (for ``flush``, its ``now_ts``)."""
    last_seen_ts: float | None = None
    """Tracks: capture time of the frame holding the detection in ``results``; for an ``end``
    event that is when the object was last seen, which ``capture_ts`` is not."""


@dataclass(frozen=True)
class TrackingStatus:
    """How tracking runs at the stream's measured rate, for health."""

    frame_interval_s: float | None = None
    """Median time between recent frames (monotonic clock); None before two frames."""
    end_after_s: float = MIN_AUTO_END_AFTER_S
    """The end_after_s in effect: the configured one, or the one that follows the rate."""
    warning: str | None = None
    """Why the tracking settings cannot be met at the measured rate; None when they can."""


@dataclass
class _Track:
    track_id: int
    label: str
    detection: Detection
    zones: tuple[str, ...]
    first_seen_ts: float
    last_seen_ts: float
    last_seen_at: float  # the decision clock (monotonic) from here on
    last_event_at: float
    hits: int = 1
    confirmed: bool = False


@dataclass(frozen=True)
class _Passing:
    detection: Detection
    zones: tuple[str, ...]


@dataclass
class _Frame:
    detections: list[Detection]
    classifications: list[Classification]
    keypoints: list[Keypoint]
    segments: list[Segment]
    landmarks: list[Landmarks]
    raw: list[RawTensor]


class EventFilter:
    """Turns each frame's results into event drafts, keeping tracks and intervals between frames."""

    def __init__(self, settings: EventFilterSettings) -> None:
        self._settings = settings
        self._labels = frozenset(settings.labels) if settings.labels is not None else None
        self._tracks: list[_Track] = []
        self._track_ids = itertools.count(1)
        self._last_emitted: dict[tuple[EventKind, str | None], float] = {}
        self._latest_at: float | None = None
        self._intervals: deque[float] = deque(maxlen=_INTERVAL_SAMPLES)
        self.status = self._status(None)
        """Replaced whole after each frame; any thread may read it."""

    def process(
        self, results: Sequence[Result], capture_ts: float, monotonic_ts: float | None = None
    ) -> list[EventDraft]:
        """The events of one frame's ``results``, captured at ``capture_ts`` (Unix seconds).

        ``monotonic_ts`` is the frame's time on the monotonic clock, which every decision
        uses; it defaults to ``capture_ts`` (a replayed recording, tests).
        """
        now = capture_ts if monotonic_ts is None else monotonic_ts
        events: list[EventDraft] = []
        if self._latest_at is not None and now < self._latest_at:
            log.debug(
                "frame time went back from %s to %s: ending %d tracks",
                self._latest_at,
                now,
                len(self._tracks),
            )
            events.extend(self.flush(capture_ts))
            self._last_emitted.clear()
            self._intervals.clear()
        elif self._latest_at is not None:
            self._intervals.append(now - self._latest_at)
        self._latest_at = now
        self.status = self._status(statistics.median(self._intervals) if self._intervals else None)
        frame = _split(results)
        events.extend(self._detection_events(frame.detections, capture_ts, now))
        events.extend(self._classification_events(frame.classifications, capture_ts, now))
        events.extend(self._pose_events(frame.keypoints, capture_ts, now))
        events.extend(self._segmentation_events(frame.segments, capture_ts, now))
        events.extend(self._landmark_events(frame.landmarks, capture_ts, now))
        events.extend(self._raw_events(frame.raw, capture_ts, now))
        return events

    def flush(self, now_ts: float) -> list[EventDraft]:
        """End every open track (orderly shutdown, model swap); one ``end`` event each."""
        events = [self._track_event(t, "end", now_ts) for t in self._tracks if t.confirmed]
        self._tracks.clear()
        return events

    # Tracking at the measured rate

    def _status(self, interval_s: float | None) -> TrackingStatus:
        tracking = self._settings.tracking
        if tracking.end_after_s is not None:
            end_after_s = tracking.end_after_s
        elif interval_s is None:
            end_after_s = MIN_AUTO_END_AFTER_S
        else:
            end_after_s = max(MIN_AUTO_END_AFTER_S, tracking.end_after_frames * interval_s)
        warning = None
        if (
            tracking.enabled
            and interval_s is not None
            and end_after_s < MIN_END_AFTER_FRAMES * interval_s
        ):
            warning = _unmet_warning(tracking, end_after_s, interval_s)
        return TrackingStatus(interval_s, end_after_s, warning)

    # Detections

    def _detection_events(
        self, detections: list[Detection], ts: float, now: float
    ) -> list[EventDraft]:
        passing = [p for p in map(self._passing, detections) if p is not None]
        if self._settings.tracking.enabled:
            return self._tracked_events(passing, ts, now)
        passing.sort(key=lambda p: p.detection.score, reverse=True)
        return [
            _untracked(
                "detection",
                (p.detection,),
                ts,
                label=p.detection.label,
                score=p.detection.score,
                zones=p.zones,
            )
            for p in passing
            if self._gate("detection", p.detection.label, now)
        ]

    def _passing(self, detection: Detection) -> _Passing | None:
        if not self._label_wanted(detection.label) or detection.score < self._settings.min_score:
            return None
        if not self._settings.zones:
            return _Passing(detection, ())
        _ymin, xmin, ymax, xmax = detection.box
        x, y = (xmin + xmax) / 2.0, ymax
        zones = tuple(zone.name for zone in self._settings.zones if zone.contains(x, y))
        return _Passing(detection, zones) if zones else None

    def _tracked_events(self, passing: list[_Passing], ts: float, now: float) -> list[EventDraft]:
        events = self._end_unseen_tracks(ts, now)
        matched, unmatched = self._match(passing)
        update_interval_s = self._settings.tracking.update_interval_s
        for track, seen in matched:
            track.detection, track.zones = seen.detection, seen.zones
            track.last_seen_ts, track.last_seen_at = ts, now
            track.hits += 1
            if not track.confirmed:
                events.extend(self._confirm_if_seen_enough(track, ts, now))
            elif update_interval_s > 0 and now - track.last_event_at >= update_interval_s:
                track.last_event_at = now
                events.append(self._track_event(track, "update", ts))
        for seen in unmatched:
            track = _Track(
                track_id=0,  # numbered when confirmed, so ids have no gaps
                label=seen.detection.label,
                detection=seen.detection,
                zones=seen.zones,
                first_seen_ts=ts,
                last_seen_ts=ts,
                last_seen_at=now,
                last_event_at=now,
            )
            self._tracks.append(track)
            events.extend(self._confirm_if_seen_enough(track, ts, now))
        return events

    def _confirm_if_seen_enough(self, track: _Track, ts: float, now: float) -> list[EventDraft]:
        if track.hits < self._settings.tracking.min_hits:
            return []
        track.confirmed = True
        track.track_id = next(self._track_ids)
        track.last_event_at = now
        log.debug("track %d (%s) started", track.track_id, track.label)
        return [self._track_event(track, "start", ts)]

    def _end_unseen_tracks(self, ts: float, now: float) -> list[EventDraft]:
        end_after_s = self.status.end_after_s
        ended = [t for t in self._tracks if now - t.last_seen_at >= end_after_s]
        if not ended:
            return []
        self._tracks = [t for t in self._tracks if now - t.last_seen_at < end_after_s]
        # A track never confirmed was a flicker: it ends as silently as it began.
        return [self._track_event(track, "end", ts) for track in ended if track.confirmed]

    def _match(
        self, passing: list[_Passing]
    ) -> tuple[list[tuple[_Track, _Passing]], list[_Passing]]:
        """Greedy IoU assignment within each label, highest overlap first."""
        threshold = self._settings.tracking.iou_threshold
        candidates: list[tuple[float, int, int]] = []
        for t, track in enumerate(self._tracks):
            for d, seen in enumerate(passing):
                if seen.detection.label == track.label:
                    overlap = _iou(track.detection.box, seen.detection.box)
                    if overlap >= threshold:
                        candidates.append((-overlap, t, d))
        candidates.sort()
        used_tracks: set[int] = set()
        used_detections: set[int] = set()
        matched: list[tuple[_Track, _Passing]] = []
        for _, t, d in candidates:
            if t not in used_tracks and d not in used_detections:
                used_tracks.add(t)
                used_detections.add(d)
                matched.append((self._tracks[t], passing[d]))
        unmatched = [seen for d, seen in enumerate(passing) if d not in used_detections]
        return matched, unmatched

    def _track_event(self, track: _Track, lifecycle: Lifecycle, ts: float) -> EventDraft:
        if lifecycle == "end":
            log.debug("track %d (%s) ended", track.track_id, track.label)
        return EventDraft(
            kind="detection",
            lifecycle=lifecycle,
            track_id=track.track_id,
            label=track.label,
            score=track.detection.score,
            zones=track.zones,
            results=(track.detection,),
            first_seen_ts=track.first_seen_ts,
            capture_ts=ts,
            last_seen_ts=track.last_seen_ts,
        )

    # Classification, pose, raw

    def _classification_events(
        self, classifications: list[Classification], ts: float, now: float
    ) -> list[EventDraft]:
        passing = sorted(
            (
                c
                for c in classifications
                if self._label_wanted(c.label) and c.score >= self._settings.min_score
            ),
            key=lambda c: c.score,
            reverse=True,
        )
        if not passing or not self._gate("classification", passing[0].label, now):
            return []
        top = passing[0]
        return [_untracked("classification", tuple(passing), ts, label=top.label, score=top.score)]

    def _pose_events(self, keypoints: list[Keypoint], ts: float, now: float) -> list[EventDraft]:
        if not keypoints:
            return []
        mean_score = sum(k.score for k in keypoints) / len(keypoints)
        if mean_score < self._settings.min_score or not self._gate("pose", None, now):
            return []
        return [_untracked("pose", tuple(keypoints), ts, score=mean_score)]

    def _segmentation_events(
        self, segments: list[Segment], ts: float, now: float
    ) -> list[EventDraft]:
        threshold = self._settings.min_coverage
        passing = [
            s
            for s in segments
            if self._segment_wanted(s.label)
            and (s.coverage >= threshold or any(v >= threshold for v in s.zones.values()))
        ]
        if not passing:
            return []
        top = max(passing, key=lambda s: s.coverage)
        if not self._gate("segmentation", top.label, now):
            return []
        zones = tuple(
            zone.name
            for zone in self._settings.zones
            if any(s.zones.get(zone.name, 0.0) >= threshold for s in passing)
        )
        return [_untracked("segmentation", tuple(passing), ts, label=top.label, zones=zones)]

    def _landmark_events(self, found: list[Landmarks], ts: float, now: float) -> list[EventDraft]:
        present = [f for f in found if f.score >= self._settings.min_score]
        if not present or not self._gate("landmarks", None, now):
            return []
        return [_untracked("landmarks", tuple(present), ts, score=present[0].score)]

    def _segment_wanted(self, label: str) -> bool:
        if self._labels is None:
            return label != BACKGROUND
        return label in self._labels

    def _raw_events(self, tensors: list[RawTensor], ts: float, now: float) -> list[EventDraft]:
        if not tensors or not self._gate("raw", None, now):
            return []
        return [_untracked("raw", tuple(tensors), ts)]

    # Filters

    def _label_wanted(self, label: str) -> bool:
        return self._labels is None or label in self._labels

    def _gate(self, kind: EventKind, label: str | None, now: float) -> bool:
        """Whether an untracked ``kind``/``label`` event may go out at ``now``; if so, note it."""
        interval_s = self._settings.min_interval_s
        if interval_s <= 0:
            return True
        last = self._last_emitted.get((kind, label))
        if last is not None and now - last < interval_s:
            return False
        self._last_emitted[(kind, label)] = now
        return True


def _unmet_warning(tracking: TrackingSettings, end_after_s: float, interval_s: float) -> str:
    """Why ``end_after_s`` cannot work at ``interval_s`` between frames, and what to do."""
    if tracking.min_hits > 1:
        outcome = (
            f"so no track is seen min_hits ({tracking.min_hits}) times and no detection "
            "becomes an event"
        )
    else:
        outcome = "so every sighting is a track of its own (a start and an end per frame)"
    return (
        f"tracking.end_after_s {end_after_s:g} s cannot be met at this stream's rate "
        f"({interval_s:.2g} s between frames): a track ends before the next frame can continue "
        f"it, {outcome}; unset end_after_s so it follows the frame rate, or set it to "
        f"{MIN_END_AFTER_FRAMES * interval_s:.2g} s or more"
    )


def _untracked(
    kind: EventKind,
    results: tuple[Result, ...],
    ts: float,
    *,
    label: str | None = None,
    score: float | None = None,
    zones: tuple[str, ...] = (),
) -> EventDraft:
    return EventDraft(
        kind=kind,
        lifecycle=None,
        track_id=None,
        label=label,
        score=score,
        zones=zones,
        results=results,
        first_seen_ts=None,
        capture_ts=ts,
    )


def _split(results: Sequence[Result]) -> _Frame:
    frame = _Frame([], [], [], [], [], [])
    for result in results:
        if isinstance(result, Detection):
            frame.detections.append(result)
        elif isinstance(result, Classification):
            frame.classifications.append(result)
        elif isinstance(result, Keypoint):
            frame.keypoints.append(result)
        elif isinstance(result, Segment):
            frame.segments.append(result)
        elif isinstance(result, Landmarks):
            frame.landmarks.append(result)
        else:
            frame.raw.append(result)
    return frame


def _iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(ymin, xmin, ymax, xmax)`` boxes; 0 for empty boxes."""
    inter_h = min(a[2], b[2]) - max(a[0], b[0])
    inter_w = min(a[3], b[3]) - max(a[1], b[1])
    if inter_h <= 0 or inter_w <= 0:
        return 0.0
    intersection = inter_h * inter_w
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


# Geometry of zones


def _point_in_polygon(x: float, y: float, polygon: Sequence[Point]) -> bool:
    """Even-odd ray casting to the right of the point; points on the boundary are inside."""
    inside = False
    x1, y1 = polygon[-1]
    for x2, y2 in polygon:
        if _on_segment((x, y), (x1, y1), (x2, y2)):
            return True
        # Half-open rule: an edge counts when it straddles the ray's line, so a vertex on the
        # ray is counted once and horizontal edges never.
        if (y1 > y) != (y2 > y):
            crossing_x = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
            if x < crossing_x:
                inside = not inside
        x1, y1 = x2, y2
    return inside


def _on_segment(point: Point, start: Point, end: Point) -> bool:
    """Whether ``point`` lies on the segment from ``start`` to ``end`` (within a tolerance)."""
    (x, y), (x1, y1), (x2, y2) = point, start, end
    if not (
        min(x1, x2) - _EDGE_EPSILON <= x <= max(x1, x2) + _EDGE_EPSILON
        and min(y1, y2) - _EDGE_EPSILON <= y <= max(y1, y2) + _EDGE_EPSILON
    ):
        return False
    cross = (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1)
    length = max(abs(x2 - x1), abs(y2 - y1))
    return abs(cross) <= _EDGE_EPSILON * max(length, 1.0)


def _signed_area(polygon: Sequence[Point]) -> float:
    """Shoelace formula: positive for counter-clockwise corners (in y-up axes)."""
    total = 0.0
    x1, y1 = polygon[-1]
    for x2, y2 in polygon:
        total += x1 * y2 - x2 * y1
        x1, y1 = x2, y2
    return total / 2.0


def _crossing_edges(polygon: Sequence[Point]) -> tuple[int, int] | None:
    """The first pair of non-adjacent edges that touch or cross, as the indices of their starts."""
    n = len(polygon)
    edges = [(polygon[i], polygon[(i + 1) % n]) for i in range(n)]
    for i in range(n):
        for j in range(i + 2, n):
            if i == 0 and j == n - 1:
                continue  # the last edge is adjacent to the first
            if _segments_touch(*edges[i], *edges[j]):
                return i, j
    return None


def _segments_touch(p1: Point, p2: Point, q1: Point, q2: Point) -> bool:
    """Whether segments p1-p2 and q1-q2 cross, or one's end lies on the other."""
    crosses = (
        _orientation(q1, q2, p1) * _orientation(q1, q2, p2) < 0
        and _orientation(p1, p2, q1) * _orientation(p1, p2, q2) < 0
    )
    return (
        crosses
        or _on_segment(p1, q1, q2)
        or _on_segment(p2, q1, q2)
        or _on_segment(q1, p1, p2)
        or _on_segment(q2, p1, p2)
    )


def _orientation(a: Point, b: Point, c: Point) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
