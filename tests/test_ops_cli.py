"""The operator's `edgefleet broker config`, run as the console script (`watch`: test_watch.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from broker import Mosquitto, MqttProbe, find_mosquitto, free_port

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


def test_broker_config_that_nobody_could_connect_to_says_what_to_do() -> None:
    command = [str(EDGEFLEET), "broker", "config", "--port", "1883"]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    assert done.returncode == 1
    assert "no client could ever connect" in done.stderr
    assert "--allow-anonymous" in done.stderr
    assert "Traceback" not in done.stderr
