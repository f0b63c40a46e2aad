"""The capture thread and the frame slot, against real sources: files, HTTP streams, folders.

Outages are real: a file removed and put back, an HTTP server (serving the
real test video at a live-stream pace) stopped and started again on the same
port.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from PIL import Image

from edgefleet.agent.sources import (
    Capture,
    CapturedFrame,
    CaptureStats,
    FileSource,
    FileSourceSettings,
    FrameSlot,
    ImageFolderSource,
    ImageFolderSourceSettings,
    Source,
    SourceError,
    StreamSource,
    StreamSourceSettings,
    SyntheticSource,
    SyntheticSourceSettings,
)

VIDEO = "kite_pan_640x480_30fps.mp4"
DEADLINE_S = 10.0


def wait_until(condition: Callable[[], bool], what: str, *, tick: Callable[[], Any] | None = None):
    """Poll ``condition`` (calling ``tick`` between polls) until it holds or the deadline passes."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        if tick is not None:
            tick()
        else:
            time.sleep(0.01)


def frame(index: int) -> CapturedFrame:
    return CapturedFrame(pixels=np.zeros((2, 2, 3), np.uint8), capture_ts=0.0, index=index)


# --- a live-paced HTTP video server --------------------------------------------------------------


class VideoServer:
    """Serves one video file over HTTP on 127.0.0.1 at a live pace, with Range support.

    ``stall`` freezes every transfer (the connection stays open); ``stop()``
    cuts every connection and closes the port.
    """

    CHUNK = 2048

    def __init__(self, data: bytes, *, port: int = 0, bytes_per_s: int = 100_000) -> None:
        self.data = data
        self.interval_s = self.CHUNK / bytes_per_s
        self.stall = threading.Event()
        self.closing = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _VideoHandler)
        self.httpd.video = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/{VIDEO}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="video-server"
        )
        self._thread.start()

    def send(self, wfile: Any, body: bytes) -> None:
        for start in range(0, len(body), self.CHUNK):
            while self.stall.is_set() and not self.closing.is_set():
                self.closing.wait(0.01)
            if self.closing.is_set():
                return
            try:
                wfile.write(body[start : start + self.CHUNK])
            except OSError:  # the client hung up (FFmpeg does so to seek)
                return
            self.closing.wait(self.interval_s)

    def stop(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(DEADLINE_S)


class _VideoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        video: VideoServer = self.server.video  # type: ignore[attr-defined]
        size = len(video.data)
        start, end = 0, size - 1
        ranged = self.headers.get("Range", "").startswith("bytes=")
        if ranged:
            first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
            start, end = int(first), int(last) if last else size - 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        video.send(self.wfile, video.data[start : end + 1])

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def video_bytes(assets) -> bytes:
    return assets.image(VIDEO).read_bytes()


@pytest.fixture
def serve_video(video_bytes) -> Iterator[Callable[..., VideoServer]]:
    servers: list[VideoServer] = []

    def serve(port: int = 0) -> VideoServer:
        server = VideoServer(video_bytes, port=port)
        servers.append(server)
        return server

    yield serve
    for server in servers:
        if not server.closing.is_set():
            server.stop()


@pytest.fixture
def start_capture() -> Iterator[Callable[..., tuple[Capture, FrameSlot]]]:
    """Start a Capture with a fast backoff; every one is stopped at teardown."""
    captures: list[Capture] = []

    def start(source: Source, **options: Any) -> tuple[Capture, FrameSlot]:
        slot = FrameSlot()
        options = {"output_size": None, "backoff_initial_s": 0.01, "backoff_max_s": 0.05} | options
        capture = Capture("cam", source, slot, **options)
        captures.append(capture)
        capture.start()
        return capture, slot

    yield start
    for capture in captures:
        capture.stop()


def state_is(capture: Capture, state: str) -> Callable[[], bool]:
    return lambda: capture.stats.state == state


# --- FrameSlot ------------------------------------------------------------------------------------


def test_live_put_overwrites_an_untaken_frame_and_counts_it_skipped():
    slot, stop = FrameSlot(), threading.Event()

    slot.put(frame(0), wait=False, stop=stop)
    slot.put(frame(1), wait=False, stop=stop)

    assert slot.skipped == 1
    taken = slot.get(timeout_s=1.0)
    assert taken is not None
    assert taken.index == 1
    assert slot.get(timeout_s=0.01) is None


def test_non_live_put_waits_until_the_previous_frame_was_taken():
    slot, stop = FrameSlot(), threading.Event()
    slot.put(frame(0), wait=True, stop=stop)
    returned = threading.Event()

    def second_put() -> None:
        slot.put(frame(1), wait=True, stop=stop)
        returned.set()

    putter = threading.Thread(target=second_put, name="test-putter")
    putter.start()
    assert not returned.wait(0.2)

    first = slot.get(timeout_s=1.0)

    assert returned.wait(DEADLINE_S)
    putter.join(DEADLINE_S)
    second = slot.get(timeout_s=1.0)
    assert first is not None
    assert second is not None
    assert (first.index, second.index, slot.skipped) == (0, 1, 0)


def test_waiting_put_returns_without_storing_once_stop_is_set():
    slot, stop = FrameSlot(), threading.Event()
    slot.put(frame(0), wait=True, stop=stop)
    putter = threading.Thread(
        target=slot.put, args=(frame(1),), kwargs={"wait": True, "stop": stop}, name="test-putter"
    )
    putter.start()

    stop.set()
    putter.join(DEADLINE_S)

    assert not putter.is_alive()
    taken = slot.get(timeout_s=1.0)
    assert taken is not None
    assert taken.index == 0
    assert slot.get(timeout_s=0.01) is None


def test_get_returns_none_when_no_frame_comes():
    assert FrameSlot().get(timeout_s=0.01) is None


# --- Capture --------------------------------------------------------------------------------------


def test_capture_runs_a_named_thread_that_delivers_frames_at_the_output_size(start_capture):
    source = SyntheticSource(SyntheticSourceSettings(fps=200.0))
    capture, slot = start_capture(source, output_size=(300, 200))

    wait_until(lambda: capture.stats.captured >= 3, "frames")
    taken = slot.get(timeout_s=DEADLINE_S)

    assert "capture-cam" in {thread.name for thread in threading.enumerate()}
    assert capture.stats.state == "running"
    assert taken is not None
    assert taken.pixels.shape == (200, 300, 3)


def test_stop_ends_the_thread_and_leaves_the_state_stopped(start_capture):
    capture, _ = start_capture(SyntheticSource(SyntheticSourceSettings(fps=200.0)))
    wait_until(lambda: capture.stats.captured >= 1, "a frame")

    capture.stop()

    assert capture.stats.state == "stopped"
    assert "capture-cam" not in {thread.name for thread in threading.enumerate()}


def test_live_capture_counts_the_frames_nobody_took(start_capture):
    capture, _ = start_capture(SyntheticSource(SyntheticSourceSettings(fps=500.0)))
    wait_until(lambda: capture.stats.captured >= 10, "frames")

    capture.stop()

    stats = capture.stats
    assert stats.skipped == stats.captured - 1


def test_non_live_capture_hands_over_every_frame_in_order(start_capture):
    capture, slot = start_capture(SyntheticSource(SyntheticSourceSettings(fps=0, frames=20)))
    indices: list[int] = []

    def take() -> None:
        taken = slot.get(timeout_s=0.01)
        if taken is not None:
            indices.append(taken.index)

    wait_until(lambda: len(indices) == 20, "20 frames", tick=take)

    assert indices == list(range(20))
    assert capture.stats.skipped == 0


def test_finite_source_ends_the_capture(start_capture):
    capture, slot = start_capture(SyntheticSource(SyntheticSourceSettings(fps=0, frames=3)))

    wait_until(state_is(capture, "ended"), "the end", tick=lambda: slot.get(timeout_s=0.01))

    assert capture.stats.captured == 3
    assert "capture-cam" not in {thread.name for thread in threading.enumerate()}


def test_unopenable_source_degrades_with_one_warning_while_it_keeps_retrying(
    start_capture, tmp_path, caplog
):
    caplog.set_level(logging.DEBUG, logger="edgefleet.agent.sources.capture")
    source = FileSource(FileSourceSettings(path=tmp_path / "missing.mp4"))
    capture, _ = start_capture(source)

    wait_until(lambda: "retry 5 " in caplog.text, "five retries")

    stats = capture.stats
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (stats.state, stats.failures, len(warnings)) == ("degraded", 1, 1)
    assert stats.degraded_since is not None
    assert stats.last_error is not None
    assert "missing.mp4" in stats.last_error
    assert "missing.mp4" in warnings[0].getMessage()


def test_capture_recovers_when_a_removed_file_is_put_back(start_capture, assets, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edgefleet.agent.sources.capture")
    video = tmp_path / VIDEO
    shutil.copy(assets.image(VIDEO), video)
    source = FileSource(FileSourceSettings(path=video, loop=True, realtime=False))
    capture, slot = start_capture(source, output_size=(64, 48))

    def take() -> None:
        slot.get(timeout_s=0.01)

    wait_until(lambda: capture.stats.captured >= 5, "frames", tick=take)
    video.unlink()
    wait_until(state_is(capture, "degraded"), "the outage", tick=take)
    captured_in_outage = capture.stats.captured
    shutil.copy(assets.image(VIDEO), video)
    wait_until(lambda: capture.stats.captured > captured_in_outage + 5, "frames again", tick=take)

    stats = capture.stats
    assert (stats.state, stats.failures, stats.degraded_since) == ("running", 1, None)
    assert "recovered after" in caplog.text


def test_stop_returns_during_a_long_backoff(start_capture, tmp_path):
    source = FileSource(FileSourceSettings(path=tmp_path / "missing.mp4"))
    capture, _ = start_capture(source, backoff_initial_s=600.0, backoff_max_s=600.0)
    wait_until(state_is(capture, "degraded"), "the outage")

    capture.stop(timeout_s=DEADLINE_S)

    assert capture.stats.state == "stopped"


def test_stop_interrupts_a_source_pacing_a_slow_interval(start_capture, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    source = ImageFolderSource(ImageFolderSourceSettings(folder=tmp_path, interval_s=3600))
    capture, slot = start_capture(source)
    wait_until(lambda: slot.get(timeout_s=0.01) is not None, "the first image")

    capture.stop(timeout_s=DEADLINE_S)

    assert capture.stats.state == "stopped"


# --- network streams ------------------------------------------------------------------------------


def test_stream_source_reads_frames_over_http(serve_video):
    server = serve_video()
    source = StreamSource(StreamSourceSettings(url=server.url, open_timeout_s=5, read_timeout_s=5))

    source.open((300, 300))
    try:
        frames = [source.read() for _ in range(3)]
    finally:
        source.close()

    assert [f.index for f in frames] == [0, 1, 2]
    assert frames[0].pixels.shape == (300, 300, 3)


def read_until_lost(source: StreamSource, limit: int = 400) -> None:
    """Read (past the frames still buffered) until the source raises."""
    for _ in range(limit):
        source.read()


def test_stalled_stream_fails_a_read_after_the_read_timeout(serve_video):
    server = serve_video()
    source = StreamSource(
        StreamSourceSettings(url=server.url, open_timeout_s=5, read_timeout_s=0.3)
    )
    source.open((64, 48))
    source.read()

    server.stall.set()
    try:
        with pytest.raises(SourceError, match=r"127\.0\.0\.1"):
            read_until_lost(source)
    finally:
        source.close()


def test_capture_survives_a_stream_server_restart_on_the_same_port(start_capture, serve_video):
    server = serve_video()
    source = StreamSource(StreamSourceSettings(url=server.url, open_timeout_s=2, read_timeout_s=1))
    capture, _ = start_capture(source, output_size=(64, 48))
    wait_until(lambda: capture.stats.captured >= 5, "frames")

    server.stop()
    wait_until(state_is(capture, "degraded"), "the outage")
    captured_in_outage = capture.stats.captured
    serve_video(port=server.port)
    wait_until(lambda: capture.stats.captured > captured_in_outage + 5, "frames again")

    stats: CaptureStats = capture.stats
    assert stats.state == "running"
    assert stats.failures >= 1


def test_stats_is_a_copy(start_capture):
    capture, _ = start_capture(SyntheticSource(SyntheticSourceSettings(fps=0, frames=1)))
    stats = capture.stats

    stats.captured = 1000

    assert capture.stats.captured != 1000
