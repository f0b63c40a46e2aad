"""A model ready for frames: engine + pre-processing + task, one call per frame."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from .backends import Backend, BackendName
from .delegates import DelegateSettings
from .engine import Engine
from .errors import InputError, InputMismatch, SettingError
from .labels import Labels
from .modelfile import ModelBytes, ModelInfo, Normalization, TensorInfo, read_model
from .preprocess import IDENTITY, Frame, Preprocessor, ResizeMode, Transform, is_image_input
from .recognition import detect_task, make_task
from .tasks import Detection, Result, Task, TaskName

log = logging.getLogger(__name__)

# The key under which each task's results appear in JSON output.
RESULT_KEYS = {
    TaskName.CLASSIFICATION: "classes",
    TaskName.DETECTION: "detections",
    TaskName.POSE: "keypoints",
    TaskName.SEGMENTATION: "segments",
    TaskName.LANDMARKS: "landmarks",
    TaskName.RAW: "tensors",
}


@dataclass(frozen=True)
class Prediction:
    """The results for one frame, with where the time went."""

    task: TaskName
    results: list[Result]
    latency_ms: float
    preprocess_ms: float
    postprocess_ms: float
    transform: Transform

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``task``, ``latency_ms`` (invoke) and the task's result list."""
        return {
            "task": self.task.value,
            "latency_ms": round(self.latency_ms, 3),
            "preprocess_ms": round(self.preprocess_ms, 3),
            "postprocess_ms": round(self.postprocess_ms, 3),
            RESULT_KEYS[self.task]: [result_dict(r) for r in self.results],
        }


def result_dict(result: Result) -> dict[str, Any]:
    """One result, JSON-ready; a detection's keypoints and stages only where it has them."""
    record = asdict(result)
    if isinstance(result, Detection):
        for name in ("keypoints", "stages"):
            if not record[name]:
                del record[name]
    return record


def load_input_file(path: Path | str) -> npt.NDArray[Any]:
    """A ``.npy`` array for a non-image input (``--input NAME=FILE.npy``)."""
    try:
        return np.load(path, allow_pickle=False)  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise InputError(f"{path}: no such input file", hint="check the path") from None
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path}: cannot read as a NumPy array ({exc})",
            hint="save the input with numpy.save(path, array) (a .npy file)",
        ) from exc


def _fitted(engine: Engine, name: str, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``array`` in the dtype of input ``name``, where the cast keeps its kind of values."""
    spec = engine.inputs[_input_index(engine, name)]
    dtype = np.dtype(spec.dtype)
    if tuple(array.shape) != spec.shape or not np.can_cast(array.dtype, dtype, "same_kind"):
        raise InputMismatch(
            f"input '{name}' expects shape {list(spec.shape)} {spec.dtype}, "
            f"got {list(array.shape)} {array.dtype}",
            hint="save an array of the input's shape and dtype (model inspect shows them)",
        )
    return array.astype(dtype, copy=False)


def _input_index(engine: Engine, name: str) -> int:
    return _position(engine.inputs, name, "input", engine.model.source)


def _output_position(engine: Engine, name: str) -> int:
    return _position(engine.outputs, name, "output", engine.model.source)


def _position(tensors: tuple[TensorInfo, ...], name: str, kind: str, source: str) -> int:
    """Where the tensor ``name`` is among a model's inputs or outputs; else a named error."""
    for position, spec in enumerate(tensors):
        if spec.name == name:
            return position
    names = ", ".join(t.name for t in tensors)
    raise SettingError(f"{source} has no {kind} '{name}'", hint=f"its {kind}s are: {names}")


def planned_inputs(info: ModelInfo, task: Task) -> list[InputFeed]:
    """What each input would receive with the task's defaults and no ``--input`` (inspect)."""
    image = next((i for i, t in enumerate(info.inputs) if is_image_input(t)), None)
    normalization = info.normalization or task.normalization
    return [
        InputFeed(
            t.name,
            t.shape,
            t.dtype,
            _frame_words(t, task.resize, normalization)
            if i == image
            else f"zeros unless fed (--input {t.name}=FILE.npy)",
            zero_filled=i != image,
        )
        for i, t in enumerate(info.inputs)
    ]


def _frame_words(spec: TensorInfo, resize: ResizeMode, normalization: Normalization) -> str:
    kind = "RGB" if spec.shape[3] == 3 else "grayscale"
    if spec.dtype == "uint8":
        values = "pixels as they are"
    elif spec.dtype == "int8":
        values = "pixels - 128"
    else:
        mean, std = _numbers(normalization.mean), _numbers(normalization.std)
        values = f"(pixel - {mean}) / {std}"
    return f"the frame: {kind} {spec.shape[2]}x{spec.shape[1]}, {resize.value}, {values}"


def _numbers(values: tuple[float, ...]) -> str:
    text = [f"{v:g}" for v in values]
    return text[0] if len(set(text)) == 1 else "[" + ", ".join(text) + "]"


def _zeros_warning(feed: InputFeed) -> str:
    return (
        f"input '{feed.name}' {list(feed.shape)} {feed.dtype} gets zeros: nothing feeds it "
        f"(pass --input {feed.name}=FILE.npy)"
    )


def _task_name(value: TaskName | str) -> TaskName:
    try:
        return TaskName(value)
    except ValueError:
        choices = ", ".join(t.value for t in TaskName)
        raise SettingError(f"unknown task {value!r}", hint=f"use one of: {choices}") from None


@dataclass(frozen=True)
class InputFeed:
    """What one model input receives on every frame, in words (``inspect`` and ``run`` say it)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: str
    zero_filled: bool = False
    """True for an input nothing feeds: it gets zeros, which the caller is told about."""


class Predictor:
    """Runs one model on RGB frames. One thread at a time, like the engine it owns.

    The frame goes to the first image input (RGB or grayscale) that nothing else feeds.
    Other inputs get an array given by name (``feeds``, e.g. from ``--input NAME=FILE.npy``),
    or the named output of the previous frame (``carry``: an LSTM's state), or zeros, which
    ``inputs`` reports (and a warning says) instead of hiding.
    """

    def __init__(
        self,
        engine: Engine,
        task: Task,
        *,
        resize: ResizeMode | None = None,
        normalization: Normalization | None = None,
        feeds: Mapping[str, npt.NDArray[Any]] | None = None,
        carry: Mapping[str, str] | None = None,
    ):
        """``resize`` defaults to the task's; ``normalization`` (float inputs) to the model's
        metadata, else the task's. ``carry`` maps an input name to the output name it takes."""
        self.engine = engine
        self.task = task
        self._feeds = {name: _fitted(engine, name, array) for name, array in (feeds or {}).items()}
        self._carry = {
            _input_index(engine, name): _output_position(engine, output)
            for name, output in (carry or {}).items()
        }
        fed = set(self._feeds) | {engine.inputs[i].name for i in self._carry}
        self.image_input = next(
            (i for i, t in enumerate(engine.inputs) if t.name not in fed and is_image_input(t)),
            None,
        )
        self.preprocess: Preprocessor | None = None
        if self.image_input is not None or engine.inputs[0].name not in fed:
            # Where the first input is neither fed nor an image, the Preprocessor says why.
            self.preprocess = Preprocessor(
                engine.inputs[self.image_input or 0],
                source=engine.model.source,
                resize=resize or task.resize,
                normalization=normalization or engine.info.normalization or task.normalization,
            )
        self.inputs = tuple(self._describe(i) for i in range(len(engine.inputs)))
        for feed in self.inputs:
            if feed.zero_filled:
                log.warning("%s: %s", engine.model.source, _zeros_warning(feed))
        self._write_constant_inputs()

    def _describe(self, index: int) -> InputFeed:
        spec = self.engine.inputs[index]
        head = (spec.name, spec.shape, spec.dtype)
        if self.preprocess is not None and index == self.image_input:
            pre = self.preprocess
            return InputFeed(*head, _frame_words(pre.spec, pre.resize, pre.normalization))
        if spec.name in self._feeds:
            return InputFeed(*head, "the array given for it (--input)")
        if index in self._carry:
            output = self.engine.outputs[self._carry[index]].name
            return InputFeed(*head, f"output '{output}' of the previous frame (zeros at first)")
        return InputFeed(*head, "zeros: nothing feeds it", zero_filled=True)

    def _write_constant_inputs(self) -> None:
        for index, spec in enumerate(self.engine.inputs):
            if index == self.image_input:
                continue
            array = self._feeds.get(spec.name)
            if array is None:
                array = np.zeros(spec.shape, dtype=np.dtype(spec.dtype))
            self.engine.set_input(array, index)

    @property
    def needs_frame(self) -> bool:
        """False for a model whose inputs are all fed otherwise: ``predict(None)`` runs it."""
        return self.image_input is not None

    @classmethod
    def open(
        cls,
        model: ModelBytes | Path | str,
        *,
        task: TaskName | str | None = None,
        labels: Labels | None = None,
        delegate: DelegateSettings | None = None,
        threads: int | None = None,
        backend: Backend | BackendName | str | None = None,
        resize: ResizeMode | None = None,
        normalization: Normalization | None = None,
        min_score: float | None = None,
        top_k: int = 5,
        iou_threshold: float | None = None,
        anchors: str | None = None,
        feeds: Mapping[str, npt.NDArray[Any]] | None = None,
        carry: Mapping[str, str] | None = None,
    ) -> Predictor:
        """Load ``model`` and build its task (detected unless given); labels default to metadata."""
        model_bytes = model if isinstance(model, ModelBytes) else read_model(model)
        engine = Engine(model_bytes, delegate=delegate, threads=threads, backend=backend)
        try:
            info = engine.info
            if labels is None and info.metadata_labels:
                labels = Labels.from_lines(info.metadata_labels, f"{info.source} (metadata)")
            name = _task_name(task) if task else detect_task(info)
            if anchors is not None and not task:
                name = TaskName.DETECTION
            built = make_task(
                name,
                info,
                labels=labels,
                min_score=min_score,
                top_k=top_k,
                iou_threshold=iou_threshold,
                anchors=anchors,
            )
            return cls(
                engine,
                built,
                resize=resize,
                normalization=normalization,
                feeds=feeds,
                carry=carry,
            )
        except BaseException:
            engine.close()
            raise

    def predict(self, frame: Frame | None) -> Prediction:
        """Pre-process ``frame`` into the input, invoke, and read the task's results."""
        started = time.perf_counter()
        transform = IDENTITY
        if self.preprocess is not None:
            if frame is None:
                raise InputMismatch(
                    f"{self.engine.model.source} takes a frame in input "
                    f"'{self.preprocess.spec.name}', and none was given",
                    hint="pass an image",
                )
            transform = self.engine.write_input(
                partial(self.preprocess, frame), self.image_input or 0
            )
        preprocess_ms = (time.perf_counter() - started) * 1000.0
        latency_ms = self.engine.invoke()
        started = time.perf_counter()
        results = self.task.results(self.engine, transform)
        for index, position in self._carry.items():
            self.engine.set_input(self.engine.output(position), index)
        postprocess_ms = (time.perf_counter() - started) * 1000.0
        return Prediction(
            self.task.name, results, latency_ms, preprocess_ms, postprocess_ms, transform
        )

    def close(self) -> None:
        """Release the engine."""
        self.engine.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
