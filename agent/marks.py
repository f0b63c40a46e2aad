"""The high-water marks: what the device accepted, on disk, so a replay stays refused.

One file beside the model store's stream pointers, ``<store>/marks.json``::

    {"clock_floor": 1767000000.0,            newest trusted time (issued_at accepted)
     "desired_revision": 42,                 highest desired revision seen
     "streams": {"cam": {"line": "people",   per stream: its model line and, per line,
                         "lines": {"people": {"sequence": 43, "version": 9}}}}}

It is replaced whole with ``durable.write_atomically`` (temporary file, fsync, rename,
directory fsync), so a SIGKILL or power cut at any instant leaves the old marks or the
new ones, never none and never a mix (``tests/test_marks.py`` kills a real writer).
Marks only go up: :meth:`Marks.accept` takes the higher of old and new for every
figure, whatever the caller passes.

A file that does not parse (only a failing disk does that) is set aside as
``marks.json.damaged`` and logged at ERROR; the marks start again from the installed
manifests, which :mod:`acceptance` always counts too.

Threads: written on the ``updates`` thread only (``accept``, ``see_revision``); read
from any thread (``stream``, ``snapshot``, ``clock_floor``): one lock guards the copy in
memory, which is replaced whole after the file is.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .durable import write_atomically
from .modelstore import StoreError
from .protocol import LineMark, StreamMarks

__all__ = ["MARKS_FILE", "Marks"]

log = logging.getLogger(__name__)

MARKS_FILE = "marks.json"
"""The marks' file name, in the model store's root."""


class _MarksFile(BaseModel):
    """``marks.json`` as :class:`Marks` writes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clock_floor: float = Field(0.0, description="Newest trusted time seen, Unix seconds.")
    desired_revision: int | None = Field(None, description="Highest desired revision seen.")
    streams: dict[str, StreamMarks] = Field(
        default_factory=dict, description="Per stream: its line and the marks of every line."
    )


class Marks:
    """The high-water marks of one device, kept in ``<root>/marks.json``."""

    def __init__(self, root: Path) -> None:
        """Read the marks under ``root`` (none yet: all zero)."""
        self._path = root / MARKS_FILE
        self._lock = threading.Lock()
        self._state = self._read()

    @property
    def path(self) -> Path:
        """The marks file."""
        return self._path

    @property
    def clock_floor(self) -> float:
        """The newest trusted time seen (0 before the first manifest accepted)."""
        return self._state.clock_floor

    @property
    def desired_revision(self) -> int | None:
        """The highest desired revision seen, or None."""
        return self._state.desired_revision

    def stream(self, name: str) -> StreamMarks:
        """The marks of stream ``name`` (empty if it accepted nothing yet)."""
        return self._state.streams.get(name, StreamMarks())

    def snapshot(self) -> dict[str, StreamMarks]:
        """Every stream's marks, for the reported state."""
        return dict(self._state.streams)

    def accept(self, name: str, marks: StreamMarks, *, issued_at: float) -> None:
        """Record, durably, that stream ``name`` accepted a manifest issued at ``issued_at``:
        its marks become ``marks`` (never lower than before)."""
        with self._lock:
            old = self._state
            merged = _merged(old.streams.get(name, StreamMarks()), marks)
            self._replace(
                old.model_copy(
                    update={
                        "clock_floor": max(old.clock_floor, issued_at),
                        "streams": {**old.streams, name: merged},
                    }
                )
            )

    def see_revision(self, revision: int) -> None:
        """Record a desired revision, if it is the highest seen."""
        with self._lock:
            old = self._state
            if old.desired_revision is not None and revision <= old.desired_revision:
                return
            self._replace(old.model_copy(update={"desired_revision": revision}))

    def _replace(self, state: _MarksFile) -> None:
        try:
            write_atomically(self._path, state.model_dump_json().encode())
        except OSError as exc:
            raise StoreError(
                f"cannot write the update marks {self._path}: {exc.strerror or exc}",
                hint="check that the store directory is writable and the disk not full",
            ) from exc
        self._state = state

    def _read(self) -> _MarksFile:
        try:
            text = self._path.read_bytes()
        except FileNotFoundError:
            return _MarksFile()
        except OSError as exc:
            raise StoreError(
                f"cannot read the update marks {self._path}: {exc.strerror or exc}",
                hint="check the store directory's permissions and the kernel log",
            ) from exc
        try:
            return _MarksFile.model_validate_json(text)
        except (ValidationError, json.JSONDecodeError) as exc:
            aside = self._path.with_name(f"{MARKS_FILE}.damaged")
            try:
                os.replace(self._path, aside)
            except OSError as move:
                raise StoreError(
                    f"the update marks {self._path} are unreadable and cannot be set aside: "
                    f"{move.strerror or move}",
                    hint="check the store directory's permissions and the kernel log",
                ) from move
            log.error(
                "update marks %s unreadable (%s), moved to %s: the marks start again from "
                "the installed manifests",
                self._path,
                exc,
                aside,
            )
            return _MarksFile()


def _merged(old: StreamMarks, new: StreamMarks) -> StreamMarks:
    """``new``'s line, and for every line the higher of both marks."""
    lines = dict(old.lines)
    for model_id, mark in new.lines.items():
        before = lines.get(model_id, LineMark(sequence=0, version=0))
        lines[model_id] = LineMark(
            sequence=max(before.sequence, mark.sequence), version=max(before.version, mark.version)
        )
    return StreamMarks(line=new.line or old.line, lines=lines)
