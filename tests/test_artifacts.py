"""Artifacts over HTTP: the controller's /artifacts/<sha256>, served by a real uvicorn on a
free loopback port, read with httpx and with the agent's own downloader."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx
import pytest
import uvicorn
from conftest import Assets
from hypothesis import given
from hypothesis import strategies as st
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgefleet.agent.download import DownloadFailed, download
from edgefleet.ops.controller.artifacts import (
    ByteRange,
    Unsatisfiable,
    artifacts_app,
    parse_range,
)
from edgefleet.ops.controller.releases import ReleaseStore

MODEL = "mobilenet_v1_0.25_128_quant.tflite"
BLOB = bytes(range(256)) * 4  # 1024 bytes whose every offset is visible in its value
SIZE = len(BLOB)
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@dataclass(frozen=True)
class Seen:
    """One request as the server answered it."""

    method: str
    range_header: str | None
    status: int


class Recorder:
    """ASGI middleware keeping (method, Range, status) of every request; appended on the
    server's thread, read by the test's, under a lock."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._seen: list[Seen] = []

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        wanted = headers[b"range"].decode() if b"range" in headers else None

        async def recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                with self._lock:
                    self._seen.append(Seen(scope["method"], wanted, message["status"]))
            await send(message)

        await self.app(scope, receive, recording)


class UvicornServer:
    """A real uvicorn serving ``app`` on a loopback port of the OS's choice; its own thread
    (``artifact-server``), started by ``__enter__`` and stopped by ``__exit__``."""

    def __init__(self, app: ASGIApp) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        # log_config=None: uvicorn's own dictConfig would disable every logger already made.
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", access_log=False, log_config=None
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="artifact-server",
            daemon=True,
        )

    @property
    def base_url(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> UvicornServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        # uvicorn offers no event for "listening"; its flag is set once it is.
        while not self._server.started:
            assert self._thread.is_alive(), "uvicorn exited while starting"
            assert time.monotonic() < deadline, "uvicorn did not start"
            self._thread.join(0.01)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT_S)
        self._socket.close()


@pytest.fixture(scope="module")
def model(assets: Assets) -> bytes:
    return assets.model(MODEL).read_bytes()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, model: bytes) -> ReleaseStore:
    """A store holding the real model and BLOB (read-only for every test of the module)."""
    store = ReleaseStore(tmp_path_factory.mktemp("releases"))
    store.put_artifact(model)
    store.put_artifact(BLOB)
    return store


@pytest.fixture(scope="module")
def recorder(store: ReleaseStore) -> Recorder:
    return Recorder(artifacts_app(store))


@pytest.fixture(scope="module")
def server(recorder: Recorder) -> Iterator[UvicornServer]:
    with UvicornServer(recorder) as running:
        yield running


@pytest.fixture
def http(server: UvicornServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
        yield client


BLOB_PATH = f"/artifacts/{sha256(BLOB)}"


# -- whole files ----------------------------------------------------------------------------


def test_get_serves_the_whole_artifact_with_its_sha256_as_etag(http: httpx.Client) -> None:
    response = http.get(BLOB_PATH)

    assert response.status_code == 200
    assert response.content == BLOB
    assert response.headers["content-length"] == str(SIZE)
    assert response.headers["etag"] == f'"{sha256(BLOB)}"'
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-type"] == "application/octet-stream"
    assert "immutable" in response.headers["cache-control"]


def test_head_answers_the_headers_of_a_get_without_the_body(http: httpx.Client) -> None:
    response = http.head(BLOB_PATH)

    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == str(SIZE)
    assert response.headers["etag"] == f'"{sha256(BLOB)}"'


@pytest.mark.parametrize("name", ["0" * 64, "not-a-sha256", "AB" * 32])
def test_an_unknown_or_malformed_sha256_is_a_404_with_the_error_body(
    http: httpx.Client, name: str
) -> None:
    response = http.get(f"/artifacts/{name}")

    assert response.status_code == 404
    assert response.json()["code"] == "artifact_not_found"
    assert set(response.json()) == {"code", "message"}


def test_if_none_match_naming_the_etag_is_not_modified(http: httpx.Client) -> None:
    response = http.get(BLOB_PATH, headers={"If-None-Match": f'W/"x", "{sha256(BLOB)}"'})

    assert response.status_code == 304
    assert response.content == b""


# -- ranges --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "start", "end"),
    [
        ("bytes=0-9", 0, 10),
        ("bytes=1000-", 1000, SIZE),
        ("bytes=-100", SIZE - 100, SIZE),
        ("bytes=1000-5000", 1000, SIZE),  # the last byte past the end: cut to the end
        ("bytes=-5000", 0, SIZE),  # a suffix longer than the file: all of it
        ("bytes=1023-1023", 1023, SIZE),
        ("BYTES = 5-6", 5, 7),
    ],
)
def test_one_range_is_a_206_with_exactly_those_bytes(
    http: httpx.Client, asked: str, start: int, end: int
) -> None:
    response = http.get(BLOB_PATH, headers={"Range": asked})

    assert response.status_code == 206
    assert response.content == BLOB[start:end]
    assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{SIZE}"
    assert response.headers["content-length"] == str(end - start)


def test_head_with_a_range_announces_the_range_without_a_body(http: httpx.Client) -> None:
    response = http.head(BLOB_PATH, headers={"Range": "bytes=100-"})

    assert response.status_code == 206
    assert response.content == b""
    assert response.headers["content-range"] == f"bytes 100-{SIZE - 1}/{SIZE}"
    assert response.headers["content-length"] == str(SIZE - 100)


@pytest.mark.parametrize("asked", ["bytes=1024-", "bytes=5000-6000", "bytes=-0"])
def test_a_range_past_the_end_is_416_naming_the_size(http: httpx.Client, asked: str) -> None:
    response = http.get(BLOB_PATH, headers={"Range": asked})

    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{SIZE}"
    assert response.json()["code"] == "range_not_satisfiable"


@pytest.mark.parametrize(
    "asked", ["bytes=0-1,5-6", "items=0-1", "bytes=9-3", "bytes=abc", "bytes=-", "bytes 0-1"]
)
def test_several_ranges_or_a_range_that_does_not_parse_get_the_whole_file(
    http: httpx.Client, asked: str
) -> None:
    response = http.get(BLOB_PATH, headers={"Range": asked})

    assert response.status_code == 200
    assert response.content == BLOB


def test_if_range_with_another_etag_gets_the_whole_file_and_with_this_one_the_range(
    http: httpx.Client,
) -> None:
    other = http.get(BLOB_PATH, headers={"Range": "bytes=10-", "If-Range": '"other"'})
    same = http.get(BLOB_PATH, headers={"Range": "bytes=10-", "If-Range": f'"{sha256(BLOB)}"'})

    assert (other.status_code, other.content) == (200, BLOB)
    assert (same.status_code, same.content) == (206, BLOB[10:])


# -- the device's downloader ---------------------------------------------------------------


def test_the_agents_download_stopped_mid_transfer_resumes_from_the_bytes_it_has(
    server: UvicornServer, recorder: Recorder, model: bytes, tmp_path: Path
) -> None:
    url = f"{server.base_url}/artifacts/{sha256(model)}"
    staging = tmp_path / "staging" / MODEL
    stop = threading.Event()
    before = len(recorder.seen)

    with pytest.raises(DownloadFailed, match="stopped"):
        download(url, staging, size=len(model), sha256=sha256(model), stop=stop,
                 on_progress=lambda _: stop.set())  # fmt: skip
    staged = staging.stat().st_size
    data = download(url, staging, size=len(model), sha256=sha256(model), timeout_s=5.0)

    assert 0 < staged < len(model)
    assert data == model
    assert recorder.seen[before:] == [
        Seen("GET", None, 200),
        Seen("GET", f"bytes={staged}-", 206),
    ]


# -- the range decision alone --------------------------------------------------------------


@given(header=st.text(max_size=40), size=st.integers(0, 10_000))
def test_any_range_header_is_answered_within_the_file_or_as_unsatisfiable(
    header: str, size: int
) -> None:
    decided = parse_range(header, size)

    assert (
        decided is None
        or isinstance(decided, Unsatisfiable)
        or (0 <= decided.start < decided.end <= size)
    )


@given(size=st.integers(1, 10_000), data=st.data())
def test_a_valid_first_last_range_selects_what_a_slice_would(
    size: int, data: st.DataObject
) -> None:
    first = data.draw(st.integers(0, size - 1))
    last = data.draw(st.integers(first, size * 2))

    assert parse_range(f"bytes={first}-{last}", size) == ByteRange(first, min(last + 1, size))
