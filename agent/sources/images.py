"""A folder of still images (JPEG, PNG, BMP) played as a stream, one every ``interval_s``.

The folder is scanned again at the start of every cycle, so images dropped
into it (by an FTP upload from a trail camera, a cron job) are picked up. An
image that cannot be read is skipped with one warning per version of the file;
a folder that is missing, empty or holds no readable image is a
``SourceError``. Runs on the capture thread of its stream; a frame's ``full()`` (a
snapshot at the image's own size, read from the file again) on any thread.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field

from edgefleet.runtime.preprocess import Frame

from .base import BaseSourceSettings, CapturedFrame, Pacer, Size, Source, SourceError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})


class ImageFolderSourceSettings(BaseSourceSettings):
    """Still images from a folder, in name order."""

    type: Literal["images"] = Field("images", description="Source kind.")
    folder: Path = Field(description="The folder holding the images.")
    pattern: str = Field(
        "*",
        min_length=1,
        description="Glob pattern of the files to play, relative to the folder; only .jpg, "
        ".jpeg, .png and .bmp files among them are read.",
    )
    interval_s: float = Field(
        1.0,
        ge=0,
        description="Seconds between images; 0 delivers them as fast as they are consumed.",
    )
    loop: bool = Field(
        True, description="Scan the folder again and start over after the last image."
    )


_FileVersion = tuple[Path, int, int]


def _full_image(source: str, path: Path, hint: str) -> Frame:
    """The image at ``path`` at its own size, decoded again (any thread)."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise SourceError(source, f"cannot read {path.name} again ({exc})", hint=hint) from exc


class ImageFolderSource(Source):
    """Plays the images of a folder, rescanning it every cycle."""

    def __init__(self, settings: ImageFolderSourceSettings) -> None:
        super().__init__(f"images:{settings.folder}", live=settings.interval_s > 0)
        self.settings = settings
        self._pacer = Pacer(self._pause)
        self._queue: deque[Path] = deque()
        self._output_size: Size | None = None
        self._index = 0
        self._cycles = 0
        self._readable_this_cycle = 0
        self._warned: set[_FileVersion] = set()

    def open(self, output_size: Size | None) -> None:
        """Check the folder; images come at ``output_size`` (None: each image's own size)."""
        self._rearm()
        self._output_size = output_size
        self._index = 0
        self._cycles = 0
        self._queue.clear()
        self._pacer.reset()
        self._scan()

    def read(self) -> CapturedFrame | None:
        """The next readable image; None after the last one unless looping."""
        while True:
            if not self._queue:
                if self._cycles and not self.settings.loop:
                    return None
                self._queue.extend(self._scan())
                self._cycles += 1
                self._readable_this_cycle = 0
            path = self._queue.popleft()
            pixels = self._load(path)
            if pixels is not None:
                break
            if not self._queue and not self._readable_this_cycle:
                raise SourceError(
                    self.name, "no image in the folder could be read", hint=self._hint()
                )
        self._readable_this_cycle += 1
        if self.live:
            self._pacer.wait_for(self._index * self.settings.interval_s)
        full = None
        if self._output_size is not None:
            full = functools.partial(_full_image, self.name, path, self._hint())
        frame = CapturedFrame(pixels=pixels, capture_ts=time.time(), index=self._index, full=full)
        self._index += 1
        return frame

    def close(self) -> None:
        """Forget the current cycle (nothing is held open between reads)."""
        self._queue.clear()

    def _hint(self) -> str:
        return (
            f"put .jpg, .png or .bmp images matching {self.settings.pattern!r} into "
            f"{self.settings.folder}"
        )

    def _scan(self) -> list[Path]:
        folder = self.settings.folder
        if not folder.is_dir():
            raise SourceError(self.name, "no such folder", hint=self._hint())
        try:
            paths = sorted(
                path
                for path in folder.glob(self.settings.pattern)
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
            )
        except OSError as exc:
            raise SourceError(
                self.name, f"cannot list the folder ({exc})", hint=self._hint()
            ) from exc
        if not paths:
            raise SourceError(self.name, "no images in the folder", hint=self._hint())
        present = set(paths)
        self._warned = {version for version in self._warned if version[0] in present}
        return paths

    def _load(self, path: Path) -> Frame | None:
        """The image as RGB at the output size, or None (warned once) when unreadable."""
        try:
            with Image.open(path) as image:
                if self._output_size is not None:
                    image.draft("RGB", self._output_size)  # JPEG: decode at a reduced scale
                # Upright, as the model tools see it: a phone photo says how to turn it.
                rgb = ImageOps.exif_transpose(image).convert("RGB")
        except FileNotFoundError:
            log.debug("%s: %s vanished before it was read", self.name, path.name)
            return None
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
            self._warn_unreadable(path, exc)
            return None
        if self._output_size is not None and rgb.size != self._output_size:
            rgb = rgb.resize(self._output_size, Image.Resampling.BICUBIC)  # as the model tools
        return np.asarray(rgb)

    def _warn_unreadable(self, path: Path, exc: Exception) -> None:
        try:
            stat = path.stat()
        except OSError:
            return
        version = (path, stat.st_mtime_ns, stat.st_size)
        if version not in self._warned:
            self._warned.add(version)
            log.warning("%s: skipping %s, not a readable image (%s)", self.name, path.name, exc)
