"""The operator's `edgefleet broker config` and `edgefleet watch`, run as the console script."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from broker import Mosquitto, MqttProbe, find_mosquitto, free_port

from edgefleet.agent.protocol import (
    EventMessage,
    ModelRef,
    ReportedState,
    UpdateReport,
    UpdateState,
)
from edgefleet.ops.watch import describe

EDGEFLEET = Path(sys.executable).with_name("edgefleet")


def test_broker_config_output_runs_a_real_mosquitto(mosquitto_binary: Path, tmp_path: Path) -> None:
    port = free_port()
    conf = subprocess.run(
        [str(EDGEFLEET), "broker", "config", "--port", str(port), "--allow-anonymous"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (tmp_path / "mosquitto.conf").write_text(conf)
    assert "max_queued_messages 100000" in conf

    with (tmp_path / "mosquitto.log").open("wb") as log:
        process = subprocess.Popen(
            [str(find_mosquitto()), "-c", str(tmp_path / "mosquitto.conf")], stderr=log
        )
    try:
        broker = Mosquitto(tmp_path / "unused", port=port)  # only for the probe's address
        deadline = time.monotonic() + 10
        while True:
            try:
                with MqttProbe(broker) as probe:
                    assert not probe.publish("t/x", b"hello").is_failure
                break
            except (OSError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(10)


def _event(label: str) -> bytes:
    model = ModelRef(
        id="ssd",
        version="3",
        sha256="0" * 64,
        task="detection",
        backend="litert 2.3.0",
        delegate="cpu",
    )
    message = EventMessage(
        id="a" * 32, device_id="dev1", stream="door", seq=1, kind="detection", lifecycle="start",
        track_id=7, label=label, score=0.81, model=model, capture_ts=1.0, inference_ts=1.02,
        latency_ms=20.0, inference_ms=8.0,
    )  # fmt: skip
    return message.model_dump_json().encode()


def test_watch_prints_one_line_per_event_and_stops_at_count(broker: Mosquitto) -> None:
    watcher = subprocess.Popen(
        [str(EDGEFLEET), "watch", "--port", str(broker.port), "--count", "2", "--seconds", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.0)  # its subscription is in place
    with MqttProbe(broker) as probe:
        probe.publish("edgefleet/v1/dev1/events/door", _event("person"))
        probe.publish("edgefleet/v1/dev1/events/door", _event("dog"))
    out, err = watcher.communicate(timeout=30)

    assert watcher.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("dev1/door event start #7: person 0.81 (20 ms after capture")
    assert "dog" in lines[1]
    assert "2 event(s)" in err


def test_describe_names_a_payload_that_breaks_the_contract() -> None:
    assert "does not match the contract" in describe("edgefleet/v1/dev1/events/door", b"{}")
    assert "does not match the contract" in describe("edgefleet/v1/dev1/status", b"not json")


def test_watch_without_a_broker_fails_cleanly() -> None:
    result = subprocess.run(
        [str(EDGEFLEET), "watch", "--port", str(free_port()), "--seconds", "1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip

    assert result.returncode == 1
    assert "cannot reach the broker" in result.stderr
    assert "Traceback" not in result.stderr


def test_watch_describes_the_reported_update_and_its_reason() -> None:
    model = ModelRef(
        id="shelf", version="2", sha256="a" * 64, task="raw", backend="litert", delegate="cpu"
    )
    reported = ReportedState(
        device_id="pi-7",
        ts=time.time(),
        agent_version="0.1.0",
        models={"cam": model},
        updates={
            "cam": UpdateReport(
                state=UpdateState.REFUSED,
                model_id="shelf",
                version=3,
                sha256="b" * 64,
                reason="manifest expired",
                ts=time.time(),
            )
        },
    )
    line = describe("edgefleet/v1/pi-7/reported", reported.model_dump_json().encode())
    assert line == (
        "pi-7 reported: cam runs shelf 2, update to shelf 3: refused (manifest expired)"
    )
    assert "does not match the contract" in describe("edgefleet/v1/pi-7/reported", b"{}")


def test_broker_config_that_nobody_could_connect_to_says_what_to_do() -> None:
    command = [str(EDGEFLEET), "broker", "config", "--port", "1883"]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    assert done.returncode == 1
    assert "no client could ever connect" in done.stderr
    assert "--allow-anonymous" in done.stderr
    assert "Traceback" not in done.stderr
