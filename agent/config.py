"""The agent's configuration: one YAML file, validated by pydantic, overridable by environment.

Environment variables ``EDGEFLEET_<FIELD>`` override top-level fields, with
``__`` descending into sections: ``EDGEFLEET_DEVICE_ID=shop-7``,
``EDGEFLEET_BROKER__HOST=mqtt.local``, ``EDGEFLEET_STREAMS__0__MODEL__THREADS=4``.
Values are parsed as YAML scalars (``true``, ``8883``). The override is a few
lines over the parsed dict rather than pydantic-settings, because the file is
the source of truth and errors must name the file, which the dict route keeps
simple.

Every error names the file and the field (``agent.yaml: streams[0].model.path:
field required``); ``ConfigError.problems`` lists them all at once.
``check_config`` goes further, as ``edgefleet-agent check-config`` does: every
schema problem, and for every part that is valid on its own (even when others
are not) what the agent would open: each model file parses as a TFLite model
(inspected, never invoked), label files read, file and folder sources and
camera nodes exist, TLS files are there.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from edgefleet.provisioning import pki
from edgefleet.runtime import (
    BackendName,
    CpuDelegate,
    DelegateSettings,
    EdgefleetError,
    Labels,
    LabelsError,
    ModelCompiledForEdgeTPU,
    ModelError,
    ResizeMode,
    inspect_model,
    read_model,
)

from .events import EventFilterSettings
from .outbox import OutboxSettings
from .privacy import PrivacySettings
from .protocol import HOME_ASSISTANT_PREFIX, TOPIC_LEVEL_PATTERN, TOPIC_ROOT
from .sources import (
    FileSourceSettings,
    ImageFolderSourceSettings,
    SourceSettings,
    V4l2SourceSettings,
)

ENV_PREFIX = "EDGEFLEET_"
OPERATOR_ENV = frozenset(
    {
        "EDGEFLEET_FLEET",
        "EDGEFLEET_PROFILE",
        "EDGEFLEET_HOST",
        "EDGEFLEET_PORT",
        "EDGEFLEET_TOPIC_ROOT",
        "EDGEFLEET_CAFILE",
        "EDGEFLEET_CERTFILE",
        "EDGEFLEET_KEYFILE",
        "EDGEFLEET_INSECURE",
        "EDGEFLEET_CONTROLLER",
        "EDGEFLEET_CONTROLLER_CAFILE",
        "EDGEFLEET_TOKEN",
        "EDGEFLEET_TOKEN_FILE",
        "EDGEFLEET_RELEASES",
        "EDGEFLEET_ARTIFACTS_URL",
    }
)
"""The operator tools' variables (edgefleet.ops: the profile, provision, the controller's
client, releases): set in a shell that also starts an agent, they are not the agent's
settings. tests/test_config.py checks every one ops/ reads is here."""
_ENV_SKIP = {
    "EDGEFLEET_BACKEND",
    "EDGEFLEET_ASSETS",
    "EDGEFLEET_CONFIG",
    "EDGEFLEET_FAULTS",
    *OPERATOR_ENV,
}


class ConfigError(EdgefleetError):
    """The configuration is invalid; ``problems`` holds one ``location: reason`` per error."""

    def __init__(self, source: str, problems: list[str]) -> None:
        lines = "\n".join(f"  {source}: {p}" for p in problems)
        super().__init__(
            f"{source}: {len(problems)} problem(s) in the configuration\n{lines}",
            hint="fix the fields named above; `edgefleet-agent schema` prints every field",
        )
        self.source = source
        self.problems = problems


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsSettings(_Section):
    """TLS towards the broker, with a client certificate."""

    cafile: Path = Field(description="CA certificate that signed the broker's certificate.")
    certfile: Path | None = Field(None, description="This device's certificate (PEM).")
    keyfile: Path | None = Field(None, description="This device's private key (PEM).")


class BrokerSettings(_Section):
    """The MQTT broker and how to stay connected to it."""

    host: str = Field("localhost", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS).")
    protocol: Literal["mqtt5", "mqtt311"] = Field("mqtt5", description="MQTT protocol version.")
    client_id: str | None = Field(None, description="Client id; default 'edgefleet-<device_id>'.")
    username: str | None = Field(None, description="Username, when the broker wants one.")
    password_file: Path | None = Field(
        None,
        description="File holding the password; a relative name is looked up in "
        "$CREDENTIALS_DIRECTORY (systemd LoadCredential=) first.",
    )
    tls: TlsSettings | None = Field(None, description="TLS settings; plain TCP when absent.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive.")
    session_expiry_s: int = Field(
        7 * 24 * 3600, ge=0, description="How long the broker keeps this session while offline."
    )
    reconnect_min_s: float = Field(0.5, gt=0, description="First reconnect delay.")
    reconnect_max_s: float = Field(60.0, gt=0, description="Longest reconnect delay (jittered).")
    id_conflict_backoff_s: float = Field(
        4.0,
        gt=0,
        description="When another client uses this client id (the broker drops one of the two "
        "whenever the other connects), wait this long before connecting again instead of "
        "taking the connection back at once; doubles while the conflict goes on. Under 5 s, "
        "the other agent, dropped again right after it took the connection, tells the "
        "conflict too where the broker gives no reason (MQTT 3.1.1).",
    )
    id_conflict_backoff_max_s: float = Field(
        600.0,
        gt=0,
        description="Longest wait of id_conflict_backoff_s's doubling; the conflict is "
        "reported as over once a connection has held this long.",
    )
    max_inflight: int = Field(
        200, ge=1, le=65535, description="QoS 1 messages awaiting acknowledgement at once."
    )
    topic_root: str = Field(TOPIC_ROOT, description="Versioned topic root.")


class FallbackSettings(_Section):
    """Another build of the stream's model, for when the one before it cannot run."""

    path: Path = Field(description="The .tflite file (e.g. the CPU build of an Edge TPU model).")
    delegate: DelegateSettings = Field(
        default_factory=CpuDelegate, description="Accelerator for this build (default: cpu)."
    )
    threads: int | None = Field(None, ge=1, le=64, description="CPU threads for the interpreter.")


class ModelSettings(_Section):
    """The model a stream runs."""

    model_config = ConfigDict(protected_namespaces=())

    path: Path = Field(description="The .tflite file.")
    id: str | None = Field(None, description="Model id in events; default: the file name stem.")
    version: str | None = Field(
        None, description="Model version in events; default: sha256 prefix."
    )
    labels: Path | None = Field(None, description="Label file; default: labels in the model.")
    task: (
        Literal["classification", "detection", "pose", "segmentation", "landmarks", "raw"] | None
    ) = Field(None, description="Override the task detected from the model.")
    delegate: DelegateSettings = Field(
        default_factory=CpuDelegate, description="Accelerator: cpu, edgetpu, gpu or external."
    )
    threads: int | None = Field(None, ge=1, le=64, description="CPU threads for the interpreter.")
    backend: BackendName = Field(BackendName.AUTO, description="Interpreter backend.")
    resize: ResizeMode | None = Field(
        None,
        description="stretch or letterbox frames; default: the task's (letterbox for YOLO "
        "detectors, which were trained on it; stretch otherwise).",
    )
    min_score: float | None = Field(
        None, ge=0, le=1, description="Minimum result score (default 0.5 detection, else 0)."
    )
    top_k: int = Field(3, ge=1, description="Classes kept per frame for classification.")
    anchors: str | None = Field(
        None,
        description="Anchor detectors without a preset: a preset name or STRIDES@PER_LAYER "
        "(e.g. 8,16,16,16@2, MediaPipe's SsdAnchorsCalculator options); default: the preset "
        "matching the model's outputs.",
    )
    carry: dict[str, str] = Field(
        default_factory=dict,
        description="Recurrent state: input name -> the output name whose values it takes on "
        "the next frame (zeros on the first); any other non-image input gets zeros, with a "
        "warning.",
    )
    fallbacks: list[FallbackSettings] = Field(
        default_factory=list,
        description="Builds to run, in order, when the one before fails to load or fails "
        "mid-stream (a Coral unplugged): typically the CPU build of an Edge TPU model. The "
        "stream switches without a restart, reports 'accelerator lost: ...' as degraded, "
        "retries the first build with backoff and returns to it once it runs again.",
    )
    retry_s: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="While on a fallback: seconds before the first retry of the model itself; "
        "doubled after each failed retry, up to retry_max_s.",
    )
    retry_max_s: float = Field(
        600.0, gt=0, allow_inf_nan=False, description="Longest wait between retries."
    )

    def build(self, index: int) -> ModelSettings:
        """The settings of build ``index``: 0 is this model, 1.. its fallbacks (same task)."""
        if index == 0:
            return self
        fallback = self.fallbacks[index - 1]
        return self.model_copy(
            update={
                "path": fallback.path,
                "delegate": fallback.delegate,
                "threads": fallback.threads,
                "fallbacks": [],
            }
        )


class StageSettings(_Section):
    """A second model run on crops of the first one's detections (detect, then look closer)."""

    name: str = Field(
        pattern=TOPIC_LEVEL_PATTERN, description="Key of its results in each detection."
    )
    model: ModelSettings = Field(description="The model run on each crop.")
    on_labels: list[str] | None = Field(
        None, min_length=1, description="First-stage labels it runs on; unset: every one."
    )
    expand: float = Field(
        1.5, ge=1.0, le=4.0, description="How much larger than the detection's box the crop is."
    )
    rotate: bool = Field(
        True,
        description="Turn the crop upright from the detection's first two keypoints (a face's "
        "eyes), as MediaPipe does.",
    )
    max_crops: int = Field(4, ge=1, le=32, description="Crops per frame, best detections first.")


class SnapshotRuleSettings(_Section):
    """When a stream takes a snapshot by itself: at the start of a tracked object."""

    on_track_start: bool = Field(
        False,
        description="Publish a redacted snapshot (the stream's privacy) when a tracked object "
        "starts, on the stream's snapshots topic (and Home Assistant's image entity).",
    )
    labels: list[str] | None = Field(
        None, min_length=1, description="Labels whose start takes one; unset: every label."
    )
    min_interval_s: float = Field(
        30.0, ge=1.0, description="At most one snapshot per this many seconds per stream."
    )
    max_bytes: int = Field(
        200_000,
        ge=1_000,
        le=500_000,
        description="Largest JPEG: quality drops to fit, then the size halves (at most 500000, "
        "so the message stays under the broker's 1 MiB packet limit).",
    )


class StreamSettings(_Section):
    """One camera or stream, its model and its event filter."""

    name: str = Field(pattern=TOPIC_LEVEL_PATTERN, description="Stream name (a topic level).")
    source: SourceSettings = Field(description="Where frames come from.")
    model: ModelSettings = Field(description="What runs on them.")
    events: EventFilterSettings = Field(
        default_factory=EventFilterSettings, description="Which results become events."
    )
    stages: list[StageSettings] = Field(
        default_factory=list,
        description="Second-stage models on crops of the detections (face detection -> face "
        "landmarks; detection -> a classifier), cut from the full-resolution frame; their "
        "results ride in each detection's 'stages'.",
    )
    privacy: PrivacySettings = Field(
        default_factory=PrivacySettings,
        description="What snapshots hide before they leave the device (events never carry pixels).",
    )
    snapshots: SnapshotRuleSettings = Field(
        default_factory=SnapshotRuleSettings,
        description="Snapshots the stream takes by itself (off by default: only on request).",
    )

    @model_validator(mode="after")
    def _snapshots_follow_tracks(self) -> StreamSettings:
        if self.snapshots.on_track_start and not self.events.tracking.enabled:
            raise ValueError(
                "snapshots.on_track_start needs events.tracking.enabled: true (a snapshot is "
                "taken when a tracked object starts)"
            )
        return self


class HealthSettings(_Section):
    """Periodic health messages and the optional Prometheus endpoint."""

    interval_s: float = Field(30.0, ge=1, description="Seconds between health messages.")
    prometheus_port: int | None = Field(
        None, ge=1, le=65535, description="Serve Prometheus metrics on this port (off if unset)."
    )
    prometheus_bind: str = Field("127.0.0.1", description="Address of the Prometheus endpoint.")


class LoggingSettings(_Section):
    """Where logs go."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    journald: bool | None = Field(
        None, description="Structured journald logging; default: when running under systemd."
    )


class SystemdSettings(_Section):
    """Service manager integration."""

    watchdog_stale_s: float = Field(
        10.0, gt=0, description="Stop petting the watchdog when no result came for this long."
    )


class UpdateSettings(_Section):
    """Over-the-air model updates: where models live, whom to trust, how long to watch."""

    store_dir: Path = Field(
        Path("/var/lib/edgefleet/store"),
        description="The model store: models by sha256, each stream's current pointer, "
        "download staging; created if missing.",
    )
    trusted_keys: list[Path] = Field(
        [Path("/etc/edgefleet/fleet-keys")],  # pydantic copies a mutable default per instance
        description="Fleet public keys (.pub files, or folders of them) that may sign "
        "manifests; a missing path trusts nothing from it. Ignored, with a warning, when "
        "root_key is set.",
    )
    root_key: Path | None = Field(
        None,
        description="The fleet's root public key (root.pub): when set, the keys that may "
        "sign manifests are the installed root-signed key set's (<store_dir>/keyset.json), "
        "updated from the retained key-set message, not trusted_keys.",
    )
    key_set: Path | None = Field(
        None,
        description="The key set of the device's bundle (keyset.json), installed at start "
        "when the store holds no newer one; needs root_key.",
    )
    probation_s: float = Field(
        60.0, ge=0, description="How long a new model is watched before it is committed."
    )
    probation_min_frames: int = Field(
        20, ge=1, description="Frames a new model must process before its error rate counts."
    )
    max_error_rate: float = Field(
        0.05, ge=0, le=1, description="Failed frames / all frames that rolls a new model back."
    )
    max_latency_factor: float = Field(
        3.0,
        gt=1,
        description="A new model is rolled back when its median invoke time on the stream "
        "exceeds the one measured when it was validated by this factor (and by more than "
        "1 ms: timer and scheduling noise on a model that runs in microseconds).",
    )
    max_probation_starts: int = Field(
        2, ge=1, description="Agent restarts during probation (a crash loop) that roll back."
    )
    keep_previous: int = Field(2, ge=1, description="Older models kept per stream for rollback.")
    download_timeout_s: float = Field(30.0, gt=0, description="Socket timeout of a download.")
    download_attempts: int = Field(
        5, ge=1, description="Tries of a download (each resumes) before the update waits."
    )
    validation_timeout_s: float = Field(
        120.0, gt=0, description="Longest a model's validation process may run."
    )
    bench_runs: int = Field(20, ge=1, description="Timed runs when validating a model.")
    validation_memory_mib: int | None = Field(
        None,
        ge=1,
        description="Resident memory a candidate model may add, in MiB; more is refused. "
        "Unset: the memory available beside what runs (the board's available memory, and "
        "the room left under the agent's cgroup memory.max), less memory_reserve_mib.",
    )
    memory_reserve_mib: int = Field(
        64, ge=0, description="MiB the derived memory budget leaves free for everything else."
    )
    address_space_headroom_mib: int = Field(
        256,
        ge=0,
        description="Address space the validation process may reserve beyond its size at "
        "start and the memory budget: the interpreter's libraries, thread stacks and "
        "mappings (24 to 60 MiB measured for the project's models, 1 to 4 threads).",
    )
    validation_cpu_s: int = Field(
        90, ge=1, description="CPU seconds (all threads) the validation process may use."
    )
    max_slowdown: float = Field(
        3.0,
        gt=1,
        description="Without max_latency_ms in the manifest, a candidate whose median invoke "
        "is more than this many times the running model's (timed in the same validation "
        "process) is refused, unless the manifest sets allow_slower.",
    )
    min_throughput_ratio: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Probation rolls a model back when the share of captured frames it "
        "processed over the window falls below this fraction of the previous model's.",
    )
    retry_s: float = Field(
        30.0, gt=0, description="Seconds before an update that could not finish is tried again."
    )
    max_clock_skew_s: float = Field(
        300.0,
        ge=0,
        description="How far in this device's future a manifest's issued_at may be; one "
        "issued later is refused until the clock catches up.",
    )


class CommandSettings(_Section):
    """Commands over MQTT."""

    max_payload_bytes: int = Field(
        256 * 1024, ge=1024, description="Larger command payloads are refused unread."
    )
    journal_days: float = Field(
        7.0,
        gt=0,
        description="How long executed command ids are remembered (at-most-once), in the "
        "agent's running time (a wall-clock step does not shorten it; time switched off does "
        "not count, so ids may be kept longer).",
    )
    journal_max_ids: int = Field(
        100_000,
        ge=1000,
        description="At most this many command ids are remembered (the newest); the journal "
        "also forgets by count while the clock is unsynchronised, when it never forgets by age.",
    )


class EnrollmentSettings(_Section):
    """Zero-touch enrollment at first boot, and certificate renewal before expiry.

    Enrollment runs at start when the claim files are set and broker.tls.certfile does not
    exist: the agent makes its key (broker.tls.keyfile, 0600; one already there is kept)
    and a CSR, presents the single-use token over the broker's claim listener with the
    shared claim certificate, and stores the certificate it gets at broker.tls.certfile.
    Renewal needs none of the claim files: it goes over the device's own connection.
    """

    claim_certfile: Path | None = Field(
        None, description="The shared claim certificate (PEM); unset: no enrollment."
    )
    claim_keyfile: Path | None = Field(
        None, description="The claim certificate's private key (PEM, mode 0600)."
    )
    token_file: Path | None = Field(
        None,
        description="File holding this device's single-use enrollment token (ef1.…); "
        "removed once the certificate is stored, when the agent may.",
    )
    cafile: Path | None = Field(
        None,
        description="CA that signed the broker's certificate, to verify the claim listener "
        "and check the certificates the enrollment service sends; default broker.tls.cafile.",
    )
    claim_host: str | None = Field(
        None, description="Host of the claim listener; default broker.host."
    )
    claim_port: int = Field(8884, ge=1, le=65535, description="Port of the claim listener.")
    timeout_s: float = Field(
        30.0, gt=0, description="How long to wait for the enrollment or renewal answer."
    )
    retry_min_s: float = Field(
        5.0, gt=0, description="First wait after a refused or unanswered enrollment."
    )
    retry_max_s: float = Field(
        300.0, gt=0, description="Longest wait between enrollment attempts (doubling)."
    )
    renew_before_days: float | None = Field(
        30.0,
        gt=0,
        description="Renew the device certificate when it expires in fewer days than "
        "this, or than half its lifetime when that is shorter (so a short-lived "
        "certificate is not renewed over and over); unset: never renew.",
    )
    renew_check_s: float = Field(
        3600.0, gt=0, description="How often the certificate's expiry is looked at."
    )

    @property
    def configured(self) -> bool:
        """Whether enrollment can run (the claim certificate, its key and a token are set)."""
        return None not in (self.claim_certfile, self.claim_keyfile, self.token_file)

    @model_validator(mode="after")
    def _claim_files_together(self) -> EnrollmentSettings:
        given = [self.claim_certfile, self.claim_keyfile, self.token_file]
        if any(p is not None for p in given) and not self.configured:
            raise ValueError("claim_certfile, claim_keyfile and token_file go together")
        return self


DISCOVERY_PREFIX_PATTERN = r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$"


class HomeAssistantSettings(_Section):
    """Home Assistant MQTT discovery: the device and its entities appear in Home Assistant.

    Off by default. On, the agent publishes retained discovery configs under the prefix
    (occupancy per label and zone, object count, fps, inference latency, CPU temperature;
    docs/mqtt.md) at every connect, and clears those no longer wanted (off, a stream or
    zone removed, another prefix), also across restarts.
    """

    enabled: bool = Field(
        False,
        description="Publish Home Assistant discovery configs and occupancy states; false "
        "clears any published before.",
    )
    discovery_prefix: str = Field(
        HOME_ASSISTANT_PREFIX,
        pattern=DISCOVERY_PREFIX_PATTERN,
        description="Home Assistant's discovery prefix (its MQTT integration's setting; "
        "homeassistant by default there too).",
    )


class AgentConfig(_Section):
    """The whole agent configuration."""

    device_id: str = Field(pattern=TOPIC_LEVEL_PATTERN, description="This device's id.")
    broker: BrokerSettings = Field(default_factory=BrokerSettings, description="MQTT broker.")
    streams: list[StreamSettings] = Field(min_length=1, description="Cameras and their models.")
    outbox: OutboxSettings = Field(default_factory=OutboxSettings, description="Event queue.")
    health: HealthSettings = Field(default_factory=HealthSettings, description="Health.")
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Logging.")
    systemd: SystemdSettings = Field(default_factory=SystemdSettings, description="systemd.")
    updates: UpdateSettings = Field(
        default_factory=UpdateSettings, description="Over-the-air model updates."
    )
    commands: CommandSettings = Field(
        default_factory=CommandSettings, description="Commands over MQTT."
    )
    shutdown_flush_s: float = Field(
        5.0, ge=0, description="On stop, how long to keep sending queued events."
    )
    enrollment: EnrollmentSettings = Field(
        default_factory=EnrollmentSettings,
        description="Zero-touch enrollment and certificate renewal.",
    )
    homeassistant: HomeAssistantSettings = Field(
        default_factory=HomeAssistantSettings,
        description="Home Assistant MQTT discovery (opt-in).",
    )

    @field_validator("streams")
    @classmethod
    def _unique_stream_names(cls, streams: list[StreamSettings]) -> list[StreamSettings]:
        names = [s.name for s in streams]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stream names must be unique: {', '.join(duplicates)} repeated")
        return streams

    @model_validator(mode="after")
    def _enrollment_needs_tls_files(self) -> AgentConfig:
        tls = self.broker.tls
        if self.enrollment.configured and (tls is None or None in (tls.certfile, tls.keyfile)):
            raise ValueError(
                "enrollment needs broker.tls with certfile and keyfile: where the enrolled "
                "certificate and the device key go"
            )
        return self

    @model_validator(mode="after")
    def _client_id(self) -> AgentConfig:
        if self.broker.client_id is None:
            self.broker.client_id = f"edgefleet-{self.device_id}"
        return self


def load_config(path: Path | str, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, apply the environment, validate; relative paths resolve against the file."""
    path = Path(path)
    data = _read_data(path, os.environ if environ is None else environ)
    return parse_config(data, str(path), base_dir=path.parent)


def check_config(path: Path | str, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Every problem of the config file at once, as ``check-config`` reports them.

    Returns the config when it is valid and everything it names is usable; raises
    ``ConfigError`` with the schema problems and, beside them, the file problems of
    every part that is valid on its own.
    """
    path = Path(path)
    data = _read_data(path, os.environ if environ is None else environ)
    try:
        config = parse_config(data, str(path), base_dir=path.parent)
    except ConfigError as exc:
        raise ConfigError(str(path), exc.problems + _partial_problems(data, path.parent)) from None
    problems = check_files(config)
    if problems:
        raise ConfigError(str(path), problems)
    return config


def _read_data(path: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file ({exc.strerror or exc})"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {_yaml_reason(exc)}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError(source, ["the top level must be a mapping of fields"])
    problems = apply_environment(data, environ)
    if problems:
        raise ConfigError(source, problems)
    return data


def parse_config(data: dict[str, Any], source: str, *, base_dir: Path) -> AgentConfig:
    """Validate a dict as ``AgentConfig``; relative paths resolve against ``base_dir``."""
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(e) for e in exc.errors()]) from None
    _resolve_paths(config, base_dir)
    return config


def apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Overlay ``EDGEFLEET_A__B=v`` variables onto ``data`` in place; returns problems found."""
    problems = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in _ENV_SKIP:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
        try:
            _set_path(data, keys, yaml.safe_load(environ[name]))
        except (TypeError, ValueError, IndexError, yaml.YAMLError) as exc:
            problems.append(f"environment {name}: cannot apply ({exc})")
    return problems


def _set_path(data: Any, keys: list[str], value: Any) -> None:
    node = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            index = int(key)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise TypeError(f"'{key}' is inside a value that is not a section")


def _union_tags(*unions: Any) -> frozenset[str]:
    """The ``type`` values of discriminated unions: pydantic puts them in error locations."""
    tags = set()
    for union in unions:
        for member in typing.get_args(typing.get_args(union)[0]):
            tags.add(member.model_fields["type"].default)
    return frozenset(tags)


SOURCE_TYPES = sorted(_union_tags(SourceSettings))
DELEGATE_TYPES = sorted(_union_tags(DelegateSettings))
_TAGS = frozenset(SOURCE_TYPES + DELEGATE_TYPES)


def _describe(error: Any) -> str:
    location = ""
    for part in error["loc"]:
        if isinstance(part, int):
            location += f"[{part}]"
        elif part not in _TAGS:
            location += f".{part}" if location else str(part)
    reason = str(error["msg"])
    if error["type"] == "extra_forbidden":
        reason = "unknown field (check the spelling)"
    return f"{location or '(top level)'}: {reason}"


def _resolve_paths(config: AgentConfig, base_dir: Path) -> None:
    def resolve(p: Path) -> Path:
        return p if p.is_absolute() else (base_dir / p)

    config.outbox.path = resolve(config.outbox.path)
    config.updates.store_dir = resolve(config.updates.store_dir)
    config.updates.trusted_keys = [resolve(p) for p in config.updates.trusted_keys]
    if config.updates.root_key is not None:
        config.updates.root_key = resolve(config.updates.root_key)
    if config.updates.key_set is not None:
        config.updates.key_set = resolve(config.updates.key_set)
    enrollment = config.enrollment
    for name in ("claim_certfile", "claim_keyfile", "token_file", "cafile"):
        value = getattr(enrollment, name)
        if value is not None:
            setattr(enrollment, name, resolve(value))
    for stream in config.streams:
        stream.model.path = resolve(stream.model.path)
        for stage in stream.stages:
            stage.model.path = resolve(stage.model.path)
            if stage.model.labels is not None:
                stage.model.labels = resolve(stage.model.labels)
        for fallback in stream.model.fallbacks:
            fallback.path = resolve(fallback.path)
        stream.privacy = _resolved_privacy(stream.privacy, resolve)
        if stream.model.labels is not None:
            stream.model.labels = resolve(stream.model.labels)
        stream.source = _resolved_source(stream.source, resolve)


def _resolved_privacy(privacy: PrivacySettings, resolve: _Resolve) -> PrivacySettings:
    return privacy.model_copy(
        update={
            name: resolve(getattr(privacy, name))
            for name in ("face_model", "people_model")
            if getattr(privacy, name) is not None
        }
    )


def check_files(config: AgentConfig) -> list[str]:
    """Problems a valid config can still have on this machine: what the agent would open.

    Each model must parse as a TFLite model (inspected, not invoked), each label file
    read, each file or folder source and camera node exist, each TLS file be there.
    """
    problems = []
    for i, stream in enumerate(config.streams):
        problems += _model_problems(f"streams[{i}].model", stream.model)
        for j, stage in enumerate(stream.stages):
            problems += _model_problems(f"streams[{i}].stages[{j}].model", stage.model)
        problems += _source_problems(f"streams[{i}].source", stream.source)
        for name in ("face_model", "people_model"):
            path = getattr(stream.privacy, name)
            if path is not None:
                problems += _model_file_problems(f"streams[{i}].privacy.{name}", path)
    if config.broker.tls is not None:
        problems += _tls_problems(config.broker.tls, enrolling=config.enrollment.configured)
    problems += _enrollment_problems(config.enrollment)
    return problems + key_file_problems(config)


def key_file_problems(config: AgentConfig) -> list[str]:
    """The private keys the agent would use that others may read or write: it refuses them.

    One line each, naming the file and the ``chmod`` that fixes it.
    """
    keys = [("enrollment.claim_keyfile", config.enrollment.claim_keyfile)]
    if config.broker.tls is not None:
        keys.insert(0, ("broker.tls.keyfile", config.broker.tls.keyfile))
    problems = []
    for where, path in keys:
        problem = pki.key_mode_problem(path, "the agent") if path is not None else None
        if problem is not None:
            problems.append(f"{where}: {problem}")
    return problems


def _enrollment_problems(enrollment: EnrollmentSettings) -> list[str]:
    problems = []
    for name in ("claim_certfile", "claim_keyfile", "token_file", "cafile"):
        value = getattr(enrollment, name)
        if value is not None and not value.is_file():
            problems.append(f"enrollment.{name}: no such file {value}")
    return problems


def _model_problems(where: str, model: ModelSettings) -> list[str]:
    problems = _build_problems(where, model)
    for i in range(len(model.fallbacks)):
        problems.extend(_build_problems(f"{where}.fallbacks[{i}]", model.build(i + 1)))
    if model.labels is not None:
        if not model.labels.is_file():
            problems.append(f"{where}.labels: no such file {model.labels}")
        else:
            try:
                Labels.from_file(model.labels)
            except LabelsError as exc:
                problems.append(f"{where}.labels: {exc}")
    return problems


def _build_problems(where: str, model: ModelSettings) -> list[str]:
    return _model_file_problems(f"{where}.path", model.path, cpu=model.delegate.type == "cpu")


def _model_file_problems(where: str, path: Path, *, cpu: bool = True) -> list[str]:
    """A model file that is missing, no TFLite model, or an Edge TPU file meant for the CPU."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "no such file"
        return [f"{where}: {what} {path}"]
    try:
        info = inspect_model(read_model(path))
        if info.edgetpu_compiled and cpu:
            raise ModelCompiledForEdgeTPU(path)
    except ModelError as exc:
        return [f"{where}: {exc}"]
    return []


def _source_problems(where: str, source: SourceSettings) -> list[str]:
    if isinstance(source, FileSourceSettings) and not source.path.is_file():
        what = "is not a file" if source.path.exists() else "no such file"
        return [f"{where}.path: {what} {source.path}"]
    if isinstance(source, ImageFolderSourceSettings) and not source.folder.is_dir():
        what = "is not a folder" if source.folder.exists() else "no such folder"
        return [f"{where}.folder: {what} {source.folder}"]
    if isinstance(source, V4l2SourceSettings) and not Path(source.device).exists():
        return [
            f"{where}.device: no such device {source.device}; check the camera is plugged in "
            "(v4l2-ctl --list-devices)"
        ]
    return []


def _tls_problems(tls: TlsSettings, *, enrolling: bool = False) -> list[str]:
    problems = []
    # While enrolling, the certificate and key are made at start: only the CA must be there.
    for name in ("cafile",) if enrolling else ("cafile", "certfile", "keyfile"):
        value = getattr(tls, name)
        if value is not None and not value.is_file():
            problems.append(f"broker.tls.{name}: no such file {value}")
    return problems


_SOURCE: TypeAdapter[SourceSettings] = TypeAdapter(SourceSettings)
_Resolve = Callable[[Path], Path]


def _partial_problems(data: dict[str, Any], base_dir: Path) -> list[str]:
    """The file problems of the parts that are valid on their own, in a config that is not."""

    def resolve(p: Path) -> Path:
        return p if p.is_absolute() else (base_dir / p)

    problems = []
    streams = data.get("streams")
    for i, stream in enumerate(streams if isinstance(streams, list) else []):
        if not isinstance(stream, dict):
            continue
        model = _valid_part(ModelSettings, stream.get("model"))
        if model is not None:
            model.path = resolve(model.path)
            model.labels = resolve(model.labels) if model.labels is not None else None
            problems += _model_problems(f"streams[{i}].model", model)
        try:
            source = _SOURCE.validate_python(stream.get("source"))
        except ValidationError:
            continue  # its schema problems are reported already
        problems += _source_problems(f"streams[{i}].source", _resolved_source(source, resolve))
    broker = data.get("broker")
    tls = _valid_part(TlsSettings, broker.get("tls")) if isinstance(broker, dict) else None
    if tls is not None:
        problems += _tls_problems(tls)
    return problems


_Part = TypeVar("_Part", bound=BaseModel)


def _valid_part(kind: type[_Part], value: Any) -> _Part | None:
    """``value`` as a ``kind``, or None when it is not one (its problems are reported already)."""
    try:
        return kind.model_validate(value)
    except ValidationError:
        return None


def _resolved_source(source: SourceSettings, resolve: _Resolve) -> SourceSettings:
    for attr in ("path", "folder"):
        value = getattr(source, attr, None)
        if isinstance(value, Path):  # source settings are frozen: replace, don't mutate
            source = source.model_copy(update={attr: resolve(value)})
    return source


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, for editors and docs."""
    return AgentConfig.model_json_schema()


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
