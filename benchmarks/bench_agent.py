"""The agent against a raw `Interpreter.invoke()` loop, in one run; its latency and memory.

1. Throughput: `edgefleet-agent run` (a real process, real Mosquitto) on the kite
   video decoded as fast as it goes (file source, realtime: false), SSD model,
   with 1 and with 2 interpreter threads. Inferences/s come from its health
   messages (steady state, start-up excluded). Baseline: bare `invoke()` on the
   same model and thread count. The two alternate in rounds within one run: the
   agent runs a window, is paused with SIGSTOP while the raw loop runs, and
   resumes, so drift on a shared machine hits both alike; medians are compared.
   Target: agent >= 0.95x raw with the interpreter on one core fewer than the
   machine has (the agent also decodes video and talks MQTT); the figure with
   every core given to the interpreter is printed next to it.
2. Capture-to-subscriber latency: the video at camera speed (30 fps); a QoS 1
   subscriber on the same machine computes arrival - capture_ts per event.
3. Peak RSS of the agent process (VmHWM), target <= 120 MB.

    python benchmarks/bench_agent.py [--seconds 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.runtime import select_backend

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from broker import Mosquitto  # noqa: E402  (the tests' broker runner, generated config)

ASSETS = Path(os.environ.get("EDGEFLEET_ASSETS", REPO.parent / "shared" / "assets"))
MODEL = ASSETS / "models" / "ssd_mobilenet_v1_coco_quant_postprocess.tflite"
LABELS = ASSETS / "models" / "ssd_mobilenet_v1_coco_labels.txt"
VIDEO = ASSETS / "images" / "kite_pan_640x480_30fps.mp4"


def raw_invoke_rate(threads: int, runs: int = 300) -> float:
    """Inferences/s of bare invoke() calls."""
    interpreter = select_backend().module.Interpreter(model_path=str(MODEL), num_threads=threads)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    frame = np.random.default_rng(0).integers(0, 255, detail["shape"], dtype=np.uint8)
    interpreter.set_tensor(detail["index"], frame)
    for _ in range(20):
        interpreter.invoke()
    started = time.perf_counter()
    for _ in range(runs):
        interpreter.invoke()
    return runs / (time.perf_counter() - started)


class Subscriber:
    """A QoS 1 subscriber recording arrival times of events and the health messages."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.latencies_ms: list[float] = []
        self.healths: list[dict] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        now = time.time()
        payload = json.loads(message.payload)
        if "/events/" in message.topic:
            self.latencies_ms.append((now - payload["capture_ts"]) * 1000.0)
        elif message.topic.endswith("/health"):
            self.healths.append(payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_agent(
    workdir: Path, broker: Mosquitto, *, realtime: bool, threads: int
) -> tuple[subprocess.Popen[bytes], Subscriber]:
    """Start ``edgefleet-agent run`` on the video; the subscriber listens from before it."""
    config = {
        "device_id": "bench",
        "broker": {"host": broker.host, "port": broker.port},
        "streams": [
            {
                "name": "kite",
                "source": {"type": "file", "path": str(VIDEO), "loop": True, "realtime": realtime},
                "model": {"path": str(MODEL), "labels": str(LABELS), "threads": threads},
                "events": {"labels": ["person", "kite"]},
            }
        ],
        "outbox": {"path": str(workdir / f"outbox-{realtime}-{threads}.sqlite3")},
        "updates": {"store_dir": str(workdir / f"store-{realtime}-{threads}"), "trusted_keys": []},
        "health": {"interval_s": 1},
        "logging": {"level": "WARNING"},
    }
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    # Throughput runs listen to health only: a subscriber decoding every event would take
    # CPU from the agent that the raw loop never has to share.
    subscriber = Subscriber(
        broker, "edgefleet/v1/bench/#" if realtime else "edgefleet/v1/bench/health"
    )
    agent = subprocess.Popen(
        [str(Path(sys.executable).with_name("edgefleet-agent")), "run", "--config", str(path)],
        stderr=subprocess.DEVNULL,
    )
    return agent, subscriber


def stop_agent(agent: subprocess.Popen[bytes], subscriber: Subscriber) -> float:
    """SIGTERM the agent; returns its peak RSS in MiB."""
    with open(f"/proc/{agent.pid}/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    agent.terminate()
    agent.wait(30)
    time.sleep(0.5)
    subscriber.close()
    return peak_kib / 1024


def interleaved(
    workdir: Path, broker: Mosquitto, *, threads: int, rounds: int, window_s: float
) -> tuple[list[float], list[float], float]:
    """Agent and raw loop in alternation: the agent runs ``window_s``, then is paused
    (SIGSTOP) while the raw loop runs, so both see the machine in the same minute.
    Returns agent rates, raw rates and the agent's peak RSS."""
    agent, subscriber = start_agent(workdir, broker, realtime=False, threads=threads)
    deadline = time.time() + 60
    while len(subscriber.healths) < 3 and time.time() < deadline:
        time.sleep(0.2)
    agent_rates, raw_rates = [], []
    for _ in range(rounds):
        resumed = time.time()
        time.sleep(window_s)
        # Health messages a full second after the resume: the paused time is not in them.
        window = [h for h in subscriber.healths if h["ts"] > resumed + 1.0]
        agent_rates.append(steady_rate(window))
        os.kill(agent.pid, signal.SIGSTOP)
        try:
            raw_rates.append(raw_invoke_rate(threads))
        finally:
            os.kill(agent.pid, signal.SIGCONT)
    return agent_rates, raw_rates, stop_agent(agent, subscriber)


def live_latency(
    workdir: Path, broker: Mosquitto, *, threads: int, seconds: float
) -> tuple[Subscriber, float]:
    """The video at camera speed: every event's arrival minus its capture time."""
    agent, subscriber = start_agent(workdir, broker, realtime=True, threads=threads)
    time.sleep(seconds)
    return subscriber, stop_agent(agent, subscriber)


def steady_rate(healths: list[dict]) -> float:
    """Processed frames/s between the first and the last of these health messages."""
    first, last = healths[0], healths[-1]
    frames = last["streams"]["kite"]["processed"] - first["streams"]["kite"]["processed"]
    return frames / (last["ts"] - first["ts"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="agent window per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    backend = select_backend()
    cores = os.cpu_count() or 1
    spare = max(1, cores - 1)
    print(f"machine   {platform.machine()}, {cores} CPUs, {platform.platform()}")
    print(f"python    {platform.python_version()}, backend {backend.label}")
    ratios: dict[int, float] = {}
    peaks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        for threads in sorted({spare, cores}):
            agent_rates, raw_rates, peak = interleaved(
                Path(tmp), broker, threads=threads, rounds=args.rounds, window_s=args.seconds
            )
            peaks.append(peak)
            raw, agent_rate = statistics.median(raw_rates), statistics.median(agent_rates)
            ratios[threads] = agent_rate / raw
            rounds = "  ".join(
                f"{a:.1f}/{r:.1f}" for a, r in zip(agent_rates, raw_rates, strict=True)
            )
            print(
                f"{threads} thread(s)  agent/raw per round {rounds}\n"
                f"             median agent {agent_rate:6.1f}/s  raw {raw:6.1f}/s  "
                f"ratio {ratios[threads]:.3f}  peak RSS {peak:.1f} MiB"
            )
        live, peak = live_latency(Path(tmp), broker, threads=spare, seconds=args.seconds * 2)
        peaks.append(peak)
    latencies = np.asarray(live.latencies_ms)
    p50, p99 = np.percentile(latencies, [50, 99])
    print(
        f"latency capture -> subscriber, 30 fps, {spare} thread(s): p50 {p50:.1f} ms  "
        f"p99 {p99:.1f} ms ({latencies.size} events)"
    )
    print(f"agent peak RSS {max(peaks):.1f} MiB (target <= 120)")
    ok = ratios[spare] >= 0.95 and max(peaks) <= 120
    print(
        f"{'PASS' if ok else 'FAIL'}: ratio with {spare} thread(s) {ratios[spare]:.3f} "
        "(target >= 0.95)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
