"""Text the operator commands print: aligned tables and times."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """``rows`` (the first the header) as lines of left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def utc(ts: float, *, seconds: bool = False) -> str:
    """Unix seconds as ``2026-12-03 10:08 UTC`` (with seconds when asked)."""
    shape = "%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC"
    return datetime.fromtimestamp(ts, timezone.utc).strftime(shape)


def age(seconds: float) -> str:
    """A span for people: ``40s``, ``12m``, ``5h``, ``3d``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
