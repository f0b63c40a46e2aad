"""A real HTTP file server for tests, with knobs for the ways servers misbehave.

``ModelServer`` serves byte strings registered with :meth:`ModelServer.add` at
``http://127.0.0.1:<port>/<name>``, honours ``Range: bytes=N-`` (and ``N-M``) with 206 and
``Content-Range``, ignores query strings, and records every request it receives. Knobs
given to ``add`` make the server cut the connection, send more than the file, ignore
ranges, trickle, or answer with an error status::

    with ModelServer() as server:
        url = server.add("m.tflite", model, cut_after=len(model) // 2)
        ...
        assert [r.range_header for r in server.requests] == [None, f"bytes={half}-"]

Threads: the test thread constructs the server and calls every method; ``serve_forever``
runs in the daemon thread ``model-server``, and each connection in a daemon thread
``model-server-request`` (stopped with the server; a trickling response still being sent
when the test ends dies with its socket). The request log and the per-file cut counters
are guarded by one lock.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, cast
from urllib.parse import urlsplit

_CHUNK_BYTES = 16 * 1024
_JUNK = b"\xa5"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it."""

    path: str
    """The request path without its query string."""
    range_header: str | None


@dataclass(frozen=True)
class _Behaviour:
    """One file's knobs, as :meth:`ModelServer.add` documents them."""

    cut_after: int | None
    cut_every_time: bool
    extra_bytes: int
    ignore_range: bool
    omit_length: bool
    delay_per_chunk_s: float
    status: int


class ModelServer:
    """A threaded HTTP server on a free loopback port; a context manager."""

    def __init__(self) -> None:
        """Bind 127.0.0.1 on a port of the OS's choice; :meth:`start` begins serving."""
        self._lock = threading.Lock()
        self._files: dict[str, tuple[bytes, _Behaviour]] = {}
        self._served: dict[str, int] = {}
        self._requests: list[RequestRecord] = []
        self._httpd = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="model-server",
            daemon=True,
        )

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def add(
        self,
        name: str,
        content: bytes,
        *,
        cut_after: int | None = None,
        cut_every_time: bool = False,
        extra_bytes: int = 0,
        ignore_range: bool = False,
        omit_length: bool = False,
        delay_per_chunk_s: float = 0.0,
        status: int = HTTPStatus.OK,
    ) -> str:
        """Serve ``content`` at ``/<name>`` (replacing an earlier file of that name); its URL.

        - ``cut_after``: close the connection after that many body bytes of the first
          request for the file (Content-Length stays honest, so the client sees a
          truncation); later requests are served in full.
        - ``cut_every_time``: cut every request after ``cut_after`` body bytes.
        - ``extra_bytes``: append that many junk bytes to the file, announced in
          Content-Length and Content-Range (a server holding a bigger file than the manifest).
        - ``ignore_range``: answer range requests with 200 and the whole file.
        - ``omit_length``: send no Content-Length; the body ends when the connection closes.
        - ``delay_per_chunk_s``: sleep that long before each 16 KiB chunk of the body.
        - ``status``: answer with this status and a short text body instead of the file.
        """
        if not name or "/" in name:
            raise ValueError(f"a file name is one path segment, not {name!r}")
        behaviour = _Behaviour(
            cut_after,
            cut_every_time,
            extra_bytes,
            ignore_range,
            omit_length,
            delay_per_chunk_s,
            status,
        )
        with self._lock:
            self._files[name] = (content, behaviour)
            self._served[name] = 0
        return self.url(name)

    def url(self, name: str) -> str:
        """The URL of a file (registered or not: unknown names get 404)."""
        return f"{self.base_url}/{name}"

    def requests_for(self, name: str) -> list[RequestRecord]:
        """The requests for one file, oldest first."""
        return [r for r in self.requests if r.path == f"/{name}"]

    def start(self) -> ModelServer:
        """Begin serving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(_STOP_TIMEOUT_S)
        self._httpd.server_close()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- for the handler threads -------------------------------------------------------------

    def _take(self, path: str, range_header: str | None) -> tuple[bytes, _Behaviour, bool] | None:
        """Record a request; the file's body, behaviour and whether to cut this one."""
        name = path.removeprefix("/")
        with self._lock:
            self._requests.append(RequestRecord(path, range_header))
            entry = self._files.get(name)
            if entry is None:
                return None
            content, behaviour = entry
            first = self._served[name] == 0
            self._served[name] += 1
        cut = behaviour.cut_after is not None and (first or behaviour.cut_every_time)
        return content + _JUNK * behaviour.extra_bytes, behaviour, cut


class _Server(ThreadingHTTPServer):
    """The socketserver, knowing its :class:`ModelServer`; named, quiet request threads."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        owner: ModelServer,
    ) -> None:
        super().__init__(address, handler)
        self.owner = owner

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="model-server-request",
            daemon=True,
        )
        thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-body is expected here; anything else is printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        taken = cast(_Server, self.server).owner._take(path, self.headers.get("Range"))
        if taken is None:
            self._send_status(HTTPStatus.NOT_FOUND)
            return
        body, behaviour, cut = taken
        if behaviour.status != HTTPStatus.OK:
            self._send_status(behaviour.status)
            return
        span = self._range(body, behaviour)
        if span is None:
            return
        start, end, partial = span
        self._send_headers(
            body,
            start,
            end,
            partial=partial,
            ignore_range=behaviour.ignore_range,
            omit_length=behaviour.omit_length,
        )
        limit = behaviour.cut_after if cut and behaviour.cut_after is not None else end - start
        self._send_body(body[start : start + min(limit, end - start)], behaviour.delay_per_chunk_s)
        if cut or behaviour.omit_length:
            self.close_connection = True  # the client sees the end of the body as EOF

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read :attr:`ModelServer.requests` instead."""

    def _range(self, body: bytes, behaviour: _Behaviour) -> tuple[int, int, bool] | None:
        """The bytes to send, [start, end), and whether as a 206; None after answering 416."""
        header = self.headers.get("Range")
        match = _RANGE.fullmatch(header.strip()) if header else None
        if match is None or behaviour.ignore_range:
            return 0, len(body), False
        start = int(match.group(1))
        end = min(int(match.group(2)) + 1, len(body)) if match.group(2) else len(body)
        if start >= end:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return start, end, True

    def _send_headers(
        self,
        body: bytes,
        start: int,
        end: int,
        *,
        partial: bool,
        ignore_range: bool,
        omit_length: bool,
    ) -> None:
        self.send_response(HTTPStatus.PARTIAL_CONTENT if partial else HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "none" if ignore_range else "bytes")
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
        if omit_length:
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(end - start))
        self.end_headers()

    def _send_body(self, data: bytes, delay_per_chunk_s: float) -> None:
        for offset in range(0, len(data), _CHUNK_BYTES):
            if delay_per_chunk_s:
                time.sleep(delay_per_chunk_s)
            self.wfile.write(data[offset : offset + _CHUNK_BYTES])

    def _send_status(self, status: int) -> None:
        phrase = HTTPStatus(status).phrase
        body = f"{status} {phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
