"""Download the model file a signed manifest names: resumable, bounded, sha256-checked.

:func:`download` fetches ``url`` over HTTP(S) into a staging file and returns the verified
bytes. A staging file left by an earlier attempt (or an earlier run of the agent, cut off by
a reboot) is resumed with ``Range: bytes=N-``; a server that ignores the range starts the
file over. No more than the manifest's ``size`` bytes are ever written: a server that
announces or sends more is refused. Every attempt ends with the staging file flushed and
fsynced, so a resume after a power cut sees what really landed; the sha256 check at the
end catches a torn trailing chunk. On success the staging file is kept: the caller owns
it (and the returned bytes, which are exactly the verified ones).

Truncated transfers, timeouts, refused connections, 5xx, 408 and 429 are retried up to
``attempts`` times with a doubling delay, each retry resuming from what is staged; a set
``stop`` event ends the download (mid-transfer or mid-wait) with the staged bytes kept.

Threads: the agent's update thread calls :func:`download`; ``on_progress`` runs on that
thread, after each chunk. Nothing here starts a thread.

Errors::

    EdgefleetError (edgefleet.runtime)
    └── DownloadError            the model file could not be fetched
        ├── DownloadTooLarge     the server has more bytes than the manifest's size
        │                        (the manifest or the server is wrong; permanent)
        ├── DownloadTruncated    the server's file is shorter than the manifest's size
        │                        (it says so in Content-Length or Content-Range; permanent)
        ├── DownloadHashMismatch the bytes' sha256 is not the manifest's (permanent)
        ├── DownloadIncomplete   the transfer ended early (transient: a retry resumes)
        └── DownloadFailed       network error, timeout, HTTP error status, unsupported
                                 URL, staging file I/O error, stopped; ``permanent``
                                 says whether retrying the same URL can help

A bug (a callback raising, a negative ``size``) surfaces as the ordinary Python exception.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO
from urllib.parse import urlsplit, urlunsplit

from edgefleet.runtime import EdgefleetError

__all__ = [
    "DownloadError",
    "DownloadFailed",
    "DownloadHashMismatch",
    "DownloadIncomplete",
    "DownloadTooLarge",
    "DownloadTruncated",
    "download",
    "staging_failed",
    "verified_staging",
]

log = logging.getLogger(__name__)

_CHUNK_BYTES = 64 * 1024
_SCHEMES = ("http", "https")
# Statuses a later try may get past, though they are 4xx.
_TRANSIENT_CLIENT_STATUSES = (408, 429)
_RANGE_NOT_SATISFIABLE = 416
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_URL_HINT = "the manifest must name an http:// or https:// URL: re-sign it with one"
_SERVER_HINT = "check that the server is up and reachable from this device; retrying later"
_RESUME_HINT = (
    "the network or the server dropped the transfer; retrying resumes from the staged bytes"
)


class DownloadError(EdgefleetError):
    """The model file named by a manifest could not be fetched; ``url`` says which."""

    def __init__(self, url: str, message: str, *, hint: str = "") -> None:
        shown = _shown(url)
        # "mqtt:" (a chunked transfer over the broker, edgefleet.agent.chunks) has its colon.
        separator = "" if shown.endswith(":") else ":"
        super().__init__(f"download of {shown}{separator} {message}", hint=hint)
        self.url = url


class DownloadTooLarge(DownloadError):
    """The server sent or announced more bytes than the manifest's size (permanent)."""


class DownloadTruncated(DownloadError):
    """The server's file is shorter than the manifest's size (permanent)."""


class DownloadHashMismatch(DownloadError):
    """Every byte arrived but their sha256 is not the manifest's (permanent)."""


class DownloadIncomplete(DownloadError):
    """The transfer ended before ``size`` bytes arrived (transient: a retry resumes)."""


class DownloadFailed(DownloadError):
    """Network error, timeout, HTTP error status, unsupported URL, staging I/O, or stopped."""

    def __init__(self, url: str, message: str, *, hint: str = "", permanent: bool) -> None:
        super().__init__(url, message, hint=hint)
        self.permanent = permanent


def download(
    url: str,
    staging: Path,
    *,
    size: int,
    sha256: str,
    timeout_s: float = 30.0,
    attempts: int = 3,
    retry_delay_s: float = 0.5,
    on_progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> bytes:
    """Fetch ``url`` into ``staging`` (resuming what is there) and return the verified bytes."""
    if size < 0 or attempts < 1:
        raise ValueError(f"need size >= 0 and attempts >= 1, not {size} and {attempts}")
    _check_url(url)
    transfer = _Transfer(url, staging, size, timeout_s, on_progress, stop)
    transfer.make_directory()
    delay_s = retry_delay_s
    for attempt in range(1, attempts + 1):
        if stop is not None and stop.is_set():
            raise _stopped(url)
        try:
            transfer.attempt()
            break
        except (DownloadIncomplete, DownloadFailed) as exc:
            if _is_final(exc, attempt, attempts, stop):
                raise
            log.warning(
                "download %s: attempt %d of %d failed (%s); retrying in %.1f s",
                _shown(url),
                attempt,
                attempts,
                exc,
                delay_s,
            )
            if _wait(stop, delay_s):
                raise _stopped(url) from exc
            delay_s *= 2
    return transfer.verify(sha256)


def _is_final(
    exc: DownloadIncomplete | DownloadFailed,
    attempt: int,
    attempts: int,
    stop: threading.Event | None,
) -> bool:
    """Whether ``exc`` ends the download rather than earning another attempt."""
    permanent = isinstance(exc, DownloadFailed) and exc.permanent
    stopped = stop is not None and stop.is_set()
    return permanent or stopped or attempt == attempts


def _wait(stop: threading.Event | None, delay_s: float) -> bool:
    """Sleep ``delay_s`` or until ``stop`` is set; whether it was set."""
    if stop is None:
        time.sleep(delay_s)
        return False
    return stop.wait(delay_s)


@dataclass(frozen=True)
class _Transfer:
    """One download's fixed facts; each method is one step of an attempt."""

    url: str
    staging: Path
    size: int
    timeout_s: float
    on_progress: Callable[[int], None] | None
    stop: threading.Event | None

    def attempt(self) -> None:
        """One request: append to (or restart) the staging file until it holds ``size`` bytes."""
        staged = self._staged_length()
        if staged == self.size:
            return
        request = urllib.request.Request(self.url, headers={"Accept-Encoding": "identity"})
        if staged:
            request.add_header("Range", f"bytes={staged}-")
            log.info("download %s: resuming at %d of %d bytes", _shown(self.url), staged, self.size)
        with self._open(request) as response:
            start = self._body_start(response, staged)
            self._receive(response, start)

    def verify(self, sha256: str) -> bytes:
        """The staged bytes if their length and sha256 are the manifest's; else the file goes."""
        try:
            data = verified_staging(
                self.url,
                self.staging,
                size=self.size,
                sha256=sha256,
                hint="the server's file is not the one the manifest was signed for: re-sign "
                "the manifest for the file the server holds, or restore the file",
            )
        except DownloadHashMismatch:
            self.discard()
            raise
        log.info("download %s: %d bytes, sha256 verified", _shown(self.url), self.size)
        return data

    def make_directory(self) -> None:
        """Create the staging file's directory if missing."""
        try:
            self.staging.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise staging_failed(self.url, self.staging.parent, "create", exc) from exc

    def discard(self) -> None:
        """Delete the staging file, if there is one."""
        try:
            self.staging.unlink(missing_ok=True)
        except OSError as exc:
            raise staging_failed(self.url, self.staging, "delete", exc) from exc

    def _staged_length(self) -> int:
        """Bytes already staged; a file longer than ``size`` is not ours to resume, so it goes."""
        try:
            staged = self.staging.stat().st_size
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise staging_failed(self.url, self.staging, "read", exc) from exc
        if staged > self.size:
            log.warning(
                "download %s: staging file %s holds %d bytes, more than %d; starting over",
                _shown(self.url),
                self.staging,
                staged,
                self.size,
            )
            self.discard()
            return 0
        return staged

    def _open(self, request: urllib.request.Request) -> http.client.HTTPResponse:
        """Send the request; translate every way it can fail into a :class:`DownloadFailed`."""
        opener = urllib.request.build_opener(_HttpOnlyRedirects)
        try:
            response: http.client.HTTPResponse = opener.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == _RANGE_NOT_SATISFIABLE:
                # The staged bytes are no prefix of the server's file: start over next time.
                self.discard()
            raise _status_failed(self.url, exc.code, exc.reason) from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, str):  # our redirect check, or urllib's own refusal
                raise DownloadFailed(self.url, exc.reason, hint=_URL_HINT, permanent=True) from exc
            raise _network_failed(self.url, exc.reason, self.timeout_s) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise _network_failed(self.url, exc, self.timeout_s) from exc
        return response

    def _body_start(self, response: http.client.HTTPResponse, staged: int) -> int:
        """Where in the file the body starts (0 or ``staged``), after checking its size."""
        if response.status == http.client.PARTIAL_CONTENT:
            start, total = _content_range(response, self.url)
            if start != staged:
                self.discard()
                raise DownloadFailed(
                    self.url,
                    f"asked for bytes from {staged:,}, the server sent them from {start:,}",
                    hint="the server's range support is broken; the next try starts over",
                    permanent=False,
                )
        elif response.status == http.client.OK:
            if staged:
                log.info(
                    "download %s: the server ignored the range; starting over", _shown(self.url)
                )
            start, total = 0, None
        else:
            raise DownloadFailed(
                self.url,
                f"unexpected HTTP status {response.status} {response.reason}",
                hint="serve the model file with 200 or 206",
                permanent=True,
            )
        length = response.length  # Content-Length; None when absent
        announced = max(total or 0, start + length if length is not None else 0)
        if announced > self.size:
            self.discard()
            raise _too_large(self.url, self.size, announced=announced)
        whole = total if total is not None else length if start == 0 else None
        if whole is not None and whole < self.size:
            self.discard()
            raise DownloadTruncated(
                self.url,
                f"the server's file has {whole:,} bytes, the manifest says {self.size:,}",
                hint="the file on the server is cut short or another one: upload the whole "
                "file, or sign a manifest for the one that is there",
            )
        return start

    def _receive(self, response: http.client.HTTPResponse, start: int) -> None:
        """Copy the body into the staging file from ``start``, never past ``size`` bytes."""
        try:
            file = self.staging.open("ab" if start else "wb")
        except OSError as exc:
            raise staging_failed(self.url, self.staging, "open", exc) from exc
        try:
            received = self._copy(response, file, start)
        finally:
            self._close(file)
        if received < self.size:
            raise DownloadIncomplete(
                self.url,
                f"the connection ended after {received:,} of {self.size:,} bytes",
                hint=_RESUME_HINT,
            )
        if self._read(response, 1, received):
            self.discard()
            raise _too_large(self.url, self.size, announced=None)

    def _copy(self, response: http.client.HTTPResponse, file: BinaryIO, received: int) -> int:
        """Write chunks until ``size`` bytes are staged or the body ends; the bytes staged."""
        while received < self.size:
            if self.stop is not None and self.stop.is_set():
                raise _stopped(self.url)
            chunk = self._read(response, min(_CHUNK_BYTES, self.size - received), received)
            if not chunk:
                break
            try:
                file.write(chunk)
            except OSError as exc:
                raise staging_failed(self.url, self.staging, "write", exc) from exc
            received += len(chunk)
            if self.on_progress is not None:
                self.on_progress(received)
        return received

    def _close(self, file: BinaryIO) -> None:
        """Flush, fsync and close, so a resume after a power cut trusts the file's length.

        The directory is not fsynced: losing a new file's entry only costs a download from 0.
        """
        try:
            with file:
                file.flush()
                os.fsync(file.fileno())
        except OSError as exc:
            raise staging_failed(self.url, self.staging, "write", exc) from exc

    def _read(self, response: http.client.HTTPResponse, count: int, received: int) -> bytes:
        """Up to ``count`` bytes of the body; b"" once the server has closed the connection."""
        try:
            return response.read(count)
        except TimeoutError as exc:
            raise DownloadFailed(
                self.url,
                f"no data for {self.timeout_s:g} s after {received:,} bytes",
                hint="the network or the server stalled; retrying resumes from the staged bytes",
                permanent=False,
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadIncomplete(
                self.url,
                f"the connection broke after {received:,} bytes ({exc!r})",
                hint=_RESUME_HINT,
            ) from exc


def _content_range(response: http.client.HTTPResponse, url: str) -> tuple[int, int | None]:
    """(first byte, total or None) from a 206's ``Content-Range``."""
    header = response.headers.get("Content-Range", "")
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None:
        raise DownloadFailed(
            url,
            f"206 Partial Content with an unreadable Content-Range {header!r}",
            hint="fix the server's range support, or disable it",
            permanent=False,
        )
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


# -- files and URLs --------------------------------------------------------------------------


def _check_url(url: str) -> None:
    """Refuse anything but an http(s) URL with a host, before touching the disk."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise DownloadFailed(url, f"malformed URL ({exc})", hint=_URL_HINT, permanent=True) from exc
    if parts.scheme.lower() not in _SCHEMES:
        raise DownloadFailed(
            url,
            f"unsupported URL scheme {parts.scheme or '(none)'!r}",
            hint=_URL_HINT,
            permanent=True,
        )
    if not parts.hostname:
        raise DownloadFailed(url, "the URL names no host", hint=_URL_HINT, permanent=True)


def _shown(url: str) -> str:
    """The URL without credentials, query or fragment: presigned tokens stay out of logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would also follow one to ftp)."""

    def redirect_request(  # noqa: PLR0917 - urllib's signature
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        scheme = urlsplit(newurl).scheme.lower()
        if scheme not in _SCHEMES:
            raise urllib.error.URLError(f"redirected to an unsupported URL scheme {scheme!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# -- errors ----------------------------------------------------------------------------------


def _status_failed(url: str, status: int, reason: str) -> DownloadFailed:
    permanent = status < 500 and status not in _TRANSIENT_CLIENT_STATUSES
    if status == _RANGE_NOT_SATISFIABLE:
        return DownloadFailed(
            url,
            f"HTTP {status} {reason}: the staged bytes do not fit the server's file",
            hint="the staging file was discarded; the next try starts over",
            permanent=False,
        )
    return DownloadFailed(
        url,
        f"HTTP {status} {reason}",
        hint="the manifest names a file the server does not give out: check the URL and "
        "the server's permissions, and re-sign the manifest"
        if permanent
        else f"the server is failing or busy; {_SERVER_HINT} may succeed",
        permanent=permanent,
    )


def _network_failed(url: str, reason: BaseException, timeout_s: float) -> DownloadFailed:
    if isinstance(reason, TimeoutError):
        message = f"no answer within {timeout_s:g} s"
    else:
        message = f"cannot reach the server ({reason})"
    hint = f"{_SERVER_HINT} may succeed"
    if "CERTIFICATE_VERIFY_FAILED" in str(reason):
        hint = "the server's TLS certificate was refused: check the device's clock and CA store"
    return DownloadFailed(url, message, hint=hint, permanent=False)


def _too_large(url: str, size: int, *, announced: int | None) -> DownloadTooLarge:
    what = f"announced {announced:,} bytes, more" if announced is not None else "sent more"
    return DownloadTooLarge(
        url,
        f"server {what} than the manifest's {size:,} bytes",
        hint="the manifest or the server's file is wrong: re-sign the manifest for the file "
        "the server holds",
    )


def verified_staging(url: str, staging: Path, *, size: int, sha256: str, hint: str) -> bytes:
    """The bytes of a complete staging file, if their length and sha256 are the manifest's."""
    try:
        data = staging.read_bytes()
    except OSError as exc:
        raise staging_failed(url, staging, "read", exc) from exc
    expected = sha256.lower()
    got = hashlib.sha256(data).hexdigest()
    if len(data) != size or got != expected:
        raise DownloadHashMismatch(
            url,
            f"expected sha256 {expected} ({size:,} bytes), got {got} ({len(data):,} bytes)",
            hint=hint,
        )
    return data


def staging_failed(url: str, path: Path, action: str, exc: OSError) -> DownloadFailed:
    """The error for a staging file that cannot be used: transient, names the folder to check."""
    return DownloadFailed(
        url,
        f"cannot {action} the staging file {path} ({exc.strerror or exc})",
        hint=f"check the permissions and free space of {path.parent}",
        permanent=False,
    )


def _stopped(url: str) -> DownloadFailed:
    return DownloadFailed(
        url,
        "stopped",
        hint="the agent is shutting down; the staged bytes are kept for the next try",
        permanent=False,
    )
