"""``edgefleet watch`` as a person reads it: the console script against a real Mosquitto.

Every line has the time it arrived and the device; retained messages say so and how old
they are from their own time field; retained model chunks stay out unless ``--chunks``;
the broker options are those of every other broker command.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt
import pytest
from broker import Mosquitto, MqttProbe, free_port

from edgefleet.agent.protocol import (
    ChunkedModelMeta,
    EventMessage,
    ModelRef,
    ReportedState,
    StatusMessage,
    UpdateReport,
    UpdateState,
    model_chunk_topic,
    model_meta_topic,
)
from edgefleet.ops.cli import build_parser
from edgefleet.ops.watch import Described, describe, line, topic_filters
from edgefleet.provisioning import FleetDir

EDGEFLEET = Path(sys.executable).with_name("edgefleet")
ROOT = "edgefleet/v1"
SHA = "4f3a" + "0" * 60
# Every printed line: an ISO 8601 UTC time, then the device (or "fleet"), then the text.
LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) (\S+) (.+)$")
_WAIT_S = 30.0


def event(label: str, *, device: str = "dev1") -> bytes:
    model = ModelRef(
        id="ssd", version="3", sha256="0" * 64, task="detection", backend="litert 2.3.0",
        delegate="cpu",
    )  # fmt: skip
    now = time.time()
    message = EventMessage(
        id="a" * 32, device_id=device, stream="door", seq=1, kind="detection", lifecycle="start",
        track_id=7, label=label, score=0.81, model=model, capture_ts=now - 0.02,
        inference_ts=now, latency_ms=20.0, inference_ms=8.0,
    )  # fmt: skip
    return message.model_dump_json().encode()


def status(device: str, ts: float) -> bytes:
    message = StatusMessage(state="online", device_id=device, ts=ts, agent_version="0.1.0")
    return message.model_dump_json().encode()


class Watch:
    """``edgefleet watch`` as a child process; its output read line by line as it comes."""

    def __init__(self, broker: Mosquitto, *options: str) -> None:
        # The test broker is plain: --insecure (test_operator_profile.py watches over TLS).
        self.command = [str(EDGEFLEET), "watch", "--insecure", "--port", str(broker.port)]
        self.command += options
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        self.process: subprocess.Popen[str] | None = None
        self._readers: list[threading.Thread] = []

    def __enter__(self) -> Watch:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for pipe, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            reader = threading.Thread(target=self._read, args=(pipe, lines), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for reader in self._readers:
            reader.join(_WAIT_S)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()

    def _read(self, pipe: object, lines: list[str]) -> None:
        for text in pipe:  # type: ignore[attr-defined]
            with self._changed:
                lines.append(text.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, lines: list[str], text: str, nth: int = 1) -> str:
        """The ``nth`` line of ``lines`` (``self.out`` or ``self.err``) that contains ``text``."""

        def found() -> str | None:
            having = [entry for entry in lines if text in entry]
            return having[nth - 1] if len(having) >= nth else None

        with self._changed:
            if not self._changed.wait_for(lambda: found() is not None, _WAIT_S):
                raise AssertionError(f"no {text!r} within {_WAIT_S} s: {self.out} {self.err}")
            result = found()
            assert result is not None
            return result

    def watching(self) -> Watch:
        """Wait until the subscriptions are in place."""
        self.wait_for(self.err, "watching")
        return self

    def finish(self) -> int:
        """Wait for the process to end by itself; its exit code, with all output read."""
        assert self.process is not None
        code = self.process.wait(_WAIT_S)
        for reader in self._readers:
            reader.join(_WAIT_S)
        return code


@pytest.fixture
def probe(broker: Mosquitto) -> Iterator[MqttProbe]:
    with MqttProbe(broker) as client:
        yield client


def parsed(lines: list[str]) -> list[tuple[str, str, str]]:
    """(time, device, text) of each line; fails on a line without a time and a device."""
    result = []
    for text in lines:
        match = LINE.match(text)
        assert match, f"not 'TIME DEVICE TEXT': {text!r}"
        result.append((match[1], match[2], match[3]))
    return result


# -- one line --------------------------------------------------------------------------------


def test_a_line_starts_with_the_utc_time_it_arrived_and_the_device() -> None:
    arrived = 1_700_000_000.0

    text = line(Described("dev1", "status: online"), received_ts=arrived, retained=False)

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(arrived))
    assert text == f"{stamp} dev1 status: online"


@pytest.mark.parametrize(
    ("age_s", "said"),
    [
        (12.4, "12 s old"),
        (250.0, "4 min old"),
        (3 * 3600 + 5 * 60, "3 h 5 min old"),
        (5 * 86400, "5 days old"),
        (-30.0, "stamped 30 s ahead of this clock"),
    ],
)
def test_a_retained_line_says_so_and_how_old_from_the_messages_own_time(
    age_s: float, said: str
) -> None:
    arrived = 1_700_000_000.0
    described = Described("dev1", "status: online", sent_ts=arrived - age_s)

    text = line(described, received_ts=arrived, retained=True)

    assert text.endswith(f" dev1 status: online [retained, {said}]")


def test_a_retained_message_without_a_time_field_says_it_has_none() -> None:
    text = line(Described("dev1", "desired revision 3: door"), received_ts=0.0, retained=True)

    assert text.endswith("[retained, no time in the message]")


def test_describe_names_the_device_from_the_topic_for_messages_that_carry_none() -> None:
    described = describe(f"{ROOT}/dev9/desired", b'{"revision": 3, "models": {}}')

    assert (described.device, described.text) == ("dev9", "desired revision 3: no model")


def test_describe_names_a_payload_that_breaks_the_contract_and_the_field() -> None:
    broken = describe(f"{ROOT}/dev1/events/door", b'{"id": "x"}')
    not_json = describe(f"{ROOT}/dev1/status", b"not json")

    assert broken.device == "dev1"
    assert "does not match the contract" in broken.text
    assert "device_id: Field required" in broken.text
    assert "does not match the contract" in not_json.text


def test_describe_shows_the_reported_update_and_its_reason() -> None:
    model = ModelRef(
        id="shelf", version="2", sha256="a" * 64, task="raw", backend="litert", delegate="cpu"
    )
    reported = ReportedState(
        device_id="pi-7",
        ts=1000.0,
        agent_version="0.1.0",
        models={"cam": model},
        updates={
            "cam": UpdateReport(
                state=UpdateState.REFUSED, model_id="shelf", version=3, sha256="b" * 64,
                reason="manifest expired", ts=1000.0,
            )
        },
    )  # fmt: skip

    described = describe(f"{ROOT}/pi-7/reported", reported.model_dump_json().encode())

    assert described == Described(
        "pi-7", "reported: cam runs shelf 2, update to shelf 3: refused (manifest expired)", 1000.0
    )


def test_without_chunks_the_subscriptions_match_every_device_topic_but_no_model_chunk() -> None:
    filters = topic_filters(ROOT, "+", chunks=False)
    shown = [
        f"{ROOT}/dev1/status", f"{ROOT}/dev1/health", f"{ROOT}/dev1/reported",
        f"{ROOT}/dev1/desired", f"{ROOT}/dev1/events/door", f"{ROOT}/dev1/cmd/ping",
        f"{ROOT}/dev1/reply/abc", model_meta_topic(ROOT, SHA),
    ]  # fmt: skip

    def matched(topic: str, within: list[str]) -> bool:
        return any(mqtt.topic_matches_sub(f, topic) for f in within)

    assert all(matched(topic, filters) for topic in shown)
    assert not matched(model_chunk_topic(ROOT, SHA, 0), filters)
    assert matched(model_chunk_topic(ROOT, SHA, 0), topic_filters(ROOT, "+", chunks=True))


def test_watch_takes_the_broker_options_of_the_other_broker_commands() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]

    def options(name: str) -> dict[str, tuple[object, str | None]]:
        return {
            action.option_strings[0]: (action.default, action.help)
            for action in commands[name]._actions
            if action.option_strings and action.option_strings[0] in BROKER_OPTIONS
        }

    assert len(options("watch")) == len(BROKER_OPTIONS)
    for other in ("cmd", "deploy"):
        assert options("watch") == options(other), other


BROKER_OPTIONS = (
    "--profile", "--host", "--port", "--topic-root", "--cafile", "--cert", "--key", "--insecure"
)  # fmt: skip


# -- against a real broker -----------------------------------------------------------------


def test_watch_prints_one_line_per_event_and_stops_at_count(
    broker: Mosquitto, probe: MqttProbe
) -> None:
    with Watch(broker, "--count", "2", "--seconds", "60") as watch:
        watch.watching()
        probe.publish(f"{ROOT}/dev1/events/door", event("person"))
        probe.publish(f"{ROOT}/dev1/events/door", event("dog"))
        code = watch.finish()

    assert code == 0, watch.err
    lines = parsed(watch.out)
    assert [device for _, device, _ in lines] == ["dev1/door", "dev1/door"]
    assert lines[0][2].startswith("event start #7: person 0.81 (20 ms after capture, model ssd 3")
    assert "dog" in lines[1][2]
    assert "retained" not in " ".join(watch.out)
    assert "2 event(s)" in watch.err


def test_retained_messages_say_so_with_their_age_and_chunks_stay_out(
    broker: Mosquitto, probe: MqttProbe
) -> None:
    probe.publish(f"{ROOT}/dev1/status", status("dev1", time.time() - 125), retain=True)
    meta = ChunkedModelMeta(sha256=SHA, size=70_000, chunk_bytes=65_536, chunks=2)
    probe.publish(model_meta_topic(ROOT, SHA), meta.model_dump_json(), retain=True)
    probe.publish(model_chunk_topic(ROOT, SHA, 0), b"\x00" * 65_536, retain=True)
    probe.publish(model_chunk_topic(ROOT, SHA, 1), b"\x00" * 4_464, retain=True)

    with Watch(broker, "--count", "1") as watch:
        watch.watching()
        watch.wait_for(watch.out, "fleet model")
        probe.publish(f"{ROOT}/dev2/events/door", event("person", device="dev2"))
        assert watch.finish() == 0, watch.err

    lines = {device: text for _, device, text in parsed(watch.out)}
    assert set(lines) == {"dev1", "fleet", "dev2/door"}
    assert lines["dev1"] == "status: online, agent 0.1.0 [retained, 2 min old]"
    assert lines["fleet"].startswith("model 4f3a00000000: 68.4 KiB in 2 chunks of 64 KiB")
    assert lines["fleet"].endswith("[retained, no time in the message]")
    assert "retained" not in lines["dev2/door"]


def test_with_chunks_the_retained_chunks_are_printed_too(
    broker: Mosquitto, probe: MqttProbe
) -> None:
    probe.publish(model_chunk_topic(ROOT, SHA, 0), b"\x00" * 100, retain=True)
    probe.publish(model_chunk_topic(ROOT, SHA, 1), b"\x00" * 40, retain=True)

    with Watch(broker, "--chunks") as watch:
        watch.watching()
        chunk = watch.wait_for(watch.out, "chunk 1")

    said = "fleet model 4f3a00000000 chunk 1: 40 bytes [retained, no time in the message]"
    assert chunk.endswith(f" {said}")
    assert any("chunk 0: 100 bytes" in text for text in watch.out)


def test_topic_root_and_device_choose_what_is_watched(broker: Mosquitto, probe: MqttProbe) -> None:
    probe.publish("acme/v2/dev1/status", status("dev1", time.time()), retain=True)
    probe.publish("acme/v2/dev2/status", status("dev2", time.time()), retain=True)
    probe.publish(f"{ROOT}/dev1/status", status("dev1", time.time()), retain=True)

    with Watch(broker, "--topic-root", "acme/v2", "--device", "dev1", "--count", "1") as watch:
        watch.watching()
        probe.publish(f"{ROOT}/dev1/events/door", event("under the default root"))
        probe.publish("acme/v2/dev2/events/door", event("another device", device="dev2"))
        probe.publish("acme/v2/dev1/events/door", event("person"))
        assert watch.finish() == 0, watch.err

    devices = [device for _, device, _ in parsed(watch.out)]
    assert devices == ["dev1", "dev1/door"]
    assert "person" in watch.out[1]


def test_host_names_the_broker(broker: Mosquitto, probe: MqttProbe) -> None:
    with Watch(broker, "--host", broker.host, "--count", "1") as watch:
        watch.watching()
        probe.publish(f"{ROOT}/dev1/events/door", event("person"))
        assert watch.finish() == 0, watch.err

    assert "person" in watch.out[0]


def test_watch_carries_on_across_a_broker_restart(broker: Mosquitto) -> None:
    with Watch(broker, "--count", "1") as watch:
        watch.watching()
        broker.restart()
        watch.wait_for(watch.err, "lost the broker")
        watch.wait_for(watch.err, "watching", nth=2)  # subscribed again after reconnecting
        with MqttProbe(broker) as probe:
            probe.publish(f"{ROOT}/dev1/events/door", event("after the restart"))
        assert watch.finish() == 0, watch.err

    assert "after the restart" in watch.out[0]


def test_ctrl_c_stops_watch_cleanly_with_the_event_count(
    broker: Mosquitto, probe: MqttProbe
) -> None:
    with Watch(broker) as watch:
        watch.watching()
        probe.publish(f"{ROOT}/dev1/events/door", event("person"))
        watch.wait_for(watch.out, "person")
        assert watch.process is not None
        watch.process.send_signal(signal.SIGINT)
        code = watch.finish()

    assert code == 0
    assert "1 event(s)" in watch.err
    assert not any("Traceback" in text for text in watch.err)


def test_watch_without_a_broker_fails_cleanly() -> None:
    command = ["watch", "--insecure", "--host", "127.0.0.1", "--port", str(free_port())]
    command += ["--seconds", "1"]
    result = subprocess.run([str(EDGEFLEET), *command], capture_output=True, text=True, check=False)

    assert result.returncode == 1
    assert "cannot reach the broker at 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


def test_watch_of_a_device_id_that_cannot_be_one_is_bad_input() -> None:
    result = subprocess.run(
        [str(EDGEFLEET), "watch", "--device", "dev/1", "--seconds", "1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip

    assert result.returncode == 2
    assert "--device 'dev/1' is not a device id" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_release_key_set_shows_as_the_fleets_with_its_version_and_keys(tmp_path: Path) -> None:
    fleet = FleetDir.init(tmp_path / "fleet")
    payload = fleet.keyset_path.read_bytes()

    described = describe(f"{ROOT}/_trust/keyset", payload)
    broken = describe(f"{ROOT}/_trust/keyset", b"{not json")

    assert described.device == "fleet"
    assert described.text.startswith("keyset: release-key set version 1 (keys ")
    assert broken.text == "keyset: 9 bytes, not a signed key set"
