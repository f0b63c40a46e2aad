"""Damaged state at start (a power cut, a failing SD card): salvaged, counted, never silent.

A real agent installs an over-the-air model (real Mosquitto, HTTP server and fleet
key), then runs with the broker unreachable so events wait in its outbox, and
stops. Between two runs the test damages the outbox file (a page overwritten) and
the stream's model pointer, then starts the agent again.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import AgentProcess
from broker import Mosquitto
from conftest import Assets
from fleet import (
    DEVICE,
    SMALL,
    STREAM,
    Fleet,
    agent_config,
    device_probe,
    events,
    healths,
    sha256,
    variant,
    video,
)
from httpserver import ModelServer

WAIT_S = 90.0


@pytest.fixture
def fleet(broker: Mosquitto, tmp_path: Path) -> Iterator[Fleet]:
    """The device's controller; the agent in ``tmp_path / "agent"`` trusts its key."""
    probe = device_probe(broker)
    with ModelServer() as server:
        yield Fleet(tmp_path / "agent" / "keys", server, probe, DEVICE)
    probe.disconnect()


def closed_port() -> int:
    """A loopback port nothing listens on: the broker is unreachable there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rows_in(database: Path, scratch: Path) -> int:
    """Events in an outbox file, counted by plain sqlite3 on a copy (the test's own count)."""
    copy = scratch / "count.sqlite3"
    shutil.copyfile(database, copy)
    with sqlite3.connect(copy) as db:
        return int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])


def test_damaged_outbox_and_pointer_at_start_are_salvaged_and_the_committed_model_runs(
    assets: Assets, fleet: Fleet, broker: Mosquitto, tmp_path: Path
) -> None:
    workdir = tmp_path / "agent"
    release = variant(assets.model(SMALL).read_bytes(), 11)
    config = agent_config(workdir, broker.port, assets.model(SMALL), video(assets))
    agent = AgentProcess(workdir, config)
    with agent:
        fleet.deploy(STREAM, fleet.sign(fleet.manifest(release, version=2)))
        fleet.wait_for_update(STREAM, 2, {"committed"}, timeout_s=WAIT_S)
        assert agent.terminate() == 0

    # A run without a broker: events wait in the outbox; a clean stop checkpoints them.
    offline = {**config, "broker": {**config["broker"], "port": closed_port()}}
    agent.write_config(offline)
    with agent:
        agent.wait_for_log("agent 0.", WAIT_S)
        time.sleep(5)
        assert agent.terminate() == 0
    outbox = workdir / "outbox.sqlite3"
    waiting = rows_in(outbox, tmp_path)
    assert waiting > 50

    pages = outbox.stat().st_size // 4096
    with outbox.open("r+b") as damaged:  # one page in the middle of the events
        damaged.seek(pages // 2 * 4096)
        damaged.write(os.urandom(4096))
    pointer = workdir / "store" / "streams" / STREAM / "current.json"
    pointer.write_bytes(b'{"sha256": "\x00\x00')

    agent.write_config(config)
    started = time.time()
    with agent:
        health = fleet.probe.wait_until(
            lambda: next((h for h in healths(fleet.probe) if h.ts > started), None),
            "health after the damaged start",
            WAIT_S,
        )
        fleet.probe.wait_until(
            lambda: (
                sum(e.capture_ts < started for e in events(fleet.probe)) >= health.outbox.salvaged
            ),
            "the salvaged events delivered",
            WAIT_S,
        )
        reported = fleet.probe.wait_until(
            lambda: (r := fleet.reported()) and r.ts > started and r,
            "reported state after the damaged start",
            WAIT_S,
        )

    salvaged, lost = health.outbox.salvaged, health.outbox.lost
    assert salvaged > 0
    assert lost > 0
    assert salvaged + lost == waiting  # every event stored is delivered or counted
    assert health.models[0].sha256 == sha256(release)  # the committed model runs
    assert reported.models[STREAM].sha256 == sha256(release)
    assert reported.updates[STREAM].state == "committed"
    log = agent.log()
    assert f"{salvaged} events copied, {lost} lost" in log
    assert "rebuilt from the committed update record" in log
    assert (pointer.parent / "current.json.damaged").exists()


def test_reported_never_claims_a_committed_model_that_does_not_run(
    assets: Assets, fleet: Fleet, broker: Mosquitto, tmp_path: Path
) -> None:
    workdir = tmp_path / "agent"
    original = assets.model(SMALL).read_bytes()
    release = variant(original, 13)
    agent = AgentProcess(
        workdir, agent_config(workdir, broker.port, assets.model(SMALL), video(assets))
    )
    with agent:
        fleet.deploy(STREAM, fleet.sign(fleet.manifest(release, version=2)))
        fleet.wait_for_update(STREAM, 2, {"committed"}, timeout_s=WAIT_S)
        assert agent.terminate() == 0
    stored = workdir / "store" / "models" / sha256(release) / "model.tflite"
    with stored.open("r+b") as rotted:  # the committed model's bytes rot...
        rotted.seek(1000)
        rotted.write(b"\xff" * 16)
    pointer = workdir / "store" / "streams" / STREAM / "current.json"
    pointer.write_bytes(b"")  # ...and the pointer is lost

    started = time.time()
    with agent:
        reported = fleet.probe.wait_until(
            lambda: (r := fleet.reported()) and r.ts > started and STREAM in r.models and r,
            "reported state after the damaged start",
            WAIT_S,
        )

    assert reported.models[STREAM].sha256 == sha256(original)  # what really runs
    update = reported.updates[STREAM]
    assert update.state != "committed"
    assert update.reason is not None
    assert "v2 was committed, but its stored model cannot run" in update.reason
