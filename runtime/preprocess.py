"""Turning an HxWx3 uint8 RGB frame into a model's input tensor, in place.

Resizing stretches the frame to the input size or letterboxes it (keeps the
aspect ratio, pads the rest); the ``Transform`` returned maps model-normalised
coordinates back to frame-normalised ones. Values are written straight into
the interpreter's input buffer: uint8 as is, int8 shifted by 128, float as
``(pixel - mean) / std``. A frame already at model size is not resized. A
one-channel input gets the frame's luma (ITU-R 601, as Pillow's ``L`` mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from .errors import InputMismatch, UnsupportedModel
from .modelfile import Normalization, TensorInfo

Frame = npt.NDArray[np.uint8]
_SUPPORTED_DTYPES = ("uint8", "int8", "float32")
_CHANNELS = (1, 3)
_FILTER = Image.Resampling.BICUBIC
SIGNED_UNIT = Normalization(mean=(127.5,), std=(127.5,))
"""Pixels to [-1, 1]: the default for float inputs of models without normalisation metadata."""
UNIT = Normalization(mean=(0.0,), std=(255.0,))
"""Pixels to [0, 1]: what YOLO exports and most MediaPipe models were trained on."""


class ResizeMode(str, Enum):
    """How a frame of another aspect ratio is fitted to the model input."""

    STRETCH = "stretch"
    LETTERBOX = "letterbox"


@dataclass(frozen=True)
class Transform:
    """Model-normalised to frame-normalised coordinates: ``frame = (model - offset) * scale``."""

    offset_x: float = 0.0
    offset_y: float = 0.0
    scale_x: float = 1.0
    scale_y: float = 1.0

    def point(self, y: float, x: float) -> tuple[float, float]:
        """Map one ``(y, x)`` point, clipped to the frame."""
        return (
            _clip((y - self.offset_y) * self.scale_y),
            _clip((x - self.offset_x) * self.scale_x),
        )

    def box(self, ymin: float, xmin: float, ymax: float, xmax: float) -> tuple[float, ...]:
        """Map one ``(ymin, xmin, ymax, xmax)`` box, clipped to the frame."""
        return (*self.point(ymin, xmin), *self.point(ymax, xmax))


IDENTITY = Transform()


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))


def is_image_input(spec: TensorInfo) -> bool:
    """True for an input a frame can fill: ``[1, H, W, 3]`` (RGB) or ``[1, H, W, 1]`` (gray)."""
    return (
        len(spec.shape) == 4
        and spec.shape[0] == 1
        and spec.shape[3] in _CHANNELS
        and spec.dtype in _SUPPORTED_DTYPES
    )


class Preprocessor:
    """Writes frames into one image input of shape ``[1, H, W, 3]`` or ``[1, H, W, 1]``."""

    def __init__(
        self,
        spec: TensorInfo,
        *,
        source: str = "model",
        resize: ResizeMode = ResizeMode.STRETCH,
        normalization: Normalization = SIGNED_UNIT,
    ) -> None:
        if len(spec.shape) != 4 or spec.shape[0] != 1 or spec.shape[3] not in _CHANNELS:
            raise UnsupportedModel(
                source,
                f"input '{spec.name}' has shape {list(spec.shape)}, not an image "
                "[1, H, W, 3] (RGB) or [1, H, W, 1] (grayscale)",
                hint=f"use --task raw and feed it from a file: --input {spec.name}=FILE.npy",
            )
        if spec.dtype not in _SUPPORTED_DTYPES:
            raise UnsupportedModel(
                source,
                f"input dtype {spec.dtype} is not one of {', '.join(_SUPPORTED_DTYPES)}",
                hint=f"use --task raw and feed it from a file: --input {spec.name}=FILE.npy",
            )
        self.spec = spec
        self.height, self.width, self.channels = spec.shape[1:4]
        self.resize = resize
        self.normalization = normalization
        self.mean = np.asarray(normalization.mean, dtype=np.float32)
        self.std = np.asarray(normalization.std, dtype=np.float32)

    def __call__(self, frame: Frame, view: npt.NDArray[Any]) -> Transform:
        """Write ``frame`` into the input buffer ``view``; returns the coordinate transform."""
        _check_frame(frame)
        if self.channels == 1:
            frame = np.asarray(Image.fromarray(frame).convert("L"))[:, :, np.newaxis]
        frame_h, frame_w = frame.shape[:2]
        if (frame_h, frame_w) == (self.height, self.width):
            self._store(frame, view[0])
            return IDENTITY
        if self.resize is ResizeMode.STRETCH:
            self._store(_resized(frame, self.width, self.height), view[0])
            return IDENTITY
        return self._letterbox(frame, view[0])

    def _letterbox(self, frame: Frame, target: npt.NDArray[Any]) -> Transform:
        frame_h, frame_w = frame.shape[:2]
        ratio = min(self.width / frame_w, self.height / frame_h)
        new_w = max(1, round(frame_w * ratio))
        new_h = max(1, round(frame_h * ratio))
        pad_x, pad_y = (self.width - new_w) // 2, (self.height - new_h) // 2
        self._fill_black(target)
        self._store(
            _resized(frame, new_w, new_h), target[pad_y : pad_y + new_h, pad_x : pad_x + new_w]
        )
        return Transform(
            offset_x=pad_x / self.width,
            offset_y=pad_y / self.height,
            scale_x=self.width / new_w,
            scale_y=self.height / new_h,
        )

    def _store(self, pixels: Frame, target: npt.NDArray[Any]) -> None:
        if self.spec.dtype == "uint8":
            np.copyto(target, pixels)
        elif self.spec.dtype == "int8":
            # pixel - 128 for every byte, written in place: flipping the top bit does exactly that.
            np.bitwise_xor(pixels, 0x80, out=target.view(np.uint8))
        else:
            np.subtract(pixels, self.mean, out=target, casting="unsafe")
            target /= self.std

    def _fill_black(self, target: npt.NDArray[Any]) -> None:
        black = np.zeros((1, 1, self.channels), dtype=np.uint8)
        self._store(np.broadcast_to(black, target.shape), target)


def _check_frame(frame: Frame) -> None:
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise InputMismatch(
            f"expected an HxWx3 uint8 RGB frame, got shape {list(frame.shape)} {frame.dtype}",
            hint="convert the image to 8-bit RGB first",
        )


def _resized(frame: Frame, width: int, height: int) -> Frame:
    # Bicubic, Pillow's default: what the reference results of the assets were measured with
    # (bilinear moved YOLOv8n's scores by up to 0.05).
    if frame.shape[2] == 1:
        image = Image.fromarray(frame[:, :, 0]).resize((width, height), _FILTER)
        return np.asarray(image)[:, :, np.newaxis]
    return np.asarray(Image.fromarray(frame).resize((width, height), _FILTER))
