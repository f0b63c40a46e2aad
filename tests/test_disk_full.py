"""A full disk, end to end: a real agent process, a real Mosquitto, a real small ext4.

The agent's outbox and model store (with the command journal) live on a 24 MB
loop-mounted filesystem (the ``small_fs`` fixture) that a filler file fills up;
deleting the filler gives the space back. Nothing is restarted in between.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess
from broker import Mosquitto, MqttProbe
from conftest import Assets, SmallFs
from fleet import (
    DEVICE,
    ROOT,
    SMALL,
    STREAM,
    Fleet,
    agent_config,
    device_probe,
    sha256,
    variant,
    video,
)
from httpserver import ModelServer

from edgefleet.agent.protocol import CommandReply, HealthMessage

REPLIES = f"{ROOT}/replies/test"
WAIT_S = 60.0


class Controller:
    """The test's side: persistent-session probes (one per broker run) and what they got."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.client_id = f"controller-{uuid.uuid4().hex[:8]}"
        self.probes: list[MqttProbe] = []

    def connect(self) -> MqttProbe:
        """(Re)connect, resuming the session: QoS 1 messages queued meanwhile arrive too."""
        probe = MqttProbe(
            self.broker,
            self.client_id,
            timeout_s=30,
            clean_start=not self.probes,
            session_expiry_s=600,
        )
        probe.connect()
        probe.subscribe(f"{ROOT}/#", qos=1)
        self.probes.append(probe)
        return probe

    @property
    def probe(self) -> MqttProbe:
        return self.probes[-1]

    def close(self) -> None:
        for probe in self.probes:
            probe.disconnect()

    def event_seqs(self) -> list[int]:
        """The per-stream seq of every event received, in arrival order, duplicates kept."""
        return [
            json.loads(m.payload)["seq"]
            for probe in self.probes
            for m in probe.messages(f"{ROOT}/events/{STREAM}")
        ]

    def wait_for_health(self, ready: Any, what: str) -> HealthMessage:
        def found() -> HealthMessage | None:
            return next((h for h in reversed(self.probe_healths()) if ready(h)), None)

        return self.probe.wait_until(found, what, WAIT_S)

    def probe_healths(self) -> list[HealthMessage]:
        return [
            HealthMessage.model_validate_json(m.payload)
            for m in self.probe.messages(f"{ROOT}/health")
        ]

    def ask(self, name: str) -> CommandReply:
        """Send a command (reply_to in the body) and wait for its reply."""
        id_ = f"t-{uuid.uuid4().hex}"
        body = {"schema_version": 1, "id": id_, "expires_at": time.time() + 60, "reply_to": REPLIES}
        self.probe.publish(f"{ROOT}/cmd/{name}", json.dumps(body).encode())

        def answered() -> CommandReply | None:
            for message in self.probe.messages(REPLIES):
                reply = CommandReply.model_validate_json(message.payload)
                if reply.id == id_:
                    return reply
            return None

        return self.probe.wait_until(answered, f"reply to {name} {id_}", WAIT_S)


@pytest.fixture
def controller(broker: Mosquitto) -> Iterator[Controller]:
    made = Controller(broker)
    made.connect()
    yield made
    made.close()


def full_disk_agent(
    tmp_path: Path, small_fs: SmallFs, broker: Mosquitto, assets: Assets
) -> AgentProcess:
    """The agent with its outbox and store on the small filesystem, its log outside it."""
    config = agent_config(small_fs.path / "agent", broker.port, assets.model(SMALL), video(assets))
    return AgentProcess(tmp_path / "agent", config)


def test_a_full_disk_with_the_broker_down_loses_exactly_what_came_while_full(
    tmp_path: Path, small_fs: SmallFs, broker: Mosquitto, assets: Assets, controller: Controller
) -> None:
    with full_disk_agent(tmp_path, small_fs, broker, assets) as agent:
        controller.probe.wait_until(lambda: len(controller.event_seqs()) >= 10, "events", WAIT_S)

        # Broker down: events are stored. Then the disk fills: events cannot be stored.
        broker.stop()
        agent.wait_for_log("broker", WAIT_S)
        time.sleep(3)
        small_fs.fill()
        agent.wait_for_log("the disk is full", WAIT_S)
        time.sleep(2)

        # The broker returns, the disk still full: stored events go out, acks cannot be applied.
        broker.start()
        controller.connect()
        full = controller.wait_for_health(
            lambda h: h.outbox.problem and "disk is full" in h.outbox.problem,
            "health naming the full disk",
        )
        assert full.mqtt.connected
        assert full.streams[STREAM].events_lost > 0
        refused = controller.ask("ping")
        assert not refused.ok
        assert refused.message.startswith("journal unavailable (disk full)")
        sent_while_full = len(controller.probe.messages(f"{ROOT}/events/{STREAM}"))
        assert sent_while_full > 0  # publishing did not stall on the acks it cannot apply

        # Space returns: no restart, everything resumes.
        small_fs.free()
        agent.wait_for_log("writable again", WAIT_S)
        assert controller.ask("ping").ok
        agent.wait_for_log("works again", WAIT_S)
        after = controller.wait_for_health(
            lambda h: (
                h.outbox.problem is None and h.streams[STREAM].events > full.streams[STREAM].events
            ),
            "health after the space returned",
        )
        stream = after.streams[STREAM]
        made = stream.events + stream.events_lost  # every event made got a seq, 1..made
        lost = stream.events_lost

        def delivered() -> set[int]:
            return {seq for seq in controller.event_seqs() if seq <= made}

        controller.probe.wait_until(
            lambda: len(delivered()) == made - lost, "every stored event delivered", WAIT_S
        )
        assert agent.process is not None
        assert agent.process.poll() is None  # never restarted

    missing = sorted(set(range(1, made + 1)) - delivered())
    assert len(missing) == lost == after.outbox.not_stored  # the count in health is exact
    # Only events made while the disk was full are missing: one stretch, not scattered loss.
    assert missing[-1] - missing[0] + 1 == len(missing)
    seqs = controller.event_seqs()
    duplicates = len(seqs) - len(set(seqs))
    assert duplicates <= 200  # at most one window re-sent over the broker restart, no burst
    log = agent.log()
    assert "acknowledgement(s)" in log  # acks were kept and applied later, not dropped


def test_the_agent_starts_on_a_full_disk_degraded_and_recovers(
    tmp_path: Path, small_fs: SmallFs, broker: Mosquitto, assets: Assets, controller: Controller
) -> None:
    agent = full_disk_agent(tmp_path, small_fs, broker, assets)
    with agent:  # a first run leaves its state: outbox, journal, store
        controller.probe.wait_until(lambda: len(controller.event_seqs()) >= 5, "events", WAIT_S)
        assert controller.ask("ping").ok
        agent.terminate()
    small_fs.fill()

    with agent:
        seen = len(controller.probe.messages(f"{ROOT}/health"))
        controller.probe.wait_until(
            lambda: len(controller.probe.messages(f"{ROOT}/health")) > seen,
            "health from the agent started on a full disk",
            WAIT_S,
        )
        refused = controller.ask("ping")
        assert not refused.ok
        assert refused.message.startswith("journal unavailable (disk full)")
        full = controller.wait_for_health(
            lambda h: h.outbox.problem and "disk is full" in h.outbox.problem,
            "health naming the full disk",
        )
        assert full.streams[STREAM].events_lost > 0

        small_fs.free()
        assert controller.ask("ping").ok
        controller.wait_for_health(
            lambda h: (
                h.outbox.problem is None and h.streams[STREAM].events > full.streams[STREAM].events
            ),
            "events stored again",
        )
        before = len(controller.event_seqs())
        controller.probe.wait_until(
            lambda: len(controller.event_seqs()) > before, "events after recovery", WAIT_S
        )
        assert agent.process is not None
        assert agent.process.poll() is None
    assert "Traceback" not in agent.log()


def test_an_update_onto_a_full_disk_says_so_and_installs_once_there_is_room(
    tmp_path: Path, small_fs: SmallFs, broker: Mosquitto, assets: Assets
) -> None:
    probe = device_probe(broker)
    with ModelServer() as server:
        fleet = Fleet(tmp_path / "keys", server, probe, DEVICE)
        config = agent_config(
            small_fs.path / "agent",
            broker.port,
            assets.model(SMALL),
            video(assets),
            trusted_keys=[str(tmp_path / "keys")],
        )
        release = variant(assets.model(SMALL).read_bytes(), 17)
        with AgentProcess(tmp_path / "agent", config) as agent:
            probe.wait_until(fleet.reported, "the first reported state", WAIT_S)
            small_fs.fill(leave=2 << 20)  # room for records, not for the model and the margin
            fleet.deploy(STREAM, fleet.sign(fleet.manifest(release, version=2)))
            waiting = fleet.wait_for_update(
                STREAM, 2, {"downloading", "verifying"}, WAIT_S, reason="not enough space"
            )
            reason = waiting.updates[STREAM].reason
            assert reason is not None
            assert re.search(r"needs \d+\.\d MB .* has \d+\.\d MB free", reason), reason
            assert waiting.models[STREAM].sha256 == sha256(assets.model(SMALL).read_bytes())

            small_fs.free()
            done = fleet.wait_for_update(STREAM, 2, {"committed"}, WAIT_S)
            assert agent.process is not None
            assert agent.process.poll() is None
    probe.disconnect()
    assert done.models[STREAM].sha256 == sha256(release)
    assert not list((small_fs.path / "agent" / "store" / "staging").iterdir())  # renamed
