"""The supervisor: failures logged once, reported, restarted with backoff, given up on.

The first tests run small loop functions on real threads. The last ones run the real
agent (real Mosquitto, real interpreter on the kite video) with ``EDGEFLEET_FAULTS``
making each of its parts raise inside its loop, and watch health, events, commands and
the Prometheus endpoint come back.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentproc import AgentProcess, wait_until
from broker import Mosquitto, MqttProbe, free_port
from conftest import Assets
from fleet import ROOT, SMALL, agent_config, device_probe, event_count, healths, video

from edgefleet.agent.limits import memory_limits, out_of_memory_line
from edgefleet.agent.protocol import CommandReply
from edgefleet.agent.supervisor import FAULTS_ENV, PartState, Supervisor
from edgefleet.agent.systemd import Notifier, Watchdog

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}


class Flaky:
    """A loop that raises ``failures`` times (one error each turn), then runs until stopped."""

    def __init__(self, stop: threading.Event, failures: int, error: str = "boom") -> None:
        self.stop = stop
        self.failures = failures
        self.error = error
        self.calls = 0
        self.turns = 0

    def __call__(self) -> None:
        self.calls += 1
        while not self.stop.wait(0.005):
            self.turns += 1
            if self.failures > 0:
                self.failures -= 1
                raise ValueError(self.error)


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def _until(check: Callable[[], bool], what: str) -> None:
    wait_until(lambda: check() or None, what, 10, lambda: "")


def test_a_part_that_raises_is_restarted_and_reported(
    stop: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = Supervisor(max_failures=10, **FAST)
    part = Flaky(stop, failures=3)
    with caplog.at_level(logging.INFO, logger="edgefleet.agent.supervisor"):
        thread = supervisor.start("worker", part, stop)
        _until(lambda: part.calls == 4 and part.turns > 10, "the part running after 3 failures")
    status = supervisor.parts()["worker"]
    assert status.state is PartState.RUNNING
    assert status.restarts == 3
    assert status.last_error == "ValueError: boom"
    assert thread.name == "worker"
    assert thread.is_alive()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "the same failure is logged once"
    assert errors[0].exc_info is not None
    assert "restarting" in errors[0].getMessage()
    assert sum("worker restarted" in r.getMessage() for r in caplog.records) == 3
    assert supervisor.failed() == []


def test_each_distinct_failure_is_logged_with_its_traceback(
    stop: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = Supervisor(max_failures=10, **FAST)
    part = Flaky(stop, failures=1, error="first")

    def run() -> None:
        part()

    with caplog.at_level(logging.ERROR, logger="edgefleet.agent.supervisor"):
        supervisor.start("worker", run, stop)
        _until(lambda: part.calls == 2, "the first restart")
        part.error, part.failures = "second", 1
        _until(lambda: part.calls == 3, "the second restart")
    tracebacks = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert [str(e) for e in tracebacks] == ["first", "second"]
    assert supervisor.parts()["worker"].last_error == "ValueError: second"


def test_a_part_failing_too_often_is_failed_and_not_restarted(
    stop: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = Supervisor(max_failures=3, window_s=60, **FAST)
    part = Flaky(stop, failures=100)
    with caplog.at_level(logging.ERROR, logger="edgefleet.agent.supervisor"):
        thread = supervisor.start("worker", part, stop)
        thread.join(10)
    assert not thread.is_alive()
    assert part.calls == 3
    assert supervisor.failed() == ["worker"]
    status = supervisor.parts()["worker"]
    assert status.state is PartState.FAILED
    assert status.restarts == 2
    assert "worker failed 3 times" in caplog.text


def test_failures_outside_the_window_do_not_add_up(stop: threading.Event) -> None:
    # Each failure is older than the window by the time of the next: never given up on.
    supervisor = Supervisor(max_failures=2, window_s=0.001, backoff_initial_s=0.02)
    part = Flaky(stop, failures=4)
    supervisor.start("worker", part, stop)
    _until(lambda: part.calls == 5 and part.turns > 10, "the part running after 4 failures")
    assert supervisor.failed() == []
    assert supervisor.parts()["worker"].restarts == 4


def test_a_part_that_returns_is_forgotten(stop: threading.Event) -> None:
    supervisor = Supervisor(**FAST)
    part = Flaky(stop, failures=0)
    thread = supervisor.start("worker", part, stop)
    _until(lambda: "worker" in supervisor.parts() and part.turns > 0, "the part running")
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert supervisor.parts() == {}
    assert part.calls == 1


def test_a_newer_part_keeps_its_name_when_the_older_one_ends() -> None:
    supervisor = Supervisor(**FAST)
    old_stop, new_stop = threading.Event(), threading.Event()
    try:
        old = supervisor.start("capture-cam", Flaky(old_stop, 0), old_stop)
        supervisor.start("capture-cam", Flaky(new_stop, 0), new_stop)
        old_stop.set()
        old.join(5)
        assert supervisor.parts()["capture-cam"].state is PartState.RUNNING
    finally:
        old_stop.set()
        new_stop.set()


def test_stopping_during_the_backoff_ends_the_part(stop: threading.Event) -> None:
    supervisor = Supervisor(backoff_initial_s=30, backoff_max_s=30)
    part = Flaky(stop, failures=1)
    thread = supervisor.start("worker", part, stop)
    _until(lambda: supervisor.parts()["worker"].state is PartState.RESTARTING, "the backoff")
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert part.calls == 1


def test_out_of_memory_is_one_line_naming_the_limit(
    stop: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = Supervisor(max_failures=10, **FAST)
    calls = []

    def run() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError
        stop.wait()

    with caplog.at_level(logging.ERROR, logger="edgefleet.agent.supervisor"):
        supervisor.start("infer-cam", run, stop)
        _until(lambda: len(calls) == 2, "the restart after MemoryError")
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is None
    assert record.getMessage() == f"infer-cam: {out_of_memory_line()}"


def test_memory_limits_names_the_address_space_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (64 * 2**30, hard))
    try:
        assert "address-space limit (RLIMIT_AS) 65536 MiB" in memory_limits()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_the_watchdog_is_withheld_while_a_part_is_failed(
    tmp_path: Path, stop: threading.Event
) -> None:
    supervisor = Supervisor(max_failures=1, **FAST)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.settimeout(5)
        notifier = Notifier(
            {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "100000"}
        )
        watchdog = Watchdog(notifier, stale_after_s=60, failed_parts=supervisor.failed)
        watchdog.start()
        try:
            watchdog.progress()
            assert sock.recv(100) == b"WATCHDOG=1"
            supervisor.start("commands", Flaky(stop, failures=1), stop).join(5)
            assert supervisor.failed() == ["commands"]
            wait_until(lambda: watchdog.stalled, "the watchdog withheld", 5)
            while True:  # pets sent before the failure was noticed
                sock.settimeout(0)
                try:
                    sock.recv(100)
                except BlockingIOError:
                    break
            sock.settimeout(0.3)  # six watchdog periods, progress fresh all along
            watchdog.progress()
            with pytest.raises(TimeoutError):
                sock.recv(100)
        finally:
            watchdog.stop()


# -- the real agent -------------------------------------------------------------------

PARTS = [
    "capture-cam",
    "infer-cam",
    "events-cam",
    "publisher",
    "commands",
    "updates",
    "health",
    "prometheus",
]


def _ping(probe_broker: Mosquitto, reply_topic: str) -> CommandReply:
    """Send ``ping`` as an operator would and wait for its reply."""
    with MqttProbe(probe_broker, f"op-{uuid.uuid4().hex[:6]}", timeout_s=30) as op:
        op.subscribe(reply_topic)
        body = {
            "schema_version": 1,
            "id": f"sup-{uuid.uuid4().hex}",
            "expires_at": time.time() + 60,
            "reply_to": reply_topic,
        }
        op.publish(f"{ROOT}/cmd/ping", json.dumps(body).encode())
        return CommandReply.model_validate_json(op.wait_for_message(reply_topic).payload)


def test_a_fault_in_each_part_of_the_real_agent_is_reported_and_recovered(
    tmp_path: Path, broker: Mosquitto, assets: Assets
) -> None:
    port = free_port()
    config = agent_config(tmp_path, broker.port, assets.model(SMALL), video(assets))
    config["health"]["prometheus_port"] = port
    config["health"]["prometheus_bind"] = "127.0.0.1"
    faults = ",".join(f"{part}:1" for part in PARTS)
    probe = device_probe(broker)
    with AgentProcess(tmp_path / "agent", config, env={FAULTS_ENV: faults}) as agent:

        def all_recovered() -> bool:
            latest = healths(probe)
            if not latest:
                return False
            parts = latest[-1].parts
            return all(p in parts and parts[p].restarts == 1 for p in PARTS) and all(
                s.state == "running" for s in parts.values()
            )

        probe.wait_until(all_recovered, "every part restarted once, then running", 60)
        parts = healths(probe)[-1].parts
        for name in PARTS:
            assert parts[name].last_error == (
                f"InjectedFault: fault injected into {name} ({FAULTS_ENV})"
            )
        assert parts["mqtt"].restarts == 0
        assert parts["mqtt"].last_error is None

        # Each part works again: events flow, commands are answered, metrics are served.
        before = event_count(probe)
        probe.wait_until(lambda: event_count(probe) > before + 10, "events after recovery", 30)
        reply = _ping(broker, "replies/sup")
        assert reply.ok, reply
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert b"edgefleet_outbox_depth" in r.read()
        seen = len(healths(probe))
        probe.wait_until(lambda: len(healths(probe)) > seen, "health published again", 10)
        assert healths(probe)[-1].streams["cam"].state == "running"

        log = agent.log()
        for name in PARTS:
            # Once at ERROR with the traceback, then the restart.
            assert log.count(f"{name} failed unexpectedly; restarting it") == 1, log
            assert f"{name} restarted (restart 1)" in log
        assert log.count("Traceback (most recent call last)") == len(PARTS)
        assert agent.terminate() == 0


def test_a_part_that_keeps_failing_stops_the_real_agent(
    tmp_path: Path, broker: Mosquitto, assets: Assets
) -> None:
    config = agent_config(tmp_path, broker.port, assets.model(SMALL), video(assets))
    probe = device_probe(broker)
    env = {FAULTS_ENV: "commands:100"}
    with AgentProcess(tmp_path / "agent", config, env=env) as agent:
        probe.wait_until(
            lambda: any("commands" in h.parts for h in healths(probe)),
            "health naming the commands part",
            30,
        )
        assert agent.process is not None
        code = agent.process.wait(60)
        log = agent.log()
    assert code == 1, log
    assert "commands failed 5 times within 300 s" in log
    assert (
        f"stopping, a part cannot run: commands: InjectedFault: fault injected into commands "
        f"({FAULTS_ENV})" in log
    )
    assert log.count("Traceback (most recent call last)") == 1, "the same failure logged once"
    restarting = [h.parts["commands"] for h in healths(probe) if "commands" in h.parts]
    assert any(p.state == "restarting" for p in restarting) or any(
        p.restarts > 0 for p in restarting
    )
