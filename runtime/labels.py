"""Label files: one label per line, or ``ID label`` pairs, plus the COCO ``???`` convention."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import LabelsError

PLACEHOLDER = "???"
_PAIR = re.compile(r"^\s*(\d+)[\s:]+(.*?)\s*$")


@dataclass(frozen=True)
class Labels:
    """Class index to label name."""

    names: Mapping[int, str]
    source: str = ""

    @classmethod
    def from_lines(cls, lines: Iterable[str], source: str = "") -> Labels:
        """Line ``i`` is index ``i``, unless every line reads ``ID label``: then the IDs count."""
        lines = [line.rstrip("\r\n") for line in lines]
        while lines and not lines[-1].strip():
            lines.pop()
        pairs = [_PAIR.match(line) for line in lines if line.strip()]
        if pairs and all(pairs):
            return cls({int(m.group(1)): m.group(2) for m in pairs if m}, source)
        return cls({i: line.strip() for i, line in enumerate(lines)}, source)

    @classmethod
    def from_file(cls, path: Path | str) -> Labels:
        """Read a UTF-8 label file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LabelsError(
                f"{path}: cannot read label file ({exc})",
                hint="pass a UTF-8 text file with one label per line",
            ) from exc
        return cls.from_lines(text.splitlines(), str(path))

    def name(self, index: int) -> str:
        """The label for ``index``, or the index itself when the file has none."""
        return self.names.get(index) or str(index)

    def without_placeholder(self) -> Labels:
        """Drop a leading ``???`` line, so index ``c`` names line ``c+1``.

        The COCO label files shipped with the TFLite SSD examples start with
        ``???`` for the background class, while ``TFLite_Detection_PostProcess``
        numbers the real classes from 0.
        """
        if self.names.get(0) != PLACEHOLDER:
            return self
        return Labels({i - 1: n for i, n in self.names.items() if i > 0}, self.source)

    def __len__(self) -> int:
        return len(self.names)
