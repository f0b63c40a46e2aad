"""A model ready for frames: engine + pre-processing + task, one call per frame."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

from .backends import Backend, BackendName
from .delegates import DelegateSettings
from .engine import Engine
from .errors import SettingError
from .labels import Labels
from .modelfile import ModelBytes, Normalization, read_model
from .preprocess import Frame, Preprocessor, ResizeMode, Transform
from .tasks import Detection, Result, Task, TaskName, detect_task, make_task

# The key under which each task's results appear in JSON output.
RESULT_KEYS = {
    TaskName.CLASSIFICATION: "classes",
    TaskName.DETECTION: "detections",
    TaskName.POSE: "keypoints",
    TaskName.SEGMENTATION: "segments",
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
    """One result, JSON-ready; a detection's keypoints only where the detector gives them."""
    record = asdict(result)
    if isinstance(result, Detection) and not result.keypoints:
        del record["keypoints"]
    return record


def _task_name(value: TaskName | str) -> TaskName:
    try:
        return TaskName(value)
    except ValueError:
        choices = ", ".join(t.value for t in TaskName)
        raise SettingError(f"unknown task {value!r}", hint=f"use one of: {choices}") from None


class Predictor:
    """Runs one model on RGB frames. One thread at a time, like the engine it owns."""

    def __init__(
        self,
        engine: Engine,
        task: Task,
        *,
        resize: ResizeMode | None = None,
        normalization: Normalization | None = None,
    ):
        """``resize`` defaults to the task's; ``normalization`` (float inputs) to the model's
        metadata, else the task's."""
        self.engine = engine
        self.task = task
        self.preprocess = Preprocessor(
            engine.inputs[0],
            source=engine.model.source,
            resize=resize or task.resize,
            normalization=normalization or engine.info.normalization or task.normalization,
        )

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
    ) -> Predictor:
        """Load ``model`` and build its task (detected unless given); labels default to metadata."""
        model_bytes = model if isinstance(model, ModelBytes) else read_model(model)
        engine = Engine(model_bytes, delegate=delegate, threads=threads, backend=backend)
        try:
            info = engine.info
            if labels is None and info.metadata_labels:
                labels = Labels.from_lines(info.metadata_labels, f"{info.source} (metadata)")
            name = _task_name(task) if task else detect_task(info)
            built = make_task(name, info, labels=labels, min_score=min_score, top_k=top_k)
            return cls(engine, built, resize=resize, normalization=normalization)
        except BaseException:
            engine.close()
            raise

    def predict(self, frame: Frame) -> Prediction:
        """Pre-process ``frame`` into the input, invoke, and read the task's results."""
        started = time.perf_counter()
        transform = self.engine.write_input(partial(self.preprocess, frame))
        preprocess_ms = (time.perf_counter() - started) * 1000.0
        latency_ms = self.engine.invoke()
        started = time.perf_counter()
        results = self.task.results(self.engine, transform)
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
