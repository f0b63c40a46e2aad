"""The model download: resume, bounds, hash check and retries, against a real HTTP server."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from broker import free_port
from conftest import Assets
from httpserver import ModelServer

from edgefleet.agent.download import (
    DownloadFailed,
    DownloadHashMismatch,
    DownloadIncomplete,
    DownloadTooLarge,
    DownloadTruncated,
    download,
)

MODEL = "mobilenet_v1_0.25_128_quant.tflite"
# Long enough that a test finishing quickly proves the stop event, not the delay, ended it.
LONG_DELAY_S = 30.0


@pytest.fixture(scope="module")
def model(assets: Assets) -> bytes:
    """The real model's bytes, read once."""
    return assets.model(MODEL).read_bytes()


@pytest.fixture
def server() -> Iterator[ModelServer]:
    """A model server on a free loopback port."""
    with ModelServer() as running:
        yield running


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    """Where the download is staged (its directory does not exist yet)."""
    return tmp_path / "staging" / MODEL


def fetch(
    url: str,
    staging: Path,
    model: bytes,
    *,
    attempts: int = 3,
    retry_delay_s: float = 0.01,
    on_progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
    sha256: str | None = None,
) -> bytes:
    """``download`` with the manifest facts of ``model`` and test-sized delays."""
    return download(
        url,
        staging,
        size=len(model),
        sha256=sha256 or hashlib.sha256(model).hexdigest(),
        timeout_s=5.0,
        attempts=attempts,
        retry_delay_s=retry_delay_s,
        on_progress=on_progress,
        stop=stop,
    )


def ranges(server: ModelServer) -> list[str | None]:
    """The Range header of every request for the model, in order."""
    return [record.range_header for record in server.requests_for(MODEL)]


def test_full_download_returns_the_exact_bytes(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model)

    data = fetch(url, staging, model)

    assert data == model
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(model).hexdigest()
    assert staging.read_bytes() == model
    assert ranges(server) == [None]


def test_download_cut_halfway_resumes_from_the_bytes_received(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    half = len(model) // 2
    url = server.add(MODEL, model, cut_after=half)

    data = fetch(url, staging, model)

    assert data == model
    assert ranges(server) == [None, f"bytes={half}-"]


def test_existing_partial_staging_file_is_resumed_with_a_range(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model)
    staging.parent.mkdir()
    staging.write_bytes(model[:1000])

    data = fetch(url, staging, model)

    assert data == model
    assert ranges(server) == ["bytes=1000-"]


def test_server_ignoring_the_range_restarts_the_file(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model, ignore_range=True)
    staging.parent.mkdir()
    staging.write_bytes(b"\0" * 1000)  # not the model's first bytes: appending would show

    data = fetch(url, staging, model)

    assert data == model
    assert ranges(server) == ["bytes=1000-"]


def test_complete_staging_file_is_verified_without_a_request(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model)
    staging.parent.mkdir()
    staging.write_bytes(model)

    data = fetch(url, staging, model)

    assert data == model
    assert server.requests == []


def test_staging_file_longer_than_the_manifest_size_is_discarded(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model)
    staging.parent.mkdir()
    staging.write_bytes(model + b"junk")

    data = fetch(url, staging, model)

    assert data == model
    assert ranges(server) == [None]


def test_server_announcing_more_than_the_manifest_size_is_refused(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model, extra_bytes=100)
    sizes: list[int] = []

    with pytest.raises(DownloadTooLarge) as caught:
        fetch(url, staging, model, on_progress=lambda _: sizes.append(staging.stat().st_size))

    assert f"{len(model) + 100:,}" in caught.value.message
    assert f"{len(model):,}" in caught.value.message
    assert not staging.exists()
    assert sizes == []  # refused on the headers, before writing a byte
    assert len(server.requests) == 1


def test_server_streaming_more_than_the_manifest_size_is_refused(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model, extra_bytes=100, omit_length=True)
    counts: list[int] = []
    sizes: list[int] = []

    def watch(count: int) -> None:
        counts.append(count)
        sizes.append(staging.stat().st_size)

    with pytest.raises(DownloadTooLarge, match=f"more than the manifest's {len(model):,} bytes"):
        fetch(url, staging, model, on_progress=watch)

    assert counts[-1] == len(model)  # took the manifest's bytes, then refused the next one
    assert max(sizes) <= len(model)
    assert not staging.exists()
    assert len(server.requests) == 1


def test_wrong_sha256_is_refused_and_the_staging_file_removed(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model)
    wrong = hashlib.sha256(b"another model").hexdigest()

    with pytest.raises(DownloadHashMismatch) as caught:
        fetch(url, staging, model, sha256=wrong)

    assert wrong in caught.value.message
    assert hashlib.sha256(model).hexdigest() in caught.value.message
    assert not staging.exists()


def test_download_truncated_on_every_try_fails_after_all_attempts(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    cut = 100_000
    url = server.add(MODEL, model, cut_after=cut, cut_every_time=True)

    with pytest.raises(DownloadIncomplete, match=f"after {3 * cut:,} of {len(model):,} bytes"):
        fetch(url, staging, model, attempts=3)

    assert ranges(server) == [None, f"bytes={cut}-", f"bytes={2 * cut}-"]
    assert staging.stat().st_size == 3 * cut  # kept for the next download to resume


def test_a_server_file_shorter_than_the_manifest_is_refused_without_retrying(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model[: len(model) // 2])

    with pytest.raises(DownloadTruncated, match=f"has {len(model) // 2:,} bytes"):
        fetch(url, staging, model)

    assert len(server.requests) == 1
    assert not staging.exists()


def test_a_shorter_server_file_found_on_resume_is_refused(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model[:-1000])
    staging.parent.mkdir()
    staging.write_bytes(model[:1000])

    with pytest.raises(DownloadTruncated):
        fetch(url, staging, model)

    assert ranges(server)[0] == "bytes=1000-"


def test_not_found_is_permanent_and_not_retried(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model, status=404)

    with pytest.raises(DownloadFailed, match="HTTP 404") as caught:
        fetch(url, staging, model)

    assert caught.value.permanent
    assert len(server.requests) == 1


def test_server_error_is_transient_and_retried(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model, status=503)

    with pytest.raises(DownloadFailed, match="HTTP 503") as caught:
        fetch(url, staging, model, attempts=2)

    assert not caught.value.permanent
    assert len(server.requests) == 2


def test_connection_refused_is_transient(staging: Path, model: bytes) -> None:
    url = f"http://127.0.0.1:{free_port()}/{MODEL}"

    with pytest.raises(DownloadFailed, match="cannot reach the server") as caught:
        fetch(url, staging, model, attempts=2)

    assert not caught.value.permanent


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/m.tflite", "file:///etc/passwd"])
def test_unsupported_scheme_is_permanent_and_creates_nothing(
    url: str, staging: Path, model: bytes
) -> None:
    scheme = url.split(":", 1)[0]

    with pytest.raises(DownloadFailed, match=f"unsupported URL scheme '{scheme}'") as caught:
        fetch(url, staging, model)

    assert caught.value.permanent
    assert not staging.parent.exists()


def test_progress_counts_increase_to_the_size(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model)
    counts: list[int] = []

    fetch(url, staging, model, on_progress=counts.append)

    assert counts == sorted(set(counts))
    assert counts[-1] == len(model)


def test_stop_ends_the_wait_between_retries_promptly(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model, cut_after=100_000)
    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    timer.name = "test-stop"
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(DownloadFailed, match="stopped") as caught:
            fetch(url, staging, model, retry_delay_s=LONG_DELAY_S, stop=stop)
    finally:
        timer.cancel()

    assert time.monotonic() - started < LONG_DELAY_S  # the wait ended, it did not run out
    assert not caught.value.permanent
    assert len(server.requests) == 1


def test_stop_during_a_transfer_keeps_the_staged_bytes(
    server: ModelServer, staging: Path, model: bytes
) -> None:
    url = server.add(MODEL, model, delay_per_chunk_s=0.01)
    stop = threading.Event()

    with pytest.raises(DownloadFailed, match="stopped"):
        fetch(url, staging, model, stop=stop, on_progress=lambda _: stop.set())

    assert staging.read_bytes() == model[:65536]
