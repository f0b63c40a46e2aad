"""The agent's wall clock stepped while it runs (NTP after boot on a board without RTC).

Only the agent process sees the stepped clock: libfaketime (Debian's ``faketime``
package) is preloaded into it with ``FAKETIME_TIMESTAMP_FILE``, which it re-reads on
every clock read (``FAKETIME_NO_CACHE=1``), so the test steps the clock by writing an
offset such as ``+3600`` into that file. ``FAKETIME_DONT_FAKE_MONOTONIC=1`` keeps the
monotonic clock real, as a real step does. The broker, the test and everything else keep
the real time. A real Mosquitto, the real SSD detector on a still image (the same kites
in every frame, so every track stays open unless something ends it), real MQTT requests.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess
from broker import Mosquitto, MqttProbe
from conftest import Assets
from fleet import DEVICE as OTA_DEVICE
from fleet import SMALL, STREAM, Fleet, agent_config, device_probe, sha256, variant, video
from httpserver import ModelServer

from edgefleet.agent.protocol import CommandReply, EventMessage, Topics

# Debian's multiarch directory: x86_64-linux-gnu, aarch64-linux-gnu, arm-linux-gnueabihf.
LIBFAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"), None)
DEVICE = "dev-clock"
TOPICS = Topics(DEVICE)
HOUR_S = 3600.0
DAYS_30 = 30 * 86400
REPLIES = f"test/{DEVICE}/replies"

_NO_FAKETIME = (
    "libfaketime is not installed (/usr/lib/*/faketime/libfaketimeMT.so.1): "
    "apt-get install faketime (scripts/bootstrap.sh test does)"
)


@pytest.fixture(autouse=True)
def _libfaketime() -> None:
    """A skip without libfaketime, a failure under CI (which must run every test)."""
    if LIBFAKETIME is None:
        if os.environ.get("CI"):
            pytest.fail(f"{_NO_FAKETIME} (CI must run every test)")
        pytest.skip(_NO_FAKETIME)


class SteppedAgent:
    """The agent with its own wall clock, offset by whatever :meth:`step` wrote last."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.offset_file = workdir / "faketime"
        self.offset_file.write_text("+0\n")
        env = {
            "LD_PRELOAD": str(LIBFAKETIME),
            "FAKETIME_TIMESTAMP_FILE": str(self.offset_file),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
        self.process = AgentProcess(workdir / "agent", config, env=env)

    def step(self, offset_s: float) -> None:
        """Set the agent's wall clock to real time plus ``offset_s``."""
        self.offset_file.write_text(f"{offset_s:+.0f}\n")


def _config(assets: Assets, port: int, workdir: Path) -> dict[str, Any]:
    """The SSD detector on one still image as fast as it goes, tracking kites.

    An update event per track and frame, and each frame captured while the one before is
    inferred: every step lands between some frame's capture and its inference, where a
    latency taken from the wall clock would show it.
    """
    frames = workdir / "frames"
    frames.mkdir()
    shutil.copy(assets.image("kite_and_cold.jpg"), frames / "kite.jpg")
    return {
        "device_id": DEVICE,
        "broker": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 1},
        "streams": [
            {
                "name": "still",
                "source": {"type": "images", "folder": str(frames), "interval_s": 0.0},
                "model": {"path": str(assets.ssd), "labels": str(assets.coco_labels), "threads": 1},
                "events": {
                    "labels": ["kite"],
                    "tracking": {"enabled": True, "end_after_s": 3.0, "update_interval_s": 0.01},
                },
            }
        ],
        "outbox": {"path": str(workdir / "outbox.sqlite3")},
        "updates": {"store_dir": str(workdir / "store"), "trusted_keys": []},
        "health": {"interval_s": 1},
    }


@pytest.fixture
def observer(broker: Mosquitto) -> Iterator[MqttProbe]:
    """The controller's side: events and command replies."""
    _parsed.clear()
    with MqttProbe(broker, "controller", timeout_s=60) as probe:
        probe.subscribe(f"{TOPICS.base}/events/#")
        probe.subscribe(REPLIES)
        yield probe


_parsed: list[EventMessage] = []  # the observer's events so far, each parsed once


def _events(probe: MqttProbe) -> list[EventMessage]:
    received = [m for m in probe.messages() if m.topic.startswith(f"{TOPICS.base}/events/")]
    _parsed.extend(EventMessage.model_validate_json(m.payload) for m in received[len(_parsed) :])
    return list(_parsed)


def _wait_for_event(probe: MqttProbe, what: str, matches: Callable[[EventMessage], bool]) -> None:
    probe.wait_until(lambda: any(matches(e) for e in _events(probe)) or None, what, 60)


def _ping(probe: MqttProbe, id_: str) -> CommandReply:
    """Send ``ping`` with ``id_`` (expiring in a year: expiry is not what this is about)."""
    seen = len(probe.messages(REPLIES))
    body = {"schema_version": 1, "id": id_, "expires_at": time.time() + 365 * 86400}
    probe.publish(TOPICS.command("ping"), json.dumps({**body, "reply_to": REPLIES}).encode())
    probe.wait_until(lambda: len(probe.messages(REPLIES)) > seen or None, f"reply to {id_}", 60)
    return CommandReply.model_validate_json(probe.messages(REPLIES)[seen].payload)


def test_a_wall_clock_step_costs_no_latency_no_track_and_no_second_run_of_a_command(
    broker: Mosquitto, observer: MqttProbe, assets: Assets, tmp_path: Path
) -> None:
    agent = SteppedAgent(tmp_path, _config(assets, broker.port, tmp_path))
    with agent.process:
        _wait_for_event(observer, "a kite track's update", lambda e: e.lifecycle == "update")
        first = _ping(observer, "ping-before-the-step")
        started = {e.track_id for e in _events(observer) if e.lifecycle == "start"}

        agent.step(+HOUR_S)  # NTP steps the clock an hour ahead...
        ahead = time.time() + HOUR_S - 60
        _wait_for_event(observer, "an update stamped an hour ahead", lambda e: e.capture_ts > ahead)
        _wait_for_event(
            observer,
            "updates for 3 s (end_after_s) on the stepped clock",
            lambda e: e.lifecycle == "update" and e.capture_ts > ahead + 60 + 3,
        )
        agent.step(0)  # ...and back
        back = time.time() + 60
        after_back = time.time()
        _wait_for_event(
            observer,
            "updates for 3 s after stepping back",
            lambda e: e.lifecycle == "update" and after_back + 3 < e.capture_ts < back,
        )
        received = _events(observer)  # before the shutdown, which ends every track
        agent.process.terminate()

    latencies = [e.latency_ms for e in received]
    assert min(latencies) >= 0, sorted(latencies)[:5]
    assert max(latencies) < 60_000, sorted(latencies)[-5:]  # a step showed as +3,600,000
    assert [e for e in received if e.lifecycle == "end"] == []
    assert {e.track_id for e in received if e.lifecycle == "start"} == started
    assert {type(e.clock_synced) for e in received} <= {bool}

    # A restart with the clock 30 days ahead: the journal still knows the command.
    agent.step(+DAYS_30)
    with agent.process:
        again = _ping(observer, "ping-before-the-step")
        agent.process.terminate()
    assert again == first  # the recorded reply, not a new run
    log = agent.process.log()
    assert log.count("command ping ping-before-the-step done") == 1, log
    assert "ping-before-the-step: repeated id, answered from the record" in log


PROBATION_S = 30.0


@pytest.fixture
def fleet(broker: Mosquitto, tmp_path: Path) -> Iterator[Fleet]:
    """The controller of the updated device, trusted by the agent in ``tmp_path / "agent"``."""
    probe = device_probe(broker)
    with ModelServer() as server:
        yield Fleet(tmp_path / "agent" / "keys", server, probe, OTA_DEVICE)
    probe.disconnect()


def test_probation_lasts_its_set_time_across_a_wall_clock_step(
    broker: Mosquitto, fleet: Fleet, assets: Assets, tmp_path: Path
) -> None:
    model = assets.model(SMALL)
    config = agent_config(
        tmp_path / "agent", broker.port, model, video(assets), probation_s=PROBATION_S
    )
    agent = SteppedAgent(tmp_path, config)
    with agent.process:
        fleet.deploy(STREAM, fleet.sign(fleet.manifest(variant(model.read_bytes(), 1), version=2)))
        fleet.wait_for_update(STREAM, 2, {"probation"}, timeout_s=120)

        agent.step(+HOUR_S)  # an hour passes on the wall clock at once: not the window
        time.sleep(5)  # the agent judges probation every second
        reported = fleet.reported()
        assert reported is not None
        assert reported.updates[STREAM].state == "probation", reported.updates[STREAM]

        agent.step(0)  # and back: the window is not stretched by an hour either
        committed = fleet.wait_for_update(STREAM, 2, {"committed"}, timeout_s=PROBATION_S + 60)
        agent.process.terminate()
    assert committed.updates[STREAM].sha256 == sha256(variant(model.read_bytes(), 1))
