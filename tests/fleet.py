"""The controller's side of an update, for tests: a fleet key, signed manifests, desired state.

``Fleet`` signs manifests with a real ed25519 key (the device trusts its ``.pub``),
serves model bytes from a real HTTP server (``httpserver.ModelServer``) and
publishes the retained ``desired`` message on a real broker. ``reported`` reads
back what the device says, parsed by the protocol's own models.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from broker import MqttProbe
from httpserver import ModelServer

from edgefleet.agent.protocol import (
    DesiredState,
    Manifest,
    ReportedState,
    SignedManifest,
    TensorSpec,
    Topics,
)
from edgefleet.provisioning.signing import generate_signing_key, load_private_key, sign_manifest
from edgefleet.runtime import ModelBytes, inspect_model

DAY_S = 86400.0


class Fleet:
    """Signs, serves and deploys models to one device."""

    def __init__(self, keydir: Path, server: ModelServer, probe: MqttProbe, device: str) -> None:
        self.private_path, self.public_path = generate_signing_key(keydir)
        self.key = load_private_key(self.private_path)
        self.server = server
        self.probe = probe
        self.topics = Topics(device)
        self.revision = 0
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
        """A manifest describing ``content`` (served under ``name`` unless ``serve`` is None)."""
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
        }
        if "inputs" not in fields:  # a broken model cannot be inspected: the test says
            info = inspect_model(model)
            values["inputs"] = [
                TensorSpec(shape=tuple(t.shape), dtype=t.dtype) for t in info.inputs
            ]
            values["outputs"] = [
                TensorSpec(shape=tuple(t.shape), dtype=t.dtype) for t in info.outputs
            ]
        return Manifest.model_validate({**values, **fields})

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
        self, stream: str, version: int, states: set[str], timeout_s: float = 60
    ) -> ReportedState:
        """Wait until the device reports the update to ``version`` in one of ``states``."""

        def reached() -> ReportedState | None:
            reported = self.reported()
            update = reported.updates.get(stream) if reported else None
            if update is not None and update.version == version and update.state in states:
                return reported
            return None

        return self.probe.wait_until(
            reached,
            f"update of {stream} to version {version} in {sorted(states)} "
            f"(last reported: {self.reported()})",
            timeout_s,
        )
