"""``edgefleet model inspect | run | bench``: the runtime as command-line tools.

Only argument parsing and printing live here; the work is done by the
library. Errors are raised as ``EdgefleetError`` and printed by the caller
(``report_error``), which exits with ``exit_code``: 2 for bad input (a missing
file, a file that is not a model, an image that cannot be read, an invalid
option, as argparse does for usage errors), 1 for anything else (a delegate
library missing, an inference that failed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .backends import BackendName, select_backend
from .bench import bench
from .delegates import DELEGATE_SYNTAX, DelegateSettings, parse_delegate
from .errors import EdgefleetError, ImageError, InputError, ModelError, SettingError
from .images import load_image
from .labels import Labels
from .modelfile import ModelInfo, TensorInfo, inspect_model, read_model
from .predictor import RESULT_KEYS, Prediction, Predictor
from .preprocess import ResizeMode
from .tasks import TaskName

Handler = Callable[[argparse.Namespace], int]

EXIT_FAILED = 1
"""Something outside the input went wrong: the environment, a device, the broker."""
EXIT_BAD_INPUT = 2
"""The input is at fault: an option, a missing file, a file that is not a model or an image."""


def register(subcommands: Any) -> None:
    """Add the ``model`` command group to a top-level argparse subparsers object."""
    model = subcommands.add_parser("model", help="inspect, run and benchmark .tflite models")
    commands = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="describe a model without running it")
    inspect.add_argument("model", type=Path, metavar="MODEL", help="the .tflite file")
    _add_json(inspect)
    inspect.set_defaults(handler=_inspect)

    run = commands.add_parser("run", help="run a model on images and print the results")
    run.add_argument("model", type=Path, metavar="MODEL", help="the .tflite file")
    run.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files")
    run.add_argument(
        "--labels", type=Path, metavar="FILE", help="label file (default: labels in the model)"
    )
    run.add_argument(
        "--task",
        choices=[t.value for t in TaskName],
        help="override the detected task (default: detected from the outputs)",
    )
    run.add_argument(
        "--resize",
        choices=[m.value for m in ResizeMode],
        default=ResizeMode.STRETCH.value,
        help="fit images to the input by stretching or letterboxing (default: %(default)s)",
    )
    run.add_argument(
        "--threshold",
        type=float,
        metavar="SCORE",
        help="minimum score (default: 0.5 detection, 0 otherwise)",
    )
    run.add_argument(
        "--top-k", type=_positive, default=5, metavar="K", help="classes to show (default: 5)"
    )
    _add_engine_options(run)
    _add_json(run, "print one JSON object per image, one per line")
    run.set_defaults(handler=_run)

    bench_cmd = commands.add_parser("bench", help="measure load time and inference latency")
    bench_cmd.add_argument("model", type=Path, metavar="MODEL", help="the .tflite file")
    bench_cmd.add_argument(
        "--runs",
        type=_positive,
        default=100,
        metavar="N",
        help="measured runs (default: %(default)s)",
    )
    bench_cmd.add_argument(
        "--warmup",
        type=_non_negative,
        default=10,
        metavar="N",
        help="unmeasured runs before them (default: %(default)s)",
    )
    _add_engine_options(bench_cmd)
    _add_json(bench_cmd)
    bench_cmd.set_defaults(handler=_bench)


def exit_code(exc: EdgefleetError) -> int:
    """The exit code for ``exc``: 2 when the input is at fault, else 1."""
    if isinstance(exc, ModelError | InputError | SettingError):
        return EXIT_BAD_INPUT
    return EXIT_FAILED


def report_error(exc: EdgefleetError) -> None:
    """Print ``exc`` for a person: what happened, then what to do; no traceback."""
    print(f"edgefleet: error: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"  what to do: {exc.hint}", file=sys.stderr)


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--delegate", default="cpu", metavar="DELEGATE", help=f"{DELEGATE_SYNTAX} (default: cpu)"
    )
    parser.add_argument(
        "--allow-cpu-fallback",
        action="store_true",
        help="run on the CPU, with a warning, if the delegate cannot be loaded (default: fail)",
    )
    parser.add_argument(
        "--threads", type=_positive, metavar="N", help="CPU threads (default: the runtime's)"
    )
    parser.add_argument(
        "--backend",
        choices=[b.value for b in BackendName],
        help="interpreter backend (default: $EDGEFLEET_BACKEND, else auto)",
    )


def _add_json(parser: argparse.ArgumentParser, text: str = "print JSON") -> None:
    parser.add_argument("--json", action="store_true", help=text)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _delegate(args: argparse.Namespace) -> DelegateSettings:
    return parse_delegate(args.delegate, allow_cpu_fallback=args.allow_cpu_fallback)


def _inspect(args: argparse.Namespace) -> int:
    info = inspect_model(read_model(args.model))
    if args.json:
        print(json.dumps(info.to_dict()))
    else:
        print(_describe(info))
    return 0


def _describe(info: ModelInfo) -> str:
    labels = f"{len(info.metadata_labels)} in metadata" if info.metadata_labels else "none"
    lines = [
        f"model          {info.source}",
        f"size           {info.size} bytes",
        f"sha256         {info.sha256}",
        f"edge tpu       {'yes, compiled for the Coral Edge TPU' if info.edgetpu_compiled else 'no'}",  # noqa: E501
        *(f"input          {_tensor_line(t)}" for t in info.inputs),
        *(f"output         {_tensor_line(t)}" for t in info.outputs),
        f"operators      {', '.join(info.op_names)}",
        f"labels         {labels}",
    ]
    return "\n".join(lines)


def _tensor_line(t: TensorInfo) -> str:
    quant = f"  scale {t.scale:g} zero_point {t.zero_point}" if t.quantized else ""
    shape = list(t.shape) if t.shape else "(shape set at run time)"
    return f"{t.name}  {shape} {t.dtype}{quant}"


def _run(args: argparse.Namespace) -> int:
    labels = Labels.from_file(args.labels) if args.labels else None
    failures = 0
    with Predictor.open(
        args.model,
        task=args.task,
        labels=labels,
        delegate=_delegate(args),
        threads=args.threads,
        backend=args.backend,
        resize=ResizeMode(args.resize),
        min_score=args.threshold,
        top_k=args.top_k,
    ) as predictor:
        backend = predictor.engine.backend.label
        delegate = predictor.engine.delegate.description
        for image in args.images:
            try:
                prediction = predictor.predict(load_image(image))
            except ImageError as exc:
                # One unreadable image must not cost the results of the others.
                report_error(exc)
                failures += 1
                continue
            if args.json:
                record = {"image": str(image), "backend": backend, "delegate": delegate}
                print(json.dumps(record | prediction.to_dict()))
            else:
                print(_prediction_text(image, backend, delegate, prediction))
    return EXIT_BAD_INPUT if failures else 0


def _prediction_text(image: Path, backend: str, delegate: str, p: Prediction) -> str:
    head = f"{image}: {p.task.value}, {p.latency_ms:.1f} ms ({backend}, {delegate})"
    rows = p.to_dict()[RESULT_KEYS[p.task]]
    if p.task is TaskName.RAW:
        body = [f"  {r['name']} {list(r['shape'])}" for r in rows]
    elif p.task is TaskName.POSE:
        body = [f"  {r['name']:<15} x={r['x']:.3f} y={r['y']:.3f} {r['score']:.2f}" for r in rows]
    elif p.task is TaskName.DETECTION:
        body = [f"  {r['label']:<15} {r['score']:.2f}  box={list(r['box'])}" for r in rows]
    else:
        body = [f"  {r['index']:>5} {r['label']:<25} {r['score']:.3f}" for r in rows]
    return "\n".join([head, *(body or ["  (nothing above the threshold)"])])


def _bench(args: argparse.Namespace) -> int:
    result = bench(
        read_model(args.model),
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        delegate=_delegate(args),
        backend=select_backend(args.backend),
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    r = result
    print(
        f"model              {r.model}\n"
        f"backend            {r.backend}\n"
        f"delegate           {r.delegate}, threads {r.threads or 'default'}\n"
        f"load               {r.load_ms:.1f} ms\n"
        f"first inference    {r.first_inference_ms:.2f} ms\n"
        f"runs               {r.runs} (after {r.warmup} warm-up)\n"
        f"latency ms         min {r.min_ms:.2f}  p50 {r.p50_ms:.2f}  p90 {r.p90_ms:.2f}  "
        f"p99 {r.p99_ms:.2f}  max {r.max_ms:.2f}\n"
        f"throughput         {r.inferences_per_s:.1f} inferences/s\n"
        f"peak RSS           {r.peak_rss_mb:.1f} MiB"
    )
    return 0


__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "exit_code", "register", "report_error"]
