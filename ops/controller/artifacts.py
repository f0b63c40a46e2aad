"""Model artifacts over HTTP: ``GET`` and ``HEAD /artifacts/<sha256>``, with Range for resume.

The artifacts of a release store (``releases.py``) are immutable and named by their
sha256, which is their strong ``ETag`` (quoted) and makes them cacheable forever. What a
request gets:

- no ``Range``: 200 and the whole file, with ``Content-Length`` and ``Accept-Ranges: bytes``;
- one range, ``bytes=A-B``, ``bytes=A-`` or ``bytes=-N`` (the last N bytes): 206 with
  ``Content-Range: bytes A-B/SIZE`` (B past the end is cut to the end; N past the size is
  the whole file);
- a range that starts at or past the end (or ``bytes=-0``): 416, ``Content-Range:
  bytes */SIZE`` and an error body;
- several ranges, a unit other than ``bytes``, or a ``Range`` that does not parse: ignored,
  200 and the whole file. RFC 9110 lets a server ignore any Range; devices ask for one
  range (``bytes=N-``, ``edgefleet.agent.download``), and multipart answers would only
  add a format to get wrong;
- ``If-Range`` other than the ETag: the range is ignored (200, the whole file);
  ``If-None-Match`` naming the ETag (or ``*``): 304;
- an unknown or malformed sha256: 404.

Errors are JSON, ``{"code": ..., "message": ...}`` (:class:`ErrorBody`), as everywhere in
the controller's API. The range itself is decided here (:func:`parse_range`, pure); the
bytes are sent by Starlette's ``FileResponse``, given the decided range in canonical form.

Threads: none of its own. The handlers run on the ASGI server's event loop; the file
reads are Starlette's (a worker thread per read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import FileResponse
from starlette.types import Receive, Scope, Send

from .releases import ARTIFACTS_PATH, ReleaseStore

__all__ = [
    "ByteRange",
    "ErrorBody",
    "Unsatisfiable",
    "artifacts_app",
    "artifacts_router",
    "parse_range",
]

MEDIA_TYPE = "application/octet-stream"
# Content-addressed: the bytes behind a URL never change.
CACHE_CONTROL = "public, max-age=31536000, immutable"
_SPEC = re.compile(r"^([0-9]*)-([0-9]*)$")
_UNIT = "bytes"


class ErrorBody(BaseModel):
    """The body of every error answer."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="What went wrong, as a stable identifier.")
    message: str = Field(description="What went wrong, for a person.")


class ErrorCode(str, Enum):
    """The codes this module answers with."""

    ARTIFACT_NOT_FOUND = "artifact_not_found"
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start`` up to (not including) ``end`` of a file."""

    start: int
    end: int

    def header(self) -> str:
        """The range as a ``Range`` header value."""
        return f"{_UNIT}={self.start}-{self.end - 1}"


@dataclass(frozen=True)
class Unsatisfiable:
    """A range that selects no byte of the file: answered 416."""


def parse_range(header: str | None, size: int) -> ByteRange | Unsatisfiable | None:
    """What a ``Range`` header asks of a file of ``size`` bytes (RFC 9110, 14.1.2).

    None: serve the whole file (no header, another unit, several ranges, bad syntax).
    """
    spec = _single_spec(header)
    if spec is None:
        return None
    first, last = spec
    if first is None:
        assert last is not None
        return ByteRange(max(size - last, 0), size) if last and size else Unsatisfiable()
    if first >= size:
        return Unsatisfiable()
    return ByteRange(first, size if last is None else min(last + 1, size))


def _single_spec(header: str | None) -> tuple[int | None, int | None] | None:
    """(first, last) of a one-range ``bytes=`` header, either may be absent; None when the
    header is absent, of another unit, of several ranges or not valid (last < first)."""
    if header is None:
        return None
    unit, equals, spec = header.partition("=")
    match = _SPEC.fullmatch(spec.strip())
    if not equals or unit.strip().lower() != _UNIT or match is None:
        return None
    first = int(match[1]) if match[1] else None
    last = int(match[2]) if match[2] else None
    if first is None and last is None:
        return None  # "bytes=-"
    if first is not None and last is not None and last < first:
        return None  # invalid syntax: ignored, not 416
    return first, last


def artifacts_router(store: ReleaseStore) -> APIRouter:
    """The routes serving ``store``'s artifacts, to include in the controller's app."""
    router = APIRouter(tags=["artifacts"])

    @router.api_route(
        ARTIFACTS_PATH + "/{sha256}",
        methods=["GET", "HEAD"],
        response_class=Response,
        summary="A model artifact, whole or a byte range",
        responses={
            200: {"description": "The whole file.", "content": {MEDIA_TYPE: {}}},
            206: {"description": "The range asked for.", "content": {MEDIA_TYPE: {}}},
            304: {"description": "If-None-Match named the ETag: not modified."},
            404: {"description": "No artifact with that sha256.", "model": ErrorBody},
            416: {"description": "The range starts past the end.", "model": ErrorBody},
        },
    )
    async def get_artifact(sha256: str, request: Request) -> Response:
        """The artifact whose sha256 is ``sha256`` (its ETag)."""
        return _answer(store, sha256, request)

    return router


def artifacts_app(store: ReleaseStore) -> FastAPI:
    """A FastAPI app that serves only ``store``'s artifacts (tests, a standalone server)."""
    app = FastAPI(title="edgefleet artifacts")
    app.include_router(artifacts_router(store))
    return app


# -- answering --------------------------------------------------------------------------


def _answer(store: ReleaseStore, sha256: str, request: Request) -> Response:
    path = store.artifact_path(sha256)
    if path is None:
        return _error(404, ErrorCode.ARTIFACT_NOT_FOUND, f"no artifact with sha256 {sha256[:64]!r}")
    stat = path.stat()
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL, "Accept-Ranges": _UNIT}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    wanted = parse_range(request.headers.get("range"), stat.st_size)
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        wanted = None  # the client's copy is of other bytes: send it all
    if isinstance(wanted, Unsatisfiable):
        return _error(
            416,
            ErrorCode.RANGE_NOT_SATISFIABLE,
            f"the range {request.headers.get('range')!r} starts past the end of the "
            f"{stat.st_size}-byte artifact",
            headers={"Content-Range": f"{_UNIT} */{stat.st_size}"},
        )
    return _ArtifactFile(path, headers=headers, stat=stat, byte_range=wanted)


def _matches(if_none_match: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (weak comparison) or is ``*``."""
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _error(
    status: int, code: ErrorCode, message: str, *, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(code=code.value, message=message)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class _ArtifactFile(FileResponse):
    """Starlette's file response, serving the range decided here and nothing else."""

    def __init__(
        self, path: Path, *, headers: dict[str, str], stat: Any, byte_range: ByteRange | None
    ) -> None:
        super().__init__(path, headers=headers, media_type=MEDIA_TYPE, stat_result=stat)
        self._byte_range = byte_range

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The request's own Range and If-Range were judged by _answer: Starlette sees only
        # the canonical range (or none), so it cannot decide differently (its 400s).
        kept = [(k, v) for k, v in scope["headers"] if k not in (b"range", b"if-range")]
        if self._byte_range is not None:
            kept.append((b"range", self._byte_range.header().encode("latin-1")))
        await super().__call__({**scope, "headers": kept}, receive, send)
