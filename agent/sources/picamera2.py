"""Raspberry Pi cameras through picamera2: ``lores`` at model size, ``main`` for snapshots.

The camera runs two streams. ``main`` is full size and serves snapshots;
``lores`` is produced by the ISP at the model's input size, so no frame is
ever resized on the CPU. On a Pi 4 and older (VC4) ``lores`` is YUV420 only,
and converting YUV420 to RGB at model size with numpy is cheap; on a Pi 5
(PiSP) ``lores`` can be RGB. Without an output size, frames come from
``main``.

picamera2 is imported lazily, on the first ``open()``, so this module imports
on machines without it. The camera object only needs the part of the
Picamera2 API used here: ``create_video_configuration``, ``configure``,
``camera_configuration``, ``start``, ``capture_array(name, wait=seconds)``,
``stop``, ``close`` and the class attribute ``platform``.

Pixel order: libcamera names formats by their little-endian word, so
picamera2's "BGR888" is laid out R, G, B in memory (and "RGB888" is B, G, R).
RGB frames are therefore asked for as "BGR888".

``open``/``read``/``close`` run on the capture thread of the stream;
``snapshot()`` may run on any thread (picamera2 serialises captures). A frame read from
``lores`` offers it as its ``full()``: the ``main`` frame of the moment it is asked for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator

from edgefleet.runtime.preprocess import Frame

from .base import BaseSourceSettings, CapturedFrame, Size, Source, SourceError

log = logging.getLogger(__name__)

CameraFactory = Callable[[int], Any]
"""Makes the camera object for a camera index (default: ``picamera2.Picamera2(camera_num=i)``)."""

RGB_FORMAT = "BGR888"  # R, G, B bytes in memory: see the module docstring
YUV420_FORMAT = "YUV420"


class Picamera2SourceSettings(BaseSourceSettings):
    """A Raspberry Pi camera module (CSI) through picamera2."""

    type: Literal["picamera2"] = Field("picamera2", description="Source kind.")
    camera_index: int = Field(0, ge=0, description="Which camera, in libcamera's order.")
    width: int = Field(1280, gt=0, description="Width of the full-size (main, snapshot) stream.")
    height: int = Field(720, gt=0, description="Height of the full-size (main, snapshot) stream.")
    fps: float = Field(30.0, gt=0, description="Camera frame rate.")
    lores_format: Literal["auto", "yuv420", "rgb"] = Field(
        "auto",
        description="Format of the model-size stream: 'auto' is rgb on a Pi 5 and yuv420 "
        "(converted to RGB here) on older boards, whose ISP only produces YUV420 there.",
    )
    read_timeout_s: float = Field(
        2.0, gt=0, description="Treat the camera as lost when no frame came for this many seconds."
    )

    @field_validator("width", "height")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("must be even")
        return value


@dataclass(frozen=True)
class YuvEncoding:
    """How YUV was derived from RGB: luma weights and whether values use the full 0-255 range."""

    kr: float
    kb: float
    full_range: bool


_ENCODINGS = {"Rec601": (0.299, 0.114), "Rec709": (0.2126, 0.0722), "Rec2020": (0.2627, 0.0593)}
BT601_LIMITED = YuvEncoding(0.299, 0.114, full_range=False)


def encoding_of(colour_space: Any) -> YuvEncoding:
    """The YUV encoding of a libcamera ``ColorSpace`` (BT.601 limited range when unknown)."""
    name = getattr(getattr(colour_space, "ycbcrEncoding", None), "name", None)
    range_name = getattr(getattr(colour_space, "range", None), "name", None)
    if name not in _ENCODINGS:
        log.warning("unknown YUV encoding in colour space %r; assuming BT.601", colour_space)
        name = "Rec601"
    kr, kb = _ENCODINGS[name]
    return YuvEncoding(kr, kb, full_range=range_name == "Full")


def yuv420_to_rgb(
    yuv: npt.NDArray[np.uint8], width: int, height: int, encoding: YuvEncoding = BT601_LIMITED
) -> Frame:
    """An RGB frame from a planar YUV420 (I420) image as picamera2 returns it.

    ``yuv`` has ``height * 3 / 2`` rows of ``stride`` bytes (``stride >= width``):
    the Y plane, then the U and V planes at half resolution with half the stride.
    Each chroma sample colours a 2x2 block of pixels.
    """
    stride = yuv.shape[1]
    flat = yuv.reshape(-1)
    chroma_w, chroma_h, chroma_stride = (width + 1) // 2, (height + 1) // 2, stride // 2
    u_start = height * stride
    v_start = u_start + chroma_h * chroma_stride
    y = flat[:u_start].reshape(height, stride)[:, :width].astype(np.float32)
    u = _plane(flat, u_start, chroma_h, chroma_stride, chroma_w)
    v = _plane(flat, v_start, chroma_h, chroma_stride, chroma_w)
    if not encoding.full_range:
        y = (y - 16.0) * (255.0 / 219.0)
        u *= 255.0 / 224.0
        v *= 255.0 / 224.0
    kr, kb = encoding.kr, encoding.kb
    kg = 1.0 - kr - kb
    chroma = np.stack(
        (
            2 * (1 - kr) * v,
            -(2 * kb * (1 - kb) / kg) * u - (2 * kr * (1 - kr) / kg) * v,
            2 * (1 - kb) * u,
        ),
        axis=-1,
    )
    chroma = chroma.repeat(2, axis=0).repeat(2, axis=1)[:height, :width]
    rgb: Frame = np.clip(y[..., None] + chroma + 0.5, 0, 255).astype(np.uint8)
    return rgb


def _plane(
    flat: npt.NDArray[np.uint8], start: int, rows: int, stride: int, width: int
) -> npt.NDArray[np.float32]:
    plane = flat[start : start + rows * stride].reshape(rows, stride)[:, :width]
    return plane.astype(np.float32) - 128.0


def _rgb_from_rgb_stream(array: npt.NDArray[np.uint8]) -> Frame:
    """An RGB frame from a "BGR888" (R, G, B) or "XBGR8888" (R, G, B, X) array."""
    rgb: Frame = np.ascontiguousarray(array[:, :, :3])
    return rgb


def _default_factory() -> CameraFactory:
    try:
        from picamera2 import Picamera2
    except ImportError as exc:
        raise SourceError(
            "picamera2",
            f"the picamera2 library is not installed ({exc})",
            hint="on Raspberry Pi OS: sudo apt install python3-picamera2, and create the "
            "virtualenv with --system-site-packages",
        ) from exc

    def make(index: int) -> Any:
        return Picamera2(camera_num=index)

    return make


class Picamera2Source(Source):
    """A Pi camera: frames from ``lores`` at the model size, snapshots from ``main``."""

    def __init__(
        self, settings: Picamera2SourceSettings, camera_factory: CameraFactory | None = None
    ) -> None:
        super().__init__(f"picamera2:{settings.camera_index}", live=True)
        self.settings = settings
        self._factory = camera_factory
        self._lock = threading.Lock()  # guards _camera against close() during a snapshot
        self._camera: Any = None
        self._stream = "main"
        self._lores_size: Size = (0, 0)
        self._lores_yuv = False
        self._encoding = BT601_LIMITED
        self._index = 0
        self._hint = (
            "check the ribbon cable and that the camera is listed by rpicam-hello "
            "--list-cameras, and that no other program (another agent, rpicam-vid) uses it"
        )

    def open(self, output_size: Size | None) -> None:
        """Open, configure and start the camera; frames come at ``output_size`` when possible."""
        self._rearm()
        factory = self._factory or _default_factory()
        try:
            camera = factory(self.settings.camera_index)
        except (RuntimeError, IndexError, OSError) as exc:
            raise SourceError(
                self.name, f"cannot open the camera ({exc})", hint=self._hint
            ) from exc
        try:
            self._configure(camera, output_size)
            camera.start()
        except (RuntimeError, ValueError, OSError) as exc:
            camera.close()
            raise SourceError(
                self.name, f"cannot configure or start the camera ({exc})", hint=self._hint
            ) from exc
        with self._lock:
            self._camera = camera
        self._index = 0

    def _configure(self, camera: Any, output_size: Size | None) -> None:
        main_size = (self.settings.width, self.settings.height)
        lores = None
        if output_size is not None and output_size != main_size:
            if output_size[0] <= main_size[0] and output_size[1] <= main_size[1]:
                lores = {"size": output_size, "format": self._lores_format(camera)}
            else:
                log.info(
                    "%s: model input %sx%s is larger than the camera's %sx%s; using main",
                    self.name, *output_size, *main_size,
                )  # fmt: skip
        config = camera.create_video_configuration(
            main={"size": main_size, "format": RGB_FORMAT},
            lores=lores,
            controls={"FrameRate": self.settings.fps},
        )
        camera.configure(config)
        actual = camera.camera_configuration()
        self._stream = "main" if lores is None else "lores"
        if lores is not None:
            width, height = actual["lores"]["size"]
            self._lores_size = (width, height)
            self._lores_yuv = actual["lores"]["format"] == YUV420_FORMAT
            self._encoding = encoding_of(actual.get("colour_space"))
            if output_size is not None and self._lores_size != output_size:
                log.info(
                    "%s: the camera delivers %sx%s for the %sx%s model input; frames get resized",
                    self.name, *self._lores_size, *output_size,
                )  # fmt: skip

    def _lores_format(self, camera: Any) -> str:
        choice = self.settings.lores_format
        if choice == "auto":
            platform = getattr(getattr(camera, "platform", None), "name", "VC4")
            choice = "rgb" if platform == "PISP" else "yuv420"
        return RGB_FORMAT if choice == "rgb" else YUV420_FORMAT

    def read(self) -> CapturedFrame:
        """The next frame (lores at model size, else main); SourceError when the camera is lost."""
        camera = self._camera
        assert camera is not None, "read() before open()"
        array = self._capture(camera, self._stream)
        if self._stream == "lores" and self._lores_yuv:
            pixels = yuv420_to_rgb(array, *self._lores_size, self._encoding)
        else:
            pixels = _rgb_from_rgb_stream(array)
        frame = CapturedFrame(
            pixels=pixels,
            capture_ts=time.time(),
            index=self._index,
            full=self.snapshot if self._stream == "lores" else None,
        )
        self._index += 1
        return frame

    def snapshot(self) -> Frame:
        """The latest full-size frame from ``main`` (any thread)."""
        with self._lock:
            if self._camera is None:
                raise SourceError(
                    self.name, "no snapshot: the camera is not running", hint=self._hint
                )
            return _rgb_from_rgb_stream(self._capture(self._camera, "main"))

    def _capture(self, camera: Any, stream: str) -> npt.NDArray[np.uint8]:
        try:
            array: npt.NDArray[np.uint8] = camera.capture_array(
                stream, wait=self.settings.read_timeout_s
            )
        except TimeoutError as exc:
            raise SourceError(
                self.name,
                f"no frame for {self.settings.read_timeout_s:g} s",
                hint=self._hint,
            ) from exc
        except RuntimeError as exc:
            raise SourceError(self.name, f"capture failed ({exc})", hint=self._hint) from exc
        return array

    def close(self) -> None:
        """Stop and release the camera; safe when not open."""
        with self._lock:
            camera, self._camera = self._camera, None
        if camera is None:
            return
        try:
            camera.stop()
        except RuntimeError as exc:
            log.debug("%s: error while stopping (%s)", self.name, exc)
        finally:
            camera.close()
