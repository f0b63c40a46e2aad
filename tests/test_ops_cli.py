"""The operator's `edgefleet broker config`, run as the console script (`watch`: test_watch.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from broker import Mosquitto, MqttProbe, free_port

EDGEFLEET = Path(sys.executable).with_name("edgefleet")


def test_broker_config_output_runs_a_real_mosquitto(mosquitto_binary: Path, tmp_path: Path) -> None:
    # Memory only: this broker keeps nothing (test_mosquitto.py restarts one that keeps it).
    port = free_port()
    conf = subprocess.run(
        [str(EDGEFLEET), "broker", "config", "--port", str(port), "--allow-anonymous",
         "--no-persistence"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "max_queued_messages 100000" in conf

    with (
        Mosquitto.from_conf(tmp_path / "broker", conf, port) as broker,
        MqttProbe(broker) as probe,
    ):
        assert not probe.publish("t/x", b"hello").is_failure


def test_broker_config_that_nobody_could_connect_to_says_what_to_do() -> None:
    command = [str(EDGEFLEET), "broker", "config", "--port", "1883"]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    assert done.returncode == 2  # bad input, as in every command (ops/errors.py)
    assert "no client could ever connect" in done.stderr
    assert "--allow-anonymous" in done.stderr
    assert "Traceback" not in done.stderr


def test_broker_config_names_the_option_it_refuses() -> None:
    command = [str(EDGEFLEET), "broker", "config", "--allow-anonymous", "--autosave-interval", "-5"]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    assert done.returncode == 2
    assert "--autosave-interval: Input should be greater than or equal to 0" in done.stderr
    assert "--allow-anonymous" not in done.stderr
    assert "Traceback" not in done.stderr
