"""Event filtering and tracking: which results become events, driven frame by frame."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgefleet.agent.events import (
    EventDraft,
    EventFilter,
    EventFilterSettings,
    TrackingSettings,
    Zone,
)
from edgefleet.runtime import Classification, Detection, Keypoint, RawTensor
from edgefleet.runtime.tasks import KEYPOINT_NAMES, Result

FPS = 30.0
UNTRACKED = TrackingSettings(enabled=False)
# Start on the first sighting, so each test sees its track at once (min_hits has its own tests).
IMMEDIATE = TrackingSettings(min_hits=1)
# The same with a fixed end_after_s, for tests whose few frames would otherwise set the rate.
IMMEDIATE_END_1S = TrackingSettings(min_hits=1, end_after_s=1.0)
# A person-shaped box in the middle of the frame, for tests where its place is beside the point.
STANDING_BOX = (0.2, 0.4, 0.8, 0.6)


def person(
    box: tuple[float, float, float, float] = STANDING_BOX, score: float = 0.9, label: str = "person"
) -> Detection:
    """A detection of ``label``; ``box`` is (ymin, xmin, ymax, xmax)."""
    return Detection(class_id=0, label=label, score=score, box=box)


def standing_at(x: float, y: float, label: str = "person") -> Detection:
    """A 0.2 x 0.2 box whose bottom edge is centred on (x, y)."""
    return person((y - 0.2, x - 0.1, y, x + 0.1), label=label)


def span(xmin: float, xmax: float) -> tuple[float, float, float, float]:
    """A full-height box from ``xmin`` to ``xmax``: its IoU with another span is 1-D."""
    return (0.0, xmin, 1.0, xmax)


def pose(score: float) -> list[Result]:
    """Seventeen keypoints, all with ``score``."""
    return [Keypoint(name, 0.5, 0.5, score) for name in KEYPOINT_NAMES]


def run(
    event_filter: EventFilter, frames: Iterable[tuple[Sequence[Result], float]]
) -> list[EventDraft]:
    """Every event of ``frames``, each a (results, capture time) pair, in order."""
    return [event for results, ts in frames for event in event_filter.process(results, ts)]


def lifecycles(events: Iterable[EventDraft]) -> list[tuple[int | None, str | None]]:
    """(track id, lifecycle) of each event."""
    return [(event.track_id, event.lifecycle) for event in events]


# Filters


def test_detections_below_min_score_are_dropped() -> None:
    event_filter = EventFilter(EventFilterSettings(min_score=0.6, tracking=UNTRACKED))

    events = event_filter.process([person(score=0.59), person(score=0.6)], 0.0)

    assert [event.score for event in events] == [0.6]


def test_only_listed_labels_become_events() -> None:
    event_filter = EventFilter(EventFilterSettings(labels=["car"], tracking=UNTRACKED))

    events = event_filter.process([person(label="person"), person(label="car")], 0.0)

    assert [event.label for event in events] == ["car"]


def test_zone_counts_where_the_box_stands_not_the_box_itself() -> None:
    walkway = Zone(name="walkway", polygon=[(0.0, 0.5), (1.0, 0.5), (1.0, 0.8), (0.0, 0.8)])
    event_filter = EventFilter(EventFilterSettings(zones=[walkway], tracking=UNTRACKED))
    mostly_above_but_standing_inside = person((0.1, 0.1, 0.6, 0.3), label="person")
    mostly_inside_but_standing_below = person((0.55, 0.6, 0.9, 0.9), label="dog")

    events = event_filter.process(
        [mostly_above_but_standing_inside, mostly_inside_but_standing_below], 0.0
    )

    assert [(event.label, event.zones) for event in events] == [("person", ("walkway",))]


def test_event_names_every_zone_it_stands_in() -> None:
    left = Zone(name="left", polygon=[(0.0, 0.0), (0.6, 0.0), (0.6, 1.0), (0.0, 1.0)])
    right = Zone(name="right", polygon=[(0.4, 0.0), (1.0, 0.0), (1.0, 1.0), (0.4, 1.0)])
    event_filter = EventFilter(EventFilterSettings(zones=[left, right], tracking=UNTRACKED))

    events = event_filter.process([standing_at(0.5, 0.7)], 0.0)

    assert [event.zones for event in events] == [("left", "right")]


# A U shape: two arms (x 0.1-0.3 and 0.7-0.9) joined by a base along the bottom (y 0.7-0.9).
U_SHAPE = Zone(
    name="u",
    polygon=[
        (0.1, 0.1),
        (0.3, 0.1),
        (0.3, 0.7),
        (0.7, 0.7),
        (0.7, 0.1),
        (0.9, 0.1),
        (0.9, 0.9),
        (0.1, 0.9),
    ],
)


@pytest.mark.parametrize(
    ("point", "inside"),
    [
        ((0.2, 0.3), True),  # left arm
        ((0.8, 0.3), True),  # right arm
        ((0.5, 0.8), True),  # base
        ((0.5, 0.3), False),  # the notch between the arms
        ((0.5, 0.1), False),  # level with the arms' tops, in the notch
        ((0.05, 0.5), False),  # left of everything
        ((0.5, 0.95), False),  # below the base
    ],
)
def test_concave_zone_contains_its_arms_but_not_its_notch(
    point: tuple[float, float], inside: bool
) -> None:
    assert U_SHAPE.contains(*point) is inside


@pytest.mark.parametrize(
    "point",
    [
        (0.1, 0.5),  # left edge
        (0.5, 0.9),  # bottom edge, horizontal
        (0.5, 0.7),  # the notch's floor, a horizontal edge with outside above it
        (0.3, 0.4),  # the notch's side
        (0.3, 0.7),  # the notch's concave corner
        (0.9, 0.9),  # a convex corner
        (0.7, 0.1),  # a corner level with other corners, on the same horizontal line
    ],
)
def test_points_on_a_zone_edge_or_corner_are_inside(point: tuple[float, float]) -> None:
    assert U_SHAPE.contains(*point)


def test_zones_sharing_an_edge_both_contain_it_and_at_the_frame_border() -> None:
    top = Zone(name="top", polygon=[(0.0, 0.0), (1.0, 0.0), (1.0, 0.5), (0.0, 0.5)])
    bottom = Zone(name="bottom", polygon=[(0.0, 0.5), (1.0, 0.5), (1.0, 1.0), (0.0, 1.0)])

    on_shared_edge = [top.contains(0.3, 0.5), bottom.contains(0.3, 0.5)]
    at_frame_bottom = bottom.contains(0.3, 1.0)

    assert on_shared_edge == [True, True]
    assert at_frame_bottom


# Tracking


def test_still_object_for_30s_at_30fps_is_start_two_updates_and_end() -> None:
    event_filter = EventFilter(EventFilterSettings(tracking=IMMEDIATE))  # updates 10 s, end 1 s
    frames = [([person()], i / FPS) for i in range(int(30 * FPS))]

    events = run(event_filter, frames) + event_filter.process([], 30.0 + 1.0)

    assert lifecycles(events) == [(1, "start"), (1, "update"), (1, "update"), (1, "end")]


def test_track_starts_only_after_min_hits_sightings() -> None:
    event_filter = EventFilter(EventFilterSettings())  # min_hits 3 by default
    frames = [([person()], i / FPS) for i in range(3)]

    events = run(event_filter, frames)

    assert lifecycles(events) == [(1, "start")]
    assert events[0].capture_ts == 2 / FPS
    assert events[0].first_seen_ts == 0.0


def test_flicker_shorter_than_min_hits_makes_no_event_at_all() -> None:
    event_filter = EventFilter(EventFilterSettings())
    flicker = [([person()], 0.0), ([person()], 1 / FPS), ([], 2 / FPS)]

    events = run(event_filter, flicker) + event_filter.process([], 5.0) + event_filter.flush(6.0)

    assert events == []


def test_track_ids_count_only_confirmed_tracks() -> None:
    event_filter = EventFilter(EventFilterSettings())
    flicker = [([standing_at(0.2, 0.9)], 0.0)]
    steady = [([standing_at(0.7, 0.9)], (i + 1) / FPS) for i in range(3)]

    events = run(event_filter, flicker + steady)

    assert lifecycles(events) == [(1, "start")]


def test_update_interval_zero_gives_only_start_and_end() -> None:
    tracking = TrackingSettings(update_interval_s=0.0, min_hits=1)
    event_filter = EventFilter(EventFilterSettings(tracking=tracking))
    frames = [([person()], i / FPS) for i in range(int(30 * FPS))]

    events = run(event_filter, frames) + event_filter.flush(30.0)

    assert lifecycles(events) == [(1, "start"), (1, "end")]


def test_moving_object_keeps_its_track() -> None:
    event_filter = EventFilter(EventFilterSettings(tracking=IMMEDIATE))
    frames = [([person(span(0.01 * i, 0.01 * i + 0.3))], i / FPS) for i in range(60)]

    events = run(event_filter, frames)

    assert lifecycles(events) == [(1, "start")]


def test_two_objects_of_the_same_label_get_separate_tracks() -> None:
    event_filter = EventFilter(EventFilterSettings(tracking=IMMEDIATE))
    frames = [([person(span(0.0, 0.3)), person(span(0.6, 0.9))], i / FPS) for i in range(30)]

    events = run(event_filter, frames) + event_filter.flush(1.0)

    assert sorted(lifecycles(events)) == [(1, "end"), (1, "start"), (2, "end"), (2, "start")]


def test_overlapping_object_of_another_label_opens_its_own_track() -> None:
    event_filter = EventFilter(EventFilterSettings(tracking=IMMEDIATE))

    events = run(event_filter, [([person()], 0.0), ([person(label="dog")], 0.1)])

    assert [(event.label, event.track_id, event.lifecycle) for event in events] == [
        ("person", 1, "start"),
        ("dog", 2, "start"),
    ]


def test_matching_takes_the_highest_overlap_first() -> None:
    # Frame 2's first box overlaps track 1 (IoU 0.33) and track 2 (0.6); its second box overlaps
    # only track 1 (0.78). Taking pairs in detection order would strand the second box.
    event_filter = EventFilter(EventFilterSettings(tracking=IMMEDIATE))
    first, second = person(span(0.2, 0.6)), person(span(0.05, 0.45))
    frames = [([person(span(0.0, 0.4)), person(span(0.3, 0.7))], 0.0), ([first, second], 0.1)]

    during = run(event_filter, frames)
    ends = event_filter.flush(0.2)

    assert lifecycles(during) == [(1, "start"), (2, "start")]
    assert {event.track_id: event.results for event in ends} == {1: (second,), 2: (first,)}


def test_object_back_within_end_after_s_keeps_its_track() -> None:
    event_filter = EventFilter(EventFilterSettings(tracking=IMMEDIATE_END_1S))

    events = run(event_filter, [([person()], 0.0), ([], 0.5), ([person()], 0.9)])

    assert lifecycles(events) == [(1, "start")]


def test_object_back_after_end_after_s_is_a_new_track() -> None:
    event_filter = EventFilter(EventFilterSettings(tracking=IMMEDIATE_END_1S))

    events = run(event_filter, [([person()], 0.0), ([person()], 1.5)])

    assert lifecycles(events) == [(1, "start"), (1, "end"), (2, "start")]


def test_end_event_carries_the_last_detection_and_when_it_was_seen() -> None:
    event_filter = EventFilter(EventFilterSettings(tracking=IMMEDIATE_END_1S))
    last = person(span(0.05, 0.35), score=0.7)
    run(event_filter, [([person(span(0.0, 0.3))], 10.0), ([last], 10.5)])

    (end,) = event_filter.process([], 12.0)

    assert (end.lifecycle, end.results, end.score) == ("end", (last,), 0.7)
    assert (end.first_seen_ts, end.last_seen_ts, end.capture_ts) == (10.0, 10.5, 12.0)


def test_object_leaving_every_zone_ends_its_track() -> None:
    door = Zone(name="door", polygon=[(0.0, 0.0), (0.5, 0.0), (0.5, 1.0), (0.0, 1.0)])
    event_filter = EventFilter(EventFilterSettings(zones=[door], tracking=IMMEDIATE_END_1S))
    inside, outside = standing_at(0.45, 0.9), standing_at(0.55, 0.9)

    events = run(event_filter, [([inside], 0.0), ([outside], 0.5), ([outside], 1.0)])

    assert [(event.lifecycle, event.zones) for event in events] == [
        ("start", ("door",)),
        ("end", ("door",)),
    ]


def test_flush_ends_every_open_track() -> None:
    event_filter = EventFilter(EventFilterSettings(tracking=IMMEDIATE))
    event_filter.process([person(span(0.0, 0.3)), person(span(0.6, 0.9), label="car")], 0.0)

    ends = event_filter.flush(0.1)
    after = event_filter.flush(0.2)

    assert [(event.track_id, event.lifecycle, event.capture_ts) for event in ends] == [
        (1, "end", 0.1),
        (2, "end", 0.1),
    ]
    assert after == []


# Tracking on a slow board: the defaults follow the measured frame interval

SLOW_INTERVAL_S = 5.0  # SSD on an emulated board: 0.2 fps
WALL_T0 = 1_790_000_000.0  # capture times are Unix seconds; decisions run on the monotonic clock


def slow_frames(
    seen: list[bool], *, mono_t0: float = 1000.0
) -> list[tuple[list[Result], float, float]]:
    """(results, capture time, monotonic time) every 5 s; a person where ``seen`` says so."""
    return [
        (
            [person()] if present else [],
            WALL_T0 + i * SLOW_INTERVAL_S,
            mono_t0 + i * SLOW_INTERVAL_S,
        )
        for i, present in enumerate(seen)
    ]


def run_timed(
    event_filter: EventFilter, frames: Iterable[tuple[Sequence[Result], float, float]]
) -> list[EventDraft]:
    """Every event of ``frames``, each (results, capture time, monotonic time), in order."""
    return [e for results, ts, mono in frames for e in event_filter.process(results, ts, mono)]


def test_at_0_2_fps_the_default_tracking_still_makes_events() -> None:
    event_filter = EventFilter(EventFilterSettings())  # min_hits 3, end_after_s unset
    frames = slow_frames([True] * 4 + [False] * 4)

    events = run_timed(event_filter, frames)

    assert lifecycles(events) == [(1, "start"), (1, "end")]
    start, end = events
    assert start.capture_ts == WALL_T0 + 2 * SLOW_INTERVAL_S  # the third sighting
    assert start.first_seen_ts == WALL_T0
    assert end.last_seen_ts == WALL_T0 + 3 * SLOW_INTERVAL_S
    assert end.capture_ts == WALL_T0 + 6 * SLOW_INTERVAL_S  # unseen for 3 intervals
    assert event_filter.status.frame_interval_s == SLOW_INTERVAL_S
    assert event_filter.status.end_after_s == 3 * SLOW_INTERVAL_S
    assert event_filter.status.warning is None


def test_at_0_2_fps_the_old_fixed_end_after_s_makes_no_event_and_says_why() -> None:
    tracking = TrackingSettings(end_after_s=1.0)  # the default before it followed the rate
    event_filter = EventFilter(EventFilterSettings(tracking=tracking))

    events = run_timed(event_filter, slow_frames([True] * 8))

    assert events == []
    warning = event_filter.status.warning
    assert warning is not None
    assert "tracking.end_after_s 1 s cannot be met" in warning
    assert "5 s between frames" in warning
    assert "no track is seen min_hits (3) times" in warning
    assert "7.5 s or more" in warning


def test_with_min_hits_1_the_warning_says_every_sighting_is_its_own_track() -> None:
    tracking = TrackingSettings(end_after_s=1.0, min_hits=1)
    event_filter = EventFilter(EventFilterSettings(tracking=tracking))

    events = run_timed(event_filter, slow_frames([True] * 3))

    assert lifecycles(events) == [(1, "start"), (1, "end"), (2, "start"), (2, "end"), (3, "start")]
    assert event_filter.status.warning is not None
    assert "every sighting is a track of its own" in event_filter.status.warning


def test_tracking_settings_that_fit_the_rate_raise_no_warning() -> None:
    cases = {
        "30 fps, defaults": (EventFilterSettings(), 1 / FPS),
        "30 fps, end after 1 s": (EventFilterSettings(tracking=IMMEDIATE_END_1S), 1 / FPS),
        "0.2 fps, end after 8 s": (
            EventFilterSettings(tracking=TrackingSettings(end_after_s=8.0)),
            SLOW_INTERVAL_S,
        ),
        "0.2 fps, untracked": (EventFilterSettings(tracking=UNTRACKED), SLOW_INTERVAL_S),
    }
    for what, (filter_settings, interval_s) in cases.items():
        event_filter = EventFilter(filter_settings)
        for i in range(5):
            event_filter.process([person()], i * interval_s, i * interval_s)

        assert event_filter.status.warning is None, what


def test_end_after_s_unset_is_three_frame_intervals_and_at_least_one_second() -> None:
    fast, slow = EventFilter(EventFilterSettings()), EventFilter(EventFilterSettings())
    for i in range(10):
        fast.process([], i / FPS)
        slow.process([], i * SLOW_INTERVAL_S)

    assert fast.status.end_after_s == 1.0
    assert slow.status.end_after_s == 15.0


def test_one_stall_does_not_move_the_measured_interval() -> None:
    event_filter = EventFilter(EventFilterSettings())
    times = [i * 0.5 for i in range(10)] + [4.5 + 20.0] + [25.0 + i * 0.5 for i in range(1, 5)]
    for t in times:
        event_filter.process([], t)

    assert event_filter.status.frame_interval_s == 0.5


def test_tracking_follows_the_monotonic_clock_when_the_wall_clock_steps() -> None:
    event_filter = EventFilter(EventFilterSettings(tracking=IMMEDIATE))
    # The wall clock steps back an hour (NTP on a board without a real-time clock) mid-track.
    frames = [([person()], WALL_T0 + i / FPS, 50.0 + i / FPS) for i in range(30)]
    frames += [([person()], WALL_T0 - 3600 + i / FPS, 51.0 + i / FPS) for i in range(30)]

    events = run_timed(event_filter, frames)
    ends = event_filter.flush(WALL_T0)

    assert lifecycles(events + ends) == [(1, "start"), (1, "end")]
    assert ends[0].first_seen_ts == WALL_T0  # reported in wall-clock time
    assert ends[0].last_seen_ts == WALL_T0 - 3600 + 29 / FPS


def test_monotonic_time_going_back_ends_open_tracks() -> None:
    event_filter = EventFilter(EventFilterSettings(tracking=IMMEDIATE))

    events = run_timed(event_filter, [([person()], WALL_T0, 100.0), ([person()], WALL_T0, 5.0)])

    assert lifecycles(events) == [(1, "start"), (1, "end"), (2, "start")]


def test_capture_time_going_back_ends_open_tracks() -> None:
    event_filter = EventFilter(EventFilterSettings(tracking=IMMEDIATE))

    events = run(event_filter, [([person()], 100.0), ([person()], 5.0)])

    assert lifecycles(events) == [(1, "start"), (1, "end"), (2, "start")]


# Untracked results


def test_untracked_detections_are_one_event_each_without_an_interval() -> None:
    event_filter = EventFilter(EventFilterSettings(tracking=UNTRACKED))
    frames = [([person(span(0.0, 0.3)), person(span(0.6, 0.9))], i / FPS) for i in range(3)]

    events = run(event_filter, frames)

    assert [(event.lifecycle, event.track_id) for event in events] == [(None, None)] * 6


def test_untracked_detections_are_limited_per_label_by_min_interval() -> None:
    event_filter = EventFilter(EventFilterSettings(min_interval_s=1.0, tracking=UNTRACKED))
    frame = [person(score=0.7), person(score=0.8), person(score=0.6, label="car")]

    events = run(event_filter, [(frame, 0.0), (frame, 0.5), (frame, 1.0)])

    assert [(event.capture_ts, event.label, event.score) for event in events] == [
        (0.0, "person", 0.8),
        (0.0, "car", 0.6),
        (1.0, "person", 0.8),
        (1.0, "car", 0.6),
    ]


def test_classification_event_is_the_best_class_passing_the_filters() -> None:
    event_filter = EventFilter(EventFilterSettings(labels=["tabby", "tiger cat"], min_score=0.2))
    tiger_cat, tabby = Classification(282, "tiger cat", 0.3), Classification(281, "tabby", 0.4)
    top_k: list[Result] = [
        tiger_cat,
        Classification(286, "cougar", 0.5),
        tabby,
        Classification(285, "Egyptian cat", 0.1),
    ]

    (event,) = event_filter.process(top_k, 0.0)

    assert (event.kind, event.lifecycle, event.label, event.score) == (
        "classification",
        None,
        "tabby",
        0.4,
    )
    assert event.results == (tabby, tiger_cat)


def test_classifications_are_limited_per_label_by_min_interval() -> None:
    event_filter = EventFilter(EventFilterSettings(min_interval_s=2.0))
    cat, dog = Classification(1, "cat", 0.9), Classification(2, "dog", 0.9)

    events = run(event_filter, [([cat], 0.0), ([cat], 1.0), ([dog], 1.5), ([cat], 2.0)])

    assert [(event.capture_ts, event.label) for event in events] == [
        (0.0, "cat"),
        (1.5, "dog"),
        (2.0, "cat"),
    ]


def test_pose_event_needs_the_mean_keypoint_score() -> None:
    event_filter = EventFilter(EventFilterSettings(min_score=0.4))
    mostly_unsure = pose(0.1)[:14] + pose(0.9)[14:]  # mean below 0.4 though three points are sure

    events = run(event_filter, [(mostly_unsure, 0.0), (pose(0.5), 0.1)])

    assert [(event.kind, event.capture_ts, event.label) for event in events] == [
        ("pose", 0.1, None)
    ]
    assert len(events[0].results) == len(KEYPOINT_NAMES)


def test_raw_tensors_are_one_event_per_min_interval() -> None:
    event_filter = EventFilter(EventFilterSettings(min_interval_s=1.0))
    raw: list[Result] = [RawTensor("logits", (1, 2), [[0.1, 0.9]])]

    events = run(event_filter, [(raw, i / FPS) for i in range(int(2 * FPS))])

    assert [(event.kind, event.capture_ts) for event in events] == [("raw", 0.0), ("raw", 1.0)]


# Settings


def zone(polygon: list[list[float]]) -> dict[str, Any]:
    """Settings with one zone, as a config file would hold them."""
    return {"zones": [{"name": "z", "polygon": polygon}]}


@pytest.mark.parametrize(
    ("fields", "location", "message"),
    [
        ({"min_score": 1.5}, ("min_score",), "less than or equal to 1"),
        (zone([[0, 0], [1, 1]]), ("zones", 0, "polygon"), "at least 3 items"),
        (zone([[0, 0], [2, 0], [0, 1]]), ("zones", 0, "polygon", 1, 0), "less than or equal"),
        (zone([[0, 0], [1, 1], [1, 0], [0, 0.5]]), ("zones", 0, "polygon"), "touch or cross"),
        (zone([[0, 0], [0.5, 0.5], [1, 1]]), ("zones", 0, "polygon"), "encloses no area"),
        (zone([[0, 0], [1, 0], [1, 0], [0, 1]]), ("zones", 0, "polygon"), "corner 2 repeats"),
        ({"labels": []}, ("labels",), "at least 1 item"),
        ({"tracking": {"iou_threshold": 0}}, ("tracking", "iou_threshold"), "greater than 0"),
        ({"tracking": {"end_after_s": -1}}, ("tracking", "end_after_s"), "greater than 0"),
        ({"min_interval_s": -0.5}, ("min_interval_s",), "greater than or equal to 0"),
        ({"min_socre": 0.5}, ("min_socre",), "Extra inputs are not permitted"),
    ],
)
def test_invalid_settings_are_errors_naming_the_field(
    fields: dict[str, Any], location: tuple[str | int, ...], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        EventFilterSettings.model_validate(fields)

    (error,) = caught.value.errors()
    assert error["loc"] == location
    assert message in error["msg"]


def test_zone_names_must_be_unique() -> None:
    square = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]

    with pytest.raises(ValidationError, match="zone names must be unique: door repeated"):
        EventFilterSettings(zones=[Zone(name="door", polygon=square)] * 2)


# Properties

_detections = st.builds(
    lambda label, x, width, score: person(span(x / 10, x / 10 + width / 10), score, label),
    st.sampled_from(["person", "car"]),
    st.integers(0, 8),
    st.integers(1, 3),
    st.sampled_from([0.3, 0.6, 0.9]),
)
_frames = st.lists(
    st.tuples(st.lists(_detections, max_size=5), st.sampled_from([0.0, 0.03, 0.3, 0.9, 2.0, -5.0])),
    max_size=40,
)
_tracking = st.builds(
    TrackingSettings,
    iou_threshold=st.sampled_from([0.1, 0.3, 0.7]),
    end_after_s=st.sampled_from([None, 0.1, 1.0]),
    update_interval_s=st.sampled_from([0.0, 0.5]),
    min_hits=st.sampled_from([1, 3]),
)


@settings(deadline=None)
@given(frames=_frames, tracking=_tracking)
def test_every_track_has_one_start_then_at_most_one_end(
    frames: list[tuple[list[Detection], float]], tracking: TrackingSettings
) -> None:
    event_filter = EventFilter(EventFilterSettings(tracking=tracking))
    ts = 0.0
    events: list[EventDraft] = []
    for detections, step_s in frames:
        ts += step_s
        events += event_filter.process(detections, ts)
    events += event_filter.flush(ts)

    by_track: dict[int, list[str]] = {}
    for event in events:
        assert event.track_id is not None
        assert event.lifecycle is not None
        by_track.setdefault(event.track_id, []).append(event.lifecycle)
    for history in by_track.values():
        assert history[0] == "start"
        assert history.count("start") == 1
        assert history[-1] == "end"
        assert history.count("end") == 1
