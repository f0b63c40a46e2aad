"""Ultralytics YOLO detectors: recognising their raw output, decoding it, and NMS.

A YOLO export to TFLite ends without post-processing: one tensor holds every
candidate box of every anchor cell, and choosing among them is the caller's job.
Two layouts exist, told apart by the output's shape alone:

* v8 / v11 (also v5u, v9, v10 exported by Ultralytics 8): ``[1, 4+C, N]``, per
  candidate ``cx, cy, w, h`` then ``C`` class scores, no objectness.
* v5: ``[1, N, 5+C]``, per candidate ``cx, cy, w, h``, objectness, ``C`` class scores.

Coordinates are normalised to the model input in recent exports and in input
pixels in older ones; ``decode`` accepts both. Scores are already sigmoid
outputs in both layouts. ``decode`` is pure numpy (tests drive it with crafted
arrays); ``YoloTask`` reads the engine and maps boxes back to the frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .engine import Engine
from .errors import UnsupportedModel
from .labels import Labels
from .modelfile import ModelInfo, TensorInfo
from .preprocess import UNIT, ResizeMode, Transform
from .tasks import Detection, Result, Task, TaskName, dequantize

__all__ = [
    "MIN_CANDIDATES",
    "DecodedBox",
    "YoloLayout",
    "YoloTask",
    "classwise_nms",
    "decode",
    "nms",
    "yolo_layout",
]

MIN_CANDIDATES = 100
"""Fewest candidates a YOLO output has; the smallest real export (160x160 input) has 525.
Below it a ``[1, K, 4]`` box list or a small feature map is not taken for YOLO."""
_BOX_FIELDS = 4  # cx, cy, w, h
_V5_FIELDS = _BOX_FIELDS + 1  # and objectness
# Normalised exports keep every coordinate within about [0, 1] (a box may reach a little
# past the edge); a pixel export's anchor centres reach the input size, far above this.
_NORMALISED_LIMIT = 2.0
_OUTPUT_DTYPES = ("float32", "float16", "int8", "uint8")
_DIGITS = 6  # as DetectionTask rounds

Version = Literal["v5", "v8"]
FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.intp]


@dataclass(frozen=True)
class YoloLayout:
    """How a YOLO output tensor is laid out: which family, how many classes and candidates."""

    version: Version
    classes: int
    candidates: int

    @property
    def fields(self) -> int:
        """Values per candidate: 4 box values, objectness (v5 only), then the class scores."""
        return (_V5_FIELDS if self.version == "v5" else _BOX_FIELDS) + self.classes

    @property
    def shape(self) -> tuple[int, int, int]:
        """The output shape this layout reads: ``[1, 4+C, N]`` (v8) or ``[1, N, 5+C]`` (v5)."""
        if self.version == "v8":
            return (1, self.fields, self.candidates)
        return (1, self.candidates, self.fields)


@dataclass(frozen=True)
class DecodedBox:
    """One detection after NMS, in model-input coordinates (before the frame transform)."""

    class_id: int
    score: float
    box: tuple[float, float, float, float]
    """``(ymin, xmin, ymax, xmax)`` normalised to the model input; not clipped."""


def yolo_layout(info: ModelInfo) -> YoloLayout | None:
    """The YOLO layout of a model with one ``[1, 4+C, N]`` or ``[1, N, 5+C]`` output, else None."""
    if len(info.outputs) != 1 or info.outputs[0].dtype not in _OUTPUT_DTYPES:
        return None
    shape = info.outputs[0].shape
    if len(shape) != 3 or shape[0] != 1:
        return None
    _, rows, columns = shape
    # The candidates outnumber the values per candidate in every real export, which is
    # what tells the two layouts apart.
    if rows < columns and columns >= MIN_CANDIDATES and rows > _BOX_FIELDS:
        return YoloLayout("v8", classes=rows - _BOX_FIELDS, candidates=columns)
    if columns < rows and rows >= MIN_CANDIDATES and columns > _V5_FIELDS:
        return YoloLayout("v5", classes=columns - _V5_FIELDS, candidates=rows)
    return None


def decode(
    raw: npt.NDArray[Any],
    layout: YoloLayout,
    input_size: tuple[int, int],
    *,
    spec: TensorInfo | None = None,
    min_score: float = 0.5,
    iou_threshold: float = 0.45,
    max_results: int = 100,
) -> list[DecodedBox]:
    """Detections of one raw YOLO output, best first, after class-wise NMS.

    ``input_size`` is the model input's ``(height, width)``, used when the export gives
    coordinates in input pixels. ``spec`` is the output tensor's description: when it is
    quantized, ``raw`` holds the integers and is dequantized with its scale and zero point.
    """
    if tuple(raw.shape) != layout.shape:
        raise ValueError(f"raw output has shape {list(raw.shape)}, layout wants {layout.shape}")
    values = dequantize(raw, spec) if spec is not None else raw.astype(np.float32, copy=False)
    # One row per candidate; for v8 a transposed view, no copy.
    rows = values[0].T if layout.version == "v8" else values[0]
    class_ids, scores = _best_classes(rows, layout)
    keep = np.flatnonzero(scores >= min_score)
    boxes = _corner_boxes(rows[keep, :_BOX_FIELDS], _pixel_divisor(rows, input_size))
    chosen = classwise_nms(boxes, scores[keep], class_ids[keep], iou_threshold, limit=max_results)
    return [
        DecodedBox(
            class_id=int(class_ids[keep[i]]),
            score=float(scores[keep[i]]),
            box=(float(boxes[i, 0]), float(boxes[i, 1]), float(boxes[i, 2]), float(boxes[i, 3])),
        )
        for i in chosen
    ]


def _best_classes(rows: FloatArray, layout: YoloLayout) -> tuple[IntArray, FloatArray]:
    """Per candidate, the best class and its score (v5: times the objectness)."""
    class_scores = rows[:, -layout.classes :]
    class_ids = np.argmax(class_scores, axis=1)
    scores = np.take_along_axis(class_scores, class_ids[:, np.newaxis], axis=1)[:, 0]
    if layout.version == "v5":
        scores = scores * rows[:, _BOX_FIELDS]
    return class_ids, scores.astype(np.float32, copy=False)


def _pixel_divisor(rows: FloatArray, input_size: tuple[int, int]) -> FloatArray:
    """What to divide ``cx, cy, w, h`` by to normalise them: 1, or the input's size in pixels.

    Decided on all candidates, not just the kept ones, so the answer does not hang on
    which few boxes pass the score threshold.
    """
    height, width = input_size
    if rows.shape[0] and float(np.max(rows[:, :_BOX_FIELDS])) > _NORMALISED_LIMIT:
        return np.array([width, height, width, height], dtype=np.float32)
    return np.ones(_BOX_FIELDS, dtype=np.float32)


def _corner_boxes(centred: FloatArray, divisor: FloatArray) -> FloatArray:
    """``cx, cy, w, h`` rows to ``ymin, xmin, ymax, xmax`` rows."""
    cx, cy, w, h = (centred / divisor).T
    return np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=1).astype(
        np.float32, copy=False
    )


def nms(
    boxes: npt.NDArray[Any],
    scores: npt.NDArray[Any],
    iou_threshold: float,
    *,
    limit: int | None = None,
) -> IntArray:
    """Greedy hard NMS: indices of the boxes kept, best score first.

    ``boxes`` is ``[K, 4]`` ``(ymin, xmin, ymax, xmax)``; a box is dropped when its IoU
    with a better kept box is above ``iou_threshold``. ``limit`` stops after that many.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")
    areas = _areas(boxes)
    kept: list[int] = []
    while order.size and (limit is None or len(kept) < limit):
        best, rest = int(order[0]), order[1:]
        kept.append(best)
        order = rest[_iou(boxes[best], areas[best], boxes[rest], areas[rest]) <= iou_threshold]
    return np.asarray(kept, dtype=np.intp)


def classwise_nms(
    boxes: npt.NDArray[Any],
    scores: npt.NDArray[Any],
    class_ids: npt.NDArray[Any],
    iou_threshold: float,
    *,
    limit: int | None = None,
) -> IntArray:
    """NMS within each class: boxes of different classes never suppress each other.

    One ``nms`` pass over boxes shifted apart by class (each class's boxes moved beyond
    the previous class's extent), so the result is in global score order.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not boxes.shape[0]:
        return np.empty(0, dtype=np.intp)
    span = float(boxes.max() - boxes.min()) + 1.0
    offsets = np.asarray(class_ids, dtype=np.float32)[:, np.newaxis] * span
    return nms(boxes + offsets, scores, iou_threshold, limit=limit)


def _areas(boxes: FloatArray) -> FloatArray:
    heights = np.maximum(boxes[:, 2] - boxes[:, 0], np.float32(0))
    widths = np.maximum(boxes[:, 3] - boxes[:, 1], np.float32(0))
    areas: FloatArray = heights * widths  # numpy types ufunc results as Any
    return areas


def _iou(box: FloatArray, area: np.float32, others: FloatArray, areas: FloatArray) -> FloatArray:
    """IoU of one box with each of ``others``; 0 where both are empty."""
    top_left = np.maximum(box[:2], others[:, :2])
    bottom_right = np.minimum(box[2:], others[:, 2:])
    sides = np.maximum(bottom_right - top_left, np.float32(0))
    inter = sides[:, 0] * sides[:, 1]
    union = area + areas - inter
    iou: FloatArray = np.zeros_like(inter)
    np.divide(inter, union, out=iou, where=union > 0)
    return iou


class YoloTask(Task):
    """Boxes of an Ultralytics YOLO export: best class per candidate, class-wise NMS."""

    name = TaskName.DETECTION
    # Ultralytics trains and exports on letterboxed [0, 1] RGB.
    resize = ResizeMode.LETTERBOX
    normalization = UNIT

    def __init__(
        self,
        layout: YoloLayout,
        labels: Labels | None = None,
        *,
        min_score: float = 0.5,
        iou_threshold: float = 0.45,
        max_results: int = 100,
    ) -> None:
        self.layout = layout
        self.labels = labels or Labels({})
        self.min_score = min_score
        self.iou_threshold = iou_threshold
        self.max_results = max_results

    def results(self, engine: Engine, transform: Transform) -> list[Result]:
        spec = engine.outputs[0]
        if spec.shape != self.layout.shape:
            raise UnsupportedModel(
                engine.model.source,
                f"YOLO output has shape {list(spec.shape)}, expected {list(self.layout.shape)}",
                hint="use --task raw",
            )
        height, width = engine.inputs[0].shape[1:3]
        decoded = decode(
            engine.output(0),
            self.layout,
            (height, width),
            spec=spec,
            min_score=self.min_score,
            iou_threshold=self.iou_threshold,
            max_results=self.max_results,
        )
        return [self._detection(d, transform) for d in decoded]

    def _detection(self, decoded: DecodedBox, transform: Transform) -> Detection:
        ymin, xmin, ymax, xmax = (round(v, _DIGITS) for v in transform.box(*decoded.box))
        return Detection(
            class_id=decoded.class_id,
            label=self.labels.name(decoded.class_id),
            score=round(decoded.score, _DIGITS),
            box=(ymin, xmin, ymax, xmax),
        )
