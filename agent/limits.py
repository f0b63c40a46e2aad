"""The memory limits the agent runs under, for errors that must name them.

Light on purpose (standard library only): the entry point imports it before
numpy, PyAV and the interpreter, whose imports are the first thing to fail
under a small address-space limit.
"""

from __future__ import annotations

import resource
from pathlib import Path

_CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")
# What the dynamic loader says when mmap fails for want of address space or memory.
_LOADER_OUT_OF_MEMORY = ("failed to map segment", "Cannot allocate memory")


def memory_limits() -> str:
    """The memory limits this process runs under, as a phrase ("no memory limit" if none)."""
    limits = []
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(f"address-space limit (RLIMIT_AS) {soft // 2**20} MiB")
    try:
        cgroup = _CGROUP_MEMORY_MAX.read_text().strip()
    except OSError:
        cgroup = "max"
    if cgroup.isdigit():
        limits.append(f"cgroup memory.max {int(cgroup) // 2**20} MiB")
    return " and ".join(limits) or "no memory limit"


def out_of_memory_line() -> str:
    """One line for an agent that ran out of memory: the limit, and what to do."""
    return (
        f"out of memory under the {memory_limits()}: raise the limit "
        "(LimitAS=, MemoryMax= in the unit) or run fewer or smaller streams"
    )


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a MemoryError, or a library that could not be mapped for want of memory."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, (ImportError, OSError)) and any(
        sign in str(exc) for sign in _LOADER_OUT_OF_MEMORY
    )
