"""A moving test pattern, for demos and tests on machines without a camera.

Colour bars shaded top to bottom scroll sideways while a white square moves
down; frame ``n`` depends only on ``n`` and the size, so runs are
reproducible. Generated with numpy (one slice copy per frame) on the capture
thread of its stream.
"""

from __future__ import annotations

import functools
import time
from typing import Literal

import numpy as np
from pydantic import Field

from edgefleet.runtime.preprocess import Frame

from .base import BaseSourceSettings, CapturedFrame, Pacer, Size, Source

_BAR_COLOURS = np.array(
    [
        (255, 255, 255),
        (255, 255, 0),
        (0, 255, 255),
        (0, 255, 0),
        (255, 0, 255),
        (255, 0, 0),
        (0, 0, 255),
        (0, 0, 0),
    ],
    dtype=np.float32,
)
_FRAMES_PER_SCROLL = 60


class SyntheticSourceSettings(BaseSourceSettings):
    """A generated test pattern."""

    type: Literal["synthetic"] = Field("synthetic", description="Source kind.")
    width: int = Field(640, gt=0, description="Frame width in pixels.")
    height: int = Field(480, gt=0, description="Frame height in pixels.")
    fps: float = Field(
        30.0, ge=0, description="Frames per second; 0 delivers them as fast as they are consumed."
    )
    frames: int | None = Field(
        None, ge=1, description="End after this many frames; endless if unset."
    )


def _strip(width: int, height: int) -> Frame:
    """Two pattern widths side by side, so any window of one width is a frame."""
    columns = np.arange(2 * width) * len(_BAR_COLOURS) // width % len(_BAR_COLOURS)
    shade = np.linspace(1.0, 0.4, height, dtype=np.float32)
    return (shade[:, None, None] * _BAR_COLOURS[columns][None, :, :]).astype(np.uint8)


def _frame(strip: Frame, index: int) -> Frame:
    """Frame ``index``: a window of the strip, shifted sideways, with the square drawn in."""
    height, double_width, _ = strip.shape
    width = double_width // 2
    shift = index * max(1, width // _FRAMES_PER_SCROLL) % width
    frame = strip[:, shift : shift + width].copy()
    side = max(1, min(width, height) // 8)
    top = index * max(1, height // _FRAMES_PER_SCROLL) % max(1, height - side)
    left = (width - side) // 2
    frame[top : top + side, left : left + side] = 255
    return frame


def _pattern(width: int, height: int, index: int) -> Frame:
    """Frame ``index`` of the pattern at ``width`` x ``height``, made from scratch."""
    return _frame(_strip(width, height), index)


class SyntheticSource(Source):
    """The test pattern, paced at ``fps`` (unpaced and not live when fps is 0)."""

    def __init__(self, settings: SyntheticSourceSettings) -> None:
        super().__init__(f"synthetic:{settings.width}x{settings.height}", live=settings.fps > 0)
        self.settings = settings
        self._pacer = Pacer(self._pause)
        self._strip: Frame | None = None
        self._index = 0

    def open(self, output_size: Size | None) -> None:
        """Prepare the pattern at ``output_size`` (None: the configured size)."""
        self._rearm()
        width, height = output_size or (self.settings.width, self.settings.height)
        self._strip = _strip(width, height)
        self._index = 0
        self._pacer.reset()

    def read(self) -> CapturedFrame | None:
        """The next pattern frame; None after ``frames`` frames."""
        assert self._strip is not None, "read() before open()"
        if self.settings.frames is not None and self._index >= self.settings.frames:
            return None
        if self.live:
            self._pacer.wait_for(self._index / self.settings.fps)
        size = (self.settings.width, self.settings.height)
        scaled = self._strip.shape[:2] != (size[1], size[0] * 2)
        frame = CapturedFrame(
            pixels=_frame(self._strip, self._index),
            capture_ts=time.time(),
            index=self._index,
            full=functools.partial(_pattern, *size, self._index) if scaled else None,
        )
        self._index += 1
        return frame

    def close(self) -> None:
        """Drop the pattern."""
        self._strip = None
