"""What a candidate model may cost on this board: memory beside the running models, and pace.

Memory. The validation process (``validation.py``) runs the candidate under a
memory budget: the resident memory the model may add. ``updates.validation_memory_mib``
sets it; unset, it is what is free beside everything that runs now, measured when
the update is validated (``memory_room``): the board's available memory
(``psutil.virtual_memory().available``, which already leaves out the agent's and its
other streams' resident memory) and, when the agent runs under a cgroup memory limit
(the unit's ``MemoryMax``), the room left under that limit, whichever is less, minus
``updates.memory_reserve_mib``. A candidate that needs more is refused at validation;
it never reaches the agent's own process, where it would have to live beside the
model it replaces during the swap.

Pace. ``pace_refusal`` decides, when the manifest sets no ``max_latency_ms``, whether
a candidate is too slow to replace the running model: more than
``updates.max_slowdown`` times the running model's median (both timed in the same
validation process, on the same frame, one after the other), or slower than the
frame interval of the stream's configured frame rate (``configured_fps``: where the
source's settings state one). ``allow_slower`` in the manifest waives both; a
``max_latency_ms`` replaces both with that budget.

Everything here is pure except ``memory_room``, which reads ``/proc`` and the cgroup
files; it runs on the ``updates`` thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psutil

from .config import UpdateSettings
from .protocol import Manifest
from .sources import SourceSettings

__all__ = ["MemoryRoom", "configured_fps", "memory_budget_bytes", "memory_room", "pace_refusal"]

log = logging.getLogger(__name__)

_MIB = 1 << 20
_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryRoom:
    """What is free beside what runs: the board's available memory, and the cgroup's room."""

    available_bytes: int
    cgroup_room_bytes: int | None  # memory.max - memory.current; None: no limit, or no cgroup v2
    agent_rss_bytes: int  # for the reason and the log: what the agent itself holds

    def describe(self) -> str:
        """``412 MiB available, 300 MiB under the agent's memory limit; the agent holds 80``."""
        text = f"{self.available_bytes // _MIB} MiB available"
        if self.cgroup_room_bytes is not None:
            text += f", {self.cgroup_room_bytes // _MIB} MiB under the agent's memory limit"
        return f"{text}; the agent holds {self.agent_rss_bytes // _MIB} MiB"


def memory_budget_bytes(settings: UpdateSettings, room: MemoryRoom) -> int:
    """The memory a candidate may add: the setting, else the room less the reserve. Pure.

    Never below 1 MiB: a board with no room left refuses every candidate, with the figure.
    """
    if settings.validation_memory_mib is not None:
        return settings.validation_memory_mib * _MIB
    free = room.available_bytes
    if room.cgroup_room_bytes is not None:
        free = min(free, room.cgroup_room_bytes)
    return max(_MIB, free - settings.memory_reserve_mib * _MIB)


def memory_room() -> MemoryRoom:
    """Measure the room beside what runs now (reads ``/proc`` and the cgroup's files)."""
    return MemoryRoom(
        available_bytes=int(psutil.virtual_memory().available),
        cgroup_room_bytes=_cgroup_room(),
        agent_rss_bytes=int(psutil.Process().memory_info().rss),
    )


def _cgroup_room() -> int | None:
    """``memory.max - memory.current`` of this process's cgroup (v2); None without a limit."""
    try:
        line = Path("/proc/self/cgroup").read_text(encoding="ascii").splitlines()[0]
        group = _CGROUP_ROOT / line.split("::", 1)[1].lstrip("/")
        limit = (group / "memory.max").read_text(encoding="ascii").strip()
        if limit == "max":
            return None
        current = int((group / "memory.current").read_text(encoding="ascii"))
    except (OSError, IndexError, ValueError) as exc:
        log.debug("no cgroup memory limit read: %s", exc)
        return None
    return max(0, int(limit) - current)


def configured_fps(source: SourceSettings) -> float | None:
    """The frame rate the stream's source is configured for, where its settings say. Pure.

    A camera's or the test pattern's ``fps``, an image folder's ``1 / interval_s``; None for
    a video file or network stream (their rate is in the media) and for unpaced sources.
    """
    fps = getattr(source, "fps", None)
    if isinstance(fps, int | float) and fps > 0:
        return float(fps)
    interval_s = getattr(source, "interval_s", None)
    if isinstance(interval_s, int | float) and interval_s > 0:
        return 1.0 / interval_s
    return None


def pace_refusal(
    manifest: Manifest,
    *,
    p50_ms: float,
    running_p50_ms: float | None,
    fps: float | None,
    max_slowdown: float,
) -> str | None:
    """Why a candidate is too slow to replace the running model, or None. Pure.

    Judged only when the manifest sets no ``max_latency_ms`` (validation checks that one)
    and does not set ``allow_slower``.
    """
    if manifest.max_latency_ms is not None or manifest.allow_slower:
        return None
    hint = (
        "if this is meant (a bigger model on purpose), sign the manifest with "
        "--max-latency-ms (the budget this board must meet) or --allow-slower"
    )
    if running_p50_ms is not None and running_p50_ms > 0 and p50_ms > running_p50_ms * max_slowdown:
        return (
            f"median invoke {p50_ms:.2f} ms is {p50_ms / running_p50_ms:.1f}x the running "
            f"model's {running_p50_ms:.2f} ms (timed in the same validation), over the "
            f"{max_slowdown:g}x allowed; {hint}"
        )
    if fps is not None and p50_ms > 1000.0 / fps:
        return (
            f"median invoke {p50_ms:.1f} ms cannot keep the stream's {fps:g} fps (a frame "
            f"every {1000.0 / fps:.1f} ms); {hint}"
        )
    return None
