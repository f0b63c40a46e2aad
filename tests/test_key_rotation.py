"""Release-key rotation and revocation against a real agent and a real Mosquitto.

One agent trusts the root-signed key set of its bundle (version 1: the fleet key). The
fleet then rotates to a new release key and revokes the first (version 3, retained on
``<root>/_trust/keyset``). A manifest signed by the revoked key is refused with that reason
while the old model keeps running; one signed by the new key installs; a key set not signed
by the root, and one older than the installed set, are refused and the agent keeps its set,
also across a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agentproc import AgentProcess
from broker import Mosquitto, MqttProbe
from conftest import Assets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleet import (
    DEVICE,
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

from edgefleet.agent.protocol import TOPIC_ROOT, TrustHealth, key_set_topic
from edgefleet.provisioning import (
    KeySet,
    SignedKeySet,
    key_id,
    new_key_set,
    read_key_set,
    revoked,
    rotated,
    sign_key_set,
    sign_manifest,
    write_key_set,
)

KEY_SET_TOPIC = key_set_topic(TOPIC_ROOT)


@dataclass
class Device:
    """A running agent on key set version 3: release-2 trusted, the fleet key revoked."""

    agent: AgentProcess
    fleet: Fleet
    probe: MqttProbe
    content: bytes
    installed_sha: str
    root: Ed25519PrivateKey
    new_key: Ed25519PrivateKey
    sets: dict[int, KeySet]
    workdir: Path


def publish_key_set(probe: MqttProbe, signed: SignedKeySet) -> None:
    probe.publish(KEY_SET_TOPIC, signed.model_dump_json(), retain=True)


def wait_for_trust(
    probe: MqttProbe, what: str, ready: Callable[[TrustHealth], bool], *, after: int = 0
) -> TrustHealth:
    """The trust part of the first health message (from the ``after``-th on) it is ready."""

    def reached() -> TrustHealth | None:
        for health in healths(probe)[after:]:
            if health.trust is not None and ready(health.trust):
                return health.trust
        return None

    return probe.wait_until(reached, what, 30)


@pytest.fixture(scope="module")
def device(
    assets: Assets, mosquitto_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Device]:
    workdir = tmp_path_factory.mktemp("rotation")
    content = assets.model(SMALL).read_bytes()
    root = Ed25519PrivateKey.generate()
    (workdir / "root.pub").write_bytes(
        root.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with Mosquitto(workdir / "broker") as broker, ModelServer() as server:
        probe = device_probe(broker)
        probe.subscribe(KEY_SET_TOPIC)
        fleet = Fleet(workdir / "keys", server, probe, DEVICE)
        first = new_key_set([fleet.key.public_key()], names=["fleet"])
        (workdir / "bundle").mkdir()
        write_key_set(workdir / "bundle" / "keyset.json", sign_key_set(first, root))
        config = agent_config(
            workdir,
            broker.port,
            assets.model(SMALL),
            video(assets),
            root_key=str(workdir / "root.pub"),
            key_set=str(workdir / "bundle" / "keyset.json"),
        )
        with AgentProcess(workdir / "agent", config) as agent:
            release = variant(content, 10)
            fleet.deploy(STREAM, fleet.sign(fleet.manifest(release, version=10)))
            fleet.wait_for_update(STREAM, 10, {"committed"}, timeout_s=90)
            new_key = Ed25519PrivateKey.generate()
            second = rotated(first, new_key.public_key(), name="release-2")
            third = revoked(second, "fleet", reason="laptop stolen")
            publish_key_set(probe, sign_key_set(third, root))
            wait_for_trust(probe, "key set version 3 installed", lambda t: t.key_set_version == 3)
            yield Device(
                agent,
                fleet,
                probe,
                content,
                sha256(release),
                root,
                new_key,
                {1: first, 2: second, 3: third},
                workdir,
            )
        probe.disconnect()


def test_the_bundles_set_is_installed_at_first_start_and_the_retained_one_replaces_it(
    device: Device,
) -> None:
    installed = read_key_set(device.workdir / "store" / "keyset.json")
    assert installed.payload == device.sets[3].model_dump_json()
    assert "key set installed from" in device.agent.log()
    assert "updates.trusted_keys is ignored" in device.agent.log()


def test_a_manifest_signed_by_the_revoked_key_is_refused_and_the_old_model_runs(
    device: Device,
) -> None:
    signed = device.fleet.sign(device.fleet.manifest(variant(device.content, 11), version=11))
    device.fleet.deploy(STREAM, signed)
    reported = device.fleet.wait_for_update(STREAM, 11, {"refused"})
    reason = reported.updates[STREAM].reason or ""
    print(f"\nrefused version 11: {reason}")
    assert (
        f"manifest signed by key {key_id(device.fleet.key.public_key())}, which key set "
        "version 3 revoked (laptop stolen)"
    ) in reason
    assert reported.models[STREAM].sha256 == device.installed_sha
    assert_still_running(device.probe, device.installed_sha)


def test_a_manifest_signed_by_the_new_key_installs(device: Device) -> None:
    release = variant(device.content, 12)
    manifest = device.fleet.manifest(release, version=12)
    device.fleet.deploy(STREAM, sign_manifest(manifest, device.new_key))
    reported = device.fleet.wait_for_update(STREAM, 12, {"committed"}, timeout_s=90)
    assert reported.models[STREAM].sha256 == sha256(release)
    device.installed_sha = sha256(release)


def test_a_key_set_not_signed_by_the_root_is_refused_and_the_set_stays(device: Device) -> None:
    impostor = Ed25519PrivateKey.generate()
    forged = rotated(device.sets[3], impostor.public_key())
    before = len(healths(device.probe))
    publish_key_set(device.probe, sign_key_set(forged, impostor))
    health = wait_for_trust(
        device.probe,
        "the forged key set refused",
        lambda t: "not by the fleet's root key" in (t.last_refusal or ""),
        after=before,
    )
    print(f"\nrefused key set: {health.last_refusal}")
    assert health.key_set_version == 3
    installed = read_key_set(device.workdir / "store" / "keyset.json")
    assert installed.payload == device.sets[3].model_dump_json()
    assert "key set refused, keeping version 3" in device.agent.log()


def test_a_key_set_older_than_the_installed_is_refused_and_the_set_stays(device: Device) -> None:
    before = len(healths(device.probe))
    publish_key_set(device.probe, sign_key_set(device.sets[2], device.root))
    health = wait_for_trust(
        device.probe,
        "the older key set refused",
        lambda t: "older than version 3" in (t.last_refusal or ""),
        after=before,
    )
    print(f"\nrefused key set: {health.last_refusal}")
    assert health.key_set_version == 3
    # The revoked key is still refused: version 2 trusted it.
    signed = device.fleet.sign(device.fleet.manifest(variant(device.content, 13), version=13))
    device.fleet.deploy(STREAM, signed)
    reason = device.fleet.wait_for_update(STREAM, 13, {"refused"}).updates[STREAM].reason or ""
    assert "revoked (laptop stolen)" in reason


def test_after_a_restart_the_installed_set_holds_over_the_older_bundle_and_retained_sets(
    device: Device,
) -> None:
    # The bundle still holds version 1 and the broker retains version 2 (refused above).
    assert device.agent.terminate() == 0
    before = len(healths(device.probe))
    device.agent.start()
    health = wait_for_trust(
        device.probe,
        "the restarted agent on key set version 3, refusing the retained version 2",
        lambda t: t.key_set_version == 3 and "older than version 3" in (t.last_refusal or ""),
        after=before,
    )
    assert health.problem is None
    assert_still_running(device.probe, device.installed_sha)
