"""What the health message reports: inference latencies and the state of the machine.

``LatencyWindow`` keeps the last N latencies of one stage (capture to
result, invoke, ...) and reports percentiles. ``SystemMetrics`` reads this
process's CPU and memory use (psutil), the CPU temperature (the Linux
thermal sysfs tree) and, on a Raspberry Pi, the firmware's throttling flags
(``vcgencmd get_throttled``). What the machine lacks is reported as None,
never as an error.

Threads: ``LatencyWindow.add`` runs on the inference threads, ``percentiles``
on the health thread; they share the window under a lock.
``SystemMetrics.snapshot`` runs on the health thread (a lock keeps a second
caller from splitting the CPU-time baseline or the warn-once state).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import psutil

from edgefleet.runtime import SettingError

log = logging.getLogger(__name__)

DEFAULT_WINDOW_SIZE: Final = 1000
VCGENCMD_TIMEOUT_S: Final = 2.0
_BYTES_PER_MB: Final = 1024 * 1024
_MILLIDEGREES_PER_DEGREE: Final = 1000.0
_THROTTLED_RE: Final = re.compile(r"^throttled=(0x[0-9a-fA-F]+)\s*$")
_ZONE_RE: Final = re.compile(r"^thermal_zone(\d+)$")
# Bits of `vcgencmd get_throttled` (Raspberry Pi firmware documentation).
THROTTLED_BITS: Final = {
    "under_voltage": 0,
    "freq_capped": 1,
    "throttled": 2,
    "soft_temp_limit": 3,
    "under_voltage_occurred": 16,
    "freq_capped_occurred": 17,
    "throttled_occurred": 18,
    "soft_temp_limit_occurred": 19,
}


class LatencyWindow:
    """Thread-safe rolling window of the last ``size`` latency samples, in milliseconds."""

    def __init__(self, size: int = DEFAULT_WINDOW_SIZE) -> None:
        """Keep at most ``size`` samples; older ones fall out."""
        if size < 1:
            raise SettingError(
                f"latency window size must be at least 1, got {size}",
                hint="set how many recent samples the percentiles cover",
            )
        self._samples: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value_ms: float) -> None:
        """Record one sample."""
        with self._lock:
            self._samples.append(value_ms)

    def percentiles(self) -> dict[str, float | None]:
        """``{"p50_ms", "p99_ms", "count"}`` over the window; percentiles are None when empty."""
        with self._lock:
            samples = np.fromiter(self._samples, dtype=np.float64, count=len(self._samples))
        if samples.size == 0:
            return {"p50_ms": None, "p99_ms": None, "count": 0}
        p50, p99 = np.percentile(samples, [50, 99])
        return {"p50_ms": float(p50), "p99_ms": float(p99), "count": int(samples.size)}


@dataclass(frozen=True)
class SystemSnapshot:
    """The machine as the health message reports it."""

    cpu_percent: float
    """CPU used by this process since the previous snapshot (100 = one core)."""
    rss_mb: float
    """Resident memory of this process."""
    cpu_temperature_c: float | None
    """CPU temperature, None where the machine has no thermal zone."""
    throttled: dict[str, bool] | None
    """Decoded ``vcgencmd get_throttled`` flags, None off a Raspberry Pi."""
    uptime_s: float
    """How long this process has run."""
    load_1m: float
    """The system's one-minute load average."""


def decode_throttled(value: int) -> dict[str, bool]:
    """The flags of a ``vcgencmd get_throttled`` value, by name (see ``THROTTLED_BITS``)."""
    return {name: bool(value >> bit & 1) for name, bit in THROTTLED_BITS.items()}


def parse_throttled(output: str) -> int | None:
    """The value in ``vcgencmd get_throttled`` output (``throttled=0x50005``), or None."""
    match = _THROTTLED_RE.match(output.strip())
    return int(match.group(1), 16) if match else None


def find_cpu_thermal_zone(thermal_root: Path) -> Path | None:
    """The thermal zone whose type names the CPU, else zone 0, else None."""
    try:
        entries = list(thermal_root.iterdir())
    except OSError:
        return None
    zones = sorted(
        (int(m.group(1)), entry) for entry in entries if (m := _ZONE_RE.match(entry.name))
    )
    for _, zone in zones:
        try:
            kind = (zone / "type").read_text().strip().lower()
        except OSError:
            continue
        if "cpu" in kind:
            return zone
    return next((zone for number, zone in zones if number == 0), None)


class SystemMetrics:
    """Reads this process's and the machine's state for the health message."""

    def __init__(
        self, *, thermal_root: Path = Path("/sys/class/thermal"), vcgencmd: str = "vcgencmd"
    ) -> None:
        """Find the CPU thermal zone and ``vcgencmd`` now; read them at each snapshot."""
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the baseline the first snapshot measures from
        # The process's start on the monotonic clock (read once, now): uptime never jumps with
        # a wall-clock step (NTP after boot).
        self._started = time.monotonic() - max(0.0, time.time() - self._process.create_time())
        self._lock = threading.Lock()
        self._zone = find_cpu_thermal_zone(thermal_root)
        self._vcgencmd = shutil.which(vcgencmd)
        self._warned: set[str] = set()
        log.debug(
            "system metrics: thermal zone %s, vcgencmd %s",
            self._zone or "none",
            self._vcgencmd or "not found",
        )

    def snapshot(self) -> SystemSnapshot:
        """Measure now; CPU use covers the time since the previous snapshot."""
        with self._lock:
            return SystemSnapshot(
                cpu_percent=self._process.cpu_percent(None),
                rss_mb=self._process.memory_info().rss / _BYTES_PER_MB,
                cpu_temperature_c=self._temperature_c(),
                throttled=self._throttled(),
                uptime_s=max(0.0, time.monotonic() - self._started),
                load_1m=os.getloadavg()[0],
            )

    def _temperature_c(self) -> float | None:
        if self._zone is None:
            return None
        try:
            return int((self._zone / "temp").read_text()) / _MILLIDEGREES_PER_DEGREE
        except (OSError, ValueError) as exc:
            self._warn_once(
                "thermal", "cannot read the CPU temperature from %s: %s", self._zone, exc
            )
            return None

    def _throttled(self) -> dict[str, bool] | None:
        if self._vcgencmd is None:
            return None
        try:
            result = subprocess.run(
                [self._vcgencmd, "get_throttled"],
                capture_output=True,
                text=True,
                timeout=VCGENCMD_TIMEOUT_S,
                check=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            self._warn_once(
                "vcgencmd", "cannot read throttling state (%s): %s", self._vcgencmd, exc
            )
            return None
        value = parse_throttled(result.stdout)
        if value is None:
            self._warn_once(
                "vcgencmd",
                "unexpected output from %s get_throttled: %r",
                self._vcgencmd,
                result.stdout,
            )
            return None
        return decode_throttled(value)

    def _warn_once(self, source: str, message: str, *args: object) -> None:
        """Warn about a failing source the first time only: health runs every few seconds."""
        if source not in self._warned:
            self._warned.add(source)
            log.warning(message, *args)
