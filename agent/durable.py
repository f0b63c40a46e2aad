"""Writing files so that a crash or power cut at any instant leaves the old or the new one.

Used by the model store (pointers, records, model directories) and by ``set_config``
(the agent's config file). Callers on any thread; nothing here is shared state.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TMP_INFIX = ".tmp-"
"""Marks the temporary files ``write_atomically`` leaves behind if it is killed."""


def write_atomically(path: Path, content: bytes) -> None:
    """Replace ``path`` with ``content`` so that any instant shows the old or the new file."""
    fd, temporary = tempfile.mkstemp(prefix=f"{path.name}{TMP_INFIX}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_durably(path: Path, content: bytes) -> None:
    """Write a new file and fsync it (its directory entry is the caller's to sync)."""
    with path.open("xb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())


def fsync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (created, renamed, deleted files) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
