"""Updates the device refuses: one agent, one update installed over a cut download, then
one bad manifest per test, each refused with its reason while the old model keeps running.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
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

from edgefleet.agent.modelstore import ModelStore
from edgefleet.agent.protocol import CommandReply, CommandRequest, ReportedState, SignedManifest
from edgefleet.provisioning.signing import generate_signing_key, load_private_key, sign_manifest

# -- the refusals: one agent, one baseline update, then one bad manifest per test -----------


@dataclass
class Device:
    """A running agent with v10 of the small classifier installed over the air."""

    agent: AgentProcess
    fleet: Fleet
    probe: MqttProbe
    server: ModelServer
    content: bytes
    installed_sha: str
    workdir: Path
    ranges: list[str | None]


@pytest.fixture(scope="module")
def device(
    assets: Assets, mosquitto_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Device]:
    workdir = tmp_path_factory.mktemp("ota")
    content = assets.model(SMALL).read_bytes()
    with Mosquitto(workdir / "broker") as broker, ModelServer() as server:
        probe = device_probe(broker)
        fleet = Fleet(workdir / "keys", server, probe, DEVICE)
        config = agent_config(workdir, broker.port, assets.model(SMALL), video(assets))
        with AgentProcess(workdir / "agent", config) as agent:
            release = variant(content, 10)
            half = len(release) // 2
            signed = fleet.sign(fleet.manifest(release, version=10, serve={"cut_after": half}))
            fleet.deploy(STREAM, signed)
            fleet.wait_for_update(STREAM, 10, {"committed"}, timeout_s=90)
            ranges = [r.range_header for r in server.requests_for("classifier-10.tflite")]
            yield Device(agent, fleet, probe, server, content, sha256(release), workdir, ranges)
        probe.disconnect()


def refused(device: Device, signed: SignedManifest, version: int) -> str:
    """Deploy ``signed``; return the reason the device reports; the old model must keep running."""
    device.fleet.deploy(STREAM, signed)
    reported = device.fleet.wait_for_update(STREAM, version, {"refused"})
    assert reported.models[STREAM].sha256 == device.installed_sha
    assert_still_running(device.probe, device.installed_sha)
    reason = reported.updates[STREAM].reason
    assert reason
    print(f"\nrefused version {version}: {reason}")
    return reason


def test_update_installs_over_a_download_cut_at_half_and_reports_committed(device: Device) -> None:
    half = len(device.content + b"\0" * 10) // 2
    assert device.ranges == [None, f"bytes={half}-"], "the download did not resume at the cut"
    reported = device.fleet.reported()
    assert reported is not None
    assert reported.models[STREAM].sha256 == device.installed_sha
    assert reported.models[STREAM].version == "10"
    store = ModelStore(device.workdir / "store")
    pointer = store.current(STREAM)
    assert pointer is not None
    assert pointer.sha256 == device.installed_sha
    assert sha256(store.load(pointer.sha256).content) == device.installed_sha


def test_bad_signature_is_refused(device: Device) -> None:
    signed = device.fleet.sign(device.fleet.manifest(variant(device.content, 11), version=11))
    forged = signed.model_copy(
        update={"payload": signed.payload.replace('"version":11', '"version":11 ')}
    )
    assert "signature" in refused(device, forged, 11)


def test_manifest_signed_by_an_unknown_key_is_refused(device: Device, tmp_path: Path) -> None:
    private, _ = generate_signing_key(tmp_path)
    manifest = device.fleet.manifest(variant(device.content, 12), version=12)
    reason = refused(device, sign_manifest(manifest, load_private_key(private)), 12)
    assert "does not trust" in reason


def test_wrong_sha256_is_refused(device: Device) -> None:
    content = variant(device.content, 13)
    manifest = device.fleet.manifest(content, version=13, sha256=sha256(content[:-1] + b"x"))
    assert "sha256" in refused(device, device.fleet.sign(manifest), 13)


def test_truncated_download_is_refused(device: Device) -> None:
    content = variant(device.content, 14)
    short = device.server.add("short-14.tflite", content[: len(content) // 3])
    manifest = device.fleet.manifest(content, version=14, urls=[short])
    reason = refused(device, device.fleet.sign(manifest), 14)
    assert f"has {len(content) // 3:,} bytes, the manifest says {len(content):,}" in reason


def test_server_sending_more_than_the_manifest_size_is_refused(device: Device) -> None:
    content = variant(device.content, 15)
    manifest = device.fleet.manifest(content, version=15, serve={"extra_bytes": 4096})
    assert "more than" in refused(device, device.fleet.sign(manifest), 15)


def test_older_version_replayed_is_refused(device: Device) -> None:
    manifest = device.fleet.manifest(variant(device.content, 5), version=5)
    assert "not newer" in refused(device, device.fleet.sign(manifest), 5)


def test_expired_manifest_is_refused(device: Device) -> None:
    manifest = device.fleet.manifest(
        variant(device.content, 16), version=16, expires_at=time.time() - 60
    )
    assert "expired" in refused(device, device.fleet.sign(manifest), 16)


def test_model_that_fails_to_load_is_refused(device: Device) -> None:
    broken = device.content[: len(device.content) // 2]
    manifest = device.fleet.manifest(
        broken, version=17, inputs=[{"shape": [1, 128, 128, 3], "dtype": "uint8"}], outputs=None
    )
    assert "load_failed" in refused(device, device.fleet.sign(manifest), 17)


def test_model_whose_input_shape_differs_from_the_manifest_is_refused(device: Device) -> None:
    manifest = device.fleet.manifest(
        variant(device.content, 18),
        version=18,
        inputs=[{"shape": [1, 224, 224, 3], "dtype": "uint8"}],
    )
    reason = refused(device, device.fleet.sign(manifest), 18)
    assert "input_mismatch" in reason
    assert "224" in reason
    assert "128" in reason


def test_edgetpu_model_on_a_device_without_one_is_refused(device: Device, assets: Assets) -> None:
    manifest = device.fleet.manifest(assets.edgetpu.read_bytes(), version=19)
    assert "Edge TPU" in refused(device, device.fleet.sign(manifest), 19)


def test_model_over_the_latency_budget_is_refused(device: Device) -> None:
    manifest = device.fleet.manifest(variant(device.content, 20), version=20, max_latency_ms=0.0001)
    assert "too_slow" in refused(device, device.fleet.sign(manifest), 20)


def test_artifact_name_with_path_traversal_is_refused(device: Device) -> None:
    manifest = device.fleet.manifest(variant(device.content, 21), version=21)
    # Signed by the fleet key, so only the device's own check of the name stands in the way.
    payload = manifest.model_dump_json().replace(
        f'"artifact":"{manifest.artifact}"', '"artifact":"../../../etc/cron.d/x"'
    )
    signature = device.fleet.key.sign(payload.encode())
    signed = SignedManifest(
        payload=payload,
        key_id=device.fleet.sign(manifest).key_id,
        signature=base64.b64encode(signature).decode(),
    )
    device.fleet.deploy(STREAM, signed)
    reported = device.fleet.wait_for_update(STREAM, 21, {"refused"})
    reason = reported.updates[STREAM].reason or ""
    print(f"\nrefused version 21: {reason}")
    assert "artifact" in reason
    assert reported.models[STREAM].sha256 == device.installed_sha
    assert not (device.workdir.parent / "etc").exists()
    assert_still_running(device.probe, device.installed_sha)


def test_malformed_desired_state_is_counted_and_the_model_keeps_running(device: Device) -> None:
    before = time.time()
    device.probe.publish(f"{ROOT}/desired", b'{"revision": "many", "models": 3}', retain=True)
    device.probe.wait_until(
        lambda: any(
            h.ts > before and h.remote.desired_malformed >= 1 for h in healths(device.probe)
        ),
        "health counting the malformed desired state",
        20,
    )
    assert_still_running(device.probe, device.installed_sha)
    assert "desired state ignored, it is malformed" in device.agent.log()


# -- manifests settled before: reported refused, with why, never committed ------------------


def warning_with(agent: AgentProcess, text: str) -> str:
    """The agent's WARNING line containing ``text``; fails with the log when there is none."""
    lines = [line for line in agent.log().splitlines() if " WARNING " in line and text in line]
    assert lines, f"no WARNING with {text!r} in the agent log:\n{agent.log()}"
    return lines[-1]


@pytest.mark.parametrize("version", [9, 10], ids=["older", "same-version-signed-again"])
def test_the_running_model_signed_again_under_a_version_not_newer_is_refused_not_committed(
    device: Device, version: int
) -> None:
    # The installed release's own bytes: the device used to call this "committed".
    release = variant(device.content, 10)
    manifest = device.fleet.manifest(release, version=version, name=f"again-{version}.tflite")

    reason = refused(device, device.fleet.sign(manifest), version)

    assert f"version {version} is not newer than 10, the newest installed" in reason
    warning_with(device.agent, reason)


def test_a_rolled_back_manifest_deployed_again_is_reported_refused_naming_the_rollback(
    device: Device,
) -> None:
    release = variant(device.content, 30)
    signed = device.fleet.sign(device.fleet.manifest(release, version=30))
    device.fleet.deploy(STREAM, signed)
    device.fleet.wait_for_update(STREAM, 30, {"committed"}, timeout_s=90)
    ask_rollback(device, "operator test")
    device.fleet.wait_for_update(STREAM, 30, {"rolled_back"}, reason="operator test")

    reason = refused(device, signed, 30)  # the same signed manifest, a new desired revision

    assert "rolled back on this device" in reason
    assert "operator test" in reason
    assert "again, which stays refused" in warning_with(device.agent, reason)
    assert len(device.server.requests_for("classifier-30.tflite")) == 1, "downloaded again"


def test_a_refused_manifest_deployed_again_is_reported_refused_again(device: Device) -> None:
    manifest = device.fleet.manifest(
        variant(device.content, 31), version=31, expires_at=time.time() - 60
    )
    signed = device.fleet.sign(manifest)
    first = refused(device, signed, 31)
    first_report = device.fleet.reported()
    assert first_report is not None

    revision = device.fleet.deploy(STREAM, signed)

    def reported_again() -> ReportedState | None:
        reported = device.fleet.reported()
        if reported is None or reported.desired_revision != revision:
            return None
        update = reported.updates[STREAM]
        return reported if update.ts > first_report.updates[STREAM].ts else None

    again = device.probe.wait_until(reported_again, f"a report for revision {revision}", 30)
    update = again.updates[STREAM]
    print(f"\nrefused version 31 again: {update.reason}")
    assert (update.state.value, update.version, update.reason) == ("refused", 31, first)
    assert "expired" in first
    assert f"desired revision {revision} names classifier v31 again" in warning_with(
        device.agent, first
    )
    assert_still_running(device.probe, device.installed_sha)


def ask_rollback(device: Device, reason: str) -> None:
    """The operator's ``rollback_model`` command, answered ok."""
    replies = "test-replies/rollback"
    device.probe.subscribe(replies)
    request = CommandRequest(
        id=f"rollback-{time.time_ns()}",
        expires_at=time.time() + 60,
        args={"stream": STREAM, "reason": reason},
        reply_to=replies,
    )
    device.probe.publish(f"{ROOT}/cmd/rollback_model", request.model_dump_json())
    message = device.probe.wait_until(
        lambda: next(iter(device.probe.messages(replies)), None), "the rollback's reply", 30
    )
    reply = CommandReply.model_validate_json(message.payload)
    assert reply.ok, reply.message
