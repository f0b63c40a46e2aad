"""The wire contract: every MQTT topic and payload, as pydantic models. Pure: no I/O.

The controller (``edgefleet.ops``) and any consumer import this one module to
speak to devices. Every payload carries ``schema_version``; consumers reject
versions they do not know. Topics, under a versioned root::

    edgefleet/v1/<device>/status          retained: online (birth) / offline (will, shutdown)
    edgefleet/v1/<device>/events/<stream> inference events, QoS 1, unique ``id`` per event
    edgefleet/v1/<device>/health          periodic metrics
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgefleet/v1"
# A device id or stream name becomes one topic level: no wildcards, separators or spaces.
TOPIC_LEVEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


@dataclass(frozen=True)
class Topics:
    """The topics of one device."""

    device_id: str
    root: str = TOPIC_ROOT

    @property
    def base(self) -> str:
        """``<root>/<device>``."""
        return f"{self.root}/{self.device_id}"

    @property
    def status(self) -> str:
        """Retained online/offline status."""
        return f"{self.base}/status"

    @property
    def health(self) -> str:
        """Periodic metrics."""
        return f"{self.base}/health"

    def events(self, stream: str) -> str:
        """Inference events of one stream."""
        return f"{self.base}/events/{stream}"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Message(_Frozen):
    schema_version: int = Field(SCHEMA_VERSION, description="Version of this payload's schema.")


class ModelRef(_Frozen):
    """Which model produced something, and how it runs."""

    model_config = ConfigDict(protected_namespaces=())

    id: str = Field(description="Model identifier (from the config or the manifest).")
    version: str = Field(description="Model version.")
    sha256: str = Field(description="sha256 of the exact model bytes loaded.")
    task: str = Field(description="classification, detection, pose or raw.")
    backend: str = Field(description="Interpreter backend and version, e.g. 'litert 2.3.0'.")
    delegate: str = Field(description="Delegate in use, e.g. 'cpu' or 'edgetpu (usb:0)'.")


class DetectionOut(_Frozen):
    """One detected object; box is (ymin, xmin, ymax, xmax) normalised to the frame."""

    class_id: int = Field(description="Class index from the model.")
    label: str = Field(description="Class label.")
    score: float = Field(description="Confidence, 0 to 1.")
    box: tuple[float, float, float, float] = Field(description="ymin, xmin, ymax, xmax in 0..1.")


class ClassOut(_Frozen):
    """One class of a classifier's top-k."""

    index: int = Field(description="Class index.")
    label: str = Field(description="Class label.")
    score: float = Field(description="Score, 0 to 1.")


class KeypointOut(_Frozen):
    """One body keypoint, normalised to the frame."""

    name: str = Field(description="Keypoint name (COCO order).")
    x: float = Field(description="Horizontal position, 0..1.")
    y: float = Field(description="Vertical position, 0..1.")
    score: float = Field(description="Confidence, 0 to 1.")


class TensorOut(_Frozen):
    """One raw output tensor, dequantized."""

    name: str = Field(description="Tensor name.")
    shape: tuple[int, ...] = Field(description="Tensor shape.")
    values: list[object] = Field(description="Nested lists of values.")


class EventMessage(_Message):
    """One inference event (``events/<stream>``, QoS 1). ``id`` lets consumers drop duplicates."""

    model_config = ConfigDict(protected_namespaces=())

    id: str = Field(description="Unique event id (32 hex digits).")
    device_id: str = Field(description="Device that produced the event.")
    stream: str = Field(description="Stream (camera) name.")
    seq: int = Field(
        description="Per-stream sequence number, increasing; restarts at 1 with the agent."
    )
    kind: Literal["detection", "classification", "pose", "raw"] = Field(description="Task kind.")
    lifecycle: Literal["start", "update", "end"] | None = Field(
        None, description="For tracked objects: start, update or end; null when untracked."
    )
    track_id: int | None = Field(None, description="Track id for tracked objects.")
    label: str | None = Field(None, description="Main label of the event.")
    score: float | None = Field(None, description="Main score of the event.")
    zones: list[str] = Field(default_factory=list, description="Zones the object is in.")
    model: ModelRef = Field(description="The model that produced the results.")
    capture_ts: float = Field(description="Frame capture time, Unix seconds.")
    inference_ts: float = Field(description="Time inference finished, Unix seconds.")
    latency_ms: float = Field(description="Capture to inference done, milliseconds.")
    inference_ms: float = Field(description="Interpreter invoke time, milliseconds.")
    first_seen_ts: float | None = Field(None, description="For tracks: when the object appeared.")
    last_seen_ts: float | None = Field(
        None, description="For a track's end: capture time of its last sighting."
    )
    detections: list[DetectionOut] | None = Field(None, description="Detection results.")
    classes: list[ClassOut] | None = Field(None, description="Classification results.")
    keypoints: list[KeypointOut] | None = Field(None, description="Pose keypoints.")
    tensors: list[TensorOut] | None = Field(None, description="Raw output tensors.")


class Capabilities(_Frozen):
    """What a device can do, announced in its birth message."""

    backends: list[str] = Field(description="Interpreter backends installed, with versions.")
    tasks: list[str] = Field(description="Tasks the runtime understands.")
    sources: list[str] = Field(description="Source types this build supports.")
    delegates: list[str] = Field(description="Delegate types this build can load.")


class StatusMessage(_Message):
    """Retained device status: birth (online), last will or orderly shutdown (offline)."""

    state: Literal["online", "offline"] = Field(description="online or offline.")
    device_id: str = Field(description="Device id.")
    ts: float = Field(description="Unix seconds when the status was produced.")
    reason: str | None = Field(None, description="Why offline: 'shutdown' or 'connection lost'.")
    agent_version: str | None = Field(None, description="edgefleet version on the device.")
    capabilities: Capabilities | None = Field(None, description="Announced when online.")
    models: list[ModelRef] = Field(default_factory=list, description="Models loaded.")
    streams: list[str] = Field(default_factory=list, description="Stream names.")


class StreamHealth(_Frozen):
    """Counters and latencies of one stream since the agent started."""

    state: str = Field(description="running, degraded, ended, stopped or starting.")
    captured: int = Field(description="Frames read from the source.")
    processed: int = Field(description="Frames that went through inference.")
    skipped: int = Field(description="Frames replaced by a newer one before inference.")
    failed: int = Field(description="Frames whose inference failed.")
    events: int = Field(description="Events stored in the outbox.")
    events_lost: int = Field(description="Events that could not be stored (disk full, I/O error).")
    fps: float = Field(description="Processed frames per second over the last 5 seconds.")
    latency_p50_ms: float | None = Field(None, description="Capture to result, median.")
    latency_p99_ms: float | None = Field(None, description="Capture to result, 99th percentile.")
    inference_p50_ms: float | None = Field(None, description="Invoke time, median.")
    inference_p99_ms: float | None = Field(None, description="Invoke time, 99th percentile.")
    source_failures: int = Field(description="Source outages since start.")
    last_error: str | None = Field(None, description="Most recent source or inference error.")


class OutboxHealth(_Frozen):
    """The durable event queue."""

    depth: int = Field(description="Events waiting for the broker's acknowledgement.")
    dropped: int = Field(description="Events dropped because the outbox was full (total).")


class MqttHealth(_Frozen):
    """The broker connection."""

    connected: bool = Field(description="Connected now.")
    reconnects: int = Field(description="Reconnections since start.")
    published: int = Field(description="Events acknowledged by the broker since start.")


class SystemHealth(_Frozen):
    """The board."""

    cpu_percent: float = Field(description="CPU use of the agent process, percent of one core.")
    rss_mb: float = Field(description="Resident memory of the agent, MiB.")
    cpu_temperature_c: float | None = Field(None, description="CPU temperature, when exposed.")
    throttled: dict[str, bool] | None = Field(
        None, description="vcgencmd get_throttled flags, on a Pi."
    )
    load_1m: float = Field(description="1-minute load average.")


class HealthMessage(_Message):
    """Periodic metrics (``health``)."""

    model_config = ConfigDict(protected_namespaces=())

    device_id: str = Field(description="Device id.")
    ts: float = Field(description="Unix seconds.")
    uptime_s: float = Field(description="Seconds since the agent started.")
    streams: dict[str, StreamHealth] = Field(description="Per stream.")
    outbox: OutboxHealth = Field(description="Durable event queue.")
    mqtt: MqttHealth = Field(description="Broker connection.")
    system: SystemHealth = Field(description="Board metrics.")
    models: list[ModelRef] = Field(description="Models loaded.")
