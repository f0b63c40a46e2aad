"""The controller's side of an update, for tests: a fleet key, signed manifests, desired state.

Also the device these tests update: its config, the probe on its topics, and what
its health and events say.

``Fleet`` signs manifests with a real ed25519 key (the device trusts its ``.pub``),
serves model bytes from a real HTTP server (``httpserver.ModelServer``) and
publishes the retained ``desired`` message on a real broker. ``reported`` reads
back what the device says, parsed by the protocol's own models.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from broker import Mosquitto, MqttProbe
from conftest import Assets
from httpserver import ModelServer
from PIL import Image

from edgefleet.agent.protocol import (
    DesiredState,
    EventMessage,
    HealthMessage,
    Manifest,
    ReportedState,
    SignedManifest,
    TensorSpec,
    Topics,
)
from edgefleet.provisioning.signing import generate_signing_key, load_private_key, sign_manifest
from edgefleet.runtime import ModelBytes, inspect_model

DAY_S = 86400.0

DEVICE = "dev-ota"
ROOT = f"edgefleet/v1/{DEVICE}"
STREAM = "cam"
SMALL = "mobilenet_v1_0.25_128_quant.tflite"


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def variant(content: bytes, n: int) -> bytes:
    """The same graph with ``n`` bytes of padding after the flatbuffer: another sha256.

    A rebuilt release of one model: identical tensors and speed, different bytes.
    """
    return content + b"\0" * n


def agent_config(
    workdir: Path, port: int, model: Path, source: dict[str, Any], **updates: Any
) -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "broker": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 1},
        "streams": [
            {
                "name": STREAM,
                "source": source,
                "model": {"path": str(model), "threads": 1},
                "events": {"min_score": 0.0, "min_interval_s": 0.0},
            }
        ],
        "outbox": {"path": str(workdir / "outbox.sqlite3")},
        "health": {"interval_s": 1},
        "updates": {
            "store_dir": str(workdir / "store"),
            "trusted_keys": [str(workdir / "keys")],
            "probation_s": 2.0,
            "probation_min_frames": 5,
            "bench_runs": 5,
            "download_attempts": 2,
            "retry_s": 2.0,
            **updates,
        },
    }


def write_image(folder: Path, value: int) -> None:
    """The folder's only image: one flat grey level (written beside, then renamed in)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value,) * 3).save(folder / "next.png")
    os.replace(folder / "next.png", folder / "frame.png")


def video(assets: Assets, *, realtime: bool = True) -> dict[str, Any]:
    return {
        "type": "file",
        "path": str(assets.image("kite_pan_640x480_30fps.mp4")),
        "loop": True,
        "realtime": realtime,
    }


def device_probe(broker: Mosquitto) -> MqttProbe:
    probe = MqttProbe(broker, "controller", timeout_s=30)
    probe.connect()
    probe.subscribe(f"{ROOT}/#", qos=1)
    return probe


def healths(probe: MqttProbe) -> list[HealthMessage]:
    return [HealthMessage.model_validate_json(m.payload) for m in probe.messages(f"{ROOT}/health")]


def events(probe: MqttProbe) -> list[EventMessage]:
    return [
        EventMessage.model_validate_json(m.payload)
        for m in probe.messages(f"{ROOT}/events/{STREAM}")
    ]


def event_count(probe: MqttProbe, containing: bytes = b"") -> int:
    """Events received so far whose payload holds ``containing``; cheap: nothing is parsed."""
    return sum(containing in m.payload for m in probe.messages(f"{ROOT}/events/{STREAM}"))


def processed(probe: MqttProbe) -> int:
    latest = healths(probe)
    return latest[-1].streams[STREAM].processed if latest else 0


def assert_still_running(probe: MqttProbe, sha: str) -> None:
    """The stream runs ``sha`` and keeps processing frames."""
    before = processed(probe)
    probe.wait_until(lambda: processed(probe) > before, "frames processed after the refusal", 20)
    assert healths(probe)[-1].models[0].sha256 == sha


class Fleet:
    """Signs, serves and deploys models to one device."""

    def __init__(self, keydir: Path, server: ModelServer, probe: MqttProbe, device: str) -> None:
        self.private_path, self.public_path = generate_signing_key(keydir)
        self.key = load_private_key(self.private_path)
        self.server = server
        self.probe = probe
        self.topics = Topics(device)
        self.revision = 0
        self.sequences: dict[str, int] = {}  # per model line, as `edgefleet manifest create`
        probe.subscribe(self.topics.reported)

    def manifest(
        self,
        content: bytes,
        *,
        version: int,
        model_id: str = "classifier",
        name: str | None = None,
        serve: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Manifest:
        """A manifest describing ``content`` (served under ``name`` unless ``serve`` is None),
        with the line's next sequence unless ``fields`` gives one."""
        model = ModelBytes.from_bytes(content)
        name = name or f"{model_id}-{version}.tflite"
        url = self.server.add(name, content, **(serve or {}))
        values: dict[str, Any] = {
            "model_id": model_id,
            "version": version,
            "sha256": model.sha256,
            "size": model.size,
            "artifact": name,
            "urls": [url],
            "issued_at": time.time(),
            "expires_at": time.time() + DAY_S,
            "sequence": self.sequences.get(model_id, 0) + 1,
        }
        if "inputs" not in fields:  # a broken model cannot be inspected: the test says
            info = inspect_model(model)
            # As `edgefleet manifest create` writes them: no shape in the file, shape null.
            values["inputs"] = [
                TensorSpec(shape=t.shape or None, dtype=t.dtype) for t in info.inputs
            ]
            values["outputs"] = [
                TensorSpec(shape=t.shape or None, dtype=t.dtype) for t in info.outputs
            ]
        manifest = Manifest.model_validate({**values, **fields})
        self.sequences[model_id] = max(self.sequences.get(model_id, 0), manifest.sequence)
        return manifest

    def sign(self, manifest: Manifest) -> SignedManifest:
        """Sign with the fleet key."""
        return sign_manifest(manifest, self.key)

    def deploy(self, stream: str, signed: SignedManifest) -> int:
        """Publish a new desired revision naming ``signed`` for ``stream``; returns the revision."""
        self.revision += 1
        desired = DesiredState(revision=self.revision, models={stream: signed})
        self.probe.publish(self.topics.desired, desired.model_dump_json(), retain=True)
        return self.revision

    def reported(self) -> ReportedState | None:
        """The latest reported state the device published."""
        messages = self.probe.messages(self.topics.reported)
        return ReportedState.model_validate_json(messages[-1].payload) if messages else None

    def wait_for_update(
        self,
        stream: str,
        version: int,
        states: set[str],
        timeout_s: float = 60,
        *,
        reason: str = "",
    ) -> ReportedState:
        """Wait until the device reports the update to ``version`` in one of ``states``
        (with ``reason`` in its reason, when given)."""

        def reached() -> ReportedState | None:
            reported = self.reported()
            update = reported.updates.get(stream) if reported else None
            if (
                update is not None
                and update.version == version
                and update.state in states
                and reason in (update.reason or "")
            ):
                return reported
            return None

        return self.probe.wait_until(
            reached,
            f"update of {stream} to version {version} in {sorted(states)} "
            f"(last reported: {self.reported()})",
            timeout_s,
        )
