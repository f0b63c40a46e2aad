"""Anchor-based detectors without a post-processing op: MediaPipe's BlazeFace and BlazePalm.

Such a model gives, for each of N fixed anchors, box and keypoint offsets
(``regressors`` ``[1, N, 4 + 2K]``: centre x, y, width, height, then K ``(x, y)``
keypoints, all in input pixels) and one score logit (``classificators``
``[1, N, 1]``). MediaPipe's graph turns them into detections with three
calculators, which this module follows step by step:

1. ``SsdAnchorsCalculator``: the anchor centres, one grid per stride (``anchors``);
2. ``TensorsToDetectionsCalculator``: sigmoid of the clipped logit, the score
   threshold, offsets divided by the input size plus the anchor centre (``decode``);
3. ``NonMaxSuppressionCalculator``, WEIGHTED: each cluster of overlapping
   candidates becomes one detection, its box and keypoints averaged by score
   (``weighted_nms``).

Those steps are pure functions of arrays, in coordinates normalised to the model
input; ``AnchorDetectionTask`` reads the engine's outputs and maps the result to
the frame. A model is matched to a preset of ``ANCHOR_PRESETS`` from its shapes
alone (``anchor_spec_for``): the anchor layout is not stored in the file.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from .engine import Engine
from .errors import SettingError, UnsupportedModel
from .labels import Labels
from .modelfile import ModelInfo, Normalization, TensorInfo
from .preprocess import SIGNED_UNIT, UNIT, ResizeMode, Transform
from .tasks import Detection, Result, Task, TaskName, dequantize

_BOX_VALUES = 4  # centre x, centre y, width, height
_REGRESSOR_NAME, _SCORE_NAME = "regressors", "classificators"
_DIGITS = 6  # as DetectionTask rounds


@dataclass(frozen=True)
class AnchorSpec:
    """How one family of anchor detectors lays out its anchors and decodes its outputs.

    The fields are MediaPipe's ``SsdAnchorsCalculatorOptions`` and
    ``TensorsToDetectionsCalculatorOptions`` for the model. Anchors are fixed size
    (``fixed_anchor_size: true``, as in every BlazeFace and BlazePalm graph): width and
    height 1, so box sizes come from the regressors alone and no anchor scales or
    aspect ratios are needed beyond how many anchors each cell has.
    """

    name: str
    """The preset's name, for logs and ``model inspect``."""
    input_width: int
    input_height: int
    strides: tuple[int, ...]
    """One per layer, as MediaPipe lists them; consecutive equal strides share one grid."""
    num_keypoints: int
    x_scale: float
    """Divides the x offsets (centre and keypoints): the input width in pixels."""
    y_scale: float
    w_scale: float
    h_scale: float
    label: str
    """What a detection is when no label file names class 0 ("face", "palm")."""
    anchors_per_layer: int = 2
    """Anchors each layer adds per cell: aspect ratio 1.0 plus the interpolated scale."""
    anchor_offset: float = 0.5
    """Where in its cell an anchor sits: centres are ``(x + offset) / grid``."""
    score_clip: float = 100.0
    """Logits are clipped to +-this before the sigmoid, as MediaPipe does."""
    min_score: float = 0.5
    min_suppression_threshold: float = 0.3
    """Candidates whose IoU with a cluster's best exceeds this join that cluster."""
    resize: ResizeMode = ResizeMode.STRETCH
    normalization: Normalization = SIGNED_UNIT
    """Pixels to the range the model was trained on, for a model without metadata."""

    def __post_init__(self) -> None:
        if not self.strides or min(self.strides) <= 0:
            raise SettingError(
                f"anchor spec {self.name!r}: strides {list(self.strides)} must be positive",
                hint="give one stride per anchor layer, as MediaPipe's SsdAnchorsCalculator",
            )
        if min(self.x_scale, self.y_scale, self.w_scale, self.h_scale) <= 0:
            raise SettingError(
                f"anchor spec {self.name!r}: box scales must be positive",
                hint="use the input size in pixels, as MediaPipe's graphs do",
            )

    @property
    def count(self) -> int:
        """Number of anchors, which is the N of the model's outputs."""
        return int(anchors(self).shape[0])

    @property
    def regressor_width(self) -> int:
        """Values per anchor in the regressors output: ``4 + 2 * num_keypoints``."""
        return _BOX_VALUES + 2 * self.num_keypoints


def _mediapipe_preset(
    name: str, size: int, keypoints: int, label: str, **options: Any
) -> AnchorSpec:
    """A square-input preset whose offsets are in input pixels, as MediaPipe's graphs set."""
    return AnchorSpec(
        name=name,
        input_width=size,
        input_height=size,
        strides=(8, 16, 16, 16),
        num_keypoints=keypoints,
        x_scale=size,
        y_scale=size,
        w_scale=size,
        h_scale=size,
        label=label,
        **options,
    )


ANCHOR_PRESETS: Mapping[str, AnchorSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            # face_detection_short_range.pbtxt: [-1, 1] input. MediaPipe letterboxes, but the
            # reference results in the assets README are for the stretched frame.
            _mediapipe_preset("mediapipe-face-short-range", 128, 6, "face"),
            # palm_detection_cpu.pbtxt: [0, 1] input, letterboxed (keep_aspect_ratio); the
            # model has no normalisation metadata, so the task must say it.
            _mediapipe_preset(
                "mediapipe-palm-lite",
                192,
                7,
                "palm",
                resize=ResizeMode.LETTERBOX,
                normalization=UNIT,
            ),
        )
    }
)
"""The anchor detectors this runtime knows, by name."""


@functools.cache
def anchors(spec: AnchorSpec) -> npt.NDArray[np.float32]:
    """Anchor centres ``[N, 2]`` as ``(x, y)`` normalised to the input, in the model's order.

    As MediaPipe's ``SsdAnchorsCalculator``: consecutive layers of equal stride are merged
    into one grid of ``ceil(input / stride)`` cells, each cell holding every merged layer's
    anchors; cells run row by row. The array is cached and read-only.
    """
    grids = []
    for stride, layers in itertools.groupby(spec.strides):
        per_cell = spec.anchors_per_layer * len(list(layers))
        width = math.ceil(spec.input_width / stride)
        height = math.ceil(spec.input_height / stride)
        xs = (np.arange(width) + spec.anchor_offset) / width
        ys = (np.arange(height) + spec.anchor_offset) / height
        grid_x, grid_y = np.meshgrid(xs, ys)  # [height, width]: row-major, as MediaPipe loops
        cells = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
        grids.append(np.repeat(cells, per_cell, axis=0))
    centres = np.concatenate(grids).astype(np.float32)
    centres.flags.writeable = False  # shared by every caller through the cache
    return centres


def anchor_spec_for(info: ModelInfo) -> AnchorSpec | None:
    """The preset for a model with anchor outputs ``[1, N, 4+2K]`` and ``[1, N, 1]``, or None.

    The outputs are told apart by name (``regressors``, ``classificators``) where the
    model has those names, else by shape; the preset must match N, K and the input size.
    """
    roles = _output_roles(info.outputs)
    if roles is None or not info.inputs or len(info.inputs[0].shape) != 4:
        return None
    _, count, width = info.outputs[roles[0]].shape
    height_px, width_px = info.inputs[0].shape[1:3]
    for spec in ANCHOR_PRESETS.values():
        if (
            spec.count == count
            and spec.regressor_width == width
            and (spec.input_width, spec.input_height) == (width_px, height_px)
        ):
            return spec
    return None


ANCHORS_SYNTAX = (
    "a preset (" + ", ".join(ANCHOR_PRESETS) + ") or STRIDES@PER_LAYER, e.g. 8,16,16,16@2"
)


def declared_spec(text: str, info: ModelInfo) -> AnchorSpec:
    """The anchor spec ``text`` declares for the model ``info``: a preset's name, or strides
    and anchors per layer (``8,16,16,16@2``), the input size and keypoints then read from
    the model (offsets in input pixels, [-1, 1] input unless the metadata says otherwise).
    Refused, with both counts, where it does not give the model's number of anchors."""
    roles = _output_roles(info.outputs)
    if roles is None or not info.inputs or len(info.inputs[0].shape) != 4:
        shapes = [list(t.shape) for t in info.outputs]
        raise UnsupportedModel(
            info.source,
            f"anchors need outputs [1, N, 4+2K] and [1, N, 1]; this model's are {shapes}",
            hint="leave out the anchor spec, or use --task raw",
        )
    _, count, width = info.outputs[roles[0]].shape
    spec = ANCHOR_PRESETS.get(text) or _strides_spec(text, info, (width - _BOX_VALUES) // 2)
    if spec.count != count or spec.regressor_width != width:
        raise SettingError(
            f"anchor spec {text!r} gives {spec.count} anchors of {spec.regressor_width} "
            f"values; {info.source} has {count} of {width}",
            hint="check the strides and anchors per layer against the model's graph "
            "(MediaPipe's SsdAnchorsCalculator options)",
        )
    return spec


def _strides_spec(text: str, info: ModelInfo, keypoints: int) -> AnchorSpec:
    strides_text, _, per_layer_text = text.partition("@")
    try:
        strides = tuple(int(s) for s in strides_text.split(","))
        per_layer = int(per_layer_text) if per_layer_text else 2
    except ValueError:
        raise SettingError(f"bad anchor spec {text!r}", hint=f"use {ANCHORS_SYNTAX}") from None
    height, width = info.inputs[0].shape[1:3]
    return AnchorSpec(
        name=text,
        input_width=width,
        input_height=height,
        strides=strides,
        num_keypoints=keypoints,
        x_scale=width,
        y_scale=height,
        w_scale=width,
        h_scale=height,
        label="object",
        anchors_per_layer=per_layer,
    )


def _output_roles(outputs: Sequence[TensorInfo]) -> tuple[int, int] | None:
    """Positions of the regressors and the scores among two outputs, if they are such a pair."""
    if len(outputs) != 2:
        return None
    names = [t.name for t in outputs]
    if sorted(names) == sorted((_REGRESSOR_NAME, _SCORE_NAME)):
        boxes = names.index(_REGRESSOR_NAME)
    else:
        # Exports that lost the names (palm: Identity, Identity_1): the scores are the
        # output with one value per anchor.
        widths = [t.shape[-1] if t.shape else 0 for t in outputs]
        if widths.count(1) != 1:
            return None
        boxes = 1 - widths.index(1)
    regressors, scores = outputs[boxes], outputs[1 - boxes]
    if len(regressors.shape) != 3 or len(scores.shape) != 3:
        return None
    batch, count, width = regressors.shape
    fits = (
        batch == 1
        and count > 0
        and scores.shape == (1, count, 1)
        and width >= _BOX_VALUES
        and (width - _BOX_VALUES) % 2 == 0
    )
    return (boxes, 1 - boxes) if fits else None


@dataclass(frozen=True)
class AnchorDetection:
    """One detection after weighted NMS, in coordinates normalised to the model input."""

    score: float
    box: tuple[float, float, float, float]
    """``(ymin, xmin, ymax, xmax)``."""
    keypoints: tuple[tuple[float, float], ...]
    """``(x, y)`` points."""


def decode(
    spec: AnchorSpec,
    regressors: npt.ArrayLike,
    logits: npt.ArrayLike,
    *,
    min_score: float | None = None,
    max_results: int = 100,
) -> list[AnchorDetection]:
    """Detections from one frame's raw outputs (``[N, 4+2K]`` or ``[1, N, 4+2K]``, and N logits).

    Scores are ``sigmoid(clip(logit))``; candidates below ``min_score`` (default: the
    spec's) and boxes of negative size (which MediaPipe drops too) are left out; the
    rest go through ``weighted_nms``, best first.
    """
    raw = np.asarray(regressors, dtype=np.float32).reshape(spec.count, spec.regressor_width)
    clip = spec.score_clip
    # float64: exp(100) overflows float32, and the clip allows it.
    values = np.clip(np.asarray(logits, dtype=np.float64).reshape(spec.count), -clip, clip)
    scores = 1.0 / (1.0 + np.exp(-values))
    threshold = spec.min_score if min_score is None else min_score
    kept = np.flatnonzero(scores >= threshold)
    centres = anchors(spec)[kept]
    raw = raw[kept]
    centre_x = raw[:, 0] / spec.x_scale + centres[:, 0]
    centre_y = raw[:, 1] / spec.y_scale + centres[:, 1]
    half_w = raw[:, 2] / spec.w_scale / 2.0
    half_h = raw[:, 3] / spec.h_scale / 2.0
    boxes = np.stack(
        [centre_y - half_h, centre_x - half_w, centre_y + half_h, centre_x + half_w], axis=1
    )
    offsets = raw[:, _BOX_VALUES:].reshape(kept.size, spec.num_keypoints, 2)
    scale = np.array([spec.x_scale, spec.y_scale], dtype=np.float32)
    points: npt.NDArray[np.float32] = offsets / scale + centres[:, np.newaxis, :]
    sized = (half_w >= 0) & (half_h >= 0)
    return weighted_nms(
        boxes[sized],
        scores[kept][sized],
        points[sized],
        threshold=spec.min_suppression_threshold,
        max_results=max_results,
    )


def weighted_nms(
    boxes: npt.ArrayLike,
    scores: npt.ArrayLike,
    keypoints: npt.ArrayLike,
    *,
    threshold: float,
    max_results: int = 100,
) -> list[AnchorDetection]:
    """MediaPipe's weighted non-maximum suppression, best score first.

    ``boxes`` ``[M, 4]`` are ``(ymin, xmin, ymax, xmax)``, ``keypoints`` ``[M, K, 2]``.
    The best remaining candidate and every one whose IoU with it exceeds ``threshold``
    form a cluster; the cluster becomes one detection whose box corners and keypoints
    are the score-weighted means of its members and whose score is the best one's.
    Averaging, rather than keeping the best box alone, steadies the box from frame to
    frame, which is why BlazeFace was trained for it.
    """
    box_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    score_array = np.asarray(scores, dtype=np.float64).reshape(-1)
    point_array = np.asarray(keypoints, dtype=np.float64)
    remaining = np.argsort(-score_array, kind="stable")
    found: list[AnchorDetection] = []
    while remaining.size and len(found) < max_results:
        best = remaining[0]
        # The best always joins its own cluster: a zero-area box has IoU 0 with itself,
        # and would otherwise stay in ``remaining`` for ever.
        joins = _iou(box_array[best], box_array[remaining]) > threshold
        joins[0] = True
        members = remaining[joins]
        weights = score_array[members]
        total = weights.sum()
        box = weights @ box_array[members] / total
        points = np.tensordot(weights, point_array[members], axes=1) / total
        found.append(
            AnchorDetection(
                score=float(score_array[best]),
                box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
                keypoints=tuple((float(x), float(y)) for x, y in points),
            )
        )
        remaining = remaining[~joins]
    return found


def _iou(box: npt.NDArray[np.float64], others: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Intersection over union of one ``(ymin, xmin, ymax, xmax)`` box with each of ``others``."""
    top = np.maximum(box[0], others[:, 0])
    left = np.maximum(box[1], others[:, 1])
    bottom = np.minimum(box[2], others[:, 2])
    right = np.minimum(box[3], others[:, 3])
    inter = np.clip(bottom - top, 0.0, None) * np.clip(right - left, 0.0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    iou: npt.NDArray[np.float64] = np.divide(
        inter, union, out=np.zeros_like(inter), where=union > 0
    )
    return iou


class AnchorDetectionTask(Task):
    """Boxes and keypoints of an anchor detector (``regressors`` and ``classificators``).

    Every detection is class 0, labelled by the label file's line 0 where one is given,
    else by the spec (``face``, ``palm``). Resize and normalisation default to the
    spec's (the Predictor still prefers the model's normalisation metadata).
    """

    name = TaskName.DETECTION

    def __init__(
        self,
        spec: AnchorSpec,
        labels: Labels | None = None,
        *,
        min_score: float | None = None,
        max_results: int = 100,
    ):
        """``min_score`` defaults to the spec's (0.5 for the presets)."""
        self.spec = spec
        self.label = (labels.names.get(0) if labels else None) or spec.label
        self.min_score = spec.min_score if min_score is None else min_score
        self.max_results = max_results
        self.resize = spec.resize
        self.normalization = spec.normalization

    def results(self, engine: Engine, transform: Transform) -> list[Result]:
        regressors, logits = self._outputs(engine)
        found = decode(
            self.spec,
            regressors,
            logits,
            min_score=self.min_score,
            max_results=self.max_results,
        )
        return [self._detection(d, transform) for d in found]

    def _outputs(self, engine: Engine) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The regressors and logits of the last invoke, dequantized."""
        roles = _output_roles(engine.outputs)
        spec = self.spec
        expected = (1, spec.count, spec.regressor_width)
        if roles is None or engine.outputs[roles[0]].shape != expected:
            shapes = [list(t.shape) for t in engine.outputs]
            raise UnsupportedModel(
                engine.model.source,
                f"{spec.name} needs outputs {list(expected)} and {[1, spec.count, 1]}, "
                f"this model has {shapes}",
                hint="use the anchor preset made for this model, or --task raw",
            )
        boxes, scores = roles
        return (
            dequantize(engine.output(boxes), engine.outputs[boxes]),
            dequantize(engine.output(scores), engine.outputs[scores]),
        )

    def _detection(self, found: AnchorDetection, transform: Transform) -> Detection:
        ymin, xmin, ymax, xmax = transform.box(*found.box)
        keypoints = []
        for x, y in found.keypoints:
            frame_y, frame_x = transform.point(y, x)
            keypoints.append((round(frame_x, _DIGITS), round(frame_y, _DIGITS)))
        return Detection(
            class_id=0,
            label=self.label,
            score=round(found.score, _DIGITS),
            box=(
                round(ymin, _DIGITS),
                round(xmin, _DIGITS),
                round(ymax, _DIGITS),
                round(xmax, _DIGITS),
            ),
            keypoints=tuple(keypoints),
        )
