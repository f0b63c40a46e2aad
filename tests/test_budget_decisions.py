"""The budget decisions without a process, a socket or a file: memory budget, pace, throughput."""

from __future__ import annotations

import pytest

from edgefleet.agent.budgets import MemoryRoom, configured_fps, memory_budget_bytes, pace_refusal
from edgefleet.agent.config import UpdateSettings
from edgefleet.agent.pipeline import ModelStats
from edgefleet.agent.probation import Throughput, Verdict, probation_verdict
from edgefleet.agent.protocol import Manifest
from edgefleet.agent.sources import (
    FileSourceSettings,
    ImageFolderSourceSettings,
    SyntheticSourceSettings,
)

MIB = 1 << 20
SETTINGS = UpdateSettings(probation_s=60, probation_min_frames=20)


def manifest(**fields: object) -> Manifest:
    values: dict[str, object] = {
        "model_id": "m",
        "version": 5,
        "sha256": "a" * 64,
        "size": 10,
        "artifact": "m.tflite",
        "urls": ["https://models.example/m.tflite"],
        "inputs": [{"shape": [1, 8, 8, 3], "dtype": "uint8"}],
        "issued_at": 1.0,
        "expires_at": 2.0,
    }
    return Manifest.model_validate({**values, **fields})


# -- memory budget ------------------------------------------------------------------------


def test_the_configured_budget_wins_over_what_is_free() -> None:
    room = MemoryRoom(available_bytes=8000 * MIB, cgroup_room_bytes=None, agent_rss_bytes=0)
    settings = UpdateSettings(validation_memory_mib=300)
    assert memory_budget_bytes(settings, room) == 300 * MIB


def test_the_derived_budget_is_the_smaller_room_less_the_reserve() -> None:
    board = MemoryRoom(available_bytes=900 * MIB, cgroup_room_bytes=None, agent_rss_bytes=0)
    unit = MemoryRoom(available_bytes=900 * MIB, cgroup_room_bytes=400 * MIB, agent_rss_bytes=0)
    settings = UpdateSettings(memory_reserve_mib=64)
    assert memory_budget_bytes(settings, board) == (900 - 64) * MIB
    assert memory_budget_bytes(settings, unit) == (400 - 64) * MIB


def test_a_board_with_no_room_gets_a_budget_that_refuses_every_model() -> None:
    full = MemoryRoom(available_bytes=10 * MIB, cgroup_room_bytes=0, agent_rss_bytes=0)
    assert memory_budget_bytes(UpdateSettings(), full) == MIB


def test_the_room_names_its_figures() -> None:
    room = MemoryRoom(412 * MIB, cgroup_room_bytes=300 * MIB, agent_rss_bytes=80 * MIB)
    assert room.describe() == (
        "412 MiB available, 300 MiB under the agent's memory limit; the agent holds 80 MiB"
    )


# -- pace -----------------------------------------------------------------------------------


def test_a_candidate_within_the_factor_of_the_running_model_passes() -> None:
    assert (
        pace_refusal(manifest(), p50_ms=2.9, running_p50_ms=1.0, fps=None, max_slowdown=3) is None
    )


def test_a_candidate_over_the_factor_is_refused_with_both_figures_and_what_to_do() -> None:
    reason = pace_refusal(manifest(), p50_ms=12.4, running_p50_ms=0.46, fps=None, max_slowdown=3)
    assert reason is not None
    assert "12.40 ms is 27.0x the running model's 0.46 ms" in reason
    assert "--allow-slower" in reason
    assert "--max-latency-ms" in reason


def test_a_candidate_slower_than_the_frame_interval_is_refused() -> None:
    reason = pace_refusal(manifest(), p50_ms=50.0, running_p50_ms=40.0, fps=30, max_slowdown=3)
    assert reason is not None
    assert "cannot keep the stream's 30 fps" in reason


@pytest.mark.parametrize("fields", [{"allow_slower": True}, {"max_latency_ms": 100.0}])
def test_an_allowance_or_an_explicit_budget_replaces_the_pace_check(
    fields: dict[str, object],
) -> None:
    slow = manifest(**fields)
    assert pace_refusal(slow, p50_ms=90.0, running_p50_ms=1.0, fps=30, max_slowdown=3) is None


def test_without_a_running_figure_only_the_frame_rate_counts() -> None:
    assert (
        pace_refusal(manifest(), p50_ms=20.0, running_p50_ms=None, fps=30, max_slowdown=3) is None
    )


def test_the_configured_frame_rate_comes_from_the_source_settings_that_state_one() -> None:
    assert configured_fps(SyntheticSourceSettings(fps=15)) == 15
    assert configured_fps(SyntheticSourceSettings(fps=0)) is None  # unpaced
    assert configured_fps(ImageFolderSourceSettings(folder="x", interval_s=0.5)) == 2.0
    assert configured_fps(FileSourceSettings(path="x.mp4")) is None  # the media's own rate


# -- throughput in probation ----------------------------------------------------------------

BEFORE = Throughput(processed=300, captured=300, elapsed_s=10.0)  # kept up with 30 fps


def stats(processed: int) -> ModelStats:
    s = ModelStats(processed=processed)
    for _ in range(processed):
        s.inference.add(5.0)
    return s


def test_a_model_that_halves_the_frames_processed_is_rolled_back_at_the_end_of_the_window() -> None:
    verdict = probation_verdict(
        stats(900),
        captured=1800,
        elapsed_s=60,
        validated_p50_ms=5.0,
        settings=SETTINGS,
        before=BEFORE,
    )
    assert verdict.rollback_reason is not None
    assert "throughput fell to 15.0 fps, 50% of 1800 frames skipped" in verdict.rollback_reason
    assert "from 30.0 fps, 0% of 300 frames skipped with the previous model" in (
        verdict.rollback_reason
    )


def test_a_drop_is_judged_over_the_whole_window_not_before_its_end() -> None:
    verdict = probation_verdict(
        stats(30),
        captured=300,
        elapsed_s=10,
        validated_p50_ms=5.0,
        settings=SETTINGS,
        before=BEFORE,
    )
    assert verdict == Verdict()  # keep watching


def test_a_model_that_keeps_most_of_the_pace_is_committed() -> None:
    verdict = probation_verdict(
        stats(1500),
        captured=1800,
        elapsed_s=60,
        validated_p50_ms=5.0,
        settings=SETTINGS,
        before=BEFORE,
    )
    assert verdict.commit


def test_a_manifest_that_allows_a_slower_model_is_not_rolled_back_for_its_throughput() -> None:
    verdict = probation_verdict(
        stats(900),
        captured=1800,
        elapsed_s=60,
        validated_p50_ms=5.0,
        settings=SETTINGS,
        before=BEFORE,
        allow_slower=True,
    )
    assert verdict.commit


@pytest.mark.parametrize(
    "before", [None, Throughput(processed=5, captured=5, elapsed_s=0.2)], ids=["none", "too-few"]
)
def test_without_enough_of_the_previous_model_throughput_is_not_compared(
    before: Throughput | None,
) -> None:
    verdict = probation_verdict(
        stats(900),
        captured=1800,
        elapsed_s=60,
        validated_p50_ms=5.0,
        settings=SETTINGS,
        before=before,
    )
    assert verdict.commit
