"""Replays, flip-flops, stale and untrusted releases against one real agent and Mosquitto.

One agent, one fleet key, one HTTP model server for the whole module: the tests build on
each other in order (each leaves the device as the next expects, as the device keeps its
high-water marks for good), then restart the agent and show that every refusal holds,
and last take the fleet key away to show a stored model is not loaded again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from agentproc import AgentProcess
from broker import Mosquitto, MqttProbe
from conftest import Assets
from fleet import (
    DEVICE,
    ROOT,
    SMALL,
    STREAM,
    Fleet,
    agent_config,
    assert_still_running,
    device_probe,
    healths,
    sha256,
    variant,
    video,
)
from httpserver import ModelServer

from edgefleet.agent.clock import kernel_synchronised
from edgefleet.agent.marks import MARKS_FILE
from edgefleet.agent.protocol import (
    CommandReply,
    CommandRequest,
    DesiredState,
    ErrorCode,
    SignedManifest,
    UpdateReport,
    UpdateState,
)
from edgefleet.provisioning.signing import generate_signing_key

COMMIT_TIMEOUT_S = 90
FUTURE_S = 15.0  # how far ahead of the clock the manifest that becomes valid is issued


@dataclass
class Device:
    """The agent under test and the fleet that updates it."""

    agent: AgentProcess
    fleet: Fleet
    probe: MqttProbe
    server: ModelServer
    content: bytes
    workdir: Path
    config: dict[str, object]
    signed: dict[str, SignedManifest] = field(default_factory=dict)  # captured, by name
    contents: dict[str, bytes] = field(default_factory=dict)

    def sha(self, name: str) -> str:
        """The sha256 of release ``name``'s model."""
        return sha256(self.contents[name])

    def restart(self) -> None:
        """SIGTERM the agent and start it again on the same store and config."""
        assert self.agent.terminate() == 0, self.agent.log()
        self.agent = AgentProcess(self.workdir, self.config).start()
        since = time.time()
        self.probe.wait_until(
            lambda: any(h.ts > since for h in healths(self.probe)), "health after restart", 60
        )


@pytest.fixture(scope="module")
def device(
    assets: Assets, mosquitto_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Device]:
    workdir = tmp_path_factory.mktemp("replay")
    content = assets.model(SMALL).read_bytes()
    with Mosquitto(workdir / "broker") as broker, ModelServer() as server:
        probe = device_probe(broker)
        fleet = Fleet(workdir / "agent" / "keys", server, probe, DEVICE)
        config = agent_config(
            workdir / "agent", broker.port, assets.model(SMALL), video(assets), max_clock_skew_s=1
        )
        agent = AgentProcess(workdir / "agent", config).start()
        state = Device(agent, fleet, probe, server, content, workdir / "agent", config)
        try:
            yield state
        finally:
            state.agent.kill()
            probe.disconnect()


def release(device: Device, name: str, version: int, padding: int, **fields: object) -> str:
    """Sign a release of the classifier with ``padding`` bytes more (another sha256); keep
    its signed manifest under ``name``; return its sha256."""
    content = variant(device.content, padding)
    manifest = device.fleet.manifest(
        content, version=version, name=f"classifier-{name}.tflite", **fields
    )
    device.signed[name] = device.fleet.sign(manifest)
    device.contents[name] = content
    return device.sha(name)


def rollback(device: Device, name: str, to: str, from_: str, version: int, **fields: object) -> str:
    """Sign a rollback to the bytes of release ``to`` from the installed release ``from_``."""
    source = json.loads(device.signed[from_].payload)
    content = device.contents[to]
    manifest = device.fleet.manifest(
        content,
        version=version,
        name=f"classifier-{name}.tflite",
        rollback_from={"version": source["version"], "sha256": source["sha256"]},
        **fields,
    )
    device.signed[name] = device.fleet.sign(manifest)
    device.contents[name] = content
    return device.sha(name)


def install(device: Device, name: str) -> None:
    """Deploy the captured manifest ``name``; wait until it is committed and runs."""
    version = json.loads(device.signed[name].payload)["version"]
    device.fleet.deploy(STREAM, device.signed[name])
    reported = device.fleet.wait_for_update(STREAM, version, {"committed"}, COMMIT_TIMEOUT_S)
    assert reported.models[STREAM].sha256 == device.sha(name)


def refused(device: Device, name: str, reason: str, runs: str) -> str:
    """Deploy the captured manifest ``name``; it must be refused with ``reason`` in the
    reason while the model of release ``runs`` keeps running. Returns the reason."""
    version = json.loads(device.signed[name].payload)["version"]
    device.fleet.deploy(STREAM, device.signed[name])
    reported = device.fleet.wait_for_update(STREAM, version, {"refused"}, reason=reason)
    assert reported.models[STREAM].sha256 == device.sha(runs)
    assert_still_running(device.probe, device.sha(runs))
    said = reported.updates[STREAM].reason
    assert said is not None
    print(f"\n{name} refused: {said}")
    return said


# -- replays and rollbacks ------------------------------------------------------------------


def test_a_captured_rollback_replayed_after_a_newer_release_is_refused_while_it_runs(
    device: Device,
) -> None:
    release(device, "v1", 1, 1)
    release(device, "v2", 2, 2)
    install(device, "v1")
    install(device, "v2")
    rollback(device, "back-to-v1", to="v1", from_="v2", version=1)
    install(device, "back-to-v1")
    release(device, "v3", 3, 3)
    install(device, "v3")

    # The rollback is sequence 3, v3 is sequence 4: replaying the rollback message is refused.
    refused(device, "back-to-v1", "sequence 3 is not newer than 4", runs="v3")


def test_an_older_release_republished_after_a_rollback_is_refused(device: Device) -> None:
    rollback(device, "back-to-v2", to="v2", from_="v3", version=2)  # sequence 5
    install(device, "back-to-v2")

    refused(device, "v2", "sequence 2 is not newer than 5", runs="back-to-v2")
    refused(device, "v1", "sequence 1 is not newer than 5", runs="back-to-v2")


def test_the_release_rolled_back_from_is_not_reopened_for_reinstall(device: Device) -> None:
    refused(device, "v3", "sequence 4 is not newer than 5", runs="back-to-v2")
    # Signed anew (a new sequence): its version is used up; only a higher one installs.
    release(device, "v3-again", 3, 3)
    refused(device, "v3-again", "version 3 is not newer than 3", runs="back-to-v2")


def test_two_manifests_published_alternately_cause_no_second_install(device: Device) -> None:
    release(device, "v4", 4, 4)
    release(device, "v5", 5, 5)
    install(device, "v4")
    install(device, "v5")

    for _ in range(2):
        refused(device, "v4", "is not newer than", runs="v5")
        install(device, "v5")  # the installed manifest itself: nothing to do

    for name in ("v4", "v5"):
        downloads = device.server.requests_for(f"classifier-{name}.tflite")
        assert len(downloads) == 1, f"{name} downloaded {len(downloads)} times"
        switches = device.agent.log().count(f"now runs model {device.sha(name)}")
        assert switches == 1, f"{name} installed {switches} times"


def test_a_rollback_from_another_sha256_than_the_installed_one_is_refused(
    device: Device,
) -> None:
    rollback(device, "back-from-v4", to="v4", from_="v4", version=4)  # v5 runs, not v4

    reason = refused(device, "back-from-v4", "a rollback from version 4", runs="v5")

    assert f"but the stream runs version 5 (sha256 {device.sha('v5')[:12]})" in reason


def test_an_expired_rollback_is_refused(device: Device) -> None:
    now = time.time()
    rollback(
        device,
        "expired-back",
        to="v4",
        from_="v5",
        version=4,
        issued_at=now - 7200,
        expires_at=now - 600,
    )

    assert "manifest expired" in refused(device, "expired-back", "expired", runs="v5")


def test_a_manifest_issued_in_the_devices_future_is_refused(device: Device) -> None:
    release(device, "v6-future", 6, 6, issued_at=time.time() + 3600)

    refused(device, "v6-future", "in this device's future", runs="v5")


def test_a_manifest_refused_for_the_clock_installs_once_the_clock_reaches_it(
    device: Device,
) -> None:
    release(device, "v7-soon", 7, 7, issued_at=time.time() + FUTURE_S)
    device.fleet.deploy(STREAM, device.signed["v7-soon"])
    device.fleet.wait_for_update(STREAM, 7, {"refused"}, FUTURE_S, reason="device's future")

    # Not settled: checked again every retry_s, and installed once it is no longer ahead.
    reported = device.fleet.wait_for_update(STREAM, 7, {"committed"}, FUTURE_S + COMMIT_TIMEOUT_S)
    assert reported.models[STREAM].sha256 == device.sha("v7-soon")


# -- after a restart -------------------------------------------------------------------------


def test_every_refusal_holds_after_an_agent_restart(device: Device) -> None:
    device.restart()

    # Sequences: v1 1, v2 2, back-to-v1 3, v3 4, back-to-v2 5, v3-again 6, v4 7, v5 8,
    # back-from-v4 9, expired-back 10, v6-future 11, v7-soon 12 (the newest accepted).
    refused(device, "back-to-v1", "sequence 3 is not newer than 12", runs="v7-soon")
    refused(device, "v2", "sequence 2 is not newer than 12", runs="v7-soon")
    refused(device, "v4", "sequence 7 is not newer than 12", runs="v7-soon")
    refused(device, "expired-back", "expired", runs="v7-soon")
    refused(device, "v6-future", "in this device's future", runs="v7-soon")
    marks = json.loads((device.workdir / "store" / MARKS_FILE).read_text())
    assert marks["streams"][STREAM]["lines"]["classifier"] == {"sequence": 12, "version": 7}
    reported = device.fleet.reported()
    assert reported is not None
    assert reported.marks[STREAM].lines["classifier"].sequence == 12
    # The clock floor is the newest issued_at accepted, and health says how the clock stands.
    floor = json.loads(device.signed["v7-soon"].payload)["issued_at"]
    assert marks["clock_floor"] == floor
    clock = healths(device.probe)[-1].clock
    assert clock.trusted_floor == floor
    assert clock.synchronised == kernel_synchronised()
    assert clock.behind_floor_s == 0.0  # this machine's clock is past the floor by now


def test_a_stale_desired_revision_is_ignored(device: Device) -> None:
    before = device.fleet.reported()
    assert before is not None
    stale = DesiredState(revision=1, models={STREAM: device.signed["v1"]})

    device.probe.publish(f"{ROOT}/desired", stale.model_dump_json(), retain=True)

    device.agent.wait_for_log("desired revision 1 ignored: this device saw revision", 30)
    assert_still_running(device.probe, device.sha("v7-soon"))
    after = device.fleet.reported()
    assert after is not None
    assert after.updates[STREAM] == before.updates[STREAM]
    assert after.desired_revision == before.desired_revision


# -- the keys trusted now (destructive: last) --------------------------------------------------


def rollback_command(device: Device) -> CommandReply:
    """The operator's ``rollback_model`` command, and the device's reply."""
    replies = f"test-replies/rollback-{time.time_ns()}"
    device.probe.subscribe(replies)
    request = CommandRequest(
        id=f"rollback-{time.time_ns()}",
        expires_at=time.time() + 60,
        args={"stream": STREAM, "reason": "replay test"},
        reply_to=replies,
    )
    device.probe.publish(f"{ROOT}/cmd/rollback_model", request.model_dump_json())
    message = device.probe.wait_until(
        lambda: next(iter(device.probe.messages(replies)), None), "the rollback's reply", 30
    )
    return CommandReply.model_validate_json(message.payload)


def test_a_rollback_to_a_model_whose_signer_is_no_longer_trusted_is_refused(
    device: Device,
) -> None:
    keys = device.workdir / "keys"
    (keys / "fleet.pub").rename(device.workdir / "fleet.pub.retired")
    generate_signing_key(keys, "successor")
    (keys / "successor.key").unlink()

    reply = rollback_command(device)  # the keys are read again at every verification

    print(f"\nrollback_model: {reply.message}")
    assert not reply.ok
    assert reply.error is ErrorCode.REFUSED
    assert "no longer verifies with the trusted keys" in (reply.message or "")
    assert_still_running(device.probe, device.sha("v7-soon"))


def test_a_model_whose_signer_is_no_longer_trusted_is_not_loaded_at_start(
    device: Device, assets: Assets
) -> None:
    assert device.agent.terminate() == 0

    device.agent = AgentProcess(device.workdir, device.config).start()

    config_model = sha256(assets.model(SMALL).read_bytes())
    device.probe.wait_until(
        lambda: any(h.models and h.models[0].sha256 == config_model for h in healths(device.probe)),
        "the config file's model running",
        60,
    )
    assert_still_running(device.probe, config_model)
    log = device.agent.log()
    assert "no longer verifies with the trusted keys" in log
    assert "which this device does not trust" in log

    def stepped_back() -> UpdateReport | None:
        reported = device.fleet.reported()
        update = reported.updates.get(STREAM) if reported is not None else None
        if update is None or update.state is not UpdateState.ROLLED_BACK:
            return None
        return (
            update if "no longer verifies with the trusted keys" in (update.reason or "") else None
        )

    update = device.probe.wait_until(stepped_back, "the step back reported", 30)
    print(f"\nuntrusted signer: {update.model_id} v{update.version}: {update.reason}")
    assert update.sha256 in {device.sha("v4"), device.sha("v5"), device.sha("v7-soon")}
    reported = device.fleet.reported()
    assert reported is not None
    assert reported.models[STREAM].sha256 == config_model
