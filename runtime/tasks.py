"""What a model's outputs mean: the result types, and the tasks for classifiers, SSD
detectors, single-pose keypoints and raw tensors (YOLO, anchor detectors and
segmentation have their own modules).

Which task a model gets is decided in ``recognition.py``. Each task turns the
interpreter's output tensors into typed results, dequantizing scores and mapping
coordinates back to the frame.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt

from .engine import Engine
from .errors import UnsupportedModel
from .labels import Labels
from .modelfile import DETECTION_POSTPROCESS_OP, Normalization, TensorInfo
from .preprocess import SIGNED_UNIT, ResizeMode, Transform

# MoveNet / PoseNet order, the COCO keypoint convention.
KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
POSE_SHAPE = (1, 1, len(KEYPOINT_NAMES), 3)


class TaskName(str, Enum):
    """The kinds of model output this runtime understands."""

    CLASSIFICATION = "classification"
    DETECTION = "detection"
    POSE = "pose"
    SEGMENTATION = "segmentation"
    LANDMARKS = "landmarks"
    RAW = "raw"


@dataclass(frozen=True)
class Classification:
    """One class of a classifier's top-k."""

    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Detection:
    """One detected object; ``box`` is ``(ymin, xmin, ymax, xmax)`` normalised to the frame."""

    class_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]
    keypoints: tuple[tuple[float, float], ...] = ()
    """``(x, y)`` points normalised to the frame, for detectors that give them (BlazeFace's
    eyes, nose, mouth and ears); empty otherwise."""
    stages: Mapping[str, tuple[Result, ...]] = field(default_factory=dict)
    """What second-stage models found on this object's crop, by stage name (a face's
    landmarks, a fine-grained class); empty without them."""


@dataclass(frozen=True)
class Keypoint:
    """One body keypoint, normalised to the frame."""

    name: str
    x: float
    y: float
    score: float


@dataclass(frozen=True)
class Segment:
    """One class of a segmentation mask: the share of the frame's pixels it covers."""

    class_id: int
    label: str
    coverage: float
    """0 to 1, of the frame (letterbox padding excluded)."""
    zones: Mapping[str, float] = field(default_factory=dict)
    """Share of each named region of the frame it covers, where regions were asked for
    (the agent's zones)."""


@dataclass(frozen=True)
class Landmarks:
    """One object's landmarks: ``(x, y, z)`` with x, y normalised to the frame (z relative,
    in the same units as x), and the model's confidence that the object is there."""

    score: float
    points: tuple[tuple[float, float, float], ...]

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``(ymin, xmin, ymax, xmax)`` around the points."""
        xs, ys = [p[0] for p in self.points], [p[1] for p in self.points]
        return (min(ys), min(xs), max(ys), max(xs))


@dataclass(frozen=True)
class RawTensor:
    """One output tensor as the model produced it (dequantized when quantized)."""

    name: str
    shape: tuple[int, ...]
    values: list[Any]


Result = Classification | Detection | Keypoint | Segment | Landmarks | RawTensor


def dequantize(values: npt.NDArray[Any], spec: TensorInfo) -> npt.NDArray[np.float32]:
    """Real values of a tensor: ``(q - zero_point) * scale`` when quantized."""
    if not spec.quantized:
        return values.astype(np.float32, copy=False)
    return (values.astype(np.float32) - spec.zero_point) * np.float32(spec.scale)


class Task(ABC):
    """Base of the tasks: turns the engine's outputs into results.

    ``resize`` and ``normalization`` are how the task's models were trained to see
    frames, used unless the caller (or, for normalisation, the model's metadata) says
    otherwise: YOLO exports expect letterboxed [0, 1] input, say.
    """

    name: TaskName
    resize: ResizeMode = ResizeMode.STRETCH
    normalization: Normalization = SIGNED_UNIT

    @abstractmethod
    def results(self, engine: Engine, transform: Transform) -> list[Result]:
        """Read the outputs of the last invoke."""


class ClassificationTask(Task):
    """Top-k classes of a ``[1, N]`` score vector."""

    name = TaskName.CLASSIFICATION

    def __init__(self, labels: Labels | None = None, *, top_k: int = 5, min_score: float = 0.0):
        self.labels = labels or Labels({})
        self.top_k = top_k
        self.min_score = min_score

    def results(self, engine: Engine, transform: Transform) -> list[Result]:
        scores = dequantize(engine.output(0), engine.outputs[0]).reshape(-1)
        k = min(self.top_k, scores.size)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [
            Classification(int(i), self.labels.name(int(i)), round(float(scores[i]), 6))
            for i in top
            if scores[i] >= self.min_score
        ]


class DetectionTask(Task):
    """Boxes of an SSD model ending in ``TFLite_Detection_PostProcess``."""

    name = TaskName.DETECTION

    def __init__(
        self, labels: Labels | None = None, *, min_score: float = 0.5, max_results: int = 100
    ):
        # The post-process op numbers real classes from 0; COCO files start with '???'.
        self.labels = (labels or Labels({})).without_placeholder()
        self.min_score = min_score
        self.max_results = max_results

    def results(self, engine: Engine, transform: Transform) -> list[Result]:
        boxes, classes, scores, count = _postprocess_outputs(engine)
        detections: list[Result] = []
        for i in range(min(int(count), scores.size, self.max_results)):
            score = float(scores[i])
            if score < self.min_score:
                continue
            class_id = int(classes[i])
            ymin, xmin, ymax, xmax = transform.box(*(float(v) for v in boxes[i]))
            detections.append(
                Detection(
                    class_id=class_id,
                    label=self.labels.name(class_id),
                    score=round(score, 6),
                    box=(round(ymin, 6), round(xmin, 6), round(ymax, 6), round(xmax, 6)),
                )
            )
        return detections


def _postprocess_outputs(
    engine: Engine,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], float]:
    """Boxes, classes, scores, count: in the post-process op's own output order."""
    op = next(o for o in engine.info.operators if o.name == DETECTION_POSTPROCESS_OP)
    if len(op.outputs) != 4:
        raise UnsupportedModel(
            engine.model.source,
            f"{DETECTION_POSTPROCESS_OP} has {len(op.outputs)} outputs, expected 4",
            hint="use --task raw",
        )
    specs = {t.index: t for t in engine.outputs}
    arrays = []
    for index in op.outputs:
        values = engine.tensor(index)
        arrays.append(dequantize(values, specs[index]) if index in specs else values)
    boxes, classes, scores, count = (a.reshape(-1) if a.ndim <= 2 else a[0] for a in arrays)
    return boxes, classes, scores, float(count[0]) if count.size else 0.0


class PoseTask(Task):
    """Single-person keypoints of a MoveNet-style ``[1, 1, 17, 3]`` (y, x, score) output."""

    name = TaskName.POSE

    def results(self, engine: Engine, transform: Transform) -> list[Result]:
        spec = engine.outputs[0]
        if spec.shape != POSE_SHAPE:
            raise UnsupportedModel(
                engine.model.source,
                f"pose output has shape {list(spec.shape)}, expected {list(POSE_SHAPE)}",
                hint="use --task raw",
            )
        points = dequantize(engine.output(0), spec).reshape(len(KEYPOINT_NAMES), 3)
        keypoints: list[Result] = []
        for name, (y, x, score) in zip(KEYPOINT_NAMES, points, strict=True):
            fy, fx = transform.point(float(y), float(x))
            keypoints.append(Keypoint(name, round(fx, 6), round(fy, 6), round(float(score), 6)))
        return keypoints


class RawTask(Task):
    """Every output tensor, dequantized, for models no other task understands."""

    name = TaskName.RAW

    def results(self, engine: Engine, transform: Transform) -> list[Result]:
        return [
            RawTensor(spec.name, spec.shape, _as_list(dequantize(engine.output(i), spec)))
            for i, spec in enumerate(engine.outputs)
        ]


def _as_list(values: npt.NDArray[Any]) -> list[Any]:
    """The tensor's values as (nested) lists; a scalar tensor as a one-value list, since
    ``tolist()`` gives a bare number for it (which broke the events of a model with one)."""
    listed = values.tolist()
    return listed if isinstance(listed, list) else [listed]
