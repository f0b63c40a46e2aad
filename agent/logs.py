"""Logging for operators: structured journald records under systemd, one plain line otherwise.

``configure_logging`` installs one handler on the root logger:

- under systemd (``$JOURNAL_STREAM`` names our stderr, or ``$INVOCATION_ID``
  is set) a journald handler. Each record carries ``MESSAGE``, ``PRIORITY``,
  ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``, ``LOGGER``, ``THREAD_NAME``,
  ``SYSLOG_IDENTIFIER`` and the context fields the caller passed with
  ``extra=`` (``stream``, ``model``, ``device``, ``event_id``) as
  ``EDGEFLEET_STREAM`` and so on, so ``journalctl EDGEFLEET_STREAM=front``
  finds one camera's story. ``systemd-python`` sends the fields when it is
  installed; otherwise this module writes the journald native protocol
  itself (one datagram of ``KEY=VALUE`` lines, the length-prefixed form for
  values with line breaks, a sealed memfd for records too large for a
  datagram);
- otherwise stderr, one line per record::

    2026-11-23T08:00:00.123Z INFO edgefleet.agent.pipeline [stream=front] camera lost

Threads: ``configure_logging`` runs on the main thread at start-up (and on
reload); the handlers' ``emit`` runs on whichever thread logs, serialised by
the handler's lock.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Final

from edgefleet.runtime import SettingError

JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"
# Context a caller may attach with ``extra=``, in the order the plain line shows them.
CONTEXT_FIELDS: Final = ("stream", "model", "device", "event_id")
JOURNAL_FIELD_PREFIX: Final = "EDGEFLEET_"
# A journald that does not take a record within this time gets it on stderr instead.
JOURNAL_SEND_TIMEOUT_S: Final = 1.0

_LEVELS: Final = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}
# syslog priorities journald understands, for the standard levels and above.
_PRIORITIES: Final = (
    (logging.DEBUG, 7),
    (logging.INFO, 6),
    (logging.WARNING, 4),
    (logging.ERROR, 3),
    (logging.CRITICAL, 2),
)
_ALERT_PRIORITY: Final = 1
_TOO_LARGE: Final = (errno.EMSGSIZE, errno.ENOBUFS)
_MEMFD_SEALS: Final = (
    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
)

_JournalSend = Callable[..., Any]


def configure_logging(
    level: str = "INFO",
    *,
    journald: bool | None = None,
    environ: Mapping[str, str] | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> None:
    """Send log records at ``level`` and above to journald or stderr; safe to call again.

    ``journald=None`` decides from ``environ`` (default os.environ) whether we
    run under systemd; ``journal_socket`` is journald's native socket.
    """
    levelno = _parse_level(level)
    env = os.environ if environ is None else environ
    if journald is None:
        journald = running_under_systemd(env) and os.path.exists(journal_socket)
    handler: logging.Handler = (
        JournaldHandler(journal_socket) if journald else OperatorStderrHandler()
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _EdgefleetHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)


def running_under_systemd(environ: Mapping[str, str]) -> bool:
    """True when systemd started us: stderr is its journal stream, or it set INVOCATION_ID."""
    return _stderr_is_journal(environ.get("JOURNAL_STREAM", "")) or bool(
        environ.get("INVOCATION_ID")
    )


def _stderr_is_journal(journal_stream: str) -> bool:
    if not journal_stream or sys.stderr is None:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):  # stderr closed or not a real file (io.UnsupportedOperation)
        return False
    return journal_stream == f"{st.st_dev}:{st.st_ino}"


def _parse_level(level: str) -> int:
    try:
        return _LEVELS[level.strip().upper()]
    except KeyError:
        raise SettingError(
            f"unknown log level {level!r}", hint=f"use one of {', '.join(_LEVELS)}"
        ) from None


def syslog_priority(levelno: int) -> int:
    """The syslog priority (0-7) journald stores for a logging level."""
    for threshold, priority in _PRIORITIES:
        if levelno <= threshold:
            return priority
    return _ALERT_PRIORITY


def record_context(record: logging.LogRecord) -> dict[str, str]:
    """The known context fields (``stream``, ``model``, ...) the caller passed with ``extra=``."""
    context: dict[str, str] = {}
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            context[name] = str(value)
    return context


def _context_prefix(record: logging.LogRecord) -> str:
    context = record_context(record)
    if not context:
        return ""
    return "[" + " ".join(f"{name}={value}" for name, value in context.items()) + "] "


class _EdgefleetHandler(logging.Handler):
    """Marks the handlers ``configure_logging`` installs, so a second call replaces them."""


class OperatorFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger> [stream=.. model=..] <message>``, then any traceback."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        """The record's line, without the traceback the base class appends."""
        created = datetime.fromtimestamp(record.created, tz=timezone.utc)
        stamp = f"{created:%Y-%m-%dT%H:%M:%S}.{int(record.msecs):03d}Z"
        return f"{stamp} {record.levelname} {record.name} {_context_prefix(record)}{record.message}"


class _JournalMessageFormatter(logging.Formatter):
    """MESSAGE for journald: the context prefix and the message; journald adds time and level."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return f"{_context_prefix(record)}{record.message}"


class OperatorStderrHandler(_EdgefleetHandler, logging.StreamHandler):  # type: ignore[type-arg]
    """One line per record on the current ``sys.stderr``."""

    def __init__(self) -> None:
        """Write to whatever ``sys.stderr`` is when a record arrives."""
        logging.StreamHandler.__init__(self, sys.stderr)
        self.setFormatter(OperatorFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record's line to ``sys.stderr`` (looked up now: it may have been replaced)."""
        self.stream = sys.stderr
        super().emit(record)


def journal_fields(
    record: logging.LogRecord, message: str, syslog_identifier: str
) -> list[tuple[str, str]]:
    """The journald fields for ``record`` whose formatted MESSAGE is ``message``."""
    fields = [
        ("MESSAGE", message),
        ("PRIORITY", str(syslog_priority(record.levelno))),
        ("SYSLOG_IDENTIFIER", syslog_identifier),
        ("LOGGER", record.name),
        ("THREAD_NAME", record.threadName or ""),
        ("CODE_FILE", record.pathname),
        ("CODE_LINE", str(record.lineno)),
        ("CODE_FUNC", record.funcName),
    ]
    fields.extend(
        (JOURNAL_FIELD_PREFIX + name.upper(), value)
        for name, value in record_context(record).items()
    )
    return fields


def encode_journal_fields(fields: list[tuple[str, str]]) -> bytes:
    """Serialise fields in journald's native protocol.

    ``KEY=VALUE\\n`` for values on one line; ``KEY\\n`` + 64-bit little-endian
    length + value + ``\\n`` for values that contain a line break.
    """
    parts: list[bytes] = []
    for key, value in fields:
        name = key.encode("ascii")
        data = value.encode("utf-8", "backslashreplace")
        if b"\n" in data:
            parts.append(name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name + b"=" + data + b"\n")
    return b"".join(parts)


def _library_journal_send() -> _JournalSend | None:
    """``systemd.journal.send`` when systemd-python is installed, else None."""
    try:
        from systemd import journal
    except ImportError:
        return None
    send: _JournalSend = journal.send
    return send


class JournaldHandler(_EdgefleetHandler):
    """Sends records to journald with structured fields; falls back to stderr if it cannot."""

    def __init__(self, socket_path: str = JOURNAL_SOCKET, *, syslog_identifier: str = "") -> None:
        """Send to journald's native socket at ``socket_path``, tagged ``syslog_identifier``."""
        super().__init__()
        self.setFormatter(_JournalMessageFormatter())
        self._socket_path = socket_path
        self._identifier = syslog_identifier or os.path.basename(sys.argv[0]) or "edgefleet"
        # systemd-python always writes to the system journal socket.
        self._library = _library_journal_send() if socket_path == JOURNAL_SOCKET else None
        self._sock: socket.socket | None = None
        self._fallback = OperatorFormatter()
        self._failing = False

    def emit(self, record: logging.LogRecord) -> None:
        """Send one record (called with the handler lock held)."""
        fields = journal_fields(record, self.format(record), self._identifier)
        error = self._send(fields)
        if error:
            self._write_to_stderr(record, error)
        self._failing = bool(error)

    def close(self) -> None:
        """Close the socket to journald."""
        self.acquire()
        try:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        finally:
            self.release()
        super().close()

    def _send(self, fields: list[tuple[str, str]]) -> str:
        """Send the fields; the error text, or "" when journald took them."""
        if self._library is not None:
            message, *rest = fields
            try:
                self._library(message[1], **dict(rest))
            except (OSError, ValueError) as exc:
                return f"systemd.journal.send failed: {exc}"
            return ""
        data = encode_journal_fields(fields)
        try:
            try:
                self._socket().sendto(data, self._socket_path)
            except OSError as exc:
                if exc.errno not in _TOO_LARGE:
                    raise
                self._send_as_memfd(data)
        except OSError as exc:
            return f"cannot write to {self._socket_path}: {exc}"
        return ""

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(JOURNAL_SEND_TIMEOUT_S)
        return self._sock

    def _send_as_memfd(self, data: bytes) -> None:
        """Hand a record too large for one datagram to journald as a sealed memfd."""
        fd = os.memfd_create("edgefleet-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _MEMFD_SEALS)
            rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())
            self._socket().sendmsg([], [rights], 0, self._socket_path)
        finally:
            os.close(fd)

    def _write_to_stderr(self, record: logging.LogRecord, error: str) -> None:
        """Keep a record journald did not take, and say why the first time."""
        stream = sys.stderr
        if stream is None:
            return
        if not self._failing:
            stream.write(f"edgefleet: journald unavailable ({error}); logging to stderr\n")
        stream.write(self._fallback.format(record) + "\n")
        stream.flush()
