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

from .anchors import ANCHORS_SYNTAX
from .backends import BackendName, select_backend
from .bench import bench
from .delegates import DELEGATE_SYNTAX, DelegateSettings, parse_delegate
from .engine import unresolved_custom_op
from .errors import EdgefleetError, ImageError, InputError, ModelError, SettingError
from .images import load_image
from .labels import Labels
from .modelfile import (
    EDGETPU_CUSTOM_OP,
    ModelBytes,
    ModelInfo,
    Normalization,
    TensorInfo,
    inspect_model,
    read_model,
)
from .predictor import (
    RESULT_KEYS,
    InputFeed,
    Prediction,
    Predictor,
    load_input_file,
    planned_inputs,
)
from .preprocess import ResizeMode, Transform
from .recognition import TaskChoice, choose_task, make_task
from .segmentation import SegmentationTask, save_mask_png
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
    run.add_argument(
        "images",
        type=Path,
        nargs="*",
        metavar="IMAGE",
        help="image files (none for a model whose inputs all come from --input)",
    )
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
        help="fit images to the input by stretching or letterboxing (default: the task's: "
        "letterbox for YOLO, stretch otherwise)",
    )
    run.add_argument(
        "--normalize",
        type=_normalization,
        metavar="MEAN,STD",
        help="float inputs get (pixel - MEAN) / STD (default: the model's metadata, else "
        "0,255 for YOLO and 127.5,127.5 otherwise)",
    )
    run.add_argument(
        "--input",
        dest="feeds",
        action="append",
        default=[],
        type=_feed,
        metavar="NAME=FILE.npy",
        help="feed input NAME from a NumPy file (repeatable; default: none, and inputs nothing "
        "feeds get zeros, with a warning)",
    )
    run.add_argument(
        "--mask-out",
        type=Path,
        metavar="DIR",
        help="segmentation: write each image's mask as DIR/<image name>.png, in the image's "
        "size, pixel values the class ids (default: no masks)",
    )
    run.add_argument(
        "--anchors",
        metavar="SPEC",
        help=f"anchor detector layout: {ANCHORS_SYNTAX} (default: the preset that matches "
        "the model's outputs)",
    )
    run.add_argument(
        "--iou",
        type=_fraction,
        default=0.45,
        metavar="IOU",
        help="overlap above which YOLO boxes of a class are merged (default: %(default)s)",
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


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _normalization(text: str) -> Normalization:
    try:
        mean, std = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MEAN,STD (e.g. 0,255), got {text!r}") from None
    if std <= 0:
        raise argparse.ArgumentTypeError(f"STD must be above 0, got {std:g}")
    return Normalization((mean,), (std,))


def _feed(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {text!r}")
    return name, Path(path)


def _delegate(args: argparse.Namespace) -> DelegateSettings:
    return parse_delegate(args.delegate, allow_cpu_fallback=args.allow_cpu_fallback)


def _inspect(args: argparse.Namespace) -> int:
    model = read_model(args.model)
    info = inspect_model(model)
    choice = choose_task(info)
    feeds = planned_inputs(info, make_task(choice.name, info))
    custom = _custom_ops(model, info)
    if args.json:
        record = info.to_dict() | {
            "task": choice.name.value,
            "task_reason": choice.reason,
            "input_feeds": [{"name": f.name, "receives": f.source} for f in feeds],
            "custom_ops": custom,
        }
        print(json.dumps(record))
    else:
        print(_describe(info, choice, feeds, custom))
    return 0


def _custom_ops(model: ModelBytes, info: ModelInfo) -> dict[str, str]:
    """Each custom op of the model, and whether this runtime resolves it."""
    ops = info.custom_ops
    if not ops:
        return {}
    try:
        missing = unresolved_custom_op(model)
    except EdgefleetError as exc:
        return dict.fromkeys(ops, f"not checked: {exc.message}")
    if missing is None:
        return dict.fromkeys(ops, "resolved by this runtime")
    return {
        op: "needs the Edge TPU delegate"
        if op == EDGETPU_CUSTOM_OP
        else "NOT resolved by this runtime: the model cannot run here"
        if op == missing
        else "not checked (the runtime stops at the first op it lacks)"
        for op in ops
    }


def _describe(
    info: ModelInfo, choice: TaskChoice, feeds: list[InputFeed], custom: dict[str, str]
) -> str:
    labels = f"{len(info.metadata_labels)} in metadata" if info.metadata_labels else "none"
    tpu = "yes, compiled for the Coral Edge TPU" if info.edgetpu_compiled else "no"
    lines = [
        f"model          {info.source}",
        f"size           {info.size} bytes",
        f"sha256         {info.sha256}",
        f"edge tpu       {tpu}",
        f"task           {choice.name.value}: {choice.reason}",
        *(f"input          {_tensor_line(t)}" for t in info.inputs),
        *(f"  receives     {f.name}: {f.source}" for f in feeds),
        *(f"output         {_tensor_line(t)}" for t in info.outputs),
        f"operators      {', '.join(info.op_names)}",
        *(f"custom op      {op}: {state}" for op, state in custom.items()),
        f"labels         {labels}",
    ]
    return "\n".join(lines)


def _tensor_line(t: TensorInfo) -> str:
    quant = f"  scale {t.scale:g} zero_point {t.zero_point}" if t.quantized else ""
    shape = list(t.shape) if t.shape else "(shape set at run time)"
    return f"{t.name}  {shape} {t.dtype}{quant}"


def _run(args: argparse.Namespace) -> int:
    labels = Labels.from_file(args.labels) if args.labels else None
    feeds = {name: load_input_file(path) for name, path in args.feeds}
    failures = 0
    with Predictor.open(
        args.model,
        task=args.task,
        labels=labels,
        delegate=_delegate(args),
        threads=args.threads,
        backend=args.backend,
        resize=ResizeMode(args.resize) if args.resize else None,
        normalization=args.normalize,
        min_score=args.threshold,
        top_k=args.top_k,
        iou_threshold=args.iou,
        anchors=args.anchors,
        feeds=feeds,
    ) as predictor:
        if args.mask_out and not isinstance(predictor.task, SegmentationTask):
            raise SettingError(
                f"--mask-out needs a segmentation model; {args.model} runs "
                f"{predictor.task.name.value}",
                hint="leave out --mask-out, or pass --task segmentation if the model is one",
            )
        if predictor.preprocess is not None and not args.images:
            raise SettingError(
                f"{args.model} takes a frame in input '{predictor.preprocess.spec.name}'",
                hint="pass one or more image files",
            )
        inputs = {feed.name: feed.source for feed in predictor.inputs}
        if not args.json:
            print("\n".join(f"input {name}: {source}" for name, source in inputs.items()))
        backend = predictor.engine.backend.label
        delegate = predictor.engine.delegate.description
        for image in args.images if predictor.needs_frame else [None]:
            try:
                frame = load_image(image) if image else None
                prediction = predictor.predict(frame)
            except ImageError as exc:
                # One unreadable image must not cost the results of the others.
                report_error(exc)
                failures += 1
                continue
            if args.mask_out and image is not None and frame is not None:
                size = (frame.shape[1], frame.shape[0])
                _save_mask(predictor, prediction.transform, size, args.mask_out / image.stem)
            if args.json:
                record: dict[str, Any] = {"image": str(image) if image else None}
                record |= {"backend": backend, "delegate": delegate, "inputs": inputs}
                print(json.dumps(record | prediction.to_dict()))
            else:
                print(_prediction_text(image, backend, delegate, prediction))
    return EXIT_BAD_INPUT if failures else 0


def _save_mask(
    predictor: Predictor, transform: Transform, frame_size: tuple[int, int], stem: Path
) -> None:
    assert isinstance(predictor.task, SegmentationTask)  # checked before the first image
    path = stem.with_suffix(".png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_mask_png(predictor.task.mask(), transform, frame_size, path)
    except OSError as exc:
        raise SettingError(
            f"cannot write the mask {path} ({exc.strerror or exc})",
            hint="pass a --mask-out folder you can write to",
        ) from exc


def _prediction_text(image: Path | None, backend: str, delegate: str, p: Prediction) -> str:
    head = f"{image or 'inputs'}: {p.task.value}, {p.latency_ms:.1f} ms ({backend}, {delegate})"
    rows = p.to_dict()[RESULT_KEYS[p.task]]
    if p.task is TaskName.RAW:
        body = [f"  {r['name']} {list(r['shape'])}" for r in rows]
    elif p.task is TaskName.POSE:
        body = [f"  {r['name']:<15} x={r['x']:.3f} y={r['y']:.3f} {r['score']:.2f}" for r in rows]
    elif p.task is TaskName.DETECTION:
        body = [f"  {r['label']:<15} {r['score']:.2f}  box={list(r['box'])}" for r in rows]
    elif p.task is TaskName.LANDMARKS:
        body = [f"  {len(r['points'])} points, presence {r['score']:.2f}" for r in rows]
    elif p.task is TaskName.SEGMENTATION:
        body = [f"  {r['label']:<15} {r['coverage']:6.1%} of the frame" for r in rows]
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
