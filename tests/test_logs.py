"""Operator logging: plain stderr lines, and structured journald records over the native protocol.

journald is not running here; a datagram socket bound in tmp_path receives
the records and ``parse_native`` reads them the way journald does.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.agent.logs import (
    OperatorFormatter,
    configure_logging,
    encode_journal_fields,
    syslog_priority,
)
from edgefleet.runtime import SettingError

LOGGER = "edgefleet.agent.pipeline"
LINE_RE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO edgefleet\.agent\.pipeline "
    r"\[stream=front\] camera lost$"
)


def parse_native(data: bytes) -> dict[str, str]:
    """Fields of one journald native-protocol record: KEY=VALUE lines, or KEY, length, bytes."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            pos = end + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", data, end + 1)
            start = end + 1 + 8
            value = data[start : start + size]
            assert data[start + size : start + size + 1] == b"\n", "value not followed by newline"
            pos = start + size + 1
        fields[key.decode()] = value.decode()
    return fields


class JournalListener:
    """A datagram socket where journald's native socket would be."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = str(path)
        self.fds_received = 0

    def receive_raw(self, timeout_s: float = 5.0) -> bytes | None:
        """One record's bytes (read from the memfd when one was passed), or None on timeout."""
        self.sock.settimeout(timeout_s)
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 1)
        except (TimeoutError, BlockingIOError):
            return None
        self.fds_received += len(fds)
        for fd in fds:
            try:
                data += os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
        return data

    def receive(self, timeout_s: float = 5.0) -> dict[str, str] | None:
        """One record's fields, or None on timeout."""
        data = self.receive_raw(timeout_s)
        return None if data is None else parse_native(data)


@pytest.fixture
def journal(tmp_path: Path, restore_root_logging: None) -> Iterator[JournalListener]:
    """A journald stand-in socket in tmp_path."""
    path = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield JournalListener(sock, path)


def make_record(created: float, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(LOGGER, logging.INFO, __file__, 1, "camera lost", None, None)
    record.created = created
    record.msecs = (created % 1) * 1000
    record.__dict__.update(extra)
    return record


def test_plain_line_is_utc_time_level_logger_context_message() -> None:
    record = make_record(1795420800.125, stream="front")  # 2026-11-23T08:00:00.125Z

    line = OperatorFormatter().format(record)

    assert (
        line == "2026-11-23T08:00:00.125Z INFO edgefleet.agent.pipeline [stream=front] camera lost"
    )


def test_plain_line_shows_known_context_in_fixed_order_and_ignores_other_extras() -> None:
    record = make_record(0.0, event_id="e-1", frame=42, device="pi-7", model="ssd", stream="back")

    line = OperatorFormatter().format(record)

    assert line.endswith("[stream=back model=ssd device=pi-7 event_id=e-1] camera lost")


def test_plain_line_without_context_has_no_brackets() -> None:
    line = OperatorFormatter().format(make_record(0.0))

    assert line.endswith(" INFO edgefleet.agent.pipeline camera lost")


@pytest.mark.usefixtures("restore_root_logging")
def test_outside_systemd_records_go_to_stderr_one_line_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", environ={})

    logging.getLogger(LOGGER).info("camera lost", extra={"stream": "front"})
    logging.getLogger(LOGGER).debug("frame %d skipped", 7)

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert LINE_RE.match(lines[0])


@pytest.mark.usefixtures("restore_root_logging")
def test_configuring_twice_keeps_one_handler_and_the_last_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = len(logging.getLogger().handlers)

    configure_logging("INFO", environ={})
    configure_logging("debug", environ={})
    logging.getLogger(LOGGER).debug("frame %d skipped", 7)

    assert len(logging.getLogger().handlers) == before + 1
    assert capsys.readouterr().err.count("frame 7 skipped") == 1


def test_unknown_level_is_a_setting_error() -> None:
    with pytest.raises(SettingError, match="unknown log level 'LOUD'"):
        configure_logging("LOUD", environ={})


@pytest.mark.parametrize(
    ("levelno", "priority"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
        (logging.CRITICAL + 10, 1),
    ],
)
def test_levels_map_to_syslog_priorities(levelno: int, priority: int) -> None:
    assert syslog_priority(levelno) == priority


def test_journald_record_carries_structured_fields(journal: JournalListener) -> None:
    configure_logging("INFO", journald=True, journal_socket=journal.path)
    context = {"stream": "front", "model": "ssd", "device": "pi-7", "event_id": "e-1", "frame": 9}
    origin: list[int] = []

    def infer() -> None:
        frame = inspect.currentframe()
        assert frame is not None
        origin.append(frame.f_lineno + 1)
        logging.getLogger(LOGGER).warning("slow inference: %d ms", 120, extra=context)

    thread = threading.Thread(target=infer, name="edgefleet-infer-front")
    thread.start()
    thread.join(timeout=5)
    fields = journal.receive()

    assert fields is not None
    assert (
        fields["MESSAGE"]
        == "[stream=front model=ssd device=pi-7 event_id=e-1] slow inference: 120 ms"
    )
    assert fields["PRIORITY"] == "4"
    assert fields["LOGGER"] == LOGGER
    assert fields["THREAD_NAME"] == "edgefleet-infer-front"
    assert fields["CODE_FILE"] == __file__
    assert fields["CODE_LINE"] == str(origin[0])
    assert fields["CODE_FUNC"] == "infer"
    assert fields["EDGEFLEET_STREAM"] == "front"
    assert fields["EDGEFLEET_MODEL"] == "ssd"
    assert fields["EDGEFLEET_DEVICE"] == "pi-7"
    assert fields["EDGEFLEET_EVENT_ID"] == "e-1"
    assert not any("FRAME" in key for key in fields)


def test_journald_traceback_is_sent_in_the_length_prefixed_form(journal: JournalListener) -> None:
    configure_logging("INFO", journald=True, journal_socket=journal.path)

    try:
        _ = 1 / 0
    except ZeroDivisionError:
        logging.getLogger(LOGGER).exception("inference failed")
    data = journal.receive_raw()

    assert data is not None
    assert data.startswith(b"MESSAGE\n")
    message = parse_native(data)["MESSAGE"]
    assert message.startswith("inference failed\nTraceback (most recent call last):")
    assert message.endswith("ZeroDivisionError: division by zero")


def test_journald_record_too_large_for_a_datagram_arrives_as_a_memfd(
    journal: JournalListener,
) -> None:
    configure_logging("INFO", journald=True, journal_socket=journal.path)
    huge = "x" * 1_000_000

    logging.getLogger(LOGGER).info("%s", huge)
    fields = journal.receive()

    assert fields is not None
    assert fields["MESSAGE"] == huge
    assert journal.fds_received == 1


def test_unreachable_journald_falls_back_to_stderr_and_says_so_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_root_logging: None
) -> None:
    configure_logging("INFO", journald=True, journal_socket=str(tmp_path / "no-journal.sock"))

    logging.getLogger(LOGGER).info("camera lost", extra={"stream": "front"})
    logging.getLogger(LOGGER).info("camera lost", extra={"stream": "front"})

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("edgefleet: journald unavailable")
    assert all(LINE_RE.match(line) for line in lines[1:])


def test_invocation_id_means_systemd_and_selects_journald(journal: JournalListener) -> None:
    configure_logging("INFO", environ={"INVOCATION_ID": "0f3c"}, journal_socket=journal.path)

    logging.getLogger(LOGGER).info("started")

    fields = journal.receive()
    assert fields is not None
    assert fields["MESSAGE"] == "started"


def test_journal_stream_naming_our_stderr_selects_journald(
    journal: JournalListener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stderr = (tmp_path / "stderr").open("w")
    monkeypatch.setattr(sys, "stderr", stderr)
    st = os.fstat(stderr.fileno())

    configure_logging(
        "INFO", environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, journal_socket=journal.path
    )
    logging.getLogger(LOGGER).info("started")

    fields = journal.receive()
    stderr.close()
    assert fields is not None
    assert fields["MESSAGE"] == "started"
    assert (tmp_path / "stderr").read_text() == ""


def test_journal_stream_naming_another_file_keeps_stderr(
    journal: JournalListener, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", environ={"JOURNAL_STREAM": "1:2"}, journal_socket=journal.path)

    logging.getLogger(LOGGER).info("started")

    assert "started" in capsys.readouterr().err
    assert journal.receive(timeout_s=0) is None


def test_under_systemd_without_a_journal_socket_logs_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_root_logging: None
) -> None:
    configure_logging(
        "INFO", environ={"INVOCATION_ID": "0f3c"}, journal_socket=str(tmp_path / "absent.sock")
    )

    logging.getLogger(LOGGER).info("started")

    err = capsys.readouterr().err
    assert "started" in err
    assert "journald unavailable" not in err


_FIELD_VALUES = st.text(st.characters(codec="utf-8"), max_size=200)


@given(st.lists(st.tuples(st.from_regex(r"[A-Z][A-Z0-9_]{0,20}", fullmatch=True), _FIELD_VALUES)))
def test_native_encoding_reads_back_as_written(fields: list[tuple[str, str]]) -> None:
    expected = dict(fields)  # journald keeps repeated fields; our records never repeat one

    assert parse_native(encode_journal_fields(fields)) == expected
