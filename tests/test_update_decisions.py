"""The update's decisions, without a socket or a file: which manifests to refuse, probation."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edgefleet.agent.acceptance import Clock, Installed, Refusal, accept, refusal
from edgefleet.agent.config import UpdateSettings
from edgefleet.agent.pipeline import ModelStats
from edgefleet.agent.probation import probation_verdict
from edgefleet.agent.protocol import LineMark, Manifest, StreamMarks, UpdateState
from edgefleet.agent.updates import refused_again

NOW = 1_800_000_000.0
RUNNING = "a" * 64  # the sha256 every manifest() names unless told otherwise
OTHER = "b" * 64
CLOCK = Clock(now=NOW)
NO_MARKS = StreamMarks()


def manifest(**fields: object) -> Manifest:
    values: dict[str, object] = {
        "model_id": "m",
        "version": 5,
        "sequence": 5,
        "sha256": RUNNING,
        "size": 10,
        "artifact": "m.tflite",
        "urls": ["https://models.example/m.tflite"],
        "inputs": [{"shape": [1, 8, 8, 3], "dtype": "uint8"}],
        "issued_at": NOW - 10,
        "expires_at": NOW + 3600,
    }
    return Manifest.model_validate({**values, **fields})


def marks(sequence: int, version: int, line: str = "m") -> StreamMarks:
    return StreamMarks(line=line, lines={line: LineMark(sequence=sequence, version=version)})


def judge(
    candidate: Manifest,
    *,
    seen: StreamMarks = NO_MARKS,
    installed: Installed | None = None,
    clock: Clock = CLOCK,
    agent: str = "0.1.0",
) -> Refusal | None:
    return refusal(
        candidate,
        marks=seen,
        installed=installed or Installed(),
        clock=clock,
        agent_version=agent,
    )


def running(**fields: object) -> Installed:
    """The stream runs manifest(**fields)'s model under it."""
    installed = manifest(**fields)
    return Installed(installed.sha256, installed)


def reason(refused: Refusal | None) -> str:
    assert refused is not None, "accepted, not refused"
    return refused.reason


# -- what is accepted -----------------------------------------------------------------------


def test_a_newer_manifest_is_accepted() -> None:
    newer = manifest(version=6, sequence=6, sha256=OTHER)
    assert judge(newer, seen=marks(5, 5), installed=running()) is None


def test_the_first_manifest_is_accepted_over_a_model_from_the_config() -> None:
    assert judge(manifest(version=1, sequence=1), installed=Installed(OTHER)) is None


def test_a_rollback_naming_the_installed_release_may_go_back_in_version() -> None:
    back = manifest(
        version=3, sequence=6, sha256=OTHER, rollback_from={"version": 5, "sha256": RUNNING}
    )
    assert judge(back, seen=marks(5, 5), installed=running()) is None


def test_a_manifest_replacing_the_streams_line_may_change_the_model_id() -> None:
    other_line = manifest(model_id="n", sequence=1, version=1, replaces_model_id="m")
    assert judge(other_line, seen=marks(5, 5), installed=running()) is None


# -- replays, older releases, flip-flops ----------------------------------------------------


@pytest.mark.parametrize("sequence", [41, 43])
def test_a_sequence_not_newer_than_the_mark_is_refused_with_both_figures(sequence: int) -> None:
    replay = manifest(version=50, sequence=sequence, sha256=OTHER)
    assert f"sequence {sequence} is not newer than 43" in reason(judge(replay, seen=marks(43, 9)))


def test_a_manifest_without_a_sequence_is_refused() -> None:
    assert "no sequence" in reason(judge(manifest(sequence=0)))


@pytest.mark.parametrize("version", [4, 5])
def test_a_version_not_newer_than_the_mark_is_refused_even_with_a_new_sequence(
    version: int,
) -> None:
    older = manifest(version=version, sequence=9, sha256=OTHER)
    assert f"version {version} is not newer than 5" in reason(judge(older, seen=marks(8, 5)))


def test_the_rollback_replayed_after_a_newer_release_is_refused_by_its_sequence() -> None:
    # v9 (seq 43) installed after the rollback to v3 (seq 42) was accepted.
    rollback = manifest(
        version=3, sequence=42, sha256=OTHER, rollback_from={"version": 8, "sha256": "c" * 64}
    )
    refused = judge(rollback, seen=marks(43, 9), installed=running(version=9, sequence=43))
    assert "sequence 42 is not newer than 43" in reason(refused)


def test_an_older_release_after_a_rollback_is_refused_by_the_marks_the_rollback_kept() -> None:
    after = accept(
        manifest(version=3, sequence=10, rollback_from={"version": 9, "sha256": OTHER}),
        marks(9, 9),
        Installed(OTHER),
        installs=True,
    )
    assert after.lines["m"] == LineMark(sequence=10, version=9)
    older = manifest(version=5, sequence=5, sha256=OTHER)
    assert "sequence 5 is not newer than 10" in reason(judge(older, seen=after))


def test_two_manifests_in_turn_the_first_is_refused_once_the_second_was_accepted() -> None:
    first, second = manifest(version=6, sequence=6), manifest(version=7, sequence=7, sha256=OTHER)
    seen = accept(
        second, accept(first, NO_MARKS, Installed(), installs=True), Installed(), installs=True
    )
    assert "sequence 6 is not newer than 7" in reason(judge(first, seen=seen))


def test_marks_lost_still_count_the_installed_manifest() -> None:
    replay = manifest(version=4, sequence=4, sha256=OTHER)
    assert "sequence 4 is not newer than 5" in reason(judge(replay, installed=running()))


def test_a_rollback_from_a_release_not_installed_is_refused() -> None:
    back = manifest(
        version=3, sequence=6, sha256=OTHER, rollback_from={"version": 5, "sha256": "c" * 64}
    )
    refused = reason(judge(back, seen=marks(5, 5), installed=running()))
    assert "a rollback from version 5 (sha256 cccccccccccc)" in refused
    assert "runs version 5 (sha256 aaaaaaaaaaaa)" in refused


def test_a_rollback_naming_another_version_of_the_installed_bytes_is_refused() -> None:
    back = manifest(
        version=3, sequence=6, sha256=OTHER, rollback_from={"version": 4, "sha256": RUNNING}
    )
    assert "runs version 5" in reason(judge(back, seen=marks(5, 5), installed=running()))


def test_a_manifest_of_another_model_line_is_refused_unless_it_replaces_the_line() -> None:
    other_line = manifest(model_id="n", sequence=1, version=1)
    refused = reason(judge(other_line, seen=marks(5, 5), installed=running()))
    assert "model_id n is not the stream's model line m" in refused
    assert "replaces_model_id m" in refused


def test_accepting_never_lowers_a_mark() -> None:
    after = accept(manifest(version=3, sequence=2), marks(9, 9), Installed(), installs=True)
    assert after.lines["m"] == LineMark(sequence=9, version=9)


def test_a_release_accepted_but_never_installed_uses_its_sequence_not_its_version() -> None:
    refused_later = manifest(version=11, sequence=12)  # say its download failed
    after = accept(refused_later, marks(10, 10), Installed(), installs=False)
    assert after.lines["m"] == LineMark(sequence=12, version=10)
    assert judge(manifest(version=11, sequence=13), seen=after) is None
    assert "sequence 12 is not newer than 12" in reason(judge(refused_later, seen=after))


# -- the clock ---------------------------------------------------------------------------------


def test_an_expired_manifest_is_refused_and_checked_again_when_the_clock_changes() -> None:
    refused = judge(manifest(expires_at=NOW - 1))
    assert "expired" in reason(refused)
    assert refused is not None
    assert refused.clock_dependent


def test_a_manifest_expired_at_the_trusted_floor_is_refused_for_good() -> None:
    # The clock says the manifest is valid, but the device has seen a later trusted time.
    late_floor = Clock(now=NOW - 7200, floor=NOW)
    refused = judge(manifest(expires_at=NOW - 1, issued_at=NOW - 9000), clock=late_floor)
    assert "expired" in reason(refused)
    assert refused is not None
    assert not refused.clock_dependent


def test_a_manifest_issued_in_the_future_beyond_the_skew_is_refused_for_now() -> None:
    refused = judge(manifest(issued_at=NOW + 301))
    assert "issued 301 s in this device's future" in reason(refused)
    assert refused is not None
    assert refused.clock_dependent
    assert judge(manifest(issued_at=NOW + 299)) is None


def test_a_clock_behind_the_floor_judges_expiry_at_the_floor() -> None:
    booted_in_the_past = Clock(now=NOW - 30 * 86400, floor=NOW)
    refused = judge(manifest(expires_at=NOW - 60, issued_at=NOW - 3600), clock=booted_in_the_past)
    assert "expired 60 s ago" in reason(refused)


# -- agent and URL ------------------------------------------------------------------------------


@pytest.mark.parametrize(("agent", "needed"), [("0.1.0", "0.2"), ("1.9.9", "1.10.0")])
def test_a_manifest_for_a_newer_agent_is_refused(agent: str, needed: str) -> None:
    assert needed in reason(judge(manifest(min_agent_version=needed), agent=agent))


def test_a_manifest_without_a_usable_url_is_refused() -> None:
    assert "URL" in reason(judge(manifest(urls=["ftp://models.example/m.tflite"])))


def test_a_rolled_back_manifest_deployed_again_is_refused_naming_the_rollback() -> None:
    reason = refused_again(
        UpdateState.ROLLED_BACK, "probation failed: error rate 10%", decided_at=3, revision=4
    )
    assert reason is not None
    assert "rolled back on this device (probation failed: error rate 10%)" in reason
    assert "sign a new manifest" in reason


def test_a_refused_manifest_deployed_again_is_refused_with_its_first_reason() -> None:
    first = "version 5 is not newer than the installed 10"
    assert refused_again(UpdateState.REFUSED, first, decided_at=3, revision=7) == first


@pytest.mark.parametrize("state", [UpdateState.ROLLED_BACK, UpdateState.REFUSED])
def test_a_settled_manifest_at_the_revision_it_was_decided_at_is_left_as_it_is(
    state: UpdateState,
) -> None:
    # Reconciled again every retry_s, or after a restart: not a new deploy.
    assert refused_again(state, "why", decided_at=4, revision=4) is None
    assert refused_again(state, "why", decided_at=None, revision=4) is None


@pytest.mark.parametrize("state", [UpdateState.COMMITTED, UpdateState.PROBATION])
def test_a_manifest_that_runs_deployed_again_is_not_refused(state: UpdateState) -> None:
    assert refused_again(state, None, decided_at=3, revision=4) is None


def stats(processed: int, failed: int, latency_ms: float = 5.0) -> ModelStats:
    s = ModelStats(processed=processed, failed=failed)
    for _ in range(processed):
        s.inference.add(latency_ms)
    return s


CAPTURED = 1000  # frames the source delivered during probation, unless a test says otherwise
SETTINGS = UpdateSettings(probation_s=60, probation_min_frames=20, max_error_rate=0.05)


def test_probation_waits_while_the_window_runs() -> None:
    verdict = probation_verdict(
        stats(100, 0), captured=CAPTURED, elapsed_s=10, validated_p50_ms=5.0, settings=SETTINGS
    )
    assert not verdict.commit
    assert verdict.rollback_reason is None


def test_probation_commits_a_healthy_model_after_the_window() -> None:
    verdict = probation_verdict(
        stats(100, 1), captured=CAPTURED, elapsed_s=61, validated_p50_ms=5.0, settings=SETTINGS
    )
    assert verdict.commit


def test_probation_rolls_back_on_an_error_rate_over_the_limit() -> None:
    verdict = probation_verdict(
        stats(90, 10), captured=CAPTURED, elapsed_s=5, validated_p50_ms=5.0, settings=SETTINGS
    )
    assert verdict.rollback_reason is not None
    assert "error rate 10%" in verdict.rollback_reason


def test_probation_ignores_errors_until_enough_frames() -> None:
    verdict = probation_verdict(
        stats(5, 5), captured=CAPTURED, elapsed_s=5, validated_p50_ms=5.0, settings=SETTINGS
    )
    assert verdict.rollback_reason is None


def test_probation_rolls_back_a_model_much_slower_than_when_validated() -> None:
    slow = stats(50, 0, latency_ms=20.0)
    verdict = probation_verdict(
        slow, captured=CAPTURED, elapsed_s=5, validated_p50_ms=5.0, settings=SETTINGS
    )
    assert verdict.rollback_reason is not None
    assert "median invoke" in verdict.rollback_reason


def test_probation_keeps_a_microsecond_model_whose_median_is_a_few_times_noise() -> None:
    # 0.004 ms validated, 0.02 ms on the stream: 5x, but a cold cache, not a slower model.
    fast = stats(50, 0, latency_ms=0.02)
    verdict = probation_verdict(
        fast, captured=CAPTURED, elapsed_s=61, validated_p50_ms=0.004, settings=SETTINGS
    )
    assert verdict.rollback_reason is None
    assert verdict.commit


def test_probation_without_a_validated_latency_judges_errors_only() -> None:
    slow = stats(50, 0, latency_ms=20.0)
    verdict = probation_verdict(
        slow, captured=CAPTURED, elapsed_s=61, validated_p50_ms=None, settings=SETTINGS
    )
    assert verdict.commit


def test_probation_does_not_commit_without_enough_results() -> None:
    verdict = probation_verdict(
        stats(3, 0), captured=3, elapsed_s=61, validated_p50_ms=5.0, settings=SETTINGS
    )
    assert not verdict.commit
    assert verdict.rollback_reason is None


def test_probation_rolls_back_a_model_that_leaves_the_frames_unprocessed() -> None:
    verdict = probation_verdict(
        stats(2, 0), captured=500, elapsed_s=61, validated_p50_ms=5.0, settings=SETTINGS
    )
    assert verdict.rollback_reason is not None
    assert "2 results from 500 frames" in verdict.rollback_reason


# -- properties: whatever the marks and the manifest, an accepted one is never accepted again

MARK_VALUES = st.integers(min_value=0, max_value=50)


@settings(max_examples=500)
@given(
    mark=st.tuples(MARK_VALUES, MARK_VALUES),
    sequence=MARK_VALUES,
    version=st.integers(min_value=1, max_value=50),
    rollback=st.booleans(),
    line=st.sampled_from([None, "m", "n"]),
)
def test_a_manifest_once_accepted_is_refused_when_replayed(
    mark: tuple[int, int], sequence: int, version: int, rollback: bool, line: str | None
) -> None:
    seen = StreamMarks(
        line=line, lines={"m": LineMark(sequence=mark[0], version=mark[1])} if line else {}
    )
    installed = running(version=max(mark[1], 1), sequence=mark[0]) if line == "m" else Installed()
    candidate = manifest(
        version=version,
        sequence=sequence,
        sha256=OTHER,
        replaces_model_id="n" if line == "n" else None,
        rollback_from={"version": max(mark[1], 1), "sha256": RUNNING} if rollback else None,
    )

    assume(judge(candidate, seen=seen, installed=installed) is None)  # accepted once
    after = accept(candidate, seen, installed, installs=True)

    replay = judge(candidate, seen=after, installed=Installed(OTHER, candidate))
    assert f"sequence {sequence} is not newer than {sequence}" in reason(replay)
    assert (
        after.lines["m"].sequence >= seen.lines.get("m", LineMark(sequence=0, version=0)).sequence
    )
