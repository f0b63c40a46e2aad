"""Probation's decision: commit a newly activated model, roll it back (with why), or wait.

Pure: ``probation_verdict`` reads what the model did since activation (its stats, the
frames the source delivered) and what the previous model did (``Throughput``, taken
at activation), and returns a ``Verdict``; the ``updates`` thread acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import UpdateSettings
from .pipeline import ModelStats

__all__ = ["LATENCY_NOISE_MS", "Throughput", "Verdict", "probation_verdict"]

LATENCY_NOISE_MS = 1.0
"""A median invoke at most this far over the validated one is never "slower": for a model
that runs in microseconds, a cold cache or a busy core makes 3x of nothing."""


@dataclass(frozen=True)
class Verdict:
    """What probation decided: commit, roll back (with why), or keep watching."""

    commit: bool = False
    rollback_reason: str | None = None


@dataclass(frozen=True)
class Throughput:
    """Frames a model processed out of those the source delivered, over ``elapsed_s``."""

    processed: int
    captured: int
    elapsed_s: float

    @property
    def share(self) -> float:
        """Processed / captured: 1.0 keeps up with the source, 0.5 skips every other frame."""
        return self.processed / self.captured if self.captured else 1.0

    @property
    def fps(self) -> float:
        """Processed frames per second."""
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def describe(self) -> str:
        """``9.8 fps, 67% of 180 frames skipped``."""
        return f"{self.fps:.1f} fps, {1 - self.share:.0%} of {self.captured} frames skipped"


def probation_verdict(
    stats: ModelStats,
    *,
    captured: int,
    elapsed_s: float,
    validated_p50_ms: float | None,
    settings: UpdateSettings,
    before: Throughput | None = None,
    allow_slower: bool = False,
) -> Verdict:
    """Judge a model on probation from what it did since activation. Pure.

    Its latency is held against what validation measured for it on this device. Its
    throughput, at the end of the window, against the model it replaced (``before``): the
    share of delivered frames it processed over the whole window, below
    ``min_throughput_ratio`` of the previous model's, rolls it back (a sustained drop, not a
    slow first frame), unless the manifest allowed a slower model. It is committed only on
    evidence: ``probation_min_frames`` results. Past the window with fewer, it is rolled back
    if the source delivered the frames (``captured``) and the model did not process them (a
    hung interpreter), and kept waiting if the source delivered nothing (a camera that is
    down says nothing about the model).
    """
    frames = stats.processed + stats.failed
    if frames >= settings.probation_min_frames:
        rate = stats.failed / frames
        if rate > settings.max_error_rate:
            return Verdict(
                rollback_reason=f"error rate {rate:.0%} over {frames} frames exceeds "
                f"{settings.max_error_rate:.0%}"
            )
    slower = _slower_than_validated(stats, validated_p50_ms, settings)
    if slower is not None:
        return Verdict(rollback_reason=slower)
    if elapsed_s < settings.probation_s:
        return Verdict()
    now = Throughput(processed=stats.processed, captured=captured, elapsed_s=elapsed_s)
    dropped = None if allow_slower else _throughput_drop(before, now, settings)
    if dropped is not None:
        return Verdict(rollback_reason=dropped)
    return _at_window_end(frames, captured, elapsed_s, settings)


def _at_window_end(
    frames: int, captured: int, elapsed_s: float, settings: UpdateSettings
) -> Verdict:
    """Commit on evidence; roll back a model that processed nothing the source delivered."""
    if frames >= settings.probation_min_frames:
        return Verdict(commit=True)
    if captured >= settings.probation_min_frames:
        return Verdict(
            rollback_reason=f"{frames} results from {captured} frames in {elapsed_s:.0f} s "
            "(a stuck interpreter?)"
        )
    return Verdict()


def _slower_than_validated(
    stats: ModelStats, validated_p50_ms: float | None, settings: UpdateSettings
) -> str | None:
    """Why the model's median invoke on the stream is too far over its validation's, or None."""
    p50 = stats.inference.percentiles()["p50_ms"]
    if (
        p50 is None
        or not validated_p50_ms
        or stats.processed < settings.probation_min_frames
        or p50 <= validated_p50_ms * settings.max_latency_factor
        or p50 - validated_p50_ms <= LATENCY_NOISE_MS
    ):
        return None
    return (
        f"median invoke {p50:.2f} ms on the stream is over {settings.max_latency_factor}x the "
        f"{validated_p50_ms:.2f} ms measured when it was validated"
    )


def _throughput_drop(
    before: Throughput | None, now: Throughput, settings: UpdateSettings
) -> str | None:
    """Why the model's throughput over the window is a drop from the previous one's, or None."""
    enough = settings.probation_min_frames
    if before is None or before.captured < enough or now.captured < enough:
        return None  # too little seen on one side to compare (a new stream, a quiet camera)
    if now.share >= before.share * settings.min_throughput_ratio:
        return None
    return (
        f"throughput fell to {now.describe()} over {now.elapsed_s:.0f} s, from "
        f"{before.describe()} with the previous model: under "
        f"{settings.min_throughput_ratio:.0%} of its share of frames processed"
    )
