"""The high-water marks on disk: real files in tmp_path, a real writer process killed mid-write."""

from __future__ import annotations

import random
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgefleet.agent.marks import MARKS_FILE, Marks
from edgefleet.agent.protocol import LineMark, StreamMarks

CHILD_TIMEOUT_S = 30.0
KILLS = 30
MAX_KILL_DELAY_S = 0.05

# Raises the marks by one, forever, from wherever the file stands: every value written is
# one above the last one written, so the file must show a value the writer reached.
WRITER = """
import sys
from pathlib import Path
from edgefleet.agent.marks import Marks
from edgefleet.agent.protocol import LineMark, StreamMarks
marks = Marks(Path(sys.argv[1]))
print("ready", flush=True)
while True:
    n = marks.stream("cam").lines.get("m", LineMark(sequence=0, version=0)).sequence + 1
    line = StreamMarks(line="m", lines={"m": LineMark(sequence=n, version=n)})
    marks.accept("cam", line, issued_at=float(n))
    marks.see_revision(n)
"""


def line(sequence: int, version: int, model_id: str = "m") -> StreamMarks:
    return StreamMarks(
        line=model_id, lines={model_id: LineMark(sequence=sequence, version=version)}
    )


def test_marks_accepted_are_read_back_by_a_new_instance(tmp_path: Path) -> None:
    Marks(tmp_path).accept("cam", line(43, 9), issued_at=1_800_000_000.0)

    again = Marks(tmp_path)

    assert again.stream("cam") == line(43, 9)
    assert again.clock_floor == 1_800_000_000.0
    assert again.stream("door") == StreamMarks()


def test_marks_never_go_down_whatever_the_caller_passes(tmp_path: Path) -> None:
    marks = Marks(tmp_path)
    marks.accept("cam", line(43, 9), issued_at=2000.0)
    marks.accept("cam", line(41, 3), issued_at=1000.0)
    marks.see_revision(7)
    marks.see_revision(5)

    again = Marks(tmp_path)
    assert again.stream("cam").lines["m"] == LineMark(sequence=43, version=9)
    assert again.clock_floor == 2000.0
    assert again.desired_revision == 7


def test_a_new_model_line_keeps_the_marks_of_the_old_one(tmp_path: Path) -> None:
    marks = Marks(tmp_path)
    marks.accept("cam", line(5, 5, "people"), issued_at=1.0)
    marks.accept("cam", line(1, 1, "faces"), issued_at=2.0)

    cam = Marks(tmp_path).stream("cam")
    assert cam.line == "faces"
    assert cam.lines == {
        "people": LineMark(sequence=5, version=5),
        "faces": LineMark(sequence=1, version=1),
    }


def test_a_damaged_marks_file_is_set_aside_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / MARKS_FILE).write_text('{"streams": {"cam": 3}')

    marks = Marks(tmp_path)

    assert marks.stream("cam") == StreamMarks()
    assert (tmp_path / f"{MARKS_FILE}.damaged").read_text() == '{"streams": {"cam": 3}'
    assert "update marks" in caplog.text
    assert "unreadable" in caplog.text


def test_every_moment_of_a_killed_writer_leaves_the_old_or_the_new_marks(tmp_path: Path) -> None:
    rng = random.Random()
    reached = 0  # the highest sequence a finished kill left on disk
    reached_revision = 0
    for kill in range(KILLS):
        delay_s = rng.uniform(0, MAX_KILL_DELAY_S)
        run_and_kill(tmp_path, delay_s)

        context = f"kill {kill + 1}, {delay_s * 1000:.1f} ms into the loop"
        leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".damaged"))
        assert leftovers == [], f"{context}: the marks file was unreadable"
        marks = Marks(tmp_path)
        if reached:  # after a first complete write, the marks are never lost
            assert (tmp_path / MARKS_FILE).exists(), f"{context}: the marks file was lost"
        mark = marks.stream("cam").lines.get("m")
        sequence = mark.sequence if mark is not None else 0
        assert sequence >= reached, f"{context}: the marks went back from {reached}"
        if mark is not None:
            # One write sets every figure: old or new, never a mix of two writes.
            assert mark == LineMark(sequence=sequence, version=sequence), context
            assert marks.clock_floor == float(sequence), context
            revision = marks.desired_revision or 0
            # Written after the accept (a kill between leaves it behind), never lost.
            assert reached_revision <= revision <= sequence, context
            reached_revision = revision
        reached = sequence
    assert reached > 0, "no kill came after a complete write: the test proved nothing"


def run_and_kill(root: Path, delay_s: float) -> None:
    """Start the WRITER loop on ``root``, let it run ``delay_s``, SIGKILL it."""
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdout is not None
    assert child.stderr is not None
    try:
        ready, _, _ = select.select([child.stdout], [], [], CHILD_TIMEOUT_S)
        started = child.stdout.readline() if ready else b""
        if started != b"ready\n":
            child.kill()
            child.wait(CHILD_TIMEOUT_S)
            pytest.fail(f"the writer did not start: {child.stderr.read().decode()}")
        time.sleep(delay_s)
    finally:
        child.kill()
        child.wait(CHILD_TIMEOUT_S)
        child.stdout.close()
        child.stderr.close()
