"""Accelerators that come and go: a stream falls back to its CPU build and returns.

The accelerator is ``fakeaccel``'s: a real external delegate library built here, which
refuses to load while a control file exists, and an engine whose invoke fails meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import fakeaccel
import pytest
import tflite_builder as tb
from agentproc import AgentProcess
from broker import Mosquitto
from conftest import Assets
from test_agent import agent_config, healths, statuses, subscriber

from edgefleet.agent.config import ModelSettings, StreamSettings
from edgefleet.agent.fallback import FallbackChain
from edgefleet.agent.pipeline import StreamRunner
from edgefleet.agent.protocol import EventMessage, Topics


class _Events:
    def __init__(self) -> None:
        self.messages: list[EventMessage] = []

    def emit(self, stream: str, topic: str, payloads: list[bytes]) -> None:
        self.messages.extend(EventMessage.model_validate_json(p) for p in payloads)


@pytest.fixture
def accelerator(tmp_path: Path) -> Path:
    library = fakeaccel.build_library(tmp_path)
    if library is None:
        pytest.skip("no C compiler to build the fake accelerator (apt-get install gcc)")
    return library


def _settings(tmp_path: Path, library: Path, unplugged: Path) -> StreamSettings:
    accelerated, cpu = tmp_path / "model_accel.tflite", tmp_path / "model.tflite"
    accelerated.write_bytes(tb.reshape_model(8, 8))
    cpu.write_bytes(tb.reshape_model(8, 8))
    return StreamSettings.model_validate(
        {
            "name": "cam",
            "source": {"type": "synthetic", "width": 8, "height": 8, "fps": 50},
            "model": {
                "path": str(accelerated),
                "task": "raw",
                "delegate": fakeaccel.delegate(library, unplugged),
                "fallbacks": [{"path": str(cpu)}],
                "retry_s": 0.2,
                "retry_max_s": 0.4,
            },
            "events": {"min_interval_s": 0},
        }
    )


@pytest.fixture
def unplugged(tmp_path: Path) -> Path:
    return tmp_path / "unplugged"


@pytest.fixture
def stream(
    tmp_path: Path, accelerator: Path, unplugged: Path
) -> Iterator[tuple[StreamRunner, _Events]]:
    sink = _Events()
    runner = StreamRunner(
        _settings(tmp_path, accelerator, unplugged),
        topics=Topics("dev-fallback"),
        sink=sink,
        open_build=fakeaccel.open_build(unplugged),
    )
    runner.start()
    try:
        yield runner, sink
    finally:
        runner.stop()


def _wait_for(condition, what: str, timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _on(events: _Events, kind: str) -> list[EventMessage]:
    return [e for e in events.messages if e.model.delegate.startswith(kind)]


def test_the_stream_falls_back_mid_stream_and_returns_when_the_accelerator_is_back(
    stream: tuple[StreamRunner, _Events], unplugged: Path
) -> None:
    runner, events = stream
    _wait_for(lambda: len(_on(events, "external")) >= 5, "events on the accelerator")
    assert runner.health().state == "running"

    unplugged.touch()
    _wait_for(lambda: len(_on(events, "cpu")) >= 5, "events on the CPU build")
    degraded = runner.health()
    assert degraded.state == "degraded"
    assert degraded.fallback is not None
    assert degraded.fallback.startswith("accelerator lost: edgetpu: the device stopped answering")
    assert degraded.build_switches == 1
    assert runner.model.delegate == "cpu"

    # While it stays unplugged, every retry fails (the library refuses to load): still on the CPU.
    retry_at = runner._chain.retry_at
    _wait_for(lambda: runner._chain.retry_at != retry_at, "a failed retry")
    assert runner.health().fallback == degraded.fallback
    assert runner.health().build_switches == 1

    unplugged.unlink()
    cpu_events = len(_on(events, "cpu"))
    _wait_for(
        lambda: _on(events, "external") and events.messages[-1].model.delegate != "cpu",
        "events on the accelerator again",
    )
    back = runner.health()
    assert back.state == "running"
    assert back.fallback is None
    assert back.build_switches == 2
    assert len(_on(events, "cpu")) >= cpu_events

    runner.stop()
    final = runner.health()
    seqs = [e.seq for e in events.messages]
    assert seqs == list(range(1, len(seqs) + 1)), "an event is missing or out of order"
    assert final.failed == 0, "a frame failed instead of running on the fallback"
    assert len(seqs) == final.processed  # every processed frame made its event
    # In order: accelerator, then CPU, then the accelerator again.
    kinds = [e.model.delegate.split(" ")[0] for e in events.messages]
    changes = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert changes == ["external", "cpu", "external"]


def test_a_stream_whose_accelerator_is_missing_at_start_runs_its_fallback(
    tmp_path: Path, accelerator: Path, unplugged: Path
) -> None:
    unplugged.touch()  # no device attached when the agent starts
    sink = _Events()
    runner = StreamRunner(
        _settings(tmp_path, accelerator, unplugged),
        topics=Topics("dev-fallback"),
        sink=sink,
    )  # the real loader: the library itself refuses
    runner.start()
    try:
        _wait_for(lambda: len(sink.messages) >= 3, "events on the CPU build")
        health = runner.health()
        assert health.state == "degraded"
        assert health.fallback is not None
        assert "fake accelerator: no device attached" in health.fallback
        unplugged.unlink()
        _wait_for(lambda: runner.health().fallback is None, "the accelerator taken back")
        _wait_for(lambda: sink.messages[-1].model.delegate.startswith("external"), "its events")
    finally:
        runner.stop()
    assert runner.health().failed == 0


def test_build_0_is_the_model_and_there_is_none_past_the_fallbacks(tmp_path: Path) -> None:
    settings = ModelSettings.model_validate({"path": str(tmp_path / "m.tflite")})
    assert settings.build(0) is settings
    with pytest.raises(IndexError):
        settings.build(1)


def test_the_chain_backs_off_and_resets() -> None:
    chain = FallbackChain(builds=2, retry_s=1.0, retry_max_s=3.0)
    assert chain.can_fall_back
    assert not chain.retry_due(0.0)

    chain.fell_back(1, "usb device gone", now=10.0)
    assert (chain.active, chain.reason, chain.switches) == (
        1,
        "accelerator lost: usb device gone",
        1,
    )
    assert not chain.can_fall_back
    assert not chain.retry_due(10.5)
    assert chain.retry_due(11.0)
    chain.retry_failed(now=11.0)
    assert chain.retry_at == 13.0  # 2 s
    chain.retry_failed(now=13.0)
    assert chain.retry_at == 16.0  # 4 s, capped at 3
    chain.restored()
    assert (chain.active, chain.reason, chain.retry_at, chain.switches) == (0, None, None, 2)
    chain.fell_back(1, "again", now=20.0)
    assert chain.retry_at == 21.0  # the backoff started over


def test_each_fallback_build_is_checked_with_the_config(tmp_path: Path) -> None:
    from edgefleet.agent.config import AgentConfig, check_files

    model = tmp_path / "m.tflite"
    model.write_bytes(tb.reshape_model(8, 8))
    config = AgentConfig.model_validate(
        {
            "device_id": "dev",
            "broker": {"host": "127.0.0.1"},
            "streams": [
                {
                    "name": "cam",
                    "source": {"type": "synthetic"},
                    "model": {"path": str(model), "fallbacks": [{"path": str(tmp_path / "no")}]},
                }
            ],
        }
    )
    problems = check_files(config)
    assert f"streams[0].model.fallbacks[0].path: no such file {tmp_path / 'no'}" in problems


def test_the_agent_says_degraded_in_its_status_until_the_accelerator_is_back(
    tmp_path: Path, accelerator: Path, unplugged: Path, broker: Mosquitto, assets: Assets
) -> None:
    unplugged.touch()  # the agent boots without its accelerator
    config = agent_config(assets, broker.port, tmp_path)
    stream = _settings(tmp_path, accelerator, unplugged).model_dump(mode="json")
    stream["model"]["retry_s"] = 0.5
    config["streams"] = [stream]
    probe = subscriber(broker)
    with AgentProcess(tmp_path / "agent", config):
        probe.wait_until(
            lambda: any(s.state == "degraded" for s in statuses(probe)), "a degraded status", 60
        )
        degraded = next(s for s in statuses(probe) if s.state == "degraded")
        assert degraded.reason is not None
        assert degraded.reason.startswith("stream cam: accelerator lost: ")
        assert "fake accelerator: no device attached" in degraded.reason
        probe.wait_until(lambda: healths(probe), "a health message", 60)
        cam = healths(probe)[-1].streams["cam"]
        assert cam.state == "degraded"
        assert cam.fallback == degraded.reason.removeprefix("stream cam: ")

        unplugged.unlink()
        probe.wait_until(
            lambda: statuses(probe)[-1].state == "online", "the status online again", 60
        )
        probe.wait_until(
            lambda: healths(probe)[-1].streams["cam"].fallback is None, "health without it", 60
        )
    assert healths(probe)[-1].streams["cam"].build_switches == 2
