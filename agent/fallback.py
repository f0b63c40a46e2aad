"""Which build of a stream's model runs when accelerators come and go: pure decisions.

A stream lists builds in order of preference (``model`` then ``model.fallbacks``):
an Edge TPU build and a CPU build of the same release, say. ``FallbackChain``
holds which one runs and why, and when to try the first one again:

- a build that fails to load or fails while running (a Coral unplugged) hands
  over to the next one that loads; the reason reads ``accelerator lost: ...`` and the
  stream counts as degraded;
- while on a fallback, the first build is retried after ``retry_s``, doubled
  after each failed retry up to ``retry_max_s``;
- a retry that loads and runs a frame brings the stream back to it, with the
  reason cleared and the backoff reset.

Every switch (away or back) is counted. The stream runner does the loading and the
inference; this class only decides, so tests drive it without a model or a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FallbackChain:
    """The state of one stream's chain of builds. Used by the stream's inference thread."""

    builds: int
    retry_s: float
    retry_max_s: float
    active: int = 0
    reason: str | None = None
    """``accelerator lost: ...`` while a fallback runs; None on the first build."""
    switches: int = 0
    retry_at: float | None = None
    _wait_s: float = field(init=False)

    def __post_init__(self) -> None:
        self._wait_s = self.retry_s

    @property
    def can_fall_back(self) -> bool:
        """Whether a build after the running one is left to try."""
        return self.active + 1 < self.builds

    def fell_back(self, to: int, why: str, now: float) -> None:
        """The running build failed (``why``) and build ``to``, a later one, took over."""
        if self.active == 0:
            self.reason = f"accelerator lost: {why}"
            self.retry_at = now + self._wait_s
        self.active = to
        self.switches += 1

    def retry_due(self, now: float) -> bool:
        """Whether the first build should be tried again at ``now``."""
        return self.active > 0 and self.retry_at is not None and now >= self.retry_at

    def retry_failed(self, now: float) -> None:
        """The first build still cannot run: wait twice as long before the next try."""
        self._wait_s = min(self._wait_s * 2, self.retry_max_s)
        self.retry_at = now + self._wait_s

    def restored(self) -> None:
        """The first build runs again."""
        self.active = 0
        self.reason = None
        self.retry_at = None
        self._wait_s = self.retry_s
        self.switches += 1
