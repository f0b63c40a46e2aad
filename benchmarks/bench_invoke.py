"""`edgefleet model bench` against a raw `Interpreter.invoke()` loop, in one run.

Both time the same model on the same backend with the same thread count; the
raw loop is the floor any wrapper can reach. Rounds alternate (raw, bench, raw,
bench, ...) so drift on a shared machine hits both alike; the medians of the
per-round p50s are compared. Exit status 1 when the bench p50 is more than
--tolerance above the raw p50.

It also times a whole ``Predictor.predict`` on a real photo (resize, invoke, the task's
decoding: YOLO's NMS, a mask's coverage), for the cost on top of the invoke.

    python benchmarks/bench_invoke.py [--model PATH] [--threads 2] [--runs 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgefleet.runtime import Predictor, load_image, select_backend

ASSETS = Path(
    os.environ.get("EDGEFLEET_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets")
)
DEFAULT_MODEL = ASSETS / "models" / "mobilenet_v2_1.0_224_quant.tflite"
PHOTO = ASSETS / "images" / "kite_and_cold.jpg"


def raw_loop_p50(model: Path, threads: int, runs: int, warmup: int) -> float:
    """p50 in ms of bare invoke() calls on the backend's own Interpreter."""
    backend = select_backend()
    interpreter = backend.module.Interpreter(model_path=str(model), num_threads=threads)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    rng = np.random.default_rng(0)
    if np.issubdtype(detail["dtype"], np.integer):
        data = rng.integers(0, 255, detail["shape"], dtype=detail["dtype"])
    else:  # float inputs (YOLO, MediaPipe): values in [0, 1]
        data = rng.random(detail["shape"]).astype(detail["dtype"])
    interpreter.set_tensor(detail["index"], data)
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - started) * 1000.0)
    return float(np.percentile(times, 50))


def predict_p50(model: Path, threads: int, runs: int, warmup: int) -> float:
    """p50 in ms of a whole ``Predictor.predict`` on a real photo: pre-processing, invoke and
    the task's decoding (YOLO's NMS, a segmentation mask's coverage, ...)."""
    frame = load_image(PHOTO)
    with Predictor.open(model, threads=threads) as predictor:
        for _ in range(warmup):
            predictor.predict(frame)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            predictor.predict(frame)
            times.append((time.perf_counter() - started) * 1000.0)
    return float(np.percentile(times, 50))


def edgefleet_bench(model: Path, threads: int, runs: int, warmup: int) -> dict:
    """`edgefleet model bench --json`, run as a user runs it."""
    command = [
        str(Path(sys.executable).with_name("edgefleet")), "model", "bench", str(model),
        "--threads", str(threads), "--runs", str(runs), "--warmup", str(warmup), "--json",
    ]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(output))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed p50 excess")
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"no model at {args.model}; pass --model or set EDGEFLEET_ASSETS")

    backend = select_backend()
    print(f"machine   {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"python    {platform.python_version()}, backend {backend.label}")
    print(f"model     {args.model.name}, {args.threads} threads")
    print(f"runs      {args.runs} per measurement, {args.rounds} rounds")
    raw, bench, whole = [], [], []
    for round_number in range(1, args.rounds + 1):
        raw.append(raw_loop_p50(args.model, args.threads, args.runs, args.warmup))
        report = edgefleet_bench(args.model, args.threads, args.runs, args.warmup)
        bench.append(report["p50_ms"])
        whole.append(predict_p50(args.model, args.threads, args.runs, args.warmup))
        print(
            f"round {round_number}   raw invoke p50 {raw[-1]:7.3f} ms   "
            f"edgefleet model bench p50 {bench[-1]:7.3f} ms "
            f"(p90 {report['p90_ms']:.3f}, p99 {report['p99_ms']:.3f}, "
            f"{report['inferences_per_s']:.1f}/s, load {report['load_ms']:.1f} ms, "
            f"peak RSS {report['peak_rss_mb']:.1f} MiB)   predict p50 {whole[-1]:7.3f} ms"
        )
    raw_p50, bench_p50 = statistics.median(raw), statistics.median(bench)
    ratio = bench_p50 / raw_p50
    verdict = "PASS" if ratio <= 1 + args.tolerance else "FAIL"
    print(
        f"median    raw {raw_p50:.3f} ms   bench {bench_p50:.3f} ms   "
        f"ratio {ratio:.3f} (limit {1 + args.tolerance:.2f})   {verdict}"
    )
    whole_p50 = statistics.median(whole)
    print(
        f"predict   {whole_p50:.3f} ms on {PHOTO.name} ({whole_p50 / raw_p50:.2f}x the raw "
        f"invoke: resize and decoding on top; no target)"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
