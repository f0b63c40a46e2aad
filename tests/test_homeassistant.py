"""Home Assistant MQTT discovery: the payloads, the occupancy it derives, what it clears.

The schema models below are Home Assistant's documented options for what the agent
announces, from its documentation pages:
https://www.home-assistant.io/integrations/mqtt/#discovery-messages (the discovery topic,
``device``, ``origin``, empty retained payloads remove an entity),
https://www.home-assistant.io/integrations/binary_sensor.mqtt/,
https://www.home-assistant.io/integrations/sensor.mqtt/ and
https://www.home-assistant.io/integrations/image.mqtt/ (their "Configuration Variables").
Unknown keys are refused here although Home Assistant ignores them: a misspelt option would
be silently ignored there.
"""

from __future__ import annotations

import json
import logging
import re
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import pytest
from agentproc import AgentProcess, wait_until
from broker import Mosquitto, MqttProbe, Received
from conftest import Assets
from pydantic import BaseModel, ConfigDict, Field, model_validator
from test_agent import ROOT, agent_config, events, healths, statuses, subscriber

from edgefleet.agent.config import AgentConfig, ConfigError, parse_config
from edgefleet.agent.events import EventDraft
from edgefleet.agent.homeassistant import (
    AVAILABLE_STATES,
    DiscoveryPlan,
    OpenTracks,
    PublishedTopics,
    StateConfig,
    discovery_plan,
    reconcile,
)
from edgefleet.agent.protocol import (
    HealthMessage,
    MqttHealth,
    OutboxHealth,
    StatusMessage,
    StreamHealth,
    SystemHealth,
)

PREFIX = "homeassistant"
VERSION = "1.2.3"
CONFIG_TOPIC = re.compile(
    rf"^{PREFIX}/(binary_sensor|sensor|image)/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/config$"
)
LEFT_HALF = {"name": "left", "polygon": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]}
END_MARKER = f"{PREFIX}/zz-test/end-of-retained"


# -- Home Assistant's documented schema ----------------------------------------------


class _Documented(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HaAvailability(_Documented):
    topic: str
    payload_available: str = "online"
    payload_not_available: str = "offline"
    value_template: str | None = None


class HaDevice(_Documented):
    configuration_url: str | None = None
    connections: list[list[str]] | None = None
    hw_version: str | None = None
    identifiers: list[str] | str | None = None
    manufacturer: str | None = None
    model: str | None = None
    model_id: str | None = None
    name: str | None = None
    serial_number: str | None = None
    suggested_area: str | None = None
    sw_version: str | None = None
    via_device: str | None = None

    @model_validator(mode="after")
    def _identified(self) -> HaDevice:
        assert self.identifiers or self.connections, "identifiers or connections"
        return self


class HaOrigin(_Documented):
    name: str
    sw_version: str | None = None
    support_url: str | None = None


class HaEntity(_Documented):
    """The options every entity the agent announces shares."""

    availability: list[HaAvailability] | None = None
    availability_mode: Literal["all", "any", "latest"] | None = None
    availability_template: str | None = None
    availability_topic: str | None = None
    device: HaDevice | None = None
    enabled_by_default: bool | None = None
    encoding: str | None = None
    entity_category: Literal["diagnostic", "config"] | None = None
    entity_picture: str | None = None
    icon: str | None = None
    json_attributes_template: str | None = None
    json_attributes_topic: str | None = None
    name: str | None = None
    object_id: str | None = None
    origin: HaOrigin | None = None
    payload_available: str | None = None
    payload_not_available: str | None = None
    qos: Literal[0, 1, 2] | None = None
    unique_id: str | None = None

    @model_validator(mode="after")
    def _one_way_to_availability(self) -> HaEntity:
        assert self.availability is None or self.availability_topic is None
        return self

    @property
    def topic(self) -> str:
        """The topic the entity's state (or image) comes on."""
        raise NotImplementedError


class HaStateEntity(HaEntity):
    """binary_sensor and sensor: ``state_topic`` is the required option."""

    expire_after: int | None = Field(None, ge=0)
    force_update: bool | None = None
    state_topic: str
    value_template: str | None = None

    @property
    def topic(self) -> str:
        return self.state_topic


class HaBinarySensor(HaStateEntity):
    device_class: str | None = None
    off_delay: int | None = None
    payload_off: str = "OFF"
    payload_on: str = "ON"


class HaSensor(HaStateEntity):
    device_class: str | None = None
    last_reset_value_template: str | None = None
    options: list[str] | None = None
    state_class: Literal["measurement", "total", "total_increasing"] | None = None
    suggested_display_precision: int | None = None
    unit_of_measurement: str | None = None


class HaImage(HaEntity):
    """image: the picture on ``image_topic`` (raw bytes, or base64 with ``image_encoding``),
    or a URL on ``url_topic``; exactly one of the two."""

    content_type: str = "image/jpeg"
    image_encoding: Literal["b64"] | None = None
    image_topic: str | None = None
    url_template: str | None = None
    url_topic: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> HaImage:
        assert (self.image_topic is None) != (self.url_topic is None), "image_topic or url_topic"
        return self

    @property
    def topic(self) -> str:
        return self.image_topic or self.url_topic or ""


SCHEMAS: dict[str, type[HaEntity]] = {
    "binary_sensor": HaBinarySensor,
    "sensor": HaSensor,
    "image": HaImage,
}


def check_discovery_payload(topic: str, payload: bytes) -> HaEntity:
    """``payload`` on ``topic`` as Home Assistant documents it, plus what the agent promises
    on top: a unique id (the device registry needs it), a device, an origin, availability."""
    match = CONFIG_TOPIC.match(topic)
    assert match, f"{topic} is not <prefix>/<component>/<node_id>/<object_id>/config"
    entity = SCHEMAS[match.group(1)].model_validate_json(payload)
    assert entity.unique_id
    assert entity.device is not None
    assert entity.device.name
    assert entity.origin is not None
    assert entity.availability
    return entity


# -- helpers -----------------------------------------------------------------------


def stream(name: str = "door", **events: Any) -> dict[str, Any]:
    """A stream config; the files are never opened by the plan."""
    return {
        "name": name,
        "source": {"type": "synthetic"},
        "model": {"path": "detect.tflite"},
        "events": events,
    }


def config(*streams: dict[str, Any], enabled: bool = True, **overrides: Any) -> AgentConfig:
    data = {
        "device_id": "shop-7",
        "streams": list(streams) or [stream(labels=["person"])],
        "homeassistant": {"enabled": enabled},
        **overrides,
    }
    return parse_config(data, "agent.yaml", base_dir=Path("/nonexistent"))


def plan(*streams: dict[str, Any], **overrides: Any) -> DiscoveryPlan:
    return discovery_plan(config(*streams, **overrides), agent_version=VERSION)


def names(p: DiscoveryPlan) -> list[tuple[str, str]]:
    return [(e.component, e.config.name) for e in p.entities]


def track(
    lifecycle: str | None, track_id: int | None, label: str = "person", *zones: str
) -> EventDraft:
    return EventDraft(
        kind="detection",
        lifecycle=lifecycle,  # type: ignore[arg-type]
        track_id=track_id,
        label=label,
        score=0.9,
        zones=zones,
        results=(),
        first_seen_ts=1.0,
        capture_ts=1.0,
    )


def json_path(template: str) -> list[str]:
    """The fields a value template reads from ``value_json``, e.g. ['system', 'load_1m'],
    for the templates the agent writes (``default`` filters and parentheses left out)."""
    expression = template.strip().removeprefix("{{").removesuffix("}}")
    expression = re.sub(r"\|\s*default\([^()]*\)", "", expression)
    expression = expression.replace("(", "").replace(")", "").replace(" ", "")
    assert expression.startswith("value_json"), template
    steps = re.findall(r"\.(\w+)|\['([^']*)'\]", expression.removeprefix("value_json"))
    return [attribute or key for attribute, key in steps]


def lookup(document: Any, path: list[str]) -> Any:
    for step in path:
        assert isinstance(document, dict), f"{step} of {path}"
        assert step in document, f"{step} of {path}"
        document = document[step]
    return document


def available_states(template: str) -> set[str]:
    """The status states an availability template of the agent's shape maps to online."""
    listed = re.search(r"value_json\.state in \[([^\]]*)\]", template)
    assert listed, template
    return {s.strip().strip("'") for s in listed.group(1).split(",")}


# -- the entities -----------------------------------------------------------------------


def test_each_label_and_each_label_in_a_zone_of_a_tracked_stream_is_an_occupancy_sensor() -> None:
    announced = plan(stream(labels=["person", "car"], zones=[LEFT_HALF]))

    assert names(announced) == [
        ("binary_sensor", "door person"),
        ("binary_sensor", "door person in left"),
        ("binary_sensor", "door car"),
        ("binary_sensor", "door car in left"),
        ("sensor", "door objects"),
        ("sensor", "door fps"),
        ("sensor", "door inference latency"),
        ("sensor", "CPU temperature"),
    ]
    occupancy = [e for e in announced.entities if e.component == "binary_sensor"]
    assert {e.config.device_class for e in occupancy} == {"occupancy"}  # type: ignore[attr-defined]


def test_a_stream_without_labels_has_one_occupancy_for_any_object_and_one_per_zone() -> None:
    announced = plan(stream(zones=[LEFT_HALF]))

    assert names(announced)[:2] == [
        ("binary_sensor", "door occupancy"),
        ("binary_sensor", "door occupancy in left"),
    ]


def test_an_untracked_stream_announces_only_its_fps_and_latency() -> None:
    announced = plan(stream(labels=["person"], tracking={"enabled": False}))

    assert names(announced) == [
        ("sensor", "door fps"),
        ("sensor", "door inference latency"),
        ("sensor", "CPU temperature"),
    ]


def test_a_stream_whose_rule_takes_snapshots_has_an_image_of_the_latest_one() -> None:
    announced = plan({**stream(labels=["person"]), "snapshots": {"on_track_start": True}})

    (image,) = [e for e in announced.entities if e.component == "image"]
    assert image.config.name == "door snapshot"
    entity = check_discovery_payload(announced.config_topic(image), image.payload)
    assert isinstance(entity, HaImage)
    assert entity.image_topic == image.own_topic == announced.image_topic("door")
    assert (entity.content_type, entity.image_encoding) == ("image/jpeg", None)  # raw JPEG
    assert image.own_topic in announced.retained_topics
    assert plan(stream(labels=["person"])).image_topic("door") is None


def test_turning_the_rule_off_clears_the_image_and_the_picture_it_kept() -> None:
    before = plan({**stream(labels=["person"]), "snapshots": {"on_track_start": True}})
    (image,) = [e for e in before.entities if e.component == "image"]

    step = reconcile(plan(stream(labels=["person"])), before.retained_topics)

    assert step.clear == {before.config_topic(image), image.own_topic}


def test_discovery_off_announces_nothing() -> None:
    announced = plan(enabled=False)

    assert announced.entities == ()
    assert announced.retained_topics == frozenset()


def test_every_discovery_payload_follows_home_assistant_schema() -> None:
    announced = plan(stream(labels=["person"], zones=[LEFT_HALF]), stream("yard"))

    for topic, payload in announced.configs.items():
        check_discovery_payload(topic, payload)
    unique_ids = [e.config.unique_id for e in announced.entities]
    assert len(set(unique_ids)) == len(unique_ids)


def test_every_entity_is_available_while_the_status_says_online_or_degraded() -> None:
    status_states = StatusMessage.model_json_schema()["properties"]["state"]["enum"]

    for entity in plan().entities:
        (availability,) = entity.config.availability
        assert availability.topic == "edgefleet/v1/shop-7/status"
        assert available_states(availability.value_template) == {"online", "degraded"}
        assert availability.payload_available == "online"
        assert availability.payload_not_available == "offline"
    assert set(AVAILABLE_STATES) < set(status_states) == {"online", "degraded", "offline"}


def test_health_sensors_read_fields_the_health_message_has() -> None:
    health = HealthMessage(
        device_id="shop-7",
        ts=1.0,
        uptime_s=1.0,
        streams={
            "door": StreamHealth(
                state="running",
                captured=1,
                processed=1,
                skipped=0,
                failed=0,
                events=0,
                events_lost=0,
                fps=9.5,
                inference_p50_ms=8.2,
                source_failures=0,
            )
        },
        outbox=OutboxHealth(depth=0, dropped=0),
        mqtt=MqttHealth(connected=True, reconnects=0, published=0),
        system=SystemHealth(cpu_percent=1.0, rss_mb=80.0, cpu_temperature_c=51.5, load_1m=0.3),
        models=[],
    )
    document = json.loads(health.model_dump_json(exclude_none=True))
    from_health = {
        e.config.name: lookup(document, json_path(e.config.value_template or ""))
        for e in plan().entities
        if isinstance(e.config, StateConfig)
        and e.config.state_topic == "edgefleet/v1/shop-7/health"
    }

    assert from_health == {"door fps": 9.5, "door inference latency": 8.2, "CPU temperature": 51.5}
    for entity in plan().entities:
        if isinstance(entity.config, StateConfig) and entity.config.state_topic.endswith("/health"):
            assert entity.config.expire_after == 3 * 30  # three health intervals


def test_ids_are_home_assistant_characters_and_ids_that_come_out_equal_stay_distinct() -> None:
    announced = plan(stream("cam.1", labels=["traffic light", "traffic_light"]), device_id="shop.7")

    topics = list(announced.configs)
    assert len(set(topics)) == len(topics) == len(announced.entities)
    assert all(CONFIG_TOPIC.match(t) for t in topics)
    assert all("/shop_7/" in t for t in topics)
    assert len({e.config.unique_id for e in announced.entities}) == len(topics)
    states = [e.own_topic for e in announced.entities if e.own_topic is not None]
    assert len(set(states)) == len(states)


def test_another_prefix_moves_every_topic_the_agent_announces_itself() -> None:
    announced = plan(homeassistant={"enabled": True, "discovery_prefix": "ha/site-2"})

    assert all(t.startswith("ha/site-2/") for t in announced.retained_topics)


def test_a_prefix_with_wildcards_is_refused() -> None:
    with pytest.raises(ConfigError, match="discovery_prefix"):
        config(homeassistant={"enabled": True, "discovery_prefix": "home/#"})


# -- what is published and cleared ------------------------------------------------


def test_reconcile_clears_what_was_published_and_is_no_longer_wanted() -> None:
    before = plan(stream(labels=["person"]), stream("yard", labels=["car"]))
    after = plan(stream(labels=["person"]))

    step = reconcile(after, before.retained_topics)

    assert step.publish == after.configs
    assert step.clear == before.retained_topics - after.retained_topics
    assert step.clear
    assert all("/yard_" in t for t in step.clear)
    assert step.record == before.retained_topics


def test_reconcile_with_discovery_off_clears_everything_published() -> None:
    before = plan(stream(labels=["person"], zones=[LEFT_HALF]))

    step = reconcile(plan(enabled=False), before.retained_topics)

    assert step.publish == {}
    assert step.clear == before.retained_topics


# -- occupancy -----------------------------------------------------------------------


def test_a_label_is_occupied_while_at_least_one_of_its_tracks_is_open() -> None:
    tracks = OpenTracks()
    seen = []
    for frame in (
        [track("start", 1)],
        [track("start", 2), track("start", 3, "car")],
        [track("update", 1), track("end", 2)],
        [track("end", 1)],
        [track("end", 3, "car")],
    ):
        tracks.apply(frame)
        seen.append((tracks.count(label="person"), tracks.count(label="car"), tracks.count()))

    assert seen == [(1, 0, 1), (2, 1, 3), (1, 1, 2), (0, 1, 1), (0, 0, 0)]


def test_zone_occupancy_follows_the_zones_each_event_of_the_track_reports() -> None:
    tracks = OpenTracks()

    tracks.apply([track("start", 1, "person", "left")])
    in_left_at_start = tracks.count(label="person", zone="left")
    tracks.apply([track("update", 1, "person", "right")])

    assert in_left_at_start == 1
    assert tracks.count(label="person", zone="left") == 0
    assert tracks.count(label="person", zone="right") == 1


def test_untracked_events_and_the_end_of_an_unknown_track_change_nothing() -> None:
    tracks = OpenTracks()
    untracked = EventDraft("detection", None, None, "person", 0.9, (), (), None, 1.0)

    tracks.apply([untracked, track("end", 7)])

    assert tracks.count() == 0


def test_the_occupancy_states_are_on_off_and_the_object_count_a_number() -> None:
    announced = plan(stream(labels=["person"], zones=[LEFT_HALF]))
    tracks = OpenTracks()
    tracks.apply([track("start", 1, "person", "left"), track("start", 2)])

    states = {t.split("/")[-2]: v for t, v in announced.states("door", tracks).items()}

    assert states == {
        "door_person_occupancy": b"ON",
        "door_person_in_left_occupancy": b"ON",
        "door_objects": b"2",
    }
    assert (
        announced.states("door", OpenTracks())["homeassistant/sensor/shop-7/door_objects/state"]
        == b"0"
    )


# -- the record of published topics ---------------------------------------------


def test_the_published_topics_survive_a_restart_in_their_file(tmp_path: Path) -> None:
    path = tmp_path / "homeassistant.json"

    PublishedTopics(path).save({"homeassistant/sensor/a/b/config", "x/y"})

    assert PublishedTopics(path).load() == {"homeassistant/sensor/a/b/config", "x/y"}
    assert [p.name for p in tmp_path.iterdir()] == ["homeassistant.json"]


def test_a_missing_file_is_nothing_published(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        loaded = PublishedTopics(tmp_path / "homeassistant.json").load()

    assert loaded == set()
    assert caplog.records == []


@pytest.mark.parametrize(
    "damage", [b'{"topics": ["a"', b"[1, 2]", b"\xff\xfe garbage", b'{"topics": [3]}']
)
def test_a_damaged_file_is_nothing_published_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: bytes
) -> None:
    path = tmp_path / "homeassistant.json"
    path.write_bytes(damage)

    with caplog.at_level(logging.WARNING):
        loaded = PublishedTopics(path).load()

    assert loaded == set()
    (warning,) = caplog.records
    assert str(path) in warning.getMessage()
    assert "by hand" in warning.getMessage()


# -- end to end: a real agent and broker --------------------------------------------


def discovery_config(assets: Assets, port: int, workdir: Path, **overrides: Any) -> dict[str, Any]:
    """The kite video with discovery on; events for person and kite, a zone on the left."""
    config = agent_config(assets, port, workdir, **overrides)
    config["homeassistant"] = {"enabled": True}
    config["streams"][0]["events"]["zones"] = [LEFT_HALF]
    return config


def expected_plan(config: dict[str, Any]) -> DiscoveryPlan:
    parsed = parse_config(json.loads(json.dumps(config)), "test", base_dir=Path("/"))
    return discovery_plan(parsed, agent_version="0")


def configs_received(probe: MqttProbe) -> dict[str, Received]:
    """The latest message on each discovery config topic."""
    return {
        m.topic: m
        for m in probe.messages()
        if m.topic.startswith(f"{PREFIX}/") and m.topic.endswith("/config")
    }


def retained_under(broker: Mosquitto, topic_filter: str) -> list[Received]:
    """Every retained message under ``topic_filter``: a fresh subscriber gets them first,
    then the marker it publishes itself, so none can come after the marker."""
    with MqttProbe(broker, "late-reader", timeout_s=30) as late:
        late.subscribe(topic_filter)
        late.subscribe(END_MARKER)
        late.publish(END_MARKER, b"end")
        late.wait_for_message(END_MARKER)
        return [m for m in late.messages() if m.topic != END_MARKER]


def wait_for_retained(broker: Mosquitto, expected: Iterable[str]) -> None:
    """Until the retained topics under the prefix are ``expected`` (the agent hands them to
    its connection before the broker has them)."""
    wanted = set(expected)

    def retained() -> set[str]:
        return {m.topic for m in retained_under(broker, f"{PREFIX}/#")}

    try:
        wait_until(lambda: retained() == wanted, "the retained topics", 60)
    except AssertionError:
        raise AssertionError(f"retained {sorted(retained())}, wanted {sorted(wanted)}") from None


def states_on(probe: MqttProbe, topic: str) -> list[str]:
    """The states published on ``topic``, in order, repeats folded."""
    return fold(m.payload.decode() for m in probe.messages(topic))


def on_then_off(states: list[str]) -> bool:
    return "ON" in states and "OFF" in states[states.index("ON") :]


def fold(values: Iterable[str]) -> list[str]:
    folded: list[str] = []
    for value in values:
        if not folded or folded[-1] != value:
            folded.append(value)
    return folded


def occupancy_from_events(probe: MqttProbe, label: str) -> list[str]:
    """ON/OFF as the events say, frame by frame (the events of one frame share their
    inference time): ON while a track of ``label`` is open between its start and end."""
    open_tracks: set[int] = set()
    states = ["OFF"]
    received = sorted({e.id: e for e in events(probe)}.values(), key=lambda e: e.seq)
    frames: list[list[Any]] = []
    for event in received:
        if frames and frames[-1][0].inference_ts == event.inference_ts:
            frames[-1].append(event)
        else:
            frames.append([event])
    for frame in frames:
        for event in frame:
            if event.label != label or event.track_id is None:
                continue
            if event.lifecycle == "end":
                open_tracks.discard(event.track_id)
            else:
                open_tracks.add(event.track_id)
        states.append("ON" if open_tracks else "OFF")
    return fold(states)


def test_every_discovery_payload_follows_the_schema_and_names_topics_the_agent_publishes(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    config = discovery_config(assets, broker.port, tmp_path)
    wanted = expected_plan(config)
    probe = subscriber(broker)
    probe.subscribe(f"{PREFIX}/#", qos=1)
    with AgentProcess(tmp_path / "agent", config):
        probe.wait_until(
            lambda: configs_received(probe).keys() == wanted.configs.keys() or None,
            "every discovery config",
            90,
        )
        payloads = {
            t: check_discovery_payload(t, m.payload) for t, m in configs_received(probe).items()
        }
        referenced = {e.topic for e in payloads.values()} | {
            a.topic for e in payloads.values() for a in e.availability or []
        }
        probe.wait_until(
            lambda: referenced <= {m.topic for m in probe.messages()} or None,
            f"a message on every topic the configs name: {sorted(referenced)}",
            60,
        )
        health = probe.wait_until(
            lambda: next(
                (h for h in healths(probe) if h.streams["kite"].inference_p50_ms is not None), None
            ),
            "a health message with the stream's latency",
            60,
        )
        retained = {m.topic: m for m in retained_under(broker, f"{PREFIX}/#")}
    probe.disconnect()

    status = StatusMessage.model_validate_json(probe.messages(f"{ROOT}/status")[0].payload)
    document = json.loads(health.model_dump_json(exclude_none=True))
    for topic, entity in payloads.items():
        assert retained[topic].payload == configs_received(probe)[topic].payload
        (availability,) = entity.availability or []
        assert availability.topic == f"{ROOT}/status"
        assert status.state in available_states(availability.value_template or "")
        if entity.topic == f"{ROOT}/health" and "cpu_temperature" not in topic:
            assert isinstance(entity, HaStateEntity)
            assert isinstance(lookup(document, json_path(entity.value_template or "")), float)
    own = {t: e.topic for t, e in payloads.items() if e.topic.startswith(PREFIX)}
    for topic, state_topic in own.items():  # the agent's own states, retained
        state = retained[state_topic].payload
        if "/binary_sensor/" in topic:
            assert state in {b"ON", b"OFF"}
        else:
            assert state.isdigit()


def test_occupancy_turns_on_when_a_person_enters_and_off_after_the_track_ends_in_order(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    config = discovery_config(assets, broker.port, tmp_path, shutdown_flush_s=30)
    # Tracks end half a second after their person was last seen, at whatever rate this
    # machine infers: the video shows nobody for 1.3 s in its second half, and 0.7 s at its
    # start, each loop. min_hits 1: a slow machine still starts a track per sighting.
    config["streams"][0]["events"]["tracking"] = {"end_after_s": 0.5, "min_hits": 1}
    person = next(
        e.own_topic
        for e in expected_plan(config).entities
        if e.config.name == "kite person" and e.own_topic is not None
    )
    probe = subscriber(broker)
    probe.subscribe(f"{PREFIX}/#", qos=1)
    with AgentProcess(tmp_path / "agent", config) as agent:
        probe.wait_until(
            lambda: on_then_off(states_on(probe, person)), "the person occupancy ON, then OFF", 120
        )
        assert agent.terminate() == 0
    probe.wait_until(
        lambda: any(s.state == "offline" for s in statuses(probe)), "the offline status", 30
    )
    (retained,) = retained_under(broker, person)
    probe.disconnect()

    observed = states_on(probe, person)
    derived = occupancy_from_events(probe, "person")
    assert "ON" in observed
    assert observed == derived[len(derived) - len(observed) :], (observed, derived)
    assert observed[-1] == "OFF"
    assert retained.payload == b"OFF"


def test_disabling_discovery_clears_every_retained_config_and_state(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    config = discovery_config(assets, broker.port, tmp_path)
    announced = expected_plan(config)
    with AgentProcess(tmp_path / "enabled", config) as agent:
        agent.wait_for_log(f"Home Assistant discovery: {len(announced.entities)} entities", 90)
        wait_for_retained(broker, announced.retained_topics)
        assert agent.terminate() == 0
    published = announced.retained_topics

    config["homeassistant"]["enabled"] = False
    with AgentProcess(tmp_path / "disabled", config) as agent:
        agent.wait_for_log(f"cleared {len(published)} retained topic(s)", 90)
        left = retained_under(broker, f"{PREFIX}/#")
        assert agent.terminate() == 0

    assert left == []
    assert PublishedTopics(tmp_path / "homeassistant.json").load() == set()


def test_reloading_without_a_stream_clears_only_that_streams_entities(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    config = discovery_config(assets, broker.port, tmp_path)
    yard = {
        "name": "yard",
        "source": {"type": "synthetic", "width": 320, "height": 240, "fps": 2},
        "model": {"path": str(assets.ssd), "labels": str(assets.coco_labels), "threads": 1},
        "events": {"labels": ["car"]},
    }
    config["streams"].append(yard)
    both = expected_plan(config)
    with AgentProcess(tmp_path / "agent", config) as agent:
        agent.wait_for_log(f"Home Assistant discovery: {len(both.entities)} entities", 90)
        wait_for_retained(broker, both.retained_topics)

        config["streams"].pop()
        agent.write_config(config)
        agent.signal(signal.SIGHUP)
        kite_only = expected_plan(config)
        gone = both.retained_topics - kite_only.retained_topics
        agent.wait_for_log(f"cleared {len(gone)} retained topic(s)", 60)
        left = {m.topic for m in retained_under(broker, f"{PREFIX}/#")}
        assert agent.terminate() == 0

    assert gone
    assert all("/yard_" in t for t in gone)
    assert left == set(kite_only.retained_topics)
