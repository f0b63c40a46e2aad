"""The durable outbox: real SQLite files in tmp_path, real threads, real killed processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from pydantic import ValidationError

from edgefleet.agent.outbox import Outbox, OutboxError, OutboxItem, OutboxSettings
from edgefleet.runtime import EdgefleetError

CHILD_TIMEOUT_S = 60.0

# Puts N events, then kills itself with SIGKILL: no close(), no checkpoint, no atexit.
PUT_THEN_KILL = """
import os, signal, sys
from pathlib import Path
from edgefleet.agent.outbox import Outbox, OutboxSettings
outbox = Outbox(OutboxSettings(path=Path(sys.argv[1]), sync=sys.argv[3]))
for i in range(int(sys.argv[2])):
    outbox.put("cam", "edgefleet/v1/dev/events/cam", str(i).encode())
os.kill(os.getpid(), signal.SIGKILL)
"""

# Puts N events, waits past the depth record's pace, puts one more (recorded), SIGKILLs itself.
PUT_RECORD_THEN_KILL = """
import os, signal, sys, time
from pathlib import Path
from edgefleet.agent.outbox import Outbox, OutboxSettings
outbox = Outbox(OutboxSettings(path=Path(sys.argv[1])))
count = int(sys.argv[2])
for i in range(count):
    outbox.put("cam", "t", str(i).encode() * 200)
time.sleep(1.5)
outbox.put("cam", "t", str(count).encode() * 200)
os.kill(os.getpid(), signal.SIGKILL)
"""

# Puts until the file size limit makes a write fail, then reports what it saw.
PUT_PAST_FILE_SIZE_LIMIT = """
import json, resource, signal, sys
from pathlib import Path
from edgefleet.agent.outbox import Outbox, OutboxError, OutboxSettings
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # let write() fail with EFBIG instead
outbox = Outbox(OutboxSettings(path=Path(sys.argv[1])))
resource.setrlimit(resource.RLIMIT_FSIZE, (256_000, 256_000))
stored = 0
try:
    for _ in range(100_000):
        outbox.put("cam", "t", b"x" * 1000)
        stored += 1
    error = None
except OutboxError as exc:
    error = {"message": exc.message, "hint": exc.hint}
rows = len(outbox.peek(100_000))
print(json.dumps({"error": error, "stored": stored, "depth": outbox.depth, "rows": rows}))
"""


def settings(tmp_path: Path, **overrides: object) -> OutboxSettings:
    """Settings for an outbox file inside tmp_path."""
    return OutboxSettings.model_validate({"path": tmp_path / "outbox.sqlite3", **overrides})


def put_numbered(outbox: Outbox, count: int, stream: str = "cam") -> list[int]:
    """Put ``count`` events whose payload is their index; return their seqs."""
    return [outbox.put(stream, f"t/{stream}", str(i).encode()) for i in range(count)]


def payloads(items: list[OutboxItem]) -> list[bytes]:
    return [item.payload for item in items]


def test_outbox_returns_events_oldest_first_in_put_order(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path)) as outbox:
        outbox.put("front", "t/front", b"f0")
        outbox.put("back", "t/back", b"b0")
        outbox.put("front", "t/front", b"f1")

        items = outbox.peek(10)

    assert [(i.stream, i.topic, i.payload) for i in items] == [
        ("front", "t/front", b"f0"),
        ("back", "t/back", b"b0"),
        ("front", "t/front", b"f1"),
    ]
    assert [i.seq for i in items] == sorted(i.seq for i in items)


def test_outbox_peek_pages_with_limit_and_after_seq_without_removing(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path)) as outbox:
        seqs = put_numbered(outbox, 5)

        first = outbox.peek(2)
        rest = outbox.peek(10, after_seq=first[-1].seq)

        assert [i.seq for i in first] == seqs[:2]
        assert [i.seq for i in rest] == seqs[2:]
        assert outbox.peek(0) == []
        assert outbox.depth == 5


def test_outbox_put_records_creation_time(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path)) as outbox:
        before = time.time()
        outbox.put("cam", "t", b"x")
        after = time.time()

        (item,) = outbox.peek(1)

    assert before <= item.created_ts <= after


def test_outbox_keeps_events_across_close_and_reopen(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path)) as outbox:
        outbox.put("cam", "t/cam", b"\x00binary\xff")
        outbox.put("door", "t/door", b"{}")
        before = outbox.peek(10)

    with Outbox(settings(tmp_path)) as reopened:
        after = reopened.peek(10)
        depth = reopened.depth

    assert after == before
    assert depth == 2


def test_outbox_seq_keeps_increasing_across_reopen_even_when_emptied(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path)) as outbox:
        seqs = put_numbered(outbox, 3)
        outbox.ack(seqs)

    with Outbox(settings(tmp_path)) as reopened:
        next_seq = reopened.put("cam", "t", b"x")

    assert seqs == sorted(set(seqs))
    assert next_seq > max(seqs)


@pytest.mark.parametrize("sync", ["normal", "full"])
def test_outbox_keeps_every_put_when_the_process_is_killed(tmp_path: Path, sync: str) -> None:
    path = tmp_path / "outbox.sqlite3"
    count = 300

    child = subprocess.run(
        [sys.executable, "-c", PUT_THEN_KILL, str(path), str(count), sync],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )

    assert child.returncode == -signal.SIGKILL, child.stderr
    assert Path(f"{path}-wal").exists()  # killed before any clean checkpoint
    with Outbox(OutboxSettings(path=path)) as reopened:
        assert reopened.depth == count
        assert payloads(reopened.peek(count + 1)) == [str(i).encode() for i in range(count)]


def test_outbox_cut_wal_after_a_power_cut_is_warned_about_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    count = 400
    child = subprocess.run(
        [sys.executable, "-c", PUT_RECORD_THEN_KILL, str(path), str(count)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    recorded = json.loads(path.with_name("outbox.sqlite3.state").read_text())
    assert recorded["depth"] == count + 1
    wal = Path(f"{path}-wal")
    frame = 24 + 4096
    frames = (wal.stat().st_size - 32) // frame
    os.truncate(wal, 32 + frames // 2 * frame + 100)  # half the frames and a torn one: gone

    with caplog.at_level(logging.WARNING, logger="edgefleet.agent.outbox"):
        reopened = Outbox(OutboxSettings(path=path))
    with reopened:
        depth, lost = reopened.depth, reopened.lost
        kept = payloads(reopened.peek(count + 1))

    assert 0 < depth < count + 1
    assert lost == count + 1 - depth  # exactly what the record says is missing
    assert kept == [str(i).encode() * 200 for i in range(depth)]  # a prefix, in order
    warning = next(r.getMessage() for r in caplog.records if "were recorded" in r.getMessage())
    assert f"opened with {depth} events" in warning
    assert f"{lost} events lost" in warning


def test_outbox_salvages_the_readable_rows_of_a_corrupt_page_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(OutboxSettings(path=path)) as outbox:
        stored = {outbox.put("cam", "t", os.urandom(1000)): i for i in range(2000)}
    # The clean close checkpointed everything into the file; the depth record says 2000.
    pages = path.stat().st_size // 4096
    with path.open("r+b") as damaged:  # one leaf page in the middle: a few rows
        damaged.seek(pages // 2 * 4096)
        damaged.write(os.urandom(4096))

    with caplog.at_level(logging.ERROR, logger="edgefleet.agent.outbox"):
        reopened = Outbox(OutboxSettings(path=path))
    with reopened:
        items = reopened.peek(3000)
        salvaged, lost, depth = reopened.salvaged, reopened.lost, reopened.depth

    assert salvaged == len(items) == depth
    assert 0 < lost < 20  # one 4 KiB page holds a handful of 1 KB rows
    assert salvaged + lost == 2000
    assert [i.seq for i in items] == sorted(i.seq for i in items)
    assert {i.seq for i in items} <= stored.keys()
    assert any(f"{salvaged} events copied, {lost} lost" in r.getMessage() for r in caplog.records)


def test_outbox_drops_oldest_past_the_bound(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path, max_events=5)) as outbox:
        put_numbered(outbox, 8)

        kept = outbox.peek(10)

        assert payloads(kept) == [b"3", b"4", b"5", b"6", b"7"]
        assert outbox.depth == 5
        assert outbox.dropped == 3


def test_outbox_drop_count_survives_reopen(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path, max_events=2)) as outbox:
        put_numbered(outbox, 6)

    with Outbox(settings(tmp_path, max_events=2)) as reopened:
        assert reopened.dropped == 4
        assert reopened.depth == 2


def test_outbox_lowered_bound_drops_the_oldest_at_open(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path, max_events=10)) as outbox:
        put_numbered(outbox, 6)

    with Outbox(settings(tmp_path, max_events=4)) as reopened:
        assert payloads(reopened.peek(10)) == [b"2", b"3", b"4", b"5"]
        assert reopened.depth == 4
        assert reopened.dropped == 2


def test_outbox_ack_removes_exactly_the_acknowledged_batch(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path)) as outbox:
        seqs = put_numbered(outbox, 6)

        outbox.ack([seqs[1], seqs[3], seqs[4]])

        assert [i.seq for i in outbox.peek(10)] == [seqs[0], seqs[2], seqs[5]]
        assert outbox.depth == 3


def test_outbox_ack_is_idempotent_and_ignores_unknown_seqs(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path)) as outbox:
        seqs = put_numbered(outbox, 3)
        outbox.ack([seqs[0]])

        outbox.ack([seqs[0], seqs[0], 999_999])
        outbox.ack([])

        assert [i.seq for i in outbox.peek(10)] == seqs[1:]
        assert outbox.depth == 2


def test_outbox_depth_counter_matches_the_table_after_reopen(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path, max_events=50)) as outbox:
        seqs = put_numbered(outbox, 80)
        outbox.ack(seqs[40:60])
        depth_before = outbox.depth

    with Outbox(settings(tmp_path, max_events=50)) as reopened:
        assert reopened.depth == depth_before == len(reopened.peek(1000)) == 30


def test_outbox_concurrent_puts_and_acks_lose_nothing_and_keep_each_streams_order(
    tmp_path: Path,
) -> None:
    producers, per_producer = 6, 400
    received: list[OutboxItem] = []
    produced = threading.Event()
    deadline = time.monotonic() + 30

    with Outbox(settings(tmp_path)) as outbox:

        def produce(stream: str) -> None:
            put_numbered(outbox, per_producer, stream)

        def publish() -> None:
            after = 0
            while time.monotonic() < deadline:
                items = outbox.peek(100, after_seq=after)
                if items:
                    received.extend(items)
                    after = items[-1].seq
                    outbox.ack(item.seq for item in items)
                elif produced.is_set() and outbox.depth == 0:
                    return
                else:
                    produced.wait(0.001)

        publisher = threading.Thread(target=publish, name="test-publisher")
        threads = [
            threading.Thread(target=produce, args=(f"s{n}",), name=f"test-infer-{n}")
            for n in range(producers)
        ]
        publisher.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        produced.set()
        publisher.join(timeout=30)
        depth = outbox.depth

    by_stream: defaultdict[str, list[bytes]] = defaultdict(list)
    for item in received:
        by_stream[item.stream].append(item.payload)
    expected = [str(i).encode() for i in range(per_producer)]
    assert not publisher.is_alive()
    assert depth == 0
    assert len(received) == producers * per_producer
    assert all(by_stream[f"s{n}"] == expected for n in range(producers))


def test_outbox_moves_a_file_that_is_not_sqlite_aside_and_starts_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not a database, just some text written over it\n" * 100)

    with caplog.at_level(logging.ERROR, logger="edgefleet.agent.outbox"):
        outbox = Outbox(OutboxSettings(path=path))
    with outbox:
        seq = outbox.put("cam", "t", b"after")
        items = outbox.peek(10)

    (moved,) = tmp_path.glob("outbox.sqlite3.corrupt-*")
    assert moved.read_bytes().startswith(b"this is not a database")
    assert [(i.seq, i.payload) for i in items] == [(seq, b"after")]
    assert any(str(path) in r.getMessage() and str(moved) in r.getMessage() for r in caplog.records)


def test_outbox_moves_a_damaged_database_aside_and_starts_fresh(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(OutboxSettings(path=path)) as outbox:
        for _ in range(200):
            outbox.put("cam", "t", os.urandom(2000))
    with path.open("r+b") as damaged:  # keep the header, overwrite the b-tree pages
        damaged.seek(4096)
        damaged.write(os.urandom(64 * 4096))

    with Outbox(OutboxSettings(path=path)) as fresh:
        depth = fresh.depth
        fresh.put("cam", "t", b"works")
        items = fresh.peek(10)

    assert len(list(tmp_path.glob("outbox.sqlite3.corrupt-*"))) == 1
    assert depth == 0
    assert payloads(items) == [b"works"]


def test_outbox_salvages_what_it_can_read_when_damage_shows_while_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 6 MB of events: more than SQLite's default 2 MB page cache and the 4 MB WAL checkpoint,
    # so reading them all goes back to the (damaged) file.
    path = tmp_path / "outbox.sqlite3"
    with Outbox(OutboxSettings(path=path)) as outbox:
        stored = {}
        for _ in range(3000):
            payload = os.urandom(2000)
            stored[outbox.put("cam", "t", payload)] = payload
        with path.open("r+b") as damaged:
            damaged.seek(2 * 4096)
            damaged.write(os.urandom(200 * 4096))

        with caplog.at_level(logging.ERROR, logger="edgefleet.agent.outbox"):
            after_damage = outbox.peek(10_000)
        salvaged, lost, depth = outbox.salvaged, outbox.lost, outbox.depth
        next_seq = outbox.put("cam", "t", b"works")
        items = outbox.peek(1, after_seq=max(stored))

    seqs = [item.seq for item in after_damage]
    assert seqs == sorted(seqs)
    assert all(stored[item.seq] == item.payload for item in after_damage)  # intact, not garbage
    assert 0 < salvaged == len(after_damage) == depth < 3000
    assert lost == 3000 - salvaged  # every event is either readable again or counted
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert any(f"{salvaged} events copied, {lost} lost" in r.getMessage() for r in caplog.records)
    assert len(list(tmp_path.glob("outbox.sqlite3.corrupt-*[0-9Z]"))) == 1
    assert next_seq > max(stored)  # a fresh file never reuses a seq the publisher may hold
    assert payloads(items) == [b"works"]


def test_outbox_under_a_regular_file_is_an_outbox_error_with_a_hint(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")

    with pytest.raises(OutboxError) as caught:
        Outbox(OutboxSettings(path=blocker / "outbox.sqlite3"))

    assert isinstance(caught.value, EdgefleetError)
    assert str(blocker) in caught.value.message
    assert f"{blocker} is a file" in caught.value.hint


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories anyway")
def test_outbox_in_a_read_only_directory_is_an_outbox_error_naming_it(tmp_path: Path) -> None:
    directory = tmp_path / "readonly"
    directory.mkdir()
    directory.chmod(0o500)
    try:
        with pytest.raises(OutboxError) as caught:
            Outbox(OutboxSettings(path=directory / "outbox.sqlite3"))
    finally:
        directory.chmod(0o700)

    assert str(directory) in caught.value.hint
    assert "write" in caught.value.hint


def test_outbox_held_by_another_outbox_is_an_outbox_error(tmp_path: Path) -> None:
    with Outbox(settings(tmp_path)) as first:
        first.put("cam", "t", b"x")

        with pytest.raises(OutboxError) as caught:
            Outbox(settings(tmp_path))

    assert "another process" in caught.value.message


def test_outbox_failed_write_is_an_outbox_error_and_keeps_the_count(tmp_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", PUT_PAST_FILE_SIZE_LIMIT, str(tmp_path / "outbox.sqlite3")],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=True,
    )

    report = json.loads(child.stdout)
    assert report["error"] is not None
    assert str(tmp_path) in report["error"]["hint"]
    assert report["depth"] == report["rows"] == report["stored"] > 0


def test_outbox_settings_reject_unknown_fields_and_an_empty_bound(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        settings(tmp_path, max_rows=10)
    with pytest.raises(ValidationError):
        settings(tmp_path, max_events=0)
    with pytest.raises(ValidationError):
        settings(tmp_path, sync="off")
