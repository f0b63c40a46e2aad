"""Landmark models (MediaPipe face mesh, hand landmarks) and the crops they run on.

A landmark model sees one object, cut out of the frame by a first-stage detector
(MediaPipe's detect-then-landmark design): ``crop`` cuts the detection's box, widened
and made square, and turned upright from two of its keypoints (a face's eyes), out of
the full-resolution frame; ``Crop.to_frame`` maps a point of the crop back. The task
reads ``K`` points of ``(x, y, z)`` in input pixels (one output of ``3K`` values) and
a presence logit (an output of one value), recognised from those outputs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .engine import Engine
from .modelfile import ModelInfo
from .preprocess import Frame, Transform
from .tasks import Detection, Keypoint, Landmarks, Result, Task, TaskName, dequantize

_MIN_POINTS = 5
_DIGITS = 6


@dataclass(frozen=True)
class LandmarkLayout:
    """Where a landmark model's points and presence score are among its outputs."""

    points: int
    """Output position of the ``3K`` values."""
    presence: int
    """Output position of the one presence logit."""
    count: int
    """K, the number of points (468 for the face mesh, 21 for a hand)."""


def landmark_layout(info: ModelInfo) -> LandmarkLayout | None:
    """The layout of a landmark model: an output of ``3K`` values (K >= 5) and one of a
    single value (the presence logit; the first such output), or None."""
    sizes = [math.prod(t.shape) if t.shape else 0 for t in info.outputs]
    if not 2 <= len(sizes) <= 4:
        return None
    points = next((i for i, n in enumerate(sizes) if n >= 3 * _MIN_POINTS and n % 3 == 0), None)
    presence = next((i for i, n in enumerate(sizes) if n == 1), None)
    if points is None or presence is None:
        return None
    return LandmarkLayout(points, presence, sizes[points] // 3)


class LandmarksTask(Task):
    """The points of a landmark model, mapped to the frame, and the presence score."""

    name = TaskName.LANDMARKS

    def __init__(self, layout: LandmarkLayout) -> None:
        self.layout = layout

    def results(self, engine: Engine, transform: Transform) -> list[Result]:
        height, width = engine.inputs[0].shape[1:3]
        spec = engine.outputs[self.layout.points]
        raw = dequantize(engine.output(self.layout.points), spec).reshape(-1, 3)
        presence_spec = engine.outputs[self.layout.presence]
        logit = float(dequantize(engine.output(self.layout.presence), presence_spec).reshape(-1)[0])
        points = []
        for x, y, z in raw:
            frame_y, frame_x = transform.point(float(y) / height, float(x) / width)
            points.append(
                (round(frame_x, _DIGITS), round(frame_y, _DIGITS), round(float(z) / width, _DIGITS))
            )
        score = 1.0 / (1.0 + math.exp(-max(-100.0, min(100.0, logit))))
        return [Landmarks(round(score, _DIGITS), tuple(points))]


@dataclass(frozen=True)
class Crop:
    """A square, upright cut of the frame around one detection, at a model's input size."""

    pixels: Frame
    centre: tuple[float, float]
    """``(x, y)`` in frame pixels."""
    side: float
    """In frame pixels."""
    angle: float
    """Radians the cut is turned by in the frame (0: upright already)."""
    frame_size: tuple[int, int]
    """``(width, height)`` of the frame it came from."""

    def to_frame(self, x: float, y: float) -> tuple[float, float]:
        """A point of the crop (normalised to it) as ``(x, y)`` normalised to the frame."""
        dx, dy = (x - 0.5) * self.side, (y - 0.5) * self.side
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        frame_x = self.centre[0] + dx * cos - dy * sin
        frame_y = self.centre[1] + dx * sin + dy * cos
        width, height = self.frame_size
        return frame_x / width, frame_y / height


def crop(
    frame: Frame,
    detection: Detection,
    size: tuple[int, int],
    *,
    expand: float = 1.5,
    rotate: bool = True,
) -> Crop:
    """The detection's box widened ``expand`` times, square, turned upright from its first
    two keypoints (a face's eyes: MediaPipe's rule) when ``rotate``, cut from ``frame`` and
    resized to ``size`` ``(width, height)``."""
    height, width = frame.shape[:2]
    ymin, xmin, ymax, xmax = detection.box
    centre = ((xmin + xmax) / 2 * width, (ymin + ymax) / 2 * height)
    side = max((xmax - xmin) * width, (ymax - ymin) * height) * expand
    angle = 0.0
    if rotate and len(detection.keypoints) >= 2:
        (x0, y0), (x1, y1) = detection.keypoints[:2]
        angle = math.atan2((y1 - y0) * height, (x1 - x0) * width)
    cos, sin = math.cos(angle), math.sin(angle)
    out_w, out_h = size
    # Output pixel (u, v) -> frame pixel: the inverse map Pillow's affine transform takes.
    a, b = side / out_w * cos, -side / out_h * sin
    d, e = side / out_w * sin, side / out_h * cos
    c = centre[0] - (a * out_w + b * out_h) / 2
    f = centre[1] - (d * out_w + e * out_h) / 2
    image = Image.fromarray(frame).transform(
        size, Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.Resampling.BILINEAR
    )
    return Crop(np.asarray(image), centre, side, angle, (width, height))


def in_frame(result: Result, cut: Crop) -> Result:
    """A result found on ``cut`` (coordinates normalised to it) with its coordinates
    normalised to the whole frame: landmarks, pose keypoints, a detection's box (the
    box around its turned corners) and keypoints. Others (classes, tensors) have none."""
    if isinstance(result, Landmarks):
        points = []
        for x, y, z in result.points:
            frame_x, frame_y = cut.to_frame(x, y)
            depth = z * cut.side / cut.frame_size[0]
            points.append((round(frame_x, _DIGITS), round(frame_y, _DIGITS), round(depth, _DIGITS)))
        return Landmarks(result.score, tuple(points))
    if isinstance(result, Keypoint):
        x, y = (round(v, _DIGITS) for v in cut.to_frame(result.x, result.y))
        return dataclasses.replace(result, x=x, y=y)
    if isinstance(result, Detection):
        ymin, xmin, ymax, xmax = result.box
        corners = [cut.to_frame(x, y) for x in (xmin, xmax) for y in (ymin, ymax)]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        box = tuple(round(v, _DIGITS) for v in (min(ys), min(xs), max(ys), max(xs)))
        keypoints = tuple(
            tuple(round(v, _DIGITS) for v in cut.to_frame(x, y)) for x, y in result.keypoints
        )
        return dataclasses.replace(result, box=box, keypoints=keypoints)  # type: ignore[arg-type]
    return result
