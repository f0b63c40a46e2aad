"""Semantic segmentation: a class id per pixel, and the share of the frame each class covers.

A segmentation model is recognised from its single output (``segmentation_output``):

* ``[1, H, W]`` integer: class ids, the arg-max already in the graph (DeepLab v3);
* ``[1, H, W, C]`` float or quantized, ``C > 1``: per-class scores, arg-max taken here;
* ``[1, H, W, 1]``: one class's probability (MediaPipe selfie segmentation), class 1
  where it reaches the threshold, class 0 (background) elsewhere. The same shape with
  plain integers (an arg-max kept with its channel axis) is read as class ids.

``SegmentationTask`` turns that output into a ``[H, W]`` class-id mask in the model's
geometry and into ``Segment`` results over the part of the mask that shows the frame:
letterbox padding is excluded. ``mask_image`` and ``save_mask_png`` give the mask in the
frame's own size, pixel values being the class ids.

Like the ``Engine`` it reads, a task is used by one thread at a time; each frame gets
a fresh mask array, so a mask handed out stays valid after the next frame.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from .engine import Engine
from .errors import UnsupportedModel
from .labels import Labels
from .modelfile import ModelInfo, TensorInfo
from .preprocess import Transform
from .tasks import Result, Segment, Task, TaskName, dequantize

MIN_MASK_SIDE = 16
"""Smallest mask height and width taken for an image: below it, a ``[1, 1, 17, 3]`` pose
or ``[1, 10, 4]`` boxes output would pass for a mask."""
DEFAULT_THRESHOLD = 0.5
"""Probability from which a single-class output's pixel belongs to the class."""
BACKGROUND = "background"
FOREGROUND = "foreground"
_INTEGER_DTYPES = ("int64", "int32", "int16", "int8", "uint8", "uint16")
_PALETTE_SIZE = 256
_COVERAGE_DIGITS = 6

Mask = npt.NDArray[np.uint8]
"""A ``[H, W]`` array of class ids."""


class MaskKind(str, Enum):
    """How a segmentation output encodes the class of each pixel."""

    CLASS_IDS = "class_ids"
    SCORES = "scores"
    PROBABILITY = "probability"


@dataclass(frozen=True)
class SegmentationLayout:
    """Where a model's mask is and how to read it."""

    kind: MaskKind
    tensor: TensorInfo
    height: int
    width: int
    classes: int | None
    """Number of classes the output can name: ``C`` for scores, 2 for a probability,
    unknown (``None``) for class ids."""

    def describe(self) -> str:
        """What the output holds, in words, for ``model inspect``."""
        size = f"{self.height}x{self.width}"
        if self.kind is MaskKind.CLASS_IDS:
            return f"a {size} mask of class ids (arg-max in the graph)"
        if self.kind is MaskKind.SCORES:
            return f"{self.classes} class scores per pixel of a {size} mask (arg-max here)"
        return f"one class's probability per pixel of a {size} mask (thresholded here)"


def segmentation_output(info: ModelInfo) -> SegmentationLayout | None:
    """The layout of a segmentation model's single output, or ``None`` for other models."""
    if len(info.outputs) != 1 or not _image_like(info.outputs[0]):
        return None
    spec = info.outputs[0]
    kind = _mask_kind(spec)
    if kind is None:
        return None
    classes = _class_count(kind, spec)
    return SegmentationLayout(kind, spec, spec.shape[1], spec.shape[2], classes)


def _image_like(spec: TensorInfo) -> bool:
    """``[1, H, W]`` or ``[1, H, W, C]`` with H and W big enough to be a mask."""
    shape = spec.shape
    return (
        len(shape) in (3, 4)
        and shape[0] == 1
        and shape[1] >= MIN_MASK_SIDE
        and shape[2] >= MIN_MASK_SIDE
    )


def _mask_kind(spec: TensorInfo) -> MaskKind | None:
    integer_ids = spec.dtype in _INTEGER_DTYPES and not spec.quantized
    one_channel = len(spec.shape) == 3 or spec.shape[3] == 1
    if integer_ids:
        # Plain integers over C channels are counts or codes, not scores to compare.
        return MaskKind.CLASS_IDS if one_channel else None
    if len(spec.shape) == 3:
        # A float [1, H, W] is as likely a depth map as a mask: not taken.
        return None
    return MaskKind.PROBABILITY if one_channel else MaskKind.SCORES


def _class_count(kind: MaskKind, spec: TensorInfo) -> int | None:
    if kind is MaskKind.SCORES:
        return spec.shape[3]
    if kind is MaskKind.PROBABILITY:
        return 2  # background and the one class
    return None  # ids straight from the graph: the model does not say how many


def _class_labels(layout: SegmentationLayout, labels: Labels) -> Labels:
    """Names for the mask's class ids.

    A single-class model's label list (its metadata) names the one class it finds,
    which is class 1 here; without one, that class is only "foreground".
    """
    if layout.kind is not MaskKind.PROBABILITY or len(labels) >= 2:
        return labels
    foreground = labels.names.get(0) if len(labels) == 1 else None
    return Labels({0: BACKGROUND, 1: foreground or FOREGROUND}, labels.source)


def _class_ids(ids: npt.NDArray[Any], source: str) -> Mask:
    """Class ids as uint8, refusing ids a uint8 mask (and a palette PNG) cannot hold."""
    low, high = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
    if low < 0 or high >= _PALETTE_SIZE:
        raise _too_many_classes(source, f"class ids from {low} to {high}")
    return ids.astype(np.uint8)


def _too_many_classes(source: str, found: str) -> UnsupportedModel:
    return UnsupportedModel(
        source,
        f"segmentation output has {found}; masks here hold class ids 0 to {_PALETTE_SIZE - 1}",
        hint="use --task raw for models with more than 256 classes",
    )


class SegmentationTask(Task):
    """Per-class coverage of the frame from a segmentation output; keeps the last mask."""

    name = TaskName.SEGMENTATION

    def __init__(
        self,
        layout: SegmentationLayout,
        labels: Labels | None = None,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        min_coverage: float = 0.0,
    ) -> None:
        self.layout = layout
        self.labels = _class_labels(layout, labels or Labels({}))
        self.threshold = threshold
        self.min_coverage = min_coverage
        self.last_mask: Mask | None = None

    def mask(self) -> Mask:
        """The last frame's ``[H, W]`` class-id mask, in the model's geometry."""
        if self.last_mask is None:
            raise RuntimeError("no frame segmented yet: call predict first")
        return self.last_mask

    def results(self, engine: Engine, transform: Transform) -> list[Result]:
        spec = engine.outputs[0]
        raw = engine.output(0).reshape(spec.shape[1:])
        self.last_mask = self._class_mask(raw, spec, engine.model.source)
        region = frame_region(self.last_mask, transform)
        counts = np.bincount(region.reshape(-1), minlength=1)
        total = max(1, region.size)
        # Largest first; equal coverage keeps class order (a stable sort).
        order = np.argsort(-counts, kind="stable")
        segments: list[Result] = []
        for class_id in order:
            coverage = counts[class_id] / total
            if counts[class_id] == 0 or coverage < self.min_coverage:
                continue
            segments.append(
                Segment(
                    int(class_id),
                    self.labels.name(int(class_id)),
                    round(float(coverage), _COVERAGE_DIGITS),
                )
            )
        return segments

    def _class_mask(self, raw: npt.NDArray[Any], spec: TensorInfo, source: str) -> Mask:
        kind = self.layout.kind
        if kind is MaskKind.CLASS_IDS:
            return _class_ids(raw.reshape(raw.shape[:2]), source)
        scores = dequantize(raw, spec)
        if kind is MaskKind.PROBABILITY:
            return (scores[:, :, 0] >= self.threshold).astype(np.uint8)
        if scores.shape[2] > _PALETTE_SIZE:
            raise _too_many_classes(source, f"{scores.shape[2]} classes")
        ids: Mask = np.argmax(scores, axis=2).astype(np.uint8)
        return ids


Point = tuple[float, float]


def with_region_coverage(
    segments: Sequence[Segment],
    mask: Mask,
    transform: Transform,
    regions: Mapping[str, Sequence[Point]],
) -> list[Segment]:
    """``segments`` with the share of each region (a polygon of ``(x, y)`` frame fractions)
    that their class covers, computed on the mask's frame region."""
    region = frame_region(mask, transform)
    shares: dict[int, dict[str, float]] = {s.class_id: {} for s in segments}
    for name, polygon in regions.items():
        inside = _polygon_mask(tuple(polygon), region.shape)
        pixels = int(inside.sum())
        counts = np.bincount(region[inside], minlength=_PALETTE_SIZE) if pixels else None
        for class_id, by_zone in shares.items():
            share = counts[class_id] / pixels if counts is not None else 0.0
            by_zone[name] = round(float(share), _COVERAGE_DIGITS)
    return [replace(s, zones=shares[s.class_id]) for s in segments]


@functools.lru_cache(maxsize=32)
def _polygon_mask(polygon: tuple[Point, ...], shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    """The pixels of a ``shape`` mask inside ``polygon``, edges included (cached: zones and
    mask sizes do not change between frames)."""
    height, width = shape
    image = Image.new("1", (width, height), 0)
    corners = [(x * width, y * height) for x, y in polygon]
    ImageDraw.Draw(image).polygon(corners, fill=1, outline=1)
    return np.asarray(image, dtype=bool)


def frame_region(mask: Mask, transform: Transform) -> Mask:
    """The part of a model-geometry mask that shows the frame: letterbox padding cut off."""
    height, width = mask.shape
    top, bottom = _span(transform.offset_y, transform.scale_y, height)
    left, right = _span(transform.offset_x, transform.scale_x, width)
    return mask[top:bottom, left:right]


def _span(offset: float, scale: float, size: int) -> tuple[int, int]:
    """Mask rows (or columns) of the frame: model-normalised ``[offset, offset + 1/scale)``."""
    start = min(size - 1, max(0, round(offset * size)))
    stop = min(size, max(start + 1, round((offset + 1.0 / scale) * size)))
    return start, stop


def mask_image(mask: Mask, transform: Transform, frame_size: tuple[int, int]) -> Image.Image:
    """The mask in the frame's ``(width, height)``: padding cut off, resized nearest, so
    every pixel is still a class id; a palette image with a distinct colour per class."""
    region = frame_region(mask, transform)
    # Made as a palette image from the ids' bytes: converting from L would remap the values.
    image = Image.frombytes("P", (region.shape[1], region.shape[0]), region.tobytes())
    image.putpalette(_PALETTE)
    if image.size != frame_size:
        image = image.resize(frame_size, Image.Resampling.NEAREST)
    return image


def save_mask_png(
    mask: Mask, transform: Transform, frame_size: tuple[int, int], path: Path | str
) -> Path:
    """Write ``mask_image(...)`` as a PNG at ``path``; returns the path. ``OSError`` if the
    file cannot be written."""
    path = Path(path)
    mask_image(mask, transform, frame_size).save(path, format="PNG")
    return path


def _palette() -> list[int]:
    """The PASCAL VOC colour map: class 0 black, neighbouring ids far apart in colour.

    Each id's bits are spread over the high bits of red, green and blue in turn.
    """
    ids = np.arange(_PALETTE_SIZE)
    colours = np.zeros((_PALETTE_SIZE, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (ids >> (3 * shift + channel)) & 1
            colours[:, channel] |= bit << (7 - shift)
    return [int(v) for v in colours.reshape(-1)]


_PALETTE = _palette()
