"""Which task a model serves, and why: recognised from its outputs, or asked for and checked.

``choose_task`` looks at the graph alone (no interpreter): an SSD post-process op,
a YOLO output, BlazeFace-style anchor outputs, the MoveNet keypoint shape, a
segmentation mask or a score vector, in that order; anything else is ``raw``.
The reason it gives is what ``edgefleet model inspect`` prints. ``make_task``
builds the task, refusing an override whose outputs do not fit with the shapes
it needed, and warning when a label file's length does not match the classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .anchors import AnchorDetectionTask, anchor_spec_for, declared_spec
from .errors import SettingError, UnsupportedModel
from .labels import Labels
from .landmarks import LandmarksTask, landmark_layout
from .modelfile import DETECTION_POSTPROCESS_OP, ModelInfo
from .segmentation import MaskKind, SegmentationTask, segmentation_output
from .tasks import (
    POSE_SHAPE,
    ClassificationTask,
    DetectionTask,
    PoseTask,
    RawTask,
    Task,
    TaskName,
)
from .yolo import YoloTask, yolo_layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskChoice:
    """The task picked for a model and the evidence for it, in words."""

    name: TaskName
    reason: str


def choose_task(info: ModelInfo) -> TaskChoice:
    """The task the model's outputs say it serves; ``raw`` when none fits."""
    for recognise in _RECOGNISERS:
        choice = recognise(info)
        if choice is not None:
            return choice
    return TaskChoice(TaskName.RAW, f"no task here understands the outputs {_shapes(info)}")


def _ssd(info: ModelInfo) -> TaskChoice | None:
    if DETECTION_POSTPROCESS_OP not in info.op_names:
        return None
    return TaskChoice(TaskName.DETECTION, f"SSD: the graph ends in {DETECTION_POSTPROCESS_OP}")


def _yolo(info: ModelInfo) -> TaskChoice | None:
    layout = yolo_layout(info)
    if layout is None:
        return None
    return TaskChoice(
        TaskName.DETECTION,
        f"YOLO {layout.version}-style output {_shapes(info)}: {layout.classes} classes, "
        f"{layout.candidates} candidates (decoded here, with NMS)",
    )


def _anchors(info: ModelInfo) -> TaskChoice | None:
    spec = anchor_spec_for(info)
    if spec is None:
        return None
    return TaskChoice(
        TaskName.DETECTION,
        f"anchor boxes and scores {_shapes(info)}: {spec.name} ({spec.count} anchors, "
        "decoded here, with weighted NMS)",
    )


def _landmarks(info: ModelInfo) -> TaskChoice | None:
    layout = landmark_layout(info)
    if layout is None:
        return None
    return TaskChoice(
        TaskName.LANDMARKS,
        f"outputs {_shapes(info)}: {layout.count} landmark points and a presence score",
    )


def _pose(info: ModelInfo) -> TaskChoice | None:
    if len(info.outputs) != 1 or info.outputs[0].shape != POSE_SHAPE:
        return None
    return TaskChoice(TaskName.POSE, f"one output {_shapes(info)}: 17 keypoints (MoveNet)")


def _segmentation(info: ModelInfo) -> TaskChoice | None:
    mask = segmentation_output(info)
    if mask is None:
        return None
    return TaskChoice(TaskName.SEGMENTATION, f"one output {_shapes(info)}: {mask.describe()}")


def _classification(info: ModelInfo) -> TaskChoice | None:
    if _score_vector(info) is None:
        return None
    return TaskChoice(TaskName.CLASSIFICATION, f"one score vector {_shapes(info)}")


# In this order: an SSD graph or a YOLO output is also "one output" of some shape.
_RECOGNISERS = (_ssd, _yolo, _anchors, _landmarks, _pose, _segmentation, _classification)


def detect_task(info: ModelInfo) -> TaskName:
    """The task ``choose_task`` picks, without the reason."""
    return choose_task(info).name


def make_task(
    name: TaskName,
    info: ModelInfo,
    *,
    labels: Labels | None = None,
    min_score: float | None = None,
    top_k: int = 5,
    iou_threshold: float | None = None,
    anchors: str | None = None,
) -> Task:
    """Build the task ``name`` for a model, refusing one whose outputs do not fit.

    ``anchors`` declares an anchor detector's layout (``declared_spec``) for a model
    that no preset matches."""
    if anchors is not None:
        if name is not TaskName.DETECTION:
            raise SettingError(
                f"anchors are for detection; the task is {name.value}",
                hint="leave out the anchor spec, or use --task detection",
            )
        return AnchorDetectionTask(declared_spec(anchors, info), labels, min_score=min_score)
    if name is TaskName.DETECTION:
        return _detection_task(info, labels, min_score, iou_threshold)
    if name is TaskName.SEGMENTATION:
        return _segmentation_task(info, labels)
    if name is TaskName.CLASSIFICATION:
        classes = _score_vector(info)
        if classes is None:
            raise _refused(info, "classification needs one score vector output [1, N]")
        _check_label_count(labels, classes, info.source)
        return ClassificationTask(labels, top_k=top_k, min_score=min_score or 0.0)
    return _shape_task(name, info)


def _segmentation_task(info: ModelInfo, labels: Labels | None) -> Task:
    layout = segmentation_output(info)
    if layout is None:
        raise _refused(
            info,
            "segmentation needs one mask output: [1, H, W] class ids, [1, H, W, C] class "
            "scores or [1, H, W, 1] a probability, H and W at least 16",
        )
    if layout.kind is not MaskKind.PROBABILITY:  # there, 1 or 2 labels both fit
        _check_label_count(labels, layout.classes, info.source)
    return SegmentationTask(layout, labels)


def _shape_task(name: TaskName, info: ModelInfo) -> Task:
    """The tasks without labels: landmarks, pose, raw."""
    if name is TaskName.LANDMARKS:
        landmarks = landmark_layout(info)
        if landmarks is None:
            raise _refused(
                info, "landmarks need an output of 3K values (x, y, z) and a presence output"
            )
        return LandmarksTask(landmarks)
    if name is TaskName.POSE:
        if len(info.outputs) != 1 or info.outputs[0].shape != POSE_SHAPE:
            raise _refused(info, f"pose needs one keypoint output {list(POSE_SHAPE)} (MoveNet)")
        return PoseTask()
    return RawTask()


def _detection_task(
    info: ModelInfo, labels: Labels | None, min_score: float | None, iou: float | None
) -> Task:
    score = 0.5 if min_score is None else min_score
    if DETECTION_POSTPROCESS_OP in info.op_names:
        return DetectionTask(labels, min_score=score)
    layout = yolo_layout(info)
    if layout is not None:
        _check_label_count(labels, layout.classes, info.source)
        return YoloTask(layout, labels, min_score=score, iou_threshold=0.45 if iou is None else iou)
    spec = anchor_spec_for(info)
    if spec is not None:
        return AnchorDetectionTask(spec, labels, min_score=score)
    raise _refused(
        info,
        f"detection needs an SSD model ending in {DETECTION_POSTPROCESS_OP}, a YOLO output "
        "[1, 4+C, N] or [1, N, 5+C], or anchor outputs [1, N, 4+2K] and [1, N, 1]",
    )


def _refused(info: ModelInfo, needed: str) -> UnsupportedModel:
    return UnsupportedModel(
        info.source,
        f"{needed}; this model's outputs are {_shapes(info)}",
        hint=f"use the task it was made for (without --task: {choose_task(info).name.value})"
        ", or --task raw",
    )


def _score_vector(info: ModelInfo) -> int | None:
    """The class count of a single ``[1, N]`` score output, N > 1."""
    if len(info.outputs) != 1:
        return None
    shape = info.outputs[0].shape
    if len(shape) == 2 and shape[0] == 1 and shape[1] > 1:
        return shape[1]
    return None


def _check_label_count(labels: Labels | None, classes: int | None, source: str) -> None:
    """Warn, naming both counts, when a label file cannot be the one made for the model."""
    if labels is None or classes is None or len(labels) == classes:
        return
    known = len(labels.without_placeholder())
    if known == classes:  # a '???' first line for a model that numbers real classes from 0
        return
    hint = ""
    if len(labels) == classes + 1 and labels.name(0) in ("background", "???"):
        hint = f"; its first line '{labels.name(0)}' is a class the model does not have"
    elif len(labels) + 1 == classes:
        hint = "; the model's class 0 may be 'background', which the file lacks"
    log.warning(
        "%s has %d labels but %s has %d classes, so labels may be wrong%s",
        labels.source or "the label file",
        len(labels),
        source,
        classes,
        hint,
    )


def _shapes(info: ModelInfo) -> list[list[int]]:
    return [list(t.shape) for t in info.outputs]
