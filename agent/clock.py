"""The clock as far as the device can tell: the kernel's sync state, and jumps of the clock.

Boards without a real-time clock (a Raspberry Pi) boot with the time they last saved,
in the past, until NTP corrects it. Expiry of manifests is judged at the higher of the
clock and the newest trusted time seen (``acceptance.trusted_now``); this module says
whether the kernel considers the clock synchronised, and when the clock was set.

:func:`kernel_synchronised` reads ``adjtimex(2)`` with no mode bits (read only, no
privilege needed) through ctypes: a return of ``TIME_ERROR`` means the kernel's clock is
not synchronised (``STA_UNSYNC``; what ``timedatectl`` shows as "System clock
synchronized: no"). Where that call is missing (not Linux, no libc found) the state is
unknown (None), and health says so. :class:`ClockWatch` tells that the clock was set
(stepped by NTP, or by hand) from the wall clock moving against the monotonic clock.
Any thread; nothing here blocks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from typing import Any

__all__ = ["ClockWatch", "kernel_synchronised"]

_TIME_ERROR = 5
# struct timex is 208 bytes on 64-bit Linux (less on 32-bit); a bigger zeroed buffer is
# safe: with modes 0 the kernel only writes the struct's own fields.
_TIMEX_BYTES = 512
_JUMP_S = 2.0


@functools.cache
def _adjtimex() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None


def kernel_synchronised() -> bool | None:
    """Whether the kernel's clock is NTP-synchronised; None when it cannot be read."""
    adjtimex = _adjtimex()
    if adjtimex is None:
        return None
    buffer = ctypes.create_string_buffer(_TIMEX_BYTES)  # modes = 0: read only
    state = adjtimex(buffer)
    if state < 0:
        return None
    return bool(state != _TIME_ERROR)


class ClockWatch:
    """Tells when the wall clock was set, from its offset to the monotonic clock."""

    def __init__(self) -> None:
        """Start watching from now."""
        self._offset = time.time() - time.monotonic()

    def jumped(self) -> bool:
        """True once after the wall clock moved more than 2 s against the monotonic one."""
        offset = time.time() - time.monotonic()
        if abs(offset - self._offset) <= _JUMP_S:
            return False
        self._offset = offset
        return True
