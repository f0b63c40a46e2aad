"""One supervisor for every long-lived agent thread (Erlang's idea, kept small).

Each part (``capture-<s>``, ``infer-<s>``, ``events-<s>``, ``mqtt``,
``publisher``, ``commands``, ``updates``, ``health``, ``prometheus``) is a
named loop function that its owner hands to ``SUPERVISOR.start`` instead of
``threading.Thread``. The supervised thread runs the function; when it
returns the part is done. When it raises:

- the failure is logged once at ERROR with its traceback (the same failure
  again is counted, not logged again; ``MemoryError`` is one line naming the
  memory limit, see ``limits.py``);
- ``parts()`` shows the part as ``restarting`` with its last error and
  restart count (the ``parts`` section of the health message);
- the function is called again after a jittered backoff on the monotonic
  clock (doubling from ``BACKOFF_INITIAL_S`` up to ``BACKOFF_MAX_S``);
- after ``MAX_FAILURES`` failures within ``WINDOW_S`` the part is ``failed``
  and not restarted: ``failed()`` names it, the systemd watchdog is withheld
  and the agent exits, so the unit restarts it.

Expected failures (a lost camera, a full disk) are handled by the parts
themselves; the supervisor is for what nobody expected.

Fault injection, for tests only: ``EDGEFLEET_FAULTS=publisher:1,commands:2``
(read once at import) makes each named part raise ``InjectedFault`` that
many times at its next ``fault_point()``, a call each part's loop makes
once per turn. Unset (always, outside tests) it is one check of a global.

Threads: ``start`` runs on the owner's thread; the supervised thread runs
the part; ``parts`` and ``failed`` are read by the health and main threads.
All shared state is under one lock.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from edgefleet.runtime import EnvironmentProblem

from .limits import out_of_memory_line

log = logging.getLogger(__name__)

FAULTS_ENV = "EDGEFLEET_FAULTS"
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_FAILURES = 5
WINDOW_S = 300.0


class PartState(str, enum.Enum):
    """Where a supervised part is."""

    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"


class InjectedFault(RuntimeError):
    """Raised by ``fault_point`` in a part named in ``EDGEFLEET_FAULTS`` (tests only)."""


@dataclass
class PartStatus:
    """A part's state as health shows it."""

    state: PartState = PartState.RUNNING
    restarts: int = 0
    last_error: str | None = None
    failed_at: deque[float] = field(default_factory=deque)  # monotonic, within the window


def _parse_faults(value: str) -> dict[str, int]:
    faults = {}
    for item in value.split(","):
        name, _, count = item.strip().partition(":")
        if name:
            faults[name] = int(count) if count.isdigit() else 1
    return faults


_faults = _parse_faults(os.environ.get(FAULTS_ENV, ""))
_faults_lock = threading.Lock()


def fault_point() -> None:
    """Raise ``InjectedFault`` if ``EDGEFLEET_FAULTS`` arms the calling part; else nothing."""
    if not _faults:
        return
    name = threading.current_thread().name
    with _faults_lock:
        left = _faults.get(name, 0)
        if left <= 0:
            return
        _faults[name] = left - 1
    raise InjectedFault(f"fault injected into {name} ({FAULTS_ENV})")


class Supervisor:
    """Runs parts on named threads, restarts those that raise, reports them all."""

    def __init__(
        self,
        *,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
    ) -> None:
        """Restart after ``backoff_*``; give up after ``max_failures`` within ``window_s``."""
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_failures = max_failures
        self.window_s = window_s
        self._lock = threading.Lock()
        self._parts: dict[str, PartStatus] = {}

    def start(self, name: str, run: Callable[[], None], stop: threading.Event) -> threading.Thread:
        """Run ``run`` on a daemon thread called ``name`` until it returns or ``stop`` is set."""
        status = PartStatus()
        with self._lock:
            self._parts[name] = status
        thread = threading.Thread(
            target=self._supervise, args=(name, run, stop, status), name=name, daemon=True
        )
        try:
            thread.start()
        except RuntimeError as exc:  # no memory for another thread's stack
            self._forget(name, status)
            raise EnvironmentProblem(
                f"cannot start the {name} thread: {exc}",
                hint=out_of_memory_line(),
            ) from exc
        return thread

    def parts(self) -> dict[str, PartStatus]:
        """A copy of every part's status, by name."""
        with self._lock:
            return {
                n: PartStatus(s.state, s.restarts, s.last_error) for n, s in self._parts.items()
            }

    def failed(self) -> list[str]:
        """The parts that failed too often to be restarted."""
        with self._lock:
            return [n for n, s in self._parts.items() if s.state is PartState.FAILED]

    def failures_line(self) -> str:
        """The failed parts with their last errors, as one line."""
        with self._lock:
            return "; ".join(
                f"{n}: {s.last_error}"
                for n, s in self._parts.items()
                if s.state is PartState.FAILED
            )

    def _supervise(
        self, name: str, run: Callable[[], None], stop: threading.Event, status: PartStatus
    ) -> None:
        logged: set[str] = set()
        attempt = 0
        while True:
            try:
                run()
            except Exception as exc:  # the supervisor's one job: no part dies unseen
                if stop.is_set():
                    break  # failed while stopping: nothing to restart
                delay = self._failed(name, exc, status, logged, attempt)
                if delay is None or stop.wait(delay):
                    return
                attempt += 1
                with self._lock:
                    status.state = PartState.RUNNING
                log.info("%s restarted (restart %d)", name, status.restarts)
                continue
            break
        self._forget(name, status)

    def _failed(
        self, name: str, exc: Exception, status: PartStatus, logged: set[str], attempt: int
    ) -> float | None:
        """Record and log a failure; the backoff before the restart, or None if it failed."""
        memory = isinstance(exc, MemoryError)
        error = out_of_memory_line() if memory else f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        with self._lock:
            status.last_error = error
            status.failed_at.append(now)
            while status.failed_at and now - status.failed_at[0] > self.window_s:
                status.failed_at.popleft()
            given_up = len(status.failed_at) >= self.max_failures
            status.state = PartState.FAILED if given_up else PartState.RESTARTING
            if not given_up:
                status.restarts += 1
        if error not in logged:
            logged.add(error)
            if memory:  # not a bug: a traceback would only hide the limit
                log.error("%s: %s", name, error, extra={"part": name})
            else:
                log.error("%s failed unexpectedly; restarting it", name, exc_info=exc)
        if given_up:
            log.error(
                "%s failed %d times within %.0f s: not restarting it; the agent stops so "
                "systemd restarts it",
                name, self.max_failures, self.window_s, extra={"part": name},
            )  # fmt: skip
            return None
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)

    def _forget(self, name: str, status: PartStatus) -> None:
        """A part that ended: gone from the report unless a newer one took its name."""
        with self._lock:
            if self._parts.get(name) is status:
                del self._parts[name]


SUPERVISOR = Supervisor()
"""The agent's one supervisor: every part starts its thread through it."""
