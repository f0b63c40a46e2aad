"""A stream's health figures read while it runs: every read is one consistent moment."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tflite_builder as tb

from edgefleet.agent.config import StreamSettings
from edgefleet.agent.pipeline import StreamRunner
from edgefleet.agent.protocol import Topics

READS = 3000


class _Events:
    """The outbox's place: the events the stream stored, in memory."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    def emit(self, stream: str, topic: str, payloads: list[bytes]) -> None:
        self.payloads.extend(payloads)


@pytest.fixture
def fast_stream(tmp_path: Path) -> Iterator[StreamRunner]:
    """A tiny real model on a synthetic source delivering frames as fast as they are taken."""
    model = tmp_path / "flat.tflite"
    model.write_bytes(tb.reshape_model(8, 8))
    settings = StreamSettings.model_validate(
        {
            "name": "fast",
            "source": {"type": "synthetic", "width": 8, "height": 8, "fps": 0},
            "model": {"path": str(model), "task": "raw"},
            "events": {"min_interval_s": 3600},
        }
    )
    runner = StreamRunner(settings, topics=Topics("dev-health"), sink=_Events())
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.0001)  # the agent runs at 1 ms: switch threads often, as it does
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()
        sys.setswitchinterval(previous)


def test_health_never_shows_more_frames_processed_than_captured(fast_stream: StreamRunner) -> None:
    seen_processed = 0
    for _ in range(READS):
        health = fast_stream.health()
        assert health.processed <= health.captured, health
        seen_processed = health.processed
    assert seen_processed > 0, "the stream processed nothing while it was read"
