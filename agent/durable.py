"""Writing files so that a crash or power cut at any instant leaves the old or the new one.

Used by the model store (pointers, records, model directories) and by ``set_config``
(the agent's config file); ``free_bytes`` and ``looks_full`` by the outbox, the command
journal and the updater. Callers on any thread; nothing here is shared state.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Less free space than this: a write error is taken to be the full disk it most likely is.
_NEARLY_FULL_BYTES = 256 * 1024

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


def free_bytes(path: Path) -> int:
    """Bytes free for ordinary writes on the filesystem holding ``path`` (``df``'s "Avail").

    The blocks ext4 reserves for root and for its own metadata are not counted: they are
    no room to plan with, even for an agent running as root.
    """
    existing = next(p for p in (path, *path.parents) if p.exists())
    stat = os.statvfs(existing)
    return stat.f_bavail * stat.f_frsize


def looks_full(path: Path) -> bool:
    """Whether the filesystem holding ``path`` is (as good as) full: SQLite then reports
    some writes as a disk I/O error rather than SQLITE_FULL."""
    try:
        return free_bytes(path) < _NEARLY_FULL_BYTES
    except OSError:
        return False
