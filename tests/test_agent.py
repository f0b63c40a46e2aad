"""The agent end to end: a real agent process and Mosquitto, the real model on the real video."""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import tflite_builder as tb
from agentproc import AgentProcess, wait_until
from broker import Mosquitto, MqttProbe, free_port
from conftest import Assets
from PIL import Image

from edgefleet.agent.protocol import EventMessage, HealthMessage, StatusMessage

DEVICE = "dev-e2e"
ROOT = f"edgefleet/v1/{DEVICE}"
SCRAPES = 50


def agent_config(
    assets: Assets, port: int, workdir: Path, *, video: Path | None = None, **overrides: Any
) -> dict[str, Any]:
    """The SSD model on the kite video at camera speed, looping; events for person and kite."""
    config: dict[str, Any] = {
        "device_id": DEVICE,
        "broker": {
            "host": "127.0.0.1",
            "port": port,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1.0,
        },
        "streams": [
            {
                "name": "kite",
                "source": {
                    "type": "file",
                    "path": str(video or assets.image("kite_pan_640x480_30fps.mp4")),
                    "loop": True,
                    "realtime": True,
                },
                "model": {"path": str(assets.ssd), "labels": str(assets.coco_labels), "threads": 2},
                "events": {"labels": ["person", "kite"]},
            }
        ],
        "outbox": {"path": str(workdir / "outbox.sqlite3")},
        "updates": {"store_dir": str(workdir / "store"), "trusted_keys": []},
        "health": {"interval_s": 1},
    }
    config.update(overrides)
    return config


def stream_counter(metrics: str, name: str, stream: str = "kite") -> float:
    """The value of ``edgefleet_stream_<name>_total`` for ``stream`` on a /metrics page."""
    found = re.search(
        rf'^edgefleet_stream_{name}_total\{{stream="{stream}"\}} (\S+)$', metrics, re.M
    )
    assert found is not None, metrics
    return float(found.group(1))


def untracked(config: dict[str, Any]) -> dict[str, Any]:
    """Every passing detection an event: well over 10 events/s on the kite video."""
    config["streams"][0]["events"]["tracking"] = {"enabled": False}
    return config


def events(probe: MqttProbe) -> list[EventMessage]:
    return [
        EventMessage.model_validate_json(m.payload)
        for m in probe.messages()
        if m.topic.startswith(f"{ROOT}/events/")
    ]


def healths(probe: MqttProbe) -> list[HealthMessage]:
    return [HealthMessage.model_validate_json(m.payload) for m in probe.messages(f"{ROOT}/health")]


def statuses(probe: MqttProbe) -> list[StatusMessage]:
    return [StatusMessage.model_validate_json(m.payload) for m in probe.messages(f"{ROOT}/status")]


def subscriber(
    broker: Mosquitto, client_id: str = "consumer", *, persistent: bool = False
) -> MqttProbe:
    probe = MqttProbe(
        broker,
        client_id,
        clean_start=not persistent,
        session_expiry_s=3600 if persistent else 0,
        timeout_s=30,
    )
    probe.connect()
    probe.subscribe(f"{ROOT}/#", qos=1)
    return probe


def test_agent_publishes_person_and_kite_events_status_and_last_will(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    probe = subscriber(broker)
    with AgentProcess(tmp_path / "agent", agent_config(assets, broker.port, tmp_path)) as agent:
        probe.wait_until(
            lambda: {"person", "kite"} <= {e.label for e in events(probe)},
            "person and kite events",
            60,
        )
        received = events(probe)
        for event in received:
            assert re.fullmatch(r"[0-9a-f]{32}", event.id)
            assert (event.device_id, event.stream, event.kind) == (DEVICE, "kite", "detection")
            assert event.model.id == "ssd_mobilenet_v1_coco_quant_postprocess"
            assert event.model.sha256 == hashlib.sha256(assets.ssd.read_bytes()).hexdigest()
            assert event.model.version
            assert event.model.backend.startswith("litert")
            assert event.capture_ts <= event.inference_ts
            assert event.latency_ms > 0
            assert event.inference_ms > 0
            assert event.lifecycle in {"start", "update", "end"}
            assert event.track_id is not None
            assert event.detections
            assert event.detections[0].label == event.label
        assert len({e.id for e in received}) == len(received)

        with MqttProbe(broker, "late-reader") as late:
            late.subscribe(f"{ROOT}/status")
            retained = late.wait_for_message(f"{ROOT}/status")
        status = StatusMessage.model_validate_json(retained.payload)
        assert retained.retain
        assert status.state == "online"
        assert status.streams == ["kite"]
        assert status.capabilities is not None
        assert "detection" in status.capabilities.tasks

        agent.kill()
        probe.wait_until(
            lambda: any(s.state == "offline" for s in statuses(probe)), "offline status", 30
        )
    offline = [s for s in statuses(probe) if s.state == "offline"]
    assert offline[-1].reason == "connection lost"
    probe.disconnect()


def test_sigterm_sends_offline_and_leaves_nothing_in_the_outbox(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    probe = subscriber(broker)
    with AgentProcess(tmp_path / "agent", agent_config(assets, broker.port, tmp_path)) as agent:
        probe.wait_until(lambda: len(events(probe)) >= 5, "5 events", 60)

        assert agent.terminate() == 0

    probe.wait_until(
        lambda: any(s.state == "offline" for s in statuses(probe)), "offline status", 10
    )
    assert statuses(probe)[-1].reason == "shutdown"
    assert "agent stopped" in agent.log()
    seqs = [e.seq for e in events(probe)]
    assert seqs == list(range(1, len(seqs) + 1))
    probe.disconnect()


@pytest.mark.slow
def test_broker_outage_of_20s_loses_no_event_and_keeps_order(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    before = subscriber(broker, persistent=True)
    config = untracked(agent_config(assets, broker.port, tmp_path))
    with AgentProcess(tmp_path / "agent", config) as agent:
        before.wait_until(lambda: len(events(before)) >= 20, "20 events", 60)
        broker.stop()
        outage_start = time.time()
        time.sleep(20)
        outage_end = time.time()
        broker.start()
        after = subscriber(broker, persistent=True)  # the same session, resumed
        after.wait_until(
            lambda: any(e.capture_ts > outage_end + 2 for e in events(after)),
            "events from after the outage",
            60,
        )
        assert agent.terminate() == 0
    after.wait_until(
        lambda: statuses(after) and statuses(after)[-1].state == "offline", "offline", 20
    )

    seen: dict[str, EventMessage] = {}
    for event in events(before) + events(after):
        seen.setdefault(event.id, event)  # QoS 1 may deliver twice; the id tells
    seqs = [e.seq for e in seen.values()]
    assert seqs == sorted(seqs), "per-stream order"
    assert seqs == list(range(1, len(seqs) + 1)), "no event lost"
    during = [e for e in seen.values() if outage_start < e.capture_ts < outage_end]
    assert len(during) >= 10 * 20
    print(f"events: {len(seqs)} in total, {len(during)} produced during the 20 s outage, none lost")
    after.disconnect()


def test_outbox_bound_drops_the_oldest_and_health_counts_them(
    assets: Assets, mosquitto_binary: Path, tmp_path: Path
) -> None:
    broker = Mosquitto(tmp_path / "broker", port=free_port())
    broker.start()
    subscriber(broker, persistent=True).disconnect()  # the session waits for events
    broker.stop()
    config = untracked(agent_config(assets, broker.port, tmp_path))
    config["outbox"]["max_events"] = 30
    with AgentProcess(tmp_path / "agent", config) as agent:
        agent.wait_for_log("full at 30 events", 60)
        broker.start()
        probe = subscriber(broker, persistent=True)
        probe.wait_until(
            lambda: any(h.outbox.dropped > 0 and h.outbox.depth < 30 for h in healths(probe)),
            "health with drops",
            30,
        )
        agent.terminate()
    broker.stop()

    dropped = max(h.outbox.dropped for h in healths(probe))
    seqs = sorted({e.seq for e in events(probe)})
    # The oldest were dropped: what arrived is one unbroken run of the newest. (It may start a
    # little before dropped + 1: rows already handed to paho can be dropped from the full
    # outbox while their PUBACK is on its way, and still arrive.)
    assert 1 < seqs[0] <= dropped + 1
    assert seqs == list(range(seqs[0], seqs[-1] + 1))


def test_lost_source_is_degraded_then_resumes_without_restart(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    video = tmp_path / "camera.mp4"
    shutil.copy(assets.image("kite_pan_640x480_30fps.mp4"), video)
    probe = subscriber(broker)
    config = agent_config(assets, broker.port, tmp_path, video=video)
    with AgentProcess(tmp_path / "agent", config) as agent:

        def stream_state() -> str | None:
            latest = healths(probe)
            return latest[-1].streams["kite"].state if latest else None

        probe.wait_until(lambda: stream_state() == "running", "a running stream", 60)
        video.rename(tmp_path / "gone.mp4")
        probe.wait_until(lambda: stream_state() == "degraded", "the stream degraded", 30)
        degraded = healths(probe)[-1].streams["kite"]
        assert degraded.last_error
        assert "camera.mp4" in degraded.last_error

        (tmp_path / "gone.mp4").rename(video)
        probe.wait_until(lambda: stream_state() == "running", "the stream running again", 60)
        processed = healths(probe)[-1].streams["kite"].processed
        probe.wait_until(
            lambda: healths(probe)[-1].streams["kite"].processed > processed, "new frames", 30
        )
        assert healths(probe)[-1].streams["kite"].source_failures >= 1
        assert agent.process is not None
        assert agent.process.poll() is None
    probe.disconnect()


def test_sd_notify_ready_after_first_result_and_watchdog_stops_when_inference_hangs(
    tmp_path: Path,
) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    model = tmp_path / "hang_when_bright.tflite"
    model.write_bytes(tb.hang_when_bright_model(8, 8))
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.new("RGB", (8, 8), (0, 0, 0)).save(frames / "a_dark.png")
    config = {
        "device_id": DEVICE,
        "broker": {"host": "127.0.0.1", "port": free_port()},  # nobody listens: not needed here
        "streams": [
            {
                "name": "cam",
                "source": {"type": "images", "folder": str(frames), "interval_s": 0.05},
                "model": {"path": str(model)},
            }
        ],
        "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
        "updates": {"store_dir": str(tmp_path / "store"), "trusted_keys": []},
        "systemd": {"watchdog_stale_s": 1.0},
    }
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    received: list[tuple[float, str]] = []

    def drain() -> list[tuple[float, str]]:
        try:
            while True:
                received.append((time.monotonic(), notify.recv(4096).decode()))
        except TimeoutError:
            return received

    with AgentProcess(tmp_path / "agent", config, env) as agent:
        wait_until(lambda: any("READY=1" in m for _, m in drain()), "READY=1", 60, agent.log)
        wait_until(
            lambda: sum("WATCHDOG=1" in m for _, m in drain()) >= 3, "3 WATCHDOG=1", 30, agent.log
        )

        Image.new("RGB", (8, 8), (255, 255, 255)).save(frames / "b_bright.png")
        agent.wait_for_log("withholding the systemd watchdog", 30)
        drain()  # what was sent before the stall was noticed
        hung_at = time.monotonic()
        time.sleep(3)
        drain()

    late_pets = [t for t, m in received if "WATCHDOG=1" in m and t > hung_at]
    assert late_pets == []
    ready_at = min(t for t, m in received if "READY=1" in m)
    assert all(t >= ready_at for t, m in received if "WATCHDOG=1" in m)
    notify.close()


def test_sighup_reloads_stream_settings_without_reconnecting(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    probe = subscriber(broker)
    config = agent_config(assets, broker.port, tmp_path)
    with AgentProcess(tmp_path / "agent", config) as agent:
        probe.wait_until(
            lambda: {"person", "kite"} <= {e.label for e in events(probe)}, "events", 60
        )
        config["streams"][0]["events"]["labels"] = ["kite"]
        agent.write_config(config)
        agent.signal(signal.SIGHUP)
        agent.wait_for_log("config reloaded", 30)
        reloaded_at = time.time()
        probe.wait_until(
            lambda: sum(e.capture_ts > reloaded_at for e in events(probe)) >= 5,
            "events after the reload",
            60,
        )
        later = [e for e in events(probe) if e.capture_ts > reloaded_at]
        assert {e.label for e in later} == {"kite"}
        probe.wait_until(
            lambda: healths(probe) and healths(probe)[-1].ts > reloaded_at,
            "health after reload",
            10,
        )
        assert healths(probe)[-1].mqtt.reconnects == 0
        assert not any(s.state == "offline" for s in statuses(probe))
    probe.disconnect()


def test_prometheus_endpoint_serves_the_health_figures(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    port = free_port()
    config = agent_config(assets, broker.port, tmp_path)
    config["health"]["prometheus_port"] = port
    probe = subscriber(broker)
    with AgentProcess(tmp_path / "agent", config):
        probe.wait_until(lambda: len(events(probe)) >= 3, "events", 60)

        def scrape() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return str(r.read().decode())
            except OSError:
                return None

        metrics = wait_until(scrape, "a /metrics page", 30)
        pages = [metrics] + [page for page in (scrape() for _ in range(SCRAPES)) if page]
    processed = re.search(
        r'^edgefleet_stream_processed_total\{stream="kite"\} (\S+)$', metrics, re.M
    )
    assert processed is not None, metrics
    assert float(processed.group(1)) > 0
    for page in pages:  # each scrape is one moment: never more frames processed than captured
        assert stream_counter(page, "processed") <= stream_counter(page, "captured"), page
    assert "edgefleet_outbox_depth " in metrics
    assert "edgefleet_mqtt_connected 1.0" in metrics
    assert "edgefleet_mqtt_id_conflicts_total 0.0" in metrics
    assert 'edgefleet_stream_frame_interval_seconds{stream="kite"} ' in pages[-1]
    probe.disconnect()


def test_agent_with_no_stream_able_to_start_says_so_and_reports_degraded(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    notes = tmp_path / "model.tflite"
    notes.write_text("not a model\n" * 10)
    config = agent_config(assets, broker.port, tmp_path)
    config["streams"][0]["model"]["path"] = str(notes)
    probe = subscriber(broker)
    with AgentProcess(tmp_path / "agent", config) as agent:
        status = probe.wait_until(
            lambda: next((s for s in statuses(probe) if s.state != "offline"), None),
            "a status from the agent",
            60,
        )
        agent.wait_for_log("no stream could start", 10)
    probe.disconnect()

    assert status.state == "degraded"
    assert status.reason is not None
    assert "kite: " in status.reason
    assert "not a TensorFlow Lite model" in status.reason
    assert status.streams == []
    error = next(line for line in agent.log().splitlines() if "no stream could start" in line)
    assert " ERROR " in error
    assert "started: device dev-e2e, degraded (no stream runs)" in agent.log()
    assert "0 stream(s)" not in agent.log()
