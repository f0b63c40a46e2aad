"""Video files, network streams (RTSP/HTTP/RTMP) and V4L2 cameras, decoded by FFmpeg through PyAV.

Named ``pyav`` so it does not shadow the ``av`` package. All three sources
share one decoder loop: demux a packet, decode it (single-threaded unless
configured otherwise: the interpreter needs the cores), and convert with one
``reformat`` call, which scales to the requested size and converts to RGB in
C (swscale), so nothing resizes the frame again later.

Every FFmpeg error becomes a ``SourceError`` naming the source. Network
streams open and read with timeouts, both FFmpeg's own socket timeouts and
PyAV's interrupt callback, so a dead server fails a read instead of blocking
the capture thread forever. A stream or camera that reaches end of input is
a lost source (an error to retry), a file that ends is finished (or loops).

Everything here runs on the capture thread of the stream, except
``Source.interrupt()`` and a frame's ``full()`` (a snapshot at the decoded size, made from
the decoded picture the frame keeps a reference to).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, cast
from urllib.parse import urlsplit, urlunsplit

import av
from av.container import InputContainer
from av.video.reformatter import VideoReformatter
from av.video.stream import VideoStream
from pydantic import Field, field_validator

from edgefleet.runtime.preprocess import Frame

from .base import BaseSourceSettings, CapturedFrame, Pacer, Size, Source, SourceError

log = logging.getLogger(__name__)

# A stream over UDP loses packets now and then; a run of undecodable packets this long is a loss.
_MAX_BAD_PACKETS = 50
_STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https", "rtmp", "rtmps")
_MICROSECONDS = 1_000_000


# swscale's methods for scaling to the model's input, cheapest first. The default costs
# half of bicubic's CPU (0.4 against 1.5 ms for 640x480 -> 300x300 here), CPU the
# interpreter needs on a small board; see docs/benchmarks.md.
Scaling = Literal["point", "fast_bilinear", "bilinear", "area", "bicubic"]


class _DecodedSourceSettings(BaseSourceSettings):
    """What every FFmpeg-decoded source shares."""

    decode_threads: int = Field(
        1, ge=0, description="FFmpeg decoder threads; 0 lets FFmpeg choose (one per core)."
    )
    scaling: Scaling = Field(
        "fast_bilinear",
        description="swscale method when frames are scaled to the model's input size.",
    )


class FileSourceSettings(_DecodedSourceSettings):
    """A video file (anything FFmpeg reads: mp4, mkv, avi, ts, ...)."""

    type: Literal["file"] = Field("file", description="Source kind.")
    path: Path = Field(description="The video file.")
    loop: bool = Field(False, description="Start again from the beginning at the end of the file.")
    realtime: bool = Field(
        True,
        description="Deliver frames at the video's own rate (from its timestamps), like a camera; "
        "false delivers them as fast as they are consumed, none skipped.",
    )


class StreamSourceSettings(_DecodedSourceSettings):
    """A network stream: an IP camera over RTSP, or HTTP(S)/RTMP video."""

    type: Literal["stream"] = Field("stream", description="Source kind.")
    url: str = Field(
        description="Stream URL: rtsp://, rtsps://, http://, https://, rtmp:// or rtmps://; "
        "credentials in the URL are masked in logs."
    )
    rtsp_transport: Literal["tcp", "udp"] = Field(
        "tcp", description="RTSP transport: tcp survives lossy networks, udp has less latency."
    )
    open_timeout_s: float = Field(
        10.0, gt=0, description="Give up connecting (and retry later) after this many seconds."
    )
    read_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Treat the stream as lost when no data arrived for this many seconds.",
    )
    options: dict[str, str] = Field(
        default_factory=dict,
        description="Extra FFmpeg input options, e.g. {'fflags': 'nobuffer'}; they override "
        "the ones derived from the fields above.",
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme.lower()
        if scheme not in _STREAM_SCHEMES:
            raise ValueError(f"URL scheme must be one of {', '.join(_STREAM_SCHEMES)}")
        return url


class V4l2SourceSettings(_DecodedSourceSettings):
    """A V4L2 camera (USB webcams, capture cards) through FFmpeg's v4l2 input."""

    type: Literal["v4l2"] = Field("v4l2", description="Source kind.")
    device: str = Field("/dev/video0", description="The V4L2 device node.")
    width: int | None = Field(None, gt=0, description="Capture width; the driver's if unset.")
    height: int | None = Field(None, gt=0, description="Capture height; the driver's if unset.")
    fps: float | None = Field(None, gt=0, description="Capture frame rate; the driver's if unset.")
    input_format: str | None = Field(
        None,
        pattern=r"^[a-z0-9_]+$",
        description="Pixel format asked of the camera, e.g. 'mjpeg' (high resolutions over USB 2) "
        "or 'yuyv422'; the driver's default if unset.",
    )
    open_timeout_s: float = Field(
        10.0, gt=0, description="Give up opening the camera after this many seconds."
    )
    read_timeout_s: float = Field(
        5.0, gt=0, description="Treat the camera as lost when no frame came for this many seconds."
    )

    @field_validator("width", "height")
    @classmethod
    def _even(cls, value: int | None) -> int | None:
        if value is not None and value % 2:
            raise ValueError("must be even")
        return value


def mask_credentials(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs and status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _reason(exc: Exception) -> str:
    """FFmpeg's own words for an error, without the errno noise."""
    if isinstance(exc, av.error.ExitError):
        return "timed out"
    if isinstance(exc, av.FFmpegError) and exc.strerror:
        return str(exc.strerror)
    return str(exc)


def _full_rgb(frame: av.VideoFrame, source: str) -> Frame:
    """``frame`` as RGB at its decoded size; any thread (its own reformatter, not the frame's)."""
    try:
        rgb = VideoReformatter().reformat(frame, format="rgb24")
    except av.FFmpegError as exc:
        raise SourceError(source, f"cannot convert the frame ({_reason(exc)})") from exc
    return cast(Frame, rgb.to_ndarray())


class _AvSource(Source):
    """The demux/decode/convert loop shared by files, streams and cameras."""

    def __init__(self, name: str, *, live: bool, settings: _DecodedSourceSettings) -> None:
        super().__init__(name, live=live)
        self._decode_threads = settings.decode_threads
        self._interpolation = settings.scaling.upper()
        self._container: InputContainer | None = None
        self._packets: Iterator[av.Packet[VideoStream]] | None = None
        self._pending: deque[av.VideoFrame] = deque()
        self._output_size: Size | None = None
        self._index = 0
        self._bad_packets = 0

    def _open_container(
        self,
        target: str,
        *,
        hint: str,
        format: str | None = None,
        options: dict[str, str] | None = None,
        timeout: tuple[float, float] | None = None,
    ) -> None:
        try:
            container = av.open(target, format=format, options=options, timeout=timeout)
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(self.name, f"cannot open ({_reason(exc)})", hint=hint) from exc
        if not container.streams.video:
            container.close()
            raise SourceError(self.name, "has no video stream", hint=hint)
        stream = container.streams.video[0]
        stream.codec_context.thread_count = self._decode_threads
        self._container = container
        self._packets = container.demux(stream)
        self._pending.clear()
        self._bad_packets = 0

    def _next_decoded(self, *, hint: str) -> av.VideoFrame | None:
        """The next decoded frame, or None at the end of the input."""
        assert self._packets is not None, "read() before open()"
        while not self._pending:
            try:
                packet = next(self._packets)
            except StopIteration:
                return None
            except (av.FFmpegError, OSError) as exc:
                raise SourceError(self.name, f"read failed ({_reason(exc)})", hint=hint) from exc
            self._decode(packet, hint=hint)
        return self._pending.popleft()

    def _decode(self, packet: av.Packet[VideoStream], *, hint: str) -> None:
        try:
            self._pending.extend(packet.decode())
        except av.FFmpegError as exc:
            # One corrupt packet (UDP loss, a damaged file) costs a frame, not the source.
            self._bad_packets += 1
            log.debug("%s: undecodable packet skipped (%s)", self.name, _reason(exc))
            if self._bad_packets > _MAX_BAD_PACKETS:
                raise SourceError(
                    self.name, f"{self._bad_packets} undecodable packets in a row", hint=hint
                ) from exc
        else:
            self._bad_packets = 0

    def _deliver(self, frame: av.VideoFrame) -> CapturedFrame:
        width, height = self._output_size or (frame.width, frame.height)
        try:
            rgb = frame.reformat(
                width=width, height=height, format="rgb24", interpolation=self._interpolation
            )
        except (av.error.MemoryError, av.error.BlockingIOError) as exc:
            # swscale could not allocate (seen as EAGAIN under an address-space limit):
            # the agent's memory, not the source; the supervisor names the limit.
            raise MemoryError(f"{self.name}: no memory to convert a frame ({exc})") from exc
        except av.FFmpegError as exc:
            raise SourceError(self.name, f"cannot convert the frame ({_reason(exc)})") from exc
        pixels = cast(Frame, rgb.to_ndarray())  # rgb24 is always HxWx3 uint8
        scaled = (width, height) != (frame.width, frame.height)
        captured = CapturedFrame(
            pixels=pixels,
            capture_ts=time.time(),
            index=self._index,
            # Holds the decoded picture (no copy); converted only if a snapshot asks.
            full=functools.partial(_full_rgb, frame, self.name) if scaled else None,
        )
        self._index += 1
        return captured

    def _close_container(self) -> None:
        container, self._container, self._packets = self._container, None, None
        self._pending.clear()
        if container is not None:
            try:
                container.close()
            except (av.FFmpegError, OSError) as exc:
                log.debug("%s: error while closing (%s)", self.name, _reason(exc))

    def close(self) -> None:
        """Close the input; safe when not open."""
        self._close_container()


class FileSource(_AvSource):
    """A video file, paced at its own frame rate or read as fast as it is consumed."""

    def __init__(self, settings: FileSourceSettings) -> None:
        super().__init__(f"file:{settings.path}", live=settings.realtime, settings=settings)
        self.settings = settings
        self._pacer = Pacer(self._pause)
        self._hint = f"check that {settings.path} exists, is readable and is a video file"
        self._pass_offset_s = 0.0
        self._pass_start_s = 0.0
        self._media_s = 0.0
        self._frame_s = 0.0
        self._frames_this_pass = 0

    def open(self, output_size: Size | None) -> None:
        """Open the file; frames come at ``output_size`` (None: the video's size)."""
        self._rearm()
        self._output_size = output_size
        self._index = 0
        self._pass_offset_s = 0.0
        self._pacer.reset()
        self._open_pass()

    def _open_pass(self) -> None:
        self._close_container()
        self._open_container(str(self.settings.path), hint=self._hint)
        assert self._container is not None
        rate = self._container.streams.video[0].average_rate
        self._frame_s = 1 / float(rate) if rate else 0.0
        self._frames_this_pass = 0

    def read(self) -> CapturedFrame | None:
        """The next frame; None at the end unless looping."""
        frame = self._next_decoded(hint=self._hint)
        if frame is None and self.settings.loop:
            self._next_pass()
            frame = self._next_decoded(hint=self._hint)
        if frame is None:
            return None
        self._media_s = self._media_time(frame)
        self._frames_this_pass += 1
        if self.settings.realtime:
            self._pacer.wait_for(self._media_s)
        return self._deliver(frame)

    def _next_pass(self) -> None:
        if not self._frames_this_pass:
            raise SourceError(self.name, "has no decodable video frames", hint=self._hint)
        # Reopened rather than rewound, so a file replaced or removed meanwhile is noticed.
        self._pass_offset_s = self._media_s + self._frame_s
        self._open_pass()

    def _media_time(self, frame: av.VideoFrame) -> float:
        """Seconds since the first frame of the first pass, continuing across loops."""
        if frame.time is None:
            pass_time = self._frames_this_pass * self._frame_s
        else:
            if not self._frames_this_pass:
                self._pass_start_s = float(frame.time)
            pass_time = float(frame.time) - self._pass_start_s
        return self._pass_offset_s + pass_time


class StreamSource(_AvSource):
    """A network stream; its end, like any error, counts as a lost stream."""

    def __init__(self, settings: StreamSourceSettings) -> None:
        super().__init__(mask_credentials(settings.url), live=True, settings=settings)
        self.settings = settings
        self._hint = (
            "check that the camera or server is up and reachable from this device and that the "
            "URL, path and credentials are right"
        )

    def ffmpeg_options(self) -> dict[str, str]:
        """The FFmpeg input options this stream opens with."""
        settings = self.settings
        read_timeout_us = str(int(settings.read_timeout_s * _MICROSECONDS))
        if urlsplit(settings.url).scheme.lower().startswith("rtsp"):
            options = {"rtsp_transport": settings.rtsp_transport, "timeout": read_timeout_us}
        else:
            # rw_timeout is every protocol's I/O timeout (rtmp's own "timeout" means listen).
            options = {"rw_timeout": read_timeout_us}
        return options | settings.options

    def open(self, output_size: Size | None) -> None:
        """Connect; frames come at ``output_size`` (None: the stream's size)."""
        self._rearm()
        self._output_size = output_size
        self._index = 0
        self._open_container(
            self.settings.url,
            hint=self._hint,
            options=self.ffmpeg_options(),
            timeout=(self.settings.open_timeout_s, self.settings.read_timeout_s),
        )

    def read(self) -> CapturedFrame:
        """The next frame; SourceError when the stream broke or ended."""
        frame = self._next_decoded(hint=self._hint)
        if frame is None:
            raise SourceError(self.name, "the stream ended", hint=self._hint)
        return self._deliver(frame)


class V4l2Source(_AvSource):
    """A V4L2 camera; frames converted (and scaled) to RGB by swscale."""

    def __init__(self, settings: V4l2SourceSettings) -> None:
        super().__init__(f"v4l2:{settings.device}", live=True, settings=settings)
        self.settings = settings
        self._hint = (
            f"check that the camera is plugged in, that {settings.device} exists and is not "
            "used by another program (v4l2-ctl --list-devices), and that it supports the "
            "configured size, rate and input_format (v4l2-ctl --list-formats-ext)"
        )

    def ffmpeg_options(self) -> dict[str, str]:
        """The FFmpeg v4l2 input options this camera opens with."""
        settings = self.settings
        options: dict[str, str] = {}
        if settings.width and settings.height:
            options["video_size"] = f"{settings.width}x{settings.height}"
        if settings.fps:
            options["framerate"] = f"{settings.fps:g}"
        if settings.input_format:
            options["input_format"] = settings.input_format
        return options

    def open(self, output_size: Size | None) -> None:
        """Open the camera; frames come at ``output_size`` (None: the capture size)."""
        self._rearm()
        self._output_size = output_size
        self._index = 0
        self._open_container(
            self.settings.device,
            hint=self._hint,
            format="v4l2",
            options=self.ffmpeg_options(),
            timeout=(self.settings.open_timeout_s, self.settings.read_timeout_s),
        )

    def read(self) -> CapturedFrame:
        """The next frame; SourceError when the camera went away."""
        frame = self._next_decoded(hint=self._hint)
        if frame is None:
            raise SourceError(self.name, "the camera stopped delivering frames", hint=self._hint)
        return self._deliver(frame)
