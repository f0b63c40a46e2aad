"""Frame sources: the real test video through PyAV, image folders, the test pattern, and the
picamera2 adapter against a fake camera (no Pi camera here).

Network streams over a real HTTP server are in test_capture.py, beside the capture thread.
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from edgefleet.agent.sources import (
    FileSource,
    FileSourceSettings,
    ImageFolderSource,
    ImageFolderSourceSettings,
    Picamera2Source,
    Picamera2SourceSettings,
    SourceError,
    SourceSettings,
    StreamSource,
    StreamSourceSettings,
    SyntheticSource,
    SyntheticSourceSettings,
    V4l2Source,
    V4l2SourceSettings,
    make_source,
    mask_credentials,
    yuv420_to_rgb,
)
from edgefleet.agent.sources.picamera2 import YuvEncoding

VIDEO = "kite_pan_640x480_30fps.mp4"
VIDEO_FRAMES = 300


@pytest.fixture
def video(assets) -> Path:
    return assets.image(VIDEO)


@pytest.fixture
def opened() -> Iterator[list[Any]]:
    """Sources appended here are closed at teardown."""
    sources: list[Any] = []
    yield sources
    for source in sources:
        source.close()


def open_source(opened: list[Any], source: Any, output_size: tuple[int, int] | None = None) -> Any:
    source.open(output_size)
    opened.append(source)
    return source


# --- settings -------------------------------------------------------------------------------------


def test_settings_are_chosen_by_their_type_field(tmp_path):
    adapter: TypeAdapter[SourceSettings] = TypeAdapter(SourceSettings)

    settings = adapter.validate_python({"type": "file", "path": str(tmp_path / "a.mp4")})

    assert isinstance(make_source(settings), FileSource)
    assert isinstance(make_source(adapter.validate_python({"type": "synthetic"})), SyntheticSource)


def test_settings_reject_unknown_fields():
    with pytest.raises(ValidationError, match="fps"):
        TypeAdapter(SourceSettings).validate_python({"type": "file", "path": "a.mp4", "fps": 3})


def test_stream_url_must_use_a_streaming_scheme():
    with pytest.raises(ValidationError, match="URL scheme"):
        StreamSourceSettings(url="file:///etc/passwd")


# --- video files ----------------------------------------------------------------------------------


def test_file_frames_are_rgb_uint8_at_the_video_size(video, opened):
    source = open_source(opened, FileSource(FileSourceSettings(path=video, realtime=False)))

    first = source.read()

    assert first.pixels.shape == (480, 640, 3)
    assert first.pixels.dtype == np.uint8
    assert first.index == 0


def test_file_frames_come_scaled_to_the_output_size(video, opened):
    source = open_source(
        opened, FileSource(FileSourceSettings(path=video, realtime=False)), (300, 300)
    )

    assert source.read().pixels.shape == (300, 300, 3)


def test_unpaced_file_reads_every_frame_then_ends(video, opened):
    source = open_source(
        opened, FileSource(FileSourceSettings(path=video, realtime=False)), (32, 24)
    )

    indices = []
    while (captured := source.read()) is not None:
        indices.append(captured.index)

    assert indices == list(range(VIDEO_FRAMES))
    assert source.read() is None
    assert not source.live


def test_looping_file_starts_over_after_the_last_frame(video, opened):
    settings = FileSourceSettings(path=video, realtime=False, loop=True)
    source = open_source(opened, FileSource(settings), (64, 48))

    frames = [source.read() for _ in range(VIDEO_FRAMES + 2)]

    assert frames[VIDEO_FRAMES].index == VIDEO_FRAMES
    assert np.array_equal(frames[VIDEO_FRAMES].pixels, frames[0].pixels)
    assert np.array_equal(frames[VIDEO_FRAMES + 1].pixels, frames[1].pixels)
    assert not np.array_equal(frames[1].pixels, frames[0].pixels)


def test_realtime_file_is_live_and_never_faster_than_its_frame_rate(video, opened):
    source = open_source(opened, FileSource(FileSourceSettings(path=video)), (32, 24))

    started = time.monotonic()
    for _ in range(10):
        source.read()
    elapsed = time.monotonic() - started

    assert source.live
    # Frame 9 is held back to 9/30 s after frame 0: a bound a loaded machine only lengthens.
    # (Comparing the frames' capture_ts raced: a stamp taken late on frame 0 shortens it.)
    assert elapsed >= 9 / 30


def test_missing_file_is_a_source_error_naming_it(tmp_path):
    path = tmp_path / "nope.mp4"

    with pytest.raises(SourceError) as raised:
        FileSource(FileSourceSettings(path=path)).open(None)

    assert raised.value.source == f"file:{path}"
    assert str(path) in str(raised.value)
    assert "check that" in raised.value.hint


def test_file_that_is_not_a_video_is_a_source_error(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_bytes(b"not a video at all" * 100)

    with pytest.raises(SourceError, match=r"cannot open \(Invalid data"):
        FileSource(FileSourceSettings(path=path)).open(None)


def test_file_with_damaged_frames_skips_them_and_plays_to_the_end(video, tmp_path, opened):
    damaged = tmp_path / VIDEO
    data = bytearray(video.read_bytes())
    data[20_000:30_000] = bytes(10_000)  # inside the media data; the index (moov) is intact
    damaged.write_bytes(bytes(data))
    settings = FileSourceSettings(path=damaged, realtime=False)
    source = open_source(opened, FileSource(settings), (32, 24))

    count = 0
    while source.read() is not None:
        count += 1

    assert 0 < count < VIDEO_FRAMES


# --- network streams and cameras (tests with an HTTP server are in test_capture.py) ---------------


def test_stream_that_never_answers_fails_to_open_within_the_open_timeout():
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/live"
        source = StreamSource(StreamSourceSettings(url=url, open_timeout_s=0.3, read_timeout_s=0.3))

        with pytest.raises(SourceError, match="cannot open"):
            source.open(None)


def test_stream_refused_is_a_source_error():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    source = StreamSource(StreamSourceSettings(url=f"rtsp://127.0.0.1:{port}/cam"))

    with pytest.raises(SourceError, match="Connection refused"):
        source.open(None)


def test_stream_name_masks_the_password():
    source = StreamSource(StreamSourceSettings(url="rtsp://admin:s3cr:et@10.0.0.5:554/stream1"))

    assert source.name == "rtsp://admin:***@10.0.0.5:554/stream1"
    assert mask_credentials("http://cam.local/mjpg") == "http://cam.local/mjpg"


def test_rtsp_options_carry_transport_and_socket_timeout():
    settings = StreamSourceSettings(
        url="rtsp://cam/s", rtsp_transport="udp", read_timeout_s=2.5, options={"fflags": "nobuffer"}
    )

    assert StreamSource(settings).ffmpeg_options() == {
        "rtsp_transport": "udp",
        "timeout": "2500000",
        "fflags": "nobuffer",
    }


def test_http_and_rtmp_streams_use_the_io_timeout():
    for url in ("http://cam/video.mjpg", "rtmp://server/live/key"):
        options = StreamSource(StreamSourceSettings(url=url, read_timeout_s=1)).ffmpeg_options()
        assert options == {"rw_timeout": "1000000"}


def test_v4l2_options_follow_the_settings():
    settings = V4l2SourceSettings(width=1280, height=720, fps=30, input_format="mjpeg")

    assert V4l2Source(settings).ffmpeg_options() == {
        "video_size": "1280x720",
        "framerate": "30",
        "input_format": "mjpeg",
    }


def test_missing_v4l2_device_is_a_source_error_naming_it(tmp_path):
    device = str(tmp_path / "video7")

    with pytest.raises(SourceError) as raised:
        V4l2Source(V4l2SourceSettings(device=device)).open((300, 300))

    assert raised.value.source == f"v4l2:{device}"
    assert "v4l2-ctl" in raised.value.hint


# --- image folders --------------------------------------------------------------------------------


def save(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def folder_source(folder: Path, **settings: Any) -> ImageFolderSource:
    return ImageFolderSource(ImageFolderSourceSettings(folder=folder, interval_s=0, **settings))


def test_image_folder_plays_images_in_name_order_as_rgb(tmp_path, opened):
    save(tmp_path / "b.png", (0, 255, 0))
    save(tmp_path / "a.bmp", (255, 0, 0))
    source = open_source(opened, folder_source(tmp_path, loop=False))

    frames = [source.read(), source.read()]

    assert [tuple(f.pixels[5, 5]) for f in frames] == [(255, 0, 0), (0, 255, 0)]
    assert source.read() is None


def test_image_folder_picks_up_an_image_added_later(tmp_path, opened):
    save(tmp_path / "a.png", (255, 0, 0))
    source = open_source(opened, folder_source(tmp_path))
    source.read()

    save(tmp_path / "b.png", (0, 0, 255))
    colours = {tuple(source.read().pixels[0, 0]) for _ in range(3)}

    assert (0, 0, 255) in colours


def test_image_folder_skips_a_corrupt_file_with_one_warning(tmp_path, opened, caplog):
    save(tmp_path / "a.png", (255, 0, 0))
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    source = open_source(opened, folder_source(tmp_path))

    frames = [source.read() for _ in range(4)]

    assert all(tuple(f.pixels[0, 0]) == (255, 0, 0) for f in frames)
    skipped = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skipped) == 1
    assert "b.jpg" in skipped[0].getMessage()


def test_image_folder_ignores_files_that_are_not_images(tmp_path, opened):
    save(tmp_path / "a.png", (255, 0, 0))
    (tmp_path / "notes.txt").write_text("hello")
    source = open_source(opened, folder_source(tmp_path, loop=False))

    assert source.read() is not None
    assert source.read() is None


def test_image_folder_scales_to_the_output_size(tmp_path, opened):
    save(tmp_path / "a.jpg", (10, 200, 30), size=(640, 480))
    source = open_source(opened, folder_source(tmp_path), (300, 300))

    assert source.read().pixels.shape == (300, 300, 3)


def test_empty_image_folder_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="no images"):
        folder_source(tmp_path).open(None)


def test_missing_image_folder_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="no such folder"):
        folder_source(tmp_path / "absent").open(None)


def test_image_folder_of_only_unreadable_images_is_a_source_error(tmp_path, opened):
    (tmp_path / "a.png").write_bytes(b"garbage")
    source = open_source(opened, folder_source(tmp_path))

    with pytest.raises(SourceError, match="could be read"):
        source.read()


def test_image_folder_emptied_while_running_is_a_source_error(tmp_path, opened):
    image = save(tmp_path / "a.png", (255, 0, 0))
    source = open_source(opened, folder_source(tmp_path))
    source.read()

    image.unlink()

    with pytest.raises(SourceError, match="no images"):
        source.read()


# --- synthetic pattern ----------------------------------------------------------------------------


def test_synthetic_frames_have_the_configured_size_and_change(opened):
    source = open_source(
        opened, SyntheticSource(SyntheticSourceSettings(width=320, height=240, fps=0))
    )

    first, second = source.read(), source.read()

    assert first.pixels.shape == (240, 320, 3)
    assert first.pixels.dtype == np.uint8
    assert not np.array_equal(first.pixels, second.pixels)


def test_synthetic_frames_follow_the_output_size(opened):
    source = open_source(opened, SyntheticSource(SyntheticSourceSettings(fps=0)), (300, 300))

    assert source.read().pixels.shape == (300, 300, 3)


def test_synthetic_pattern_is_deterministic(opened):
    sources = [open_source(opened, SyntheticSource(SyntheticSourceSettings(fps=0))) for _ in "ab"]

    for _ in range(5):
        a, b = (source.read() for source in sources)
        assert np.array_equal(a.pixels, b.pixels)


def test_synthetic_source_with_a_frame_count_ends(opened):
    source = open_source(opened, SyntheticSource(SyntheticSourceSettings(fps=0, frames=2)))

    assert [source.read() is not None for _ in range(3)] == [True, True, False]


# --- picamera2, against a fake camera -------------------------------------------------------------


def _enum(name: str) -> SimpleNamespace:
    return SimpleNamespace(name=name)


class FakePicamera2:
    """The part of picamera2.Picamera2 the adapter uses, behaving as picamera2 0.3 does.

    ``frames`` maps a stream name to the array ``capture_array`` returns (or an
    exception it raises). Strides of YUV420 streams are padded to 64 bytes like
    the VC4 ISP's.
    """

    def __init__(self, platform: str = "VC4") -> None:
        self.platform = _enum(platform)
        self.frames: dict[str, Any] = {}
        self.config: dict[str, Any] | None = None
        self.calls: list[str] = []
        self.started = False
        self.camera_num: int | None = None

    def __call__(self, camera_num: int) -> FakePicamera2:  # the factory
        self.camera_num = camera_num
        return self

    def create_video_configuration(self, main: dict, lores: dict | None, controls: dict) -> dict:
        main = dict(main)
        lores = None if lores is None else dict(lores)
        small = main["size"][0] < 1280 or main["size"][1] < 720
        colour_space = SimpleNamespace(
            ycbcrEncoding=_enum("Rec601" if small else "Rec709"), range=_enum("Limited")
        )
        return {"main": main, "lores": lores, "controls": controls, "colour_space": colour_space}

    def configure(self, config: dict) -> None:
        lores = config["lores"]
        if lores is not None:
            if self.platform.name == "VC4" and lores["format"] != "YUV420":
                raise RuntimeError("lores stream must be YUV")
            width = lores["size"][0]
            lores["stride"] = -(-width // 64) * 64 if lores["format"] == "YUV420" else width * 3
        self.config = config
        self.calls.append("configure")

    def camera_configuration(self) -> dict:
        assert self.config is not None
        return self.config

    def start(self) -> None:
        self.started = True
        self.calls.append("start")

    def capture_array(self, name: str = "main", wait: float | None = None) -> np.ndarray:
        assert self.started, "capture before start"
        assert wait is not None, "a capture without a timeout can block forever"
        result = self.frames[name]
        if isinstance(result, Exception):
            raise result
        return result

    def stop(self) -> None:
        self.started = False
        self.calls.append("stop")

    def close(self) -> None:
        self.calls.append("close")


def i420(width: int, height: int, stride: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random YUV420 image: packed (no padding, as PyAV wants it) and as picamera2 returns it."""
    rng = np.random.default_rng(seed)
    y = rng.integers(16, 236, (height, width), dtype=np.uint8)
    u, v = rng.integers(16, 241, (2, height // 2, width // 2), dtype=np.uint8)
    packed = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(height * 3 // 2, width)
    padded = rng.integers(0, 256, height * 3 // 2 * stride, dtype=np.uint8)  # garbage padding
    padded[: height * stride].reshape(height, stride)[:, :width] = y
    for plane, start in ((u, height * stride), (v, height * stride * 5 // 4)):
        region = padded[start : start + height // 2 * stride // 2]
        region.reshape(height // 2, stride // 2)[:, : width // 2] = plane
    return packed, padded.reshape(height * 3 // 2, stride)


def swscale_rgb(packed: np.ndarray, colorspace: str, color_range: str) -> np.ndarray:
    """The reference conversion: FFmpeg's swscale, through PyAV."""
    frame = av.VideoFrame.from_ndarray(packed, format="yuv420p")
    return frame.reformat(
        format="rgb24", src_colorspace=colorspace, src_color_range=color_range
    ).to_ndarray()


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to rounding: swscale's fixed-point arithmetic is off by up to 3."""
    difference = np.abs(actual.astype(int) - expected.astype(int))
    assert actual.shape == expected.shape
    assert difference.max() <= 3
    assert difference.mean() < 1


@pytest.mark.parametrize(
    ("encoding", "colorspace", "color_range"),
    [
        (YuvEncoding(0.299, 0.114, full_range=False), "ITU601", "MPEG"),
        (YuvEncoding(0.2126, 0.0722, full_range=False), "ITU709", "MPEG"),
        (YuvEncoding(0.299, 0.114, full_range=True), "ITU601", "JPEG"),
    ],
)
def test_yuv420_conversion_matches_swscale(encoding, colorspace, color_range):
    packed, _ = i420(96, 92, stride=96)

    rgb = yuv420_to_rgb(packed, 96, 92, encoding)

    assert_close(rgb, swscale_rgb(packed, colorspace, color_range))


def test_yuv420_conversion_ignores_the_stride_padding():
    packed, padded = i420(96, 92, stride=128)

    assert np.array_equal(yuv420_to_rgb(padded, 96, 92), yuv420_to_rgb(packed, 96, 92))


def test_picamera2_delivers_yuv420_lores_as_rgb_at_the_model_size():
    camera = FakePicamera2("VC4")
    packed, padded = i420(96, 92, stride=128)
    camera.frames["lores"] = padded
    source = Picamera2Source(Picamera2SourceSettings(camera_index=1), camera_factory=camera)

    source.open((96, 92))
    captured = source.read()
    source.close()

    assert camera.camera_num == 1
    assert camera.config is not None
    assert camera.config["main"] == {"size": (1280, 720), "format": "BGR888"}
    assert camera.config["lores"]["format"] == "YUV420"
    assert camera.config["controls"] == {"FrameRate": 30.0}
    # A 1280x720 main stream makes picamera2 choose Rec709 for the whole camera.
    assert_close(captured.pixels, swscale_rgb(packed, "ITU709", "MPEG"))
    assert camera.calls == ["configure", "start", "stop", "close"]


def test_picamera2_on_a_pi5_takes_rgb_lores_as_is():
    camera = FakePicamera2("PISP")
    lores = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    camera.frames["lores"] = lores
    source = Picamera2Source(Picamera2SourceSettings(), camera_factory=camera)

    source.open((300, 300))
    captured = source.read()
    source.close()

    assert camera.config is not None
    assert camera.config["lores"]["format"] == "BGR888"
    assert np.array_equal(captured.pixels, lores)


def test_picamera2_without_an_output_size_reads_main():
    camera = FakePicamera2()
    camera.frames["main"] = np.zeros((480, 640, 3), np.uint8)
    source = Picamera2Source(Picamera2SourceSettings(width=640, height=480), camera_factory=camera)

    source.open(None)
    captured = source.read()
    source.close()

    assert camera.config is not None
    assert camera.config["lores"] is None
    assert captured.pixels.shape == (480, 640, 3)


def test_picamera2_snapshot_is_the_full_size_main_frame():
    camera = FakePicamera2()
    main = np.random.default_rng(1).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    camera.frames["main"] = main
    camera.frames["lores"] = i420(300, 300, stride=320)[1]
    source = Picamera2Source(Picamera2SourceSettings(), camera_factory=camera)
    source.open((300, 300))

    snapshot = source.snapshot()
    source.close()

    assert np.array_equal(snapshot, main)


def test_picamera2_snapshot_of_a_closed_camera_is_a_source_error():
    source = Picamera2Source(Picamera2SourceSettings(), camera_factory=FakePicamera2())

    with pytest.raises(SourceError, match="not running"):
        source.snapshot()


def test_picamera2_capture_timeout_is_a_source_error():
    camera = FakePicamera2()
    camera.frames["lores"] = TimeoutError("no frame")
    source = Picamera2Source(Picamera2SourceSettings(read_timeout_s=0.5), camera_factory=camera)
    source.open((300, 300))

    with pytest.raises(SourceError, match=r"no frame for 0\.5 s"):
        source.read()
    source.close()


def test_picamera2_that_cannot_open_is_a_source_error():
    def broken(camera_num: int) -> Any:
        raise RuntimeError("Camera __init__ sequence did not complete.")

    with pytest.raises(SourceError, match="cannot open the camera") as raised:
        Picamera2Source(Picamera2SourceSettings(), camera_factory=broken).open(None)

    assert "rpicam-hello" in raised.value.hint


def test_picamera2_configuration_refused_closes_the_camera():
    camera = FakePicamera2("VC4")
    source = Picamera2Source(Picamera2SourceSettings(lores_format="rgb"), camera_factory=camera)

    with pytest.raises(SourceError, match="lores stream must be YUV"):
        source.open((300, 300))

    assert camera.calls == ["close"]


def test_picamera2_missing_library_is_a_source_error_with_an_install_hint():
    if importlib.util.find_spec("picamera2") is not None:
        pytest.skip("picamera2 is installed here")

    with pytest.raises(SourceError, match="picamera2") as raised:
        Picamera2Source(Picamera2SourceSettings()).open(None)

    assert "python3-picamera2" in raised.value.hint


# --- full-size frames for snapshots ---------------------------------------------------------------


def test_file_frame_scaled_to_the_model_offers_the_decoded_frame_at_the_video_size(video, opened):
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        size = (stream.codec_context.width, stream.codec_context.height)
    source = open_source(
        opened, FileSource(FileSourceSettings(path=video, realtime=False)), (128, 128)
    )

    frame = source.read()
    source.read()  # the decoder moved on; the frame keeps its own decoded picture

    assert frame.pixels.shape == (128, 128, 3)
    assert frame.full is not None
    full = frame.full()
    assert full.shape == (size[1], size[0], 3)
    # The same picture: scaled down, it matches what the model got.
    small = np.asarray(Image.fromarray(full).resize((128, 128), Image.Resampling.BILINEAR))
    assert np.abs(small.astype(int) - frame.pixels.astype(int)).mean() < 8


def test_file_frame_at_the_video_size_offers_no_second_copy(video, opened):
    source = open_source(opened, FileSource(FileSourceSettings(path=video, realtime=False)))

    assert source.read().full is None


def test_image_frame_scaled_to_the_model_offers_the_image_at_its_own_size(tmp_path, opened):
    save(tmp_path / "a.png", (10, 200, 30), size=(640, 480))
    source = open_source(opened, folder_source(tmp_path), (300, 300))

    frame = source.read()

    assert frame.full is not None
    full = frame.full()
    assert full.shape == (480, 640, 3)
    assert tuple(full[0, 0]) == (10, 200, 30)


def test_synthetic_frame_scaled_to_the_model_offers_the_configured_size(opened):
    source = open_source(opened, SyntheticSource(SyntheticSourceSettings(fps=0)), (96, 96))
    unscaled = open_source(opened, SyntheticSource(SyntheticSourceSettings(fps=0)))

    frame = source.read()
    same_frame = unscaled.read()

    assert frame.full is not None
    assert np.array_equal(frame.full(), same_frame.pixels)
    assert same_frame.full is None


def test_picamera2_lores_frame_offers_the_main_stream_as_its_full_frame():
    camera = FakePicamera2("PISP")
    main = np.random.default_rng(2).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    camera.frames["main"] = main
    camera.frames["lores"] = np.zeros((300, 300, 3), np.uint8)
    source = Picamera2Source(Picamera2SourceSettings(), camera_factory=camera)
    source.open((300, 300))
    try:
        frame = source.read()
        assert frame.full is not None
        full = frame.full()
    finally:
        source.close()

    assert frame.pixels.shape == (300, 300, 3)
    assert np.array_equal(full, main)
