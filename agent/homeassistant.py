"""Home Assistant MQTT discovery: the device and its entities, announced under ``homeassistant/``.

Opt-in (``homeassistant.enabled``). The payloads follow Home Assistant's documentation:
https://www.home-assistant.io/integrations/mqtt/ ("MQTT Discovery": the topic
``<prefix>/<component>/[<node_id>/]<object_id>/config``, ``device``, ``origin``, an empty
retained payload removes the entity), https://www.home-assistant.io/integrations/binary_sensor.mqtt/
and https://www.home-assistant.io/integrations/sensor.mqtt/ (``state_topic``,
``value_template``, ``availability``, ``expire_after``, ``unique_id``; a value template that
renders ``None`` sets a sensor to unknown).

What a device announces, one retained config per entity (single-component discovery):

- per stream with tracking, a ``binary_sensor`` (occupancy) per configured label, and per
  label and zone: ON while at least one tracked object of that label (in that zone) is
  open, i.e. between its ``start`` and ``end`` events; without ``events.labels``, one for
  any object (and one per zone). Their state topics are the agent's own, plain ``ON`` /
  ``OFF``, retained, published when they change;
- per stream with tracking, a ``sensor`` of the tracked objects open now (its own retained
  state topic, a plain integer);
- per stream, ``sensor``s of its fps and inference latency, and for the device one of the
  CPU temperature: their state is the agent's ``health`` topic, read with a value template;
  they expire after three health intervals without one;
- per stream whose snapshot rule is on (``snapshots.on_track_start``), an ``image`` of its
  latest snapshot (https://www.home-assistant.io/integrations/image.mqtt/: the JPEG itself
  on ``image_topic``, no encoding), retained, published as the rule takes each one, so
  only redacted pixels reach it;
- availability from the retained ``status`` topic: ``online`` and ``degraded`` are
  available, ``offline`` (last will, shutdown) is not.

Every topic a device publishes here lies under ``<prefix>/<component>/<node_id>/``, the
node id being the device id (made topic-safe), so one broker ACL pattern can grant each
device its own (docs/mqtt.md). Another kind of entity is one more ``Component`` name, one
more payload model and one more ``_Builder`` method that ``discovery_plan`` calls;
``Entity.own_topic`` is the retained topic the agent publishes for it itself, None when
its state is another topic (health).

Decisions are pure: ``discovery_plan`` (config -> entities), ``OpenTracks`` (events ->
which objects are open), ``reconcile`` (what to publish and what to clear, given what was
published before). ``HomeAssistant`` does the I/O: it publishes through the agent's
``MqttLink`` (QoS 1, retained) and keeps the retained topics it published and has not
cleared yet in a small file beside the outbox (``PublishedTopics``), so a restart with
discovery disabled, a stream removed or another prefix clears what is no longer wanted.

Threads (``HomeAssistant``): ``sync`` runs on the mqtt thread at every connect and on the
thread that applies a new config (main: SIGHUP; commands: set_config); ``stream_events``
on whichever thread makes a stream; ``snapshot`` on a stream's snapshots thread; the
callback ``stream_events`` returns on that stream's events thread (and on the thread
stopping the stream, for the end events of a flush); ``_cleared`` on the mqtt thread,
inside paho's acknowledgement callback, so it takes only ``_record_lock``, which nobody
holds while publishing. Lock order: ``_sync_lock``, then ``_state_lock`` or
``_record_lock``, never both.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import AgentConfig, StreamSettings
from .durable import write_atomically
from .events import EventDraft
from .protocol import Topics

log = logging.getLogger(__name__)

MANUFACTURER = "edgefleet"
MODEL = "edgefleet-agent"
OBJECT_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
"""Home Assistant's character class for node and object ids in a discovery topic."""
PAYLOAD_ON = b"ON"
PAYLOAD_OFF = b"OFF"
# Health-based sensors turn unavailable after this many health intervals without a message.
HEALTH_INTERVALS_BEFORE_EXPIRY = 3
AVAILABLE_STATES = ("online", "degraded")
"""The status states Home Assistant shows as available (``StatusMessage.state``)."""
_NOT_AN_ID = re.compile(r"[^A-Za-z0-9_-]+")
_HASH_SUFFIX_DIGITS = 6
_TOPICS_FILE_VERSION = 1

Component = Literal["binary_sensor", "sensor", "image"]
EventsHook = Callable[[Sequence[EventDraft]], None]
"""What a stream calls with each frame's event drafts (``StreamRunner(on_events=...)``)."""


# -- the discovery payloads ------------------------------------------------------------


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceInfo(_Payload):
    """``device``: ties every entity to one device in Home Assistant's device registry."""

    identifiers: list[str] = Field(min_length=1, description="IDs that identify the device.")
    name: str = Field(description="The device's name (its device id).")
    manufacturer: str = Field(description="Who makes it.")
    model: str = Field(description="What it is.")
    sw_version: str = Field(description="The agent's version.")


class Origin(_Payload):
    """``origin``: the application that announced the entity (logged by Home Assistant)."""

    name: str = Field(description="The application's name.")
    sw_version: str = Field(description="Its version.")


class Availability(_Payload):
    """One ``availability`` entry: the agent's retained status topic."""

    topic: str = Field(description="The status topic.")
    value_template: str = Field(description="Maps the status JSON to online / offline.")
    payload_available: str = Field("online", description="What the template renders when up.")
    payload_not_available: str = Field("offline", description="What it renders when down.")


class EntityConfig(_Payload):
    """The options every entity's discovery payload carries."""

    name: str = Field(description="Entity name; Home Assistant prefixes the device's.")
    unique_id: str = Field(pattern=OBJECT_ID_PATTERN, description="Unique across devices.")
    qos: int = Field(1, description="QoS Home Assistant subscribes with.")
    availability: list[Availability] = Field(description="When the entity is available.")
    entity_category: Literal["diagnostic"] | None = Field(None, description="Diagnostics.")
    device: DeviceInfo = Field(description="The device it belongs to.")
    origin: Origin = Field(description="Who announced it.")


class StateConfig(EntityConfig):
    """The options of an entity with a state (the sensors)."""

    state_topic: str = Field(description="Where the entity's state is published.")
    value_template: str | None = Field(None, description="Extracts the state from JSON.")
    expire_after: int | None = Field(None, gt=0, description="Seconds before a state expires.")


class ImageConfig(EntityConfig):
    """An ``image``: a stream's latest snapshot."""

    image_topic: str = Field(description="Where the JPEG is published, as it is (no encoding).")
    content_type: Literal["image/jpeg"] = Field("image/jpeg", description="Its MIME type.")


class BinarySensorConfig(StateConfig):
    """A ``binary_sensor``: occupancy of a label (and zone) on a stream."""

    device_class: Literal["occupancy"] = Field("occupancy", description="Occupancy.")
    payload_on: str = Field(PAYLOAD_ON.decode(), description="The state while occupied.")
    payload_off: str = Field(PAYLOAD_OFF.decode(), description="The state while not.")


class SensorConfig(StateConfig):
    """A ``sensor``: a number (objects open, fps, latency, temperature)."""

    device_class: Literal["duration", "temperature"] | None = Field(None, description="Kind.")
    unit_of_measurement: str | None = Field(None, description="Unit of the state.")
    state_class: Literal["measurement"] = Field("measurement", description="A measurement.")
    suggested_display_precision: int | None = Field(None, ge=0, description="Decimals shown.")


# -- which tracked objects are open --------------------------------------------------


@dataclass(frozen=True)
class _OpenTrack:
    label: str
    zones: frozenset[str]


class OpenTracks:
    """The tracked objects of one stream that are open now, from its events. Pure.

    A ``start`` opens a track, an ``update`` carries its zones as they are now, an ``end``
    closes it; untracked events change nothing.
    """

    def __init__(self) -> None:
        self._open: dict[int, _OpenTrack] = {}

    def apply(self, drafts: Iterable[EventDraft]) -> None:
        """Follow one frame's events, in order."""
        for draft in drafts:
            if draft.lifecycle is None or draft.track_id is None or draft.label is None:
                continue
            if draft.lifecycle == "end":
                self._open.pop(draft.track_id, None)
            else:
                self._open[draft.track_id] = _OpenTrack(draft.label, frozenset(draft.zones))

    def count(self, *, label: str | None = None, zone: str | None = None) -> int:
        """Open tracks of ``label`` (None: any) in ``zone`` (None: anywhere in the frame)."""
        return sum(
            1
            for track in self._open.values()
            if (label is None or track.label == label) and (zone is None or zone in track.zones)
        )


@dataclass(frozen=True)
class TrackState:
    """An entity whose state the agent derives from one stream's open tracks."""

    stream: str
    label: str | None = None
    """None: objects of any label."""
    zone: str | None = None
    """None: anywhere in the frame."""
    count: bool = False
    """True: the number of open tracks; False: ON while at least one is open, else OFF."""

    def payload(self, tracks: OpenTracks) -> bytes:
        """The state to publish for ``tracks``."""
        open_now = tracks.count(label=self.label, zone=self.zone)
        if self.count:
            return str(open_now).encode()
        return PAYLOAD_ON if open_now else PAYLOAD_OFF


# -- the plan: every entity of a device ---------------------------------------------


@dataclass(frozen=True)
class Entity:
    """One Home Assistant entity: where its config goes and how its state is made."""

    component: Component
    object_id: str
    config: EntityConfig
    state: TrackState | None = None
    """How the agent derives the state it publishes on ``own_topic`` from the tracks."""
    own_topic: str | None = None
    """The retained topic the agent publishes for this entity itself (its state, its
    image); None: its state is another topic the agent publishes (health)."""
    snapshots_of: str | None = None
    """The stream whose rule's snapshots go to ``own_topic`` (an image)."""

    @property
    def payload(self) -> bytes:
        """The discovery payload (JSON, unset options left out)."""
        return self.config.model_dump_json(exclude_none=True).encode()


def entity_topic(prefix: str, component: Component, node_id: str, object_id: str) -> str:
    """``<prefix>/<component>/<node_id>/<object_id>``: under it the config and own state."""
    return f"{prefix}/{component}/{node_id}/{object_id}"


@dataclass(frozen=True)
class DiscoveryPlan:
    """What a device announces to Home Assistant (nothing when discovery is off)."""

    prefix: str
    node_id: str
    entities: tuple[Entity, ...] = ()

    def config_topic(self, entity: Entity) -> str:
        """``<prefix>/<component>/<node_id>/<object_id>/config``."""
        base = entity_topic(self.prefix, entity.component, self.node_id, entity.object_id)
        return f"{base}/config"

    @property
    def configs(self) -> dict[str, bytes]:
        """Config topic -> discovery payload, for every entity."""
        return {self.config_topic(e): e.payload for e in self.entities}

    @property
    def retained_topics(self) -> frozenset[str]:
        """Every retained topic the plan publishes: the configs and the agent's own states
        and images."""
        own = {e.own_topic for e in self.entities if e.own_topic is not None}
        return frozenset(self.configs) | own

    @property
    def streams(self) -> list[str]:
        """The streams whose tracks some entity follows, in config order."""
        names = (e.state.stream for e in self.entities if e.state is not None)
        return list(dict.fromkeys(names))

    def states(self, stream: str, tracks: OpenTracks) -> dict[str, bytes]:
        """State topic -> payload, for the entities that follow ``stream``'s tracks."""
        return {
            e.own_topic: e.state.payload(tracks)
            for e in self.entities
            if e.state is not None and e.own_topic is not None and e.state.stream == stream
        }

    def image_topic(self, stream: str) -> str | None:
        """Where ``stream``'s snapshots go for Home Assistant, if anywhere."""
        return next((e.own_topic for e in self.entities if e.snapshots_of == stream), None)


def topic_id(text: str) -> str:
    """``text`` as a node or object id: characters outside ``[A-Za-z0-9_-]`` become ``_``."""
    return _NOT_AN_ID.sub("_", text).strip("_") or "_"


class _Builder:
    """Makes the entities of one device, in config order; ``discovery_plan`` uses it."""

    def __init__(self, config: AgentConfig, agent_version: str) -> None:
        self.config = config
        self.prefix = config.homeassistant.discovery_prefix
        self.node_id = topic_id(config.device_id)
        self.topics = Topics(config.device_id, config.broker.topic_root)
        self.entities: list[Entity] = []
        self._ids: set[str] = set()
        self.availability = [
            Availability(
                topic=self.topics.status,
                value_template="{{ 'online' if value_json.state in "
                f"{list(AVAILABLE_STATES)!r} else 'offline' }}}}",
            )
        ]
        self.device = DeviceInfo(
            identifiers=[f"edgefleet_{config.device_id}"],
            name=config.device_id,
            manufacturer=MANUFACTURER,
            model=MODEL,
            sw_version=agent_version,
        )
        self.origin = Origin(name=MANUFACTURER, sw_version=agent_version)

    def object_id(self, wanted: str, name: str) -> str:
        """``wanted`` as an object id, with a hash of ``name`` where another took it (ids of
        ``a b`` and ``a_b`` come out equal)."""
        object_id = topic_id(wanted)
        if object_id in self._ids:
            digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_SUFFIX_DIGITS]
            object_id = f"{object_id}_{digest}"
        self._ids.add(object_id)
        return object_id

    def unique_id(self, object_id: str) -> str:
        return f"edgefleet_{self.node_id}_{object_id}"

    def shared(self, name: str, object_id: str) -> dict[str, Any]:
        """The options every entity's config carries besides its own."""
        return {
            "name": name,
            "unique_id": self.unique_id(object_id),
            "availability": self.availability,
            "device": self.device,
            "origin": self.origin,
        }

    def own_topic(self, component: Component, object_id: str, what: str) -> str:
        return f"{entity_topic(self.prefix, component, self.node_id, object_id)}/{what}"

    def add_occupancy(self, state: TrackState) -> None:
        what = state.label or "occupancy"
        name = f"{state.stream} {what}" + (f" in {state.zone}" if state.zone else "")
        where = f"_in_{state.zone}" if state.zone is not None else ""
        object_id = self.object_id(f"{state.stream}_{state.label or 'any'}{where}_occupancy", name)
        topic = self.own_topic("binary_sensor", object_id, "state")
        config = BinarySensorConfig(
            **self.shared(name, object_id),
            state_topic=topic,
        )
        self.entities.append(Entity("binary_sensor", object_id, config, state, topic))

    def add_object_count(self, stream: str) -> None:
        name = f"{stream} objects"
        object_id = self.object_id(f"{stream}_objects", name)
        topic = self.own_topic("sensor", object_id, "state")
        config = SensorConfig(
            **self.shared(name, object_id),
            state_topic=topic,
            suggested_display_precision=0,
        )
        count = TrackState(stream, count=True)
        self.entities.append(Entity("sensor", object_id, config, count, topic))

    def add_snapshot_image(self, stream: str) -> None:
        name = f"{stream} snapshot"
        object_id = self.object_id(f"{stream}_snapshot", name)
        topic = self.own_topic("image", object_id, "image")
        config = ImageConfig(
            **self.shared(name, object_id),
            image_topic=topic,
        )
        image = Entity("image", object_id, config, own_topic=topic, snapshots_of=stream)
        self.entities.append(image)

    def add_health_sensor(
        self,
        wanted_id: str,
        name: str,
        path: str,
        *,
        device_class: Literal["duration", "temperature"] | None = None,
        unit: str | None = None,
    ) -> None:
        """A sensor read from the health message at ``path`` (a Jinja expression on
        ``value_json``); a value the message leaves out renders None, which is unknown."""
        object_id = self.object_id(wanted_id, name)
        config = SensorConfig(
            **self.shared(name, object_id),
            state_topic=self.topics.health,
            value_template=f"{{{{ {path} | default(None) }}}}",
            expire_after=math.ceil(HEALTH_INTERVALS_BEFORE_EXPIRY * self.config.health.interval_s),
            entity_category="diagnostic",
            device_class=device_class,
            unit_of_measurement=unit,
            suggested_display_precision=1,
        )
        self.entities.append(Entity("sensor", object_id, config))

    def add_stream(self, stream: StreamSettings) -> None:
        name = stream.name
        if stream.events.tracking.enabled:
            for state in _occupancy_states(stream):
                self.add_occupancy(state)
            self.add_object_count(name)
        if stream.snapshots.on_track_start:
            self.add_snapshot_image(name)
        in_health = f"(value_json.streams['{name}'] | default({{}}))"
        self.add_health_sensor(f"{name}_fps", f"{name} fps", f"{in_health}.fps", unit="fps")
        self.add_health_sensor(
            f"{name}_inference_latency",
            f"{name} inference latency",
            f"{in_health}.inference_p50_ms",
            device_class="duration",
            unit="ms",
        )

    def add_device(self) -> None:
        self.add_health_sensor(
            "cpu_temperature",
            "CPU temperature",
            "value_json.system.cpu_temperature_c",
            device_class="temperature",
            unit="°C",
        )


def _occupancy_states(stream: StreamSettings) -> list[TrackState]:
    """One per configured label (any label when none are), and per label and zone."""
    configured = stream.events.labels
    labels: list[str | None] = [None] if configured is None else list(configured)
    zones: list[str | None] = [None, *(zone.name for zone in stream.events.zones)]
    return [TrackState(stream.name, label, zone) for label in labels for zone in zones]


def discovery_plan(config: AgentConfig, *, agent_version: str) -> DiscoveryPlan:
    """The entities ``config`` announces: none with discovery off."""
    builder = _Builder(config, agent_version)
    if config.homeassistant.enabled:
        for stream in config.streams:
            builder.add_stream(stream)
        builder.add_device()
    return DiscoveryPlan(builder.prefix, builder.node_id, tuple(builder.entities))


# -- what to publish, what to clear ----------------------------------------------------


@dataclass(frozen=True)
class Reconciliation:
    """One pass of announcing a plan, given the retained topics published before."""

    record: frozenset[str]
    """To write down before publishing: every retained topic that may be on the broker."""
    publish: dict[str, bytes]
    """Config topic -> discovery payload."""
    clear: frozenset[str]
    """Retained topics published before that the plan no longer wants: emptied."""


def reconcile(plan: DiscoveryPlan, published: Iterable[str]) -> Reconciliation:
    """What announcing ``plan`` takes when ``published`` are on the broker from before."""
    before = frozenset(published)
    wanted = plan.retained_topics
    return Reconciliation(record=before | wanted, publish=plan.configs, clear=before - wanted)


# -- the record of what was published --------------------------------------------------


class _TopicsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = _TOPICS_FILE_VERSION
    topics: list[str]


class PublishedTopics:
    """The retained topics discovery published and did not clear yet: a JSON file, replaced
    atomically. A missing file is nothing published; an unreadable one is that, with a
    warning (what it named stays on the broker until cleared by hand)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._write_problem: str | None = None

    def load(self) -> set[str]:
        """The topics recorded, or none."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return set()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read %s (%s): %s", self.path, exc, _STALE_HINT)
            return set()
        try:
            return set(_TopicsFile.model_validate_json(text).topics)
        except ValidationError as exc:
            log.warning("%s is damaged (%s): %s", self.path, _first_error(exc), _STALE_HINT)
            return set()

    def save(self, topics: Iterable[str]) -> None:
        """Replace the record; a failure (disk full) is logged once, the topics kept in memory."""
        content = _TopicsFile(topics=sorted(topics)).model_dump_json(indent=1).encode()
        try:
            write_atomically(self.path, content)
        except OSError as exc:
            problem = exc.strerror or str(exc)
            if problem != self._write_problem:
                log.warning(
                    "cannot write %s (%s): a restart may not clear the Home Assistant "
                    "topics published since",
                    self.path,
                    problem,
                )
            self._write_problem = problem
            return
        self._write_problem = None


_STALE_HINT = (
    "Home Assistant topics published before cannot be cleared by the agent; clear any left "
    "under the discovery prefix by hand (an empty retained message on each config topic)"
)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "the file"
    return f"{where}: {error['msg']}"


# -- the I/O --------------------------------------------------------------------------


class Link(Protocol):
    """What discovery needs of the broker connection (``MqttLink``)."""

    @property
    def connected(self) -> bool:
        """Whether the broker accepted the connection."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool = False,
        on_ack: Callable[[], None] | None = None,
    ) -> bool:
        """Hand a message over; ``on_ack`` runs once the broker has it."""


class HomeAssistant:
    """Announces the device to Home Assistant and publishes the states the agent derives."""

    def __init__(
        self, config: AgentConfig, link: Link, *, agent_version: str, state_file: Path
    ) -> None:
        self._link = link
        self._agent_version = agent_version
        self._plan = discovery_plan(config, agent_version=agent_version)
        self._record = PublishedTopics(state_file)
        self._sync_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._tracks: dict[str, OpenTracks] = {}  # per stream, of the runner that counts
        self._owners: dict[str, int] = {}  # per stream, the run number of that runner
        self._runs = 0
        self._sent: dict[str, bytes] = {}  # state topic -> last payload published
        self._record_lock = threading.Lock()
        self._recorded = self._record.load()
        self._wanted = self._plan.retained_topics
        self._clearing: set[str] = set()
        self._cleared_count = 0

    def apply(self, config: AgentConfig) -> None:
        """Announce what ``config`` asks for from now on, clearing what it no longer does."""
        plan = discovery_plan(config, agent_version=self._agent_version)
        streams = {s.name for s in config.streams}
        with self._sync_lock:
            changed = plan != self._plan
            with self._state_lock:
                self._plan = plan
                self._tracks = {n: t for n, t in self._tracks.items() if n in streams}
                self._owners = {n: r for n, r in self._owners.items() if n in streams}
            with self._record_lock:
                self._wanted = plan.retained_topics
        if changed:
            self.sync()

    def sync(self) -> None:
        """Publish every config and state, clear the stale topics. At every connect."""
        with self._sync_lock:
            if not self._link.connected:
                return  # the next connect does it
            plan = self._plan
            with self._record_lock:
                step = reconcile(plan, self._recorded)
                self._remember(step.record)  # before publishing: a crash after knows them
                self._clearing = set(step.clear)
                self._cleared_count = len(step.clear)
            for topic, payload in step.publish.items():
                self._link.publish(topic, payload, qos=1, retain=True)
            with self._state_lock:
                self._sent.clear()
                for stream in plan.streams:
                    self._publish_states(stream)
            for topic in sorted(step.clear):
                self._link.publish(
                    topic, b"", qos=1, retain=True, on_ack=partial(self._cleared, topic)
                )
        if plan.entities or step.clear:
            log.info(
                "Home Assistant discovery: %d entities under %s/ (node %s), %d stale "
                "topic(s) to clear",
                len(plan.entities),
                plan.prefix,
                plan.node_id,
                len(step.clear),
            )

    def stream_events(self, stream: str) -> EventsHook:
        """What a new runner of ``stream`` calls with each frame's events.

        The runner's tracks count from its first call on; the calls of a runner made before
        it (replaced, stopping) change nothing from then on. Until then the older runner's
        count, whose flush at stop ends every track it had open.
        """
        tracks = OpenTracks()
        with self._state_lock:
            self._runs += 1
            run = self._runs

        def on_events(drafts: Sequence[EventDraft]) -> None:  # the stream's events thread
            with self._state_lock:
                owner = self._owners.get(stream, 0)
                if run < owner:
                    return
                if run > owner:
                    self._owners[stream] = run
                    self._tracks[stream] = tracks
                tracks.apply(drafts)
                self._publish_states(stream)

        return on_events

    def snapshot(self, stream: str, jpeg: bytes) -> None:
        """Show ``jpeg`` (redacted) as ``stream``'s latest snapshot, if discovery has an image
        entity for it. The stream's snapshots thread."""
        with self._state_lock:
            topic = self._plan.image_topic(stream)
            if topic is not None and self._link.connected:
                self._link.publish(topic, jpeg, qos=1, retain=True)

    def _publish_states(self, stream: str) -> None:  # under _state_lock
        if not self._link.connected:
            return  # the next connect publishes the state as it is then
        tracks = self._tracks.get(stream) or OpenTracks()
        for topic, payload in self._plan.states(stream, tracks).items():
            if self._sent.get(topic) != payload:
                self._link.publish(topic, payload, qos=1, retain=True)
                self._sent[topic] = payload

    def _remember(self, topics: Iterable[str]) -> None:  # under _record_lock
        topics = set(topics)
        if topics != self._recorded:
            self._recorded = topics
            self._record.save(topics)

    def _cleared(self, topic: str) -> None:  # mqtt thread, in paho's acknowledgement callback
        with self._record_lock:
            if topic not in self._clearing:
                return
            self._clearing.discard(topic)
            if topic not in self._wanted:  # wanted again meanwhile: published again
                self._recorded.discard(topic)
            if self._clearing:
                return
            self._record.save(self._recorded)
            count = self._cleared_count
        log.info("Home Assistant discovery: cleared %d retained topic(s)", count)


def state_file(config: AgentConfig) -> Path:
    """Where the record of published topics lives: beside the outbox."""
    return config.outbox.path.with_name("homeassistant.json")
