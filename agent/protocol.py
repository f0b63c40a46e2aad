"""The wire contract: every MQTT topic and payload, as pydantic models. Pure: no I/O.

The controller (``edgefleet.ops``) and any consumer import this one module to
speak to devices. Every payload carries ``schema_version``; consumers reject
versions they do not know. Topics, under a versioned root::

    edgefleet/v1/<device>/status          retained: online (birth) / offline (will, shutdown)
    edgefleet/v1/<device>/events/<stream> inference events, QoS 1, unique ``id`` per event
    edgefleet/v1/<device>/health          periodic metrics
    edgefleet/v1/<device>/cmd/<name>      commands in (MQTT 5 response topic + correlation data,
                                          or ``reply_to`` in the payload under MQTT 3.1.1)
    edgefleet/v1/<device>/desired         retained: what the controller wants (models, config)
    edgefleet/v1/<device>/reported        retained: what the device runs, and update progress
    edgefleet/v1/_models/<sha256>/meta    retained: how a model published over the broker is cut
    edgefleet/v1/_models/<sha256>/<n>     retained: its chunk n (raw bytes, n from 0), fetched by
                                          devices whose manifest URL is ``mqtt:``

``_models`` is fleet-wide, one copy per model, and cannot be a device id (ids start with a
letter or digit). The controller publishes the chunks, then the meta; the meta's presence
says every chunk is there.

Manifests are signed as bytes: ``SignedManifest.payload`` is the manifest's JSON
text, the ed25519 signature covers exactly those bytes, and the text is parsed
into a ``Manifest`` only after the signature checked out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgefleet/v1"
EVENT_MAX_BYTES = 256 * 1024
"""The largest event a device publishes: a raw event over it leaves its tensors' values out
(``TensorOut.omitted_values``), well under the generated broker's 1 MiB packet limit."""
# A device id or stream name becomes one topic level: no wildcards, separators or spaces.
TOPIC_LEVEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def describe_errors(
    exc: ValidationError, *, names: Mapping[str, str] | None = None, limit: int = 3
) -> str:
    """A payload's first ``limit`` problems as ``field: reason``, for one message line.

    ``names`` renames top-level fields (a CLI names the option that set them).
    """
    parts = []
    for error in exc.errors(include_url=False)[:limit]:
        loc = [str(part) for part in error["loc"]]
        if names and loc and loc[0] in names:
            loc[0] = names[loc[0]]
        parts.append(f"{'.'.join(loc) or '(top level)'}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


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

    def snapshots(self, stream: str) -> str:
        """Redacted snapshots a stream takes by itself (its per-event rule)."""
        return f"{self.base}/snapshots/{stream}"

    def command(self, name: str) -> str:
        """Requests for one command."""
        return f"{self.base}/cmd/{name}"

    @property
    def commands(self) -> str:
        """Subscription filter for every command of this device."""
        return f"{self.base}/cmd/+"

    @property
    def desired(self) -> str:
        """Retained desired state, written by the controller."""
        return f"{self.base}/desired"

    @property
    def reported(self) -> str:
        """Retained reported state, written by the device."""
        return f"{self.base}/reported"

    @property
    def renew_request(self) -> str:
        """Where the device sends a CSR to renew its certificate (authenticated by it)."""
        return f"{self.base}/{RENEW_LEVEL}/request"

    @property
    def renew_answer(self) -> str:
        """Where the enrollment service answers a renewal request."""
        return f"{self.base}/{RENEW_LEVEL}/answer"

    def command_name(self, topic: str) -> str | None:
        """The command named by a ``cmd/<name>`` topic of this device, else None."""
        prefix = f"{self.base}/cmd/"
        return topic[len(prefix) :] if topic.startswith(prefix) else None


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
    task: str = Field(description="classification, detection, pose, segmentation or raw.")
    backend: str = Field(description="Interpreter backend and version, e.g. 'litert 2.3.0'.")
    delegate: str = Field(description="Delegate in use, e.g. 'cpu' or 'edgetpu (usb:0)'.")


class DetectionOut(_Frozen):
    """One detected object; box is (ymin, xmin, ymax, xmax) normalised to the frame."""

    class_id: int = Field(description="Class index from the model.")
    label: str = Field(description="Class label.")
    score: float = Field(description="Confidence, 0 to 1.")
    box: tuple[float, float, float, float] = Field(description="ymin, xmin, ymax, xmax in 0..1.")
    keypoints: list[tuple[float, float]] | None = Field(
        None,
        description="(x, y) points in 0..1, for detectors that give them (a face detector's "
        "eyes, nose, mouth and ears); absent otherwise.",
    )
    stages: dict[str, list[ClassOut | LandmarksOut | KeypointOut]] | None = Field(
        None,
        description="What each second-stage model found on this object's crop, by stage name "
        "(landmarks in frame coordinates, classes); absent without stages.",
    )


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


class SegmentOut(_Frozen):
    """One class of a segmentation mask and how much of the frame (and of each zone) it covers."""

    class_id: int = Field(description="Class index from the model.")
    label: str = Field(description="Class label.")
    coverage: float = Field(ge=0, le=1, description="Share of the frame's pixels, 0 to 1.")
    zones: dict[str, float] = Field(
        default_factory=dict, description="Share of each configured zone's pixels, 0 to 1."
    )


class LandmarksOut(_Frozen):
    """One object's landmarks (a face mesh's 468 points, a hand's 21)."""

    score: float = Field(description="Presence: how sure the model is the object is there.")
    points: list[tuple[float, float, float]] = Field(
        description="(x, y, z): x and y in 0..1 of the frame, z relative, in x's units."
    )


class TensorOut(_Frozen):
    """One raw output tensor, dequantized."""

    name: str = Field(description="Tensor name.")
    shape: tuple[int, ...] = Field(description="Tensor shape.")
    values: list[object] = Field(description="Nested lists of values.")
    omitted_values: int | None = Field(
        None,
        description="How many values were left out (values is then empty): with them the "
        "event would exceed EVENT_MAX_BYTES (256 KiB). `edgefleet model run --json` on a "
        "saved frame prints them all.",
    )


class Redaction(_Frozen):
    """What a snapshot hid (the stream's ``privacy.redact``)."""

    mode: Literal["faces", "people", "none"] = Field(description="What was looked for.")
    regions: int = Field(description="Faces (or people, as one region) hidden.")


class SnapshotMessage(_Message):
    """A redacted snapshot a stream's rule took (``snapshots/<stream>``, QoS 1, not
    retained); the ``snapshot`` command's reply carries the same fields."""

    device_id: str = Field(description="Device that took it.")
    stream: str = Field(description="Stream (camera) name.")
    capture_ts: float = Field(description="Capture time of the frame, Unix seconds.")
    track_id: int = Field(description="The tracked object whose start asked for it.")
    label: str = Field(description="That object's label.")
    frame_width: int = Field(description="Width of the frame it was cut from.")
    frame_height: int = Field(description="Height of that frame.")
    width: int = Field(description="Width of the JPEG (halved from the frame's to fit).")
    height: int = Field(description="Height of the JPEG.")
    quality: int = Field(description="JPEG quality it fitted at.")
    redacted: Redaction = Field(description="What was hidden before it left the device.")
    jpeg_base64: str = Field(description="The JPEG, base64.")


class EventMessage(_Message):
    """One inference event (``events/<stream>``, QoS 1). ``id`` lets consumers drop duplicates."""

    model_config = ConfigDict(protected_namespaces=())

    id: str = Field(description="Unique event id (32 hex digits).")
    device_id: str = Field(description="Device that produced the event.")
    stream: str = Field(description="Stream (camera) name.")
    seq: int = Field(
        description="Per-stream sequence number, increasing; restarts at 1 with the agent."
    )
    kind: Literal["detection", "classification", "pose", "segmentation", "landmarks", "raw"] = (
        Field(description="Task kind.")
    )
    lifecycle: Literal["start", "update", "end"] | None = Field(
        None, description="For tracked objects: start, update or end; null when untracked."
    )
    track_id: int | None = Field(None, description="Track id for tracked objects.")
    label: str | None = Field(None, description="Main label of the event.")
    score: float | None = Field(None, description="Main score of the event.")
    zones: list[str] = Field(default_factory=list, description="Zones the object is in.")
    model: ModelRef = Field(description="The model that produced the results.")
    capture_ts: float = Field(
        description="Frame capture time, Unix seconds (the device's wall clock: see clock_synced)."
    )
    inference_ts: float = Field(description="Time inference finished, Unix seconds.")
    latency_ms: float = Field(
        description="Capture to inference done, milliseconds, on the monotonic clock (a step "
        "of the wall clock does not change it)."
    )
    clock_synced: bool | None = Field(
        None,
        description="Whether the kernel considered the wall clock synchronised (NTP) when the "
        "event was made; false: capture_ts may be far off (a board without real-time clock "
        "before NTP). Absent where that cannot be read.",
    )
    inference_ms: float = Field(description="Interpreter invoke time, milliseconds.")
    first_seen_ts: float | None = Field(None, description="For tracks: when the object appeared.")
    last_seen_ts: float | None = Field(
        None, description="For a track's end: capture time of its last sighting."
    )
    detections: list[DetectionOut] | None = Field(None, description="Detection results.")
    classes: list[ClassOut] | None = Field(None, description="Classification results.")
    keypoints: list[KeypointOut] | None = Field(None, description="Pose keypoints.")
    segments: list[SegmentOut] | None = Field(
        None, description="Segmentation: classes and their coverage."
    )
    landmarks: list[LandmarksOut] | None = Field(None, description="Landmark points.")
    tensors: list[TensorOut] | None = Field(None, description="Raw output tensors.")


class Capabilities(_Frozen):
    """What a device can do, announced in its birth message."""

    backends: list[str] = Field(description="Interpreter backends installed, with versions.")
    tasks: list[str] = Field(description="Tasks the runtime understands.")
    sources: list[str] = Field(description="Source types this build supports.")
    delegates: list[str] = Field(description="Delegate types this build can load.")


class StatusMessage(_Message):
    """Retained device status: birth (online), last will or orderly shutdown (offline)."""

    state: Literal["online", "degraded", "offline"] = Field(
        description="online; degraded: connected, but no stream could start (reason says "
        "why; the agent still takes commands, so set_config can fix it); or offline."
    )
    device_id: str = Field(description="Device id.")
    ts: float = Field(description="Unix seconds when the status was produced.")
    reason: str | None = Field(
        None,
        description="Why offline ('shutdown' or 'connection lost') or degraded (each "
        "stream's error).",
    )
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
    fallback: str | None = Field(
        None,
        description="Why a fallback build runs ('accelerator lost: ...'; the stream is "
        "degraded meanwhile); null while the model itself runs.",
    )
    build_switches: int = Field(
        0, description="Switches between the model and its fallback builds, both ways."
    )
    redacted_regions: int = Field(
        0, description="Faces (or people) hidden in this stream's snapshots so far."
    )
    snapshots_published: int = Field(
        0, description="Snapshots the stream's rule published (snapshots.on_track_start)."
    )
    snapshots_failed: int = Field(
        0,
        description="Snapshots the rule asked for and did not send (redaction failed, the "
        "broker was down); the reason is in the log.",
    )
    stage_latency_p50_ms: dict[str, float | None] = Field(
        default_factory=dict,
        description="Each second-stage model's median time per crop (pre-processing, invoke, "
        "decoding), apart from the first model's inference_p50_ms.",
    )
    frame_interval_s: float | None = Field(
        None,
        description="Median time between recent inferred frames (monotonic clock); tracking's "
        "end_after_s follows it when unset.",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="Settings that cannot work at the measured rate, each with what to do: "
        "tracking.end_after_s shorter than the time between frames ends every track before "
        "it is confirmed, so no detection becomes an event.",
    )


class OutboxHealth(_Frozen):
    """The durable event queue."""

    depth: int = Field(description="Events waiting for the broker's acknowledgement.")
    dropped: int = Field(description="Events dropped because the outbox was full (total).")
    not_stored: int = Field(
        0,
        description="Events that could not be stored since the agent started because the "
        "storage failed (disk full, I/O error); the streams' events_lost, summed.",
    )
    salvaged: int = Field(
        0,
        description="Events copied out of a damaged outbox file into the fresh one since the "
        "agent started.",
    )
    lost: int = Field(
        0,
        description="Stored events lost to damage since the agent started: rows of a damaged "
        "file that could not be read, or events missing against the depth recorded before "
        "the last stop (a WAL cut by a power loss).",
    )
    undeliverable: int = Field(
        0,
        description="Stored events larger than the broker accepts in one packet (its MQTT 5 "
        "maximum packet size), removed unsent since the agent started so the ones after them "
        "go on; each is logged with its size and the limit.",
    )
    problem: str | None = Field(
        None,
        description="Why the outbox cannot write now (e.g. 'the disk is full'), or why "
        "acknowledged events cannot be removed; None when it works.",
    )


class MqttHealth(_Frozen):
    """The broker connection."""

    connected: bool = Field(description="Connected now.")
    reconnects: int = Field(description="Reconnections since start.")
    published: int = Field(description="Events acknowledged by the broker since start.")
    id_conflicts: int = Field(
        0,
        description="Connections lost to another client using this device's client id "
        "(the broker said so on MQTT 5, or connections kept being closed right after they "
        "were accepted), since start.",
    )
    problem: str | None = Field(
        None,
        description="Set while the link cannot stay up for a reason the operator must fix: "
        "another client uses this device's client id (the agent then waits before "
        "reconnecting instead of fighting over it).",
    )


class RemoteHealth(_Frozen):
    """Commands and desired state received, and what could not be used."""

    commands_answered: int = Field(0, description="Command replies sent since start.")
    commands_unanswered: int = Field(
        0, description="Commands not answered for want of a response topic (malformed ones)."
    )
    desired_malformed: int = Field(
        0, description="Desired-state messages ignored because they did not parse."
    )


class SystemHealth(_Frozen):
    """The board."""

    cpu_percent: float = Field(description="CPU use of the agent process, percent of one core.")
    rss_mb: float = Field(description="Resident memory of the agent, MiB.")
    cpu_temperature_c: float | None = Field(None, description="CPU temperature, when exposed.")
    throttled: dict[str, bool] | None = Field(
        None, description="vcgencmd get_throttled flags, on a Pi."
    )
    load_1m: float = Field(description="1-minute load average.")


class ClockHealth(_Frozen):
    """Whether the device's clock can be trusted for the expiry of manifests."""

    synchronised: bool | None = Field(
        None, description="The kernel's NTP sync state (adjtimex); null where unreadable."
    )
    trusted_floor: float | None = Field(
        None,
        description="Newest trusted time seen (issued_at of accepted manifests), Unix "
        "seconds; expiry is judged at no earlier time than this.",
    )
    behind_floor_s: float = Field(
        0.0,
        description="Seconds the clock is behind the trusted floor: more than 0 means the "
        "clock is wrong (a board without RTC booted in the past).",
    )


class TrustHealth(_Frozen):
    """The root-signed release-key set this device trusts (set with ``updates.root_key``)."""

    key_set_version: int | None = Field(
        None, description="Version of the installed key set; null: none installed."
    )
    expires_at: float | None = Field(
        None,
        description="When the installed set expires, Unix seconds; after it no new "
        "manifest is accepted until a newer set arrives.",
    )
    last_refusal: str | None = Field(
        None,
        description="Why the last key set offered (bundle or retained message) was "
        "refused: not signed by the root, older than the installed one, expired, malformed.",
    )
    problem: str | None = Field(
        None,
        description="Why no new manifest is accepted now: no usable root key, no set "
        "installed, or the installed set expired.",
    )


class PartHealth(_Frozen):
    """One supervised agent thread (``agent/supervisor.py``)."""

    state: Literal["running", "restarting", "failed"] = Field(
        description="running; restarting: it raised and is restarted after a backoff; failed: "
        "it raised too often and is not restarted (the agent then exits so systemd restarts it)."
    )
    restarts: int = Field(0, description="Times it was restarted since the agent started.")
    last_error: str | None = Field(
        None,
        description="The last unexpected error it raised (type: message); the traceback is "
        "in the agent's log.",
    )


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
    remote: RemoteHealth = Field(
        default_factory=RemoteHealth, description="Commands and desired state received."
    )
    clock: ClockHealth = Field(
        default_factory=ClockHealth, description="Whether the clock can be trusted."
    )
    parts: dict[str, PartHealth] = Field(
        default_factory=dict,
        description="The agent's supervised threads by name (capture-<stream>, infer-<stream>, "
        "events-<stream>, mqtt, publisher, commands, updates, health, renewal, prometheus).",
    )
    trust: TrustHealth | None = Field(
        None, description="The release-key set trusted; unset when keys come from files."
    )
    certificate_days_left: float | None = Field(
        None,
        description="Days until the device certificate in use expires (negative once it "
        "has); the agent renews it before (enrollment.renew_before_days). Unset without TLS.",
    )


# -- commands ----------------------------------------------------------------------

COMMAND_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
# A topic one can publish to: not empty, no wildcards, no NUL.
TOPIC_NAME_PATTERN = r"^[^+#\x00]+$"


class CommandName(str, Enum):
    """The commands a device answers, one topic each (``cmd/<name>``)."""

    PING = "ping"
    GET_STATUS = "get_status"
    GET_CONFIG = "get_config"
    SET_CONFIG = "set_config"
    SNAPSHOT = "snapshot"
    RESTART_STREAM = "restart_stream"
    LIST_MODELS = "list_models"
    BENCH_MODEL = "bench_model"
    ROLLBACK_MODEL = "rollback_model"


class ErrorCode(str, Enum):
    """Why a command was not carried out."""

    MALFORMED = "malformed"  # not JSON, or not a command request
    UNKNOWN_COMMAND = "unknown_command"
    INVALID_ARGS = "invalid_args"
    EXPIRED = "expired"
    TOO_LARGE = "too_large"
    NOT_FOUND = "not_found"  # a stream or model that does not exist
    REFUSED = "refused"  # valid, but the device will not do it now (e.g. nothing to roll back)
    FAILED = "failed"  # tried, and it went wrong


class CommandRequest(_Message):
    """A command; which one is the topic's last level. ``args`` are checked per command."""

    id: str = Field(
        pattern=COMMAND_ID_PATTERN,
        description="Unique id; a repeated id is answered from the recorded result, not rerun.",
    )
    expires_at: float = Field(description="Unix seconds after which the device refuses it.")
    args: dict[str, Any] = Field(default_factory=dict, description="The command's arguments.")
    reply_to: str | None = Field(
        None,
        max_length=256,
        pattern=TOPIC_NAME_PATTERN,
        description="Reply topic for MQTT 3.1.1 clients; MQTT 5 clients set the response "
        "topic property instead.",
    )


class NoArgs(_Frozen):
    """A command without arguments."""


CONFIG_PATCH_MAX_DEPTH = 16
"""Deepest nesting a ``set_config`` patch may have: no config field is nearly that deep."""


class SetConfigArgs(_Frozen):
    """``set_config``: a change to the agent's config file, or the whole new file.

    The device applies either to the YAML file it runs from and writes it back keeping the
    comments and layout of everything that did not change.
    """

    patch: dict[str, Any] | None = Field(
        None,
        description="A JSON merge patch (RFC 7396) of the config file: an object merges into "
        "the section of the same name, null removes the field, anything else replaces it. "
        "A list of named items (streams) also takes an object keyed by name: "
        '{"streams": {"door": {"events": {"min_score": 0.6}}}} changes one stream, '
        '{"streams": {"door": null}} removes it, a new name adds one.',
    )
    config: dict[str, Any] | None = Field(
        None,
        description="The whole new configuration, as in the YAML file: fields it leaves out "
        "are removed from the file.",
    )

    @field_validator("patch")
    @classmethod
    def _shallow(cls, patch: dict[str, Any] | None) -> dict[str, Any] | None:
        if patch is not None and _nests_deeper_than(patch, CONFIG_PATCH_MAX_DEPTH):
            raise ValueError(f"nests deeper than {CONFIG_PATCH_MAX_DEPTH} levels")
        return patch

    @model_validator(mode="after")
    def _one_of_patch_or_config(self) -> SetConfigArgs:
        if (self.patch is None) == (self.config is None):
            raise PydanticCustomError(
                "patch_or_config",
                "give either patch (a merge patch of the config file) or config (the whole "
                "file), not both or neither",
            )
        return self


def _nests_deeper_than(value: object, limit: int) -> bool:
    """Whether objects and lists nest more than ``limit`` levels in ``value``; no recursion."""
    level, depth = [value], 0
    while level:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            return False
        depth += 1
        if depth > limit:
            return True
        level = [child for c in containers for child in (c.values() if isinstance(c, dict) else c)]
    return False


class StreamArgs(_Frozen):
    """A command about one stream."""

    stream: str = Field(pattern=TOPIC_LEVEL_PATTERN, description="Stream name.")


class SnapshotSize(str, Enum):
    """At which resolution a snapshot is taken."""

    FRAME = "frame"  # the source's own: the decoded frame, the camera's main stream
    MODEL = "model"  # the frame as handed to the model (its input size when it is stretched)


class SnapshotArgs(StreamArgs):
    """``snapshot``: a JPEG of the latest frame of a stream."""

    max_bytes: int = Field(
        200_000,
        ge=1_000,
        le=2_000_000,
        description="Largest JPEG to send; quality drops to fit, then the size halves.",
    )
    size: SnapshotSize = Field(
        SnapshotSize.FRAME,
        description="frame: at the source's own resolution (the decoded video frame, the "
        "camera's full-size stream); model: the frame as the model gets it, at its input size "
        "when frames are stretched to it.",
    )


class BenchModelArgs(StreamArgs):
    """``bench_model``: time the stream's model in a separate process."""

    runs: int = Field(50, ge=1, le=1000, description="Timed invocations.")


class RollbackModelArgs(StreamArgs):
    """``rollback_model``: go back to the previous model of a stream."""

    reason: str = Field("operator request", max_length=200, description="Reported with it.")


COMMAND_ARGS: dict[CommandName, type[_Frozen]] = {
    CommandName.PING: NoArgs,
    CommandName.GET_STATUS: NoArgs,
    CommandName.GET_CONFIG: NoArgs,
    CommandName.SET_CONFIG: SetConfigArgs,
    CommandName.SNAPSHOT: SnapshotArgs,
    CommandName.RESTART_STREAM: StreamArgs,
    CommandName.LIST_MODELS: NoArgs,
    CommandName.BENCH_MODEL: BenchModelArgs,
    CommandName.ROLLBACK_MODEL: RollbackModelArgs,
}


class CommandReply(_Message):
    """The answer to a command, on the response topic with the request's correlation data."""

    id: str | None = Field(description="The request's id; null when it could not be read.")
    command: str = Field(description="The command's name, from the topic.")
    ok: bool = Field(description="True when the command was carried out.")
    error: ErrorCode | None = Field(None, description="Why not, as a code; null when ok.")
    message: str = Field(description="What happened, for a person.")
    result: dict[str, Any] | None = Field(None, description="The command's result, when ok.")
    ts: float = Field(description="Unix seconds when the reply was made.")


# -- manifests ---------------------------------------------------------------------

SHA256_PATTERN = r"^[0-9a-f]{64}$"
# A file name in the model store: no directory parts, no leading dot.
ARTIFACT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class TensorSpec(_Frozen):
    """What a model's input or output must look like.

    ``shape`` null says the model file fixes no shape for the tensor: an op sets it when
    the interpreter allocates or runs (the outputs of ``TFLite_Detection_PostProcess``, for
    one). Validation then checks only the dtype; ``[]`` would promise a scalar.
    """

    shape: tuple[int, ...] | None = Field(
        description="Tensor shape, e.g. [1, 224, 224, 3]; null: set at run time (the model file "
        "gives none), so only the dtype is checked."
    )
    dtype: str = Field(description="Element type: uint8, int8, float32, ...")


class TaskSpec(_Frozen):
    """How the device turns the model's outputs into results."""

    model_config = ConfigDict(protected_namespaces=())

    task: (
        Literal["classification", "detection", "pose", "segmentation", "landmarks", "raw"] | None
    ) = Field(None, description="The task; detected from the outputs when null.")
    labels: list[str] | None = Field(None, description="Class labels; the model's own if null.")
    min_score: float | None = Field(None, ge=0, le=1, description="Minimum result score.")
    top_k: int | None = Field(None, ge=1, description="Classes kept per frame (classification).")


class RollbackFrom(_Frozen):
    """The release a rollback steps back from, as installed when it was signed."""

    version: int = Field(ge=1, description="Version of the installed release.")
    sha256: str = Field(pattern=SHA256_PATTERN, description="sha256 of its model.")


class Manifest(_Message):
    """One model release, as the controller signs it."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str = Field(pattern=TOPIC_LEVEL_PATTERN, description="Model identifier.")
    version: int = Field(ge=1, description="Release number; newer releases are higher.")
    sha256: str = Field(pattern=SHA256_PATTERN, description="sha256 of the .tflite bytes.")
    size: int = Field(gt=0, description="Size of the .tflite file in bytes.")
    artifact: str = Field(pattern=ARTIFACT_PATTERN, description="File name of the model.")
    urls: list[str] = Field(
        min_length=1,
        description="Where to download it: http(s)://..., or mqtt: for a chunked transfer "
        "over the broker.",
    )
    inputs: list[TensorSpec] = Field(description="Expected input tensors.")
    outputs: list[TensorSpec] | None = Field(None, description="Expected output tensors.")
    task: TaskSpec = Field(default_factory=TaskSpec, description="Task configuration.")
    max_latency_ms: float | None = Field(
        None, gt=0, description="Median invoke time the device must reach, else it refuses."
    )
    allow_slower: bool = Field(
        False,
        description="Without max_latency_ms, a device refuses a model much slower than the "
        "one it replaces or too slow for the stream's frame rate; true installs it anyway.",
    )
    min_agent_version: str = Field("0", description="Oldest agent that may run this model.")
    issued_at: float = Field(description="Unix seconds when it was signed.")
    expires_at: float = Field(description="Unix seconds after which devices refuse it.")
    sequence: int = Field(
        0,
        ge=0,
        description="The signer's counter for this model line, one higher for every manifest "
        "it signs; a device accepts only a sequence higher than any it accepted for the line "
        "(0: none, refused).",
    )
    rollback_from: RollbackFrom | None = Field(
        None,
        description="Makes this a rollback: the release it steps back from, which must be "
        "the one installed on the stream; the version may then be older.",
    )
    replaces_model_id: str | None = Field(
        None,
        pattern=TOPIC_LEVEL_PATTERN,
        description="The model line this one replaces on a stream; without it a device "
        "refuses a model_id other than the stream's.",
    )

    @property
    def rollback(self) -> bool:
        """Whether this is a signed return to an older version (it names ``rollback_from``)."""
        return self.rollback_from is not None


class SignedManifest(_Frozen):
    """A manifest and its ed25519 signature over the exact bytes of ``payload``."""

    payload: str = Field(max_length=65_536, description="The manifest as JSON text.")
    key_id: str = Field(max_length=64, description="Which fleet key signed it.")
    signature: str = Field(max_length=200, description="base64 ed25519 signature of payload.")


# -- identities and trust ----------------------------------------------------------

HOME_ASSISTANT_PREFIX = "homeassistant"
"""Home Assistant's default MQTT discovery prefix, where devices announce themselves
(opt-in): ``homeassistant/<component>/<device_id>/...``."""

RENEW_LEVEL = "renew"
"""Level, under a device's subtree, of certificate renewal (``request`` and ``answer``)."""

ENROLL_LEVEL = "_enroll"
"""Level, under the root, of first-boot enrollment over the claim listener."""

TRUST_LEVEL = "_trust"
"""Level, under the root, of fleet-wide trust data the controller publishes (retained)."""


def enroll_request_topic(topic_root: str, claim_identity: str, session: str) -> str:
    """``<root>/_enroll/<claim identity>/<session>/request``: a claim session's request.

    The broker's claim ACL grants it as ``%u/%c``: only that claim identity, and only the
    session whose client id is ``session`` (a random value the device picks), writes here.
    """
    return f"{topic_root}/{ENROLL_LEVEL}/{claim_identity}/{session}/request"


def enroll_answer_topic(topic_root: str, claim_identity: str, session: str) -> str:
    """``<root>/_enroll/<claim identity>/<session>/answer``: read by that session alone."""
    return f"{topic_root}/{ENROLL_LEVEL}/{claim_identity}/{session}/answer"


_PEM_MAX = 16_384
ENROLL_SESSION_PATTERN = r"^[0-9a-f]{32}$"
"""A claim session: the 128-bit random client id, in hex, a device picks per attempt."""


class EnrollRequest(_Message):
    """A claim session's request (``_enroll/<claim>/<session>/request``): token and CSR."""

    token: str = Field(max_length=256, description="The single-use enrollment token (ef1.…).")
    csr: str = Field(
        max_length=_PEM_MAX, description="PEM certificate signing request for the device key."
    )


class RenewRequest(_Message):
    """A device's renewal request (``<device>/renew/request``): authenticated by the
    connection's own certificate, so no token."""

    csr: str = Field(
        max_length=_PEM_MAX, description="PEM certificate signing request for a new key."
    )


class EnrollAnswer(_Message):
    """The enrollment service's answer to an enrollment or renewal request."""

    ok: bool = Field(description="True: ``certificate`` is the device's new certificate.")
    device_id: str | None = Field(
        None, description="The name the certificate was issued for (its CN)."
    )
    certificate: str | None = Field(None, max_length=_PEM_MAX, description="PEM certificate.")
    code: (
        Literal["token_used", "token_expired", "token_unknown", "rate_limited", "bad_request"]
        | None
    ) = Field(None, description="Why it was refused (ok false).")
    reason: str | None = Field(None, max_length=1024, description="One line for the device log.")
    retry_after_s: float | None = Field(
        None, ge=0, description="With rate_limited: seconds before a new request may succeed."
    )


def key_set_topic(topic_root: str) -> str:
    """``<root>/_trust/keyset``: the retained, root-signed set of trusted release keys."""
    return f"{topic_root}/{TRUST_LEVEL}/keyset"


# -- models over the broker ---------------------------------------------------------

MODELS_LEVEL = "_models"
"""The topic level, under the root, of models published for transfer over the broker."""

MODEL_META_LEVEL = "meta"
"""The last level of a published model's ``ChunkedModelMeta`` topic."""

MQTT_MODEL_URL = "mqtt:"
"""A manifest URL saying: fetch the model named by the manifest's sha256 over the broker."""


def model_transfer_topic(topic_root: str, sha256: str) -> str:
    """``<root>/_models/<sha256>``: where the model with that sha256 is published in chunks."""
    return f"{topic_root}/{MODELS_LEVEL}/{sha256}"


def model_meta_topic(topic_root: str, sha256: str) -> str:
    """``<root>/_models/<sha256>/meta``: the retained ``ChunkedModelMeta``."""
    return f"{model_transfer_topic(topic_root, sha256)}/{MODEL_META_LEVEL}"


def model_chunk_topic(topic_root: str, sha256: str, index: int) -> str:
    """``<root>/_models/<sha256>/<index>``: the retained raw bytes of chunk ``index`` (from 0)."""
    return f"{model_transfer_topic(topic_root, sha256)}/{index}"


class ChunkedModelMeta(_Message):
    """How a model published over the broker is cut (``_models/<sha256>/meta``, retained).

    Chunk ``i`` holds the model's bytes from ``i * chunk_bytes``: ``chunk_bytes`` of them,
    except the last chunk, which holds the rest.
    """

    sha256: str = Field(pattern=SHA256_PATTERN, description="sha256 of the whole model.")
    size: int = Field(gt=0, description="Size of the model in bytes.")
    chunk_bytes: int = Field(gt=0, description="Length of every chunk but the last.")
    chunks: int = Field(gt=0, description="Number of chunks: size / chunk_bytes, rounded up.")

    @model_validator(mode="after")
    def _chunks_cover_the_size(self) -> ChunkedModelMeta:
        needed = -(-self.size // self.chunk_bytes)
        if self.chunks != needed:
            raise ValueError(
                f"{self.size} bytes in chunks of {self.chunk_bytes} make {needed} chunks, "
                f"not {self.chunks}"
            )
        return self

    def chunk_length(self, index: int) -> int:
        """How many bytes chunk ``index`` (0 <= index < chunks) holds."""
        if not 0 <= index < self.chunks:
            raise IndexError(f"chunk {index} of {self.chunks}")
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)


# -- desired and reported state -----------------------------------------------------


class DesiredState(_Message):
    """What the controller wants a device to run (``desired``, retained)."""

    revision: int = Field(ge=0, description="Increases with every change the controller makes.")
    models: dict[str, SignedManifest] = Field(
        default_factory=dict, description="Per stream name: the model it should run."
    )


class UpdateState(str, Enum):
    """Where a model update of one stream stands."""

    VERIFYING = "verifying"
    DOWNLOADING = "downloading"
    VALIDATING = "validating"
    ACTIVATING = "activating"
    PROBATION = "probation"
    COMMITTED = "committed"
    REFUSED = "refused"
    ROLLED_BACK = "rolled_back"


class UpdateReport(_Frozen):
    """Progress of the latest update of one stream."""

    model_config = ConfigDict(protected_namespaces=())

    state: UpdateState = Field(description="Where the update stands.")
    model_id: str = Field(description="Model of the manifest.")
    version: int = Field(description="Version of the manifest.")
    sha256: str = Field(description="sha256 of the manifest's model.")
    reason: str | None = Field(None, description="Why it was refused or rolled back.")
    bytes_done: int | None = Field(None, description="Downloaded so far.")
    ts: float = Field(description="Unix seconds of the last change.")


class LineMark(_Frozen):
    """The newest manifest a stream accepted from one model line: its high-water mark."""

    sequence: int = Field(ge=0, description="Highest sequence accepted.")
    version: int = Field(ge=0, description="Highest version accepted (a rollback lowers none).")


class StreamMarks(_Frozen):
    """A stream's model line and the high-water mark of every line it accepted."""

    line: str | None = Field(
        None, description="model_id of the last manifest accepted; null before the first."
    )
    lines: dict[str, LineMark] = Field(
        default_factory=dict, description="Per model_id: the newest manifest accepted."
    )


class ReportedState(_Message):
    """What the device runs and how its updates go (``reported``, retained)."""

    device_id: str = Field(description="Device id.")
    ts: float = Field(description="Unix seconds.")
    agent_version: str = Field(description="edgefleet version on the device.")
    desired_revision: int | None = Field(None, description="Last desired revision seen.")
    models: dict[str, ModelRef] = Field(description="Per stream: the model running now.")
    updates: dict[str, UpdateReport] = Field(
        default_factory=dict, description="Per stream: the latest update."
    )
    marks: dict[str, StreamMarks] = Field(
        default_factory=dict,
        description="Per stream: the high-water marks a manifest must be newer than.",
    )
