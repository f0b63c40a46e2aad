"""The update's decisions, without a socket or a file: which manifests to refuse, probation."""

from __future__ import annotations

import pytest

from edgefleet.agent.config import UpdateSettings
from edgefleet.agent.pipeline import ModelStats
from edgefleet.agent.probation import probation_verdict
from edgefleet.agent.protocol import Manifest, UpdateState
from edgefleet.agent.updates import in_sync, refusal, refused_again

NOW = 1_800_000_000.0


def manifest(**fields: object) -> Manifest:
    values: dict[str, object] = {
        "model_id": "m",
        "version": 5,
        "sha256": "a" * 64,
        "size": 10,
        "artifact": "m.tflite",
        "urls": ["https://models.example/m.tflite"],
        "inputs": [{"shape": [1, 8, 8, 3], "dtype": "uint8"}],
        "issued_at": NOW - 10,
        "expires_at": NOW + 3600,
    }
    return Manifest.model_validate({**values, **fields})


def test_a_newer_manifest_is_accepted() -> None:
    assert (
        refusal(manifest(), now=NOW, installed=manifest(version=4), agent_version="0.1.0") is None
    )


def test_the_first_manifest_is_accepted_over_a_model_from_the_config() -> None:
    assert refusal(manifest(version=1), now=NOW, installed=None, agent_version="0.1.0") is None


@pytest.mark.parametrize("installed", [5, 6])
def test_a_version_not_newer_than_installed_is_refused_as_a_replay(installed: int) -> None:
    reason = refusal(
        manifest(), now=NOW, installed=manifest(version=installed), agent_version="0.1.0"
    )
    assert reason is not None
    assert "not newer" in reason


def test_a_signed_rollback_may_go_back() -> None:
    older = manifest(version=3, rollback=True)
    assert refusal(older, now=NOW, installed=manifest(version=4), agent_version="0.1.0") is None


def test_an_expired_manifest_is_refused() -> None:
    reason = refusal(manifest(expires_at=NOW - 1), now=NOW, installed=None, agent_version="0.1")
    assert reason is not None
    assert "expired" in reason


@pytest.mark.parametrize(("agent", "needed"), [("0.1.0", "0.2"), ("1.9.9", "1.10.0")])
def test_a_manifest_for_a_newer_agent_is_refused(agent: str, needed: str) -> None:
    reason = refusal(
        manifest(min_agent_version=needed), now=NOW, installed=None, agent_version=agent
    )
    assert reason is not None
    assert needed in reason


def test_a_manifest_without_a_usable_url_is_refused() -> None:
    reason = refusal(
        manifest(urls=["ftp://models.example/m.tflite"]), now=NOW, installed=None, agent_version="1"
    )
    assert reason is not None
    assert "URL" in reason


RUNNING = "a" * 64  # the sha256 every manifest() names unless told otherwise


def test_the_installed_manifest_is_in_sync_with_the_model_it_installed() -> None:
    installed = manifest()
    assert in_sync(installed, running_sha256=RUNNING, installed=installed)


def test_a_first_release_of_the_config_files_model_is_in_sync() -> None:
    assert in_sync(manifest(version=1), running_sha256=RUNNING, installed=None)


def test_a_manifest_for_other_bytes_than_the_running_ones_is_not_in_sync() -> None:
    other = manifest(sha256="b" * 64, version=9)
    assert not in_sync(other, running_sha256=RUNNING, installed=manifest())


@pytest.mark.parametrize("version", [4, 5], ids=["older", "same-version-signed-again"])
def test_the_running_bytes_under_a_version_not_newer_are_a_replay_not_in_sync(
    version: int,
) -> None:
    installed = manifest()
    replay = manifest(version=version, issued_at=NOW)  # signed anew: another manifest
    assert not in_sync(replay, running_sha256=RUNNING, installed=installed)
    reason = refusal(replay, now=NOW, installed=installed, agent_version="0.1.0")
    assert reason is not None
    assert f"version {version} is not newer than the installed 5" in reason


def test_the_running_bytes_as_a_signed_rollback_or_a_newer_version_are_in_sync() -> None:
    installed = manifest()
    for release in (manifest(version=4, rollback=True), manifest(version=6)):
        assert in_sync(release, running_sha256=RUNNING, installed=installed)


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
