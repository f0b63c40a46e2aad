"""Frame sources (cameras, streams, files, image folders, a test pattern) and the capture thread.

A source's settings are chosen by their ``type`` field (``SourceSettings``),
``make_source`` builds the source, and a ``Capture`` runs it on its own thread
into a ``FrameSlot`` that the inference thread reads. Backends import their
libraries lazily where they are optional (picamera2), so this package imports
on any machine.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .base import CapturedFrame, Size, Source, SourceError
from .capture import Capture, CaptureState, CaptureStats, FrameSlot
from .images import ImageFolderSource, ImageFolderSourceSettings
from .picamera2 import Picamera2Source, Picamera2SourceSettings, yuv420_to_rgb
from .pyav import (
    FileSource,
    FileSourceSettings,
    StreamSource,
    StreamSourceSettings,
    V4l2Source,
    V4l2SourceSettings,
    mask_credentials,
)
from .synthetic import SyntheticSource, SyntheticSourceSettings

SourceSettings = Annotated[
    FileSourceSettings
    | StreamSourceSettings
    | V4l2SourceSettings
    | ImageFolderSourceSettings
    | SyntheticSourceSettings
    | Picamera2SourceSettings,
    Field(discriminator="type"),
]


def make_source(settings: SourceSettings) -> Source:
    """The source described by ``settings`` (nothing is opened yet)."""
    if isinstance(settings, FileSourceSettings):
        return FileSource(settings)
    if isinstance(settings, StreamSourceSettings):
        return StreamSource(settings)
    if isinstance(settings, V4l2SourceSettings):
        return V4l2Source(settings)
    if isinstance(settings, ImageFolderSourceSettings):
        return ImageFolderSource(settings)
    if isinstance(settings, SyntheticSourceSettings):
        return SyntheticSource(settings)
    return Picamera2Source(settings)


__all__ = [
    "Capture",
    "CaptureState",
    "CaptureStats",
    "CapturedFrame",
    "FileSource",
    "FileSourceSettings",
    "FrameSlot",
    "ImageFolderSource",
    "ImageFolderSourceSettings",
    "Picamera2Source",
    "Picamera2SourceSettings",
    "Size",
    "Source",
    "SourceError",
    "SourceSettings",
    "StreamSource",
    "StreamSourceSettings",
    "SyntheticSource",
    "SyntheticSourceSettings",
    "V4l2Source",
    "V4l2SourceSettings",
    "make_source",
    "mask_credentials",
    "yuv420_to_rgb",
]
