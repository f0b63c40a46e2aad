"""systemd service integration: readiness, status and a watchdog that only pets while work flows.

The agent runs as a ``Type=notify`` service. It says ``READY=1`` once the
pipeline produced its first result, keeps a one-line ``STATUS=`` current, and
sends ``WATCHDOG=1`` only while inference results really arrive, so systemd
restarts a daemon whose interpreter or camera hung even though the process
is alive.

``systemd-python`` is optional: when its ``systemd.daemon`` module is
importable and the notification socket is the process's own
``$NOTIFY_SOCKET``, it does the sending; otherwise this module speaks the
sd_notify protocol itself (one datagram of ``KEY=VALUE`` lines to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``, a leading ``@`` meaning the
abstract namespace). Without ``$NOTIFY_SOCKET`` (not started by systemd)
every call does nothing.

Threads:

- ``Notifier`` methods may be called from any thread (the main thread for
  ``ready``/``status``/``stopping``/``reloading``, the watchdog thread for
  ``watchdog``); each call sends one datagram on its own socket.
- ``Watchdog.progress`` is called by the inference thread after each result;
  it only stores a timestamp.
- ``Watchdog.start`` starts the ``edgefleet-watchdog`` thread, which runs
  ``Watchdog._run``; ``Watchdog.stop`` (the owner's thread) ends it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from edgefleet.runtime import SettingError

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
WATCHDOG_THREAD_NAME = "edgefleet-watchdog"
# How long stop() waits for the watchdog thread; it only ever sleeps on the stop event.
STOP_TIMEOUT_S = 5.0

_Sender = Callable[[str], bool]


def _library_sender() -> _Sender | None:
    """``systemd.daemon.notify`` when systemd-python is installed, else None."""
    try:
        from systemd import daemon
    except ImportError:
        return None

    def send(message: str) -> bool:
        return bool(daemon.notify(message))

    return send


def _one_line(text: str) -> str:
    """``text`` with line breaks folded into spaces: STATUS= is one line."""
    return " ".join(text.split())


class Notifier:
    """Sends sd_notify messages to systemd; does nothing when not started by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """Read the socket and watchdog settings from ``environ`` (default: os.environ)."""
        env = os.environ if environ is None else environ
        self._address = self._parse_address(env.get(NOTIFY_SOCKET_ENV, ""))
        self.enabled: bool = self._address is not None
        self.watchdog_interval_s: float | None = self._parse_watchdog(env) if self.enabled else None
        # systemd-python reads $NOTIFY_SOCKET itself, so it may only send for the real environment.
        own_socket = env.get(NOTIFY_SOCKET_ENV) == os.environ.get(NOTIFY_SOCKET_ENV)
        self._library = _library_sender() if self.enabled and own_socket else None
        self._failing = False

    @staticmethod
    def _parse_address(value: str) -> str | None:
        if not value:
            return None
        if value.startswith("@"):
            return "\0" + value[1:]
        if value.startswith("/"):
            return value
        log.warning(
            "systemd notification socket %r is not a path or abstract socket; "
            "readiness and watchdog notifications are off",
            value,
        )
        return None

    @staticmethod
    def _parse_watchdog(env: Mapping[str, str]) -> float | None:
        usec, pid = env.get(WATCHDOG_USEC_ENV, ""), env.get(WATCHDOG_PID_ENV, "")
        if not usec:
            return None
        if pid and pid != str(os.getpid()):
            log.debug("systemd watchdog is meant for pid %s, not this process", pid)
            return None
        try:
            interval_us = int(usec)
        except ValueError:
            log.warning("ignoring malformed %s=%r from systemd", WATCHDOG_USEC_ENV, usec)
            return None
        return interval_us / 1_000_000 if interval_us > 0 else None

    def ready(self, status: str | None = None) -> None:
        """Tell systemd start-up is complete (``READY=1``), with an optional status line."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        self._send("\n".join(lines))

    def status(self, text: str) -> None:
        """Set the one-line status ``systemctl status`` shows."""
        self._send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        """Pet the systemd watchdog (``WATCHDOG=1``)."""
        self._send("WATCHDOG=1")

    def reloading(self) -> None:
        """Tell systemd a configuration reload started; send ``ready()`` when it is done."""
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={now_us}")

    def stopping(self) -> None:
        """Tell systemd the service is shutting down."""
        self._send("STOPPING=1")

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        if self._library is not None:
            sent = self._library(message)
            error = "" if sent else "systemd.daemon.notify returned false"
        else:
            error = self._send_datagram(self._address, message)
        self._report(error)

    @staticmethod
    def _send_datagram(address: str, message: str) -> str:
        """Send one datagram; the error text, or "" when it was sent."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), address)
        except OSError as exc:
            return str(exc)
        return ""

    def _report(self, error: str) -> None:
        """Log the first failure of a run of failures, and the recovery after it."""
        if error and not self._failing:
            log.warning(
                "cannot notify systemd (%s); it may consider the service not ready "
                "or hung and restart it",
                error,
            )
        elif not error and self._failing:
            log.info("notifying systemd works again")
        self._failing = bool(error)


class Watchdog:
    """Pets the systemd watchdog only while the pipeline reports progress.

    A process that is alive but whose interpreter or camera hung stops
    calling ``progress()``; the watchdog then withholds ``WATCHDOG=1`` and
    systemd restarts the service after ``WatchdogSec``.
    """

    def __init__(
        self,
        notifier: Notifier,
        *,
        stale_after_s: float,
        failed_parts: Callable[[], list[str]] = list,
    ) -> None:
        """Pet through ``notifier`` while the last progress is at most ``stale_after_s`` old.

        ``failed_parts`` names the supervised parts that cannot run; while it names any,
        ``WATCHDOG=1`` is withheld too, so systemd restarts the agent.
        """
        if stale_after_s <= 0:
            raise SettingError(
                f"watchdog stale_after_s must be positive, got {stale_after_s}",
                hint="set it to how long the pipeline may go without a result, in seconds",
            )
        self._notifier = notifier
        self._stale_after_s = stale_after_s
        self._failed_parts = failed_parts
        # Written by the inference thread, read by the watchdog thread: one float
        # reference, replaced atomically, so no lock is needed.
        self._last_progress: float | None = None
        self._stalled = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stalled(self) -> bool:
        """True while progress has stopped and ``WATCHDOG=1`` is withheld."""
        return self._stalled

    @property
    def running(self) -> bool:
        """True while the watchdog thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def progress(self) -> None:
        """Record that the pipeline produced a result (called by the inference thread)."""
        self._last_progress = time.monotonic()

    def start(self) -> None:
        """Start the watchdog thread; without a systemd watchdog there is nothing to start."""
        interval_s = self._notifier.watchdog_interval_s
        if interval_s is None:
            log.debug("systemd watchdog not enabled for this service; not starting it")
            return
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(interval_s / 2,), name=WATCHDOG_THREAD_NAME, daemon=True
        )
        self._thread.start()
        log.info(
            "systemd watchdog: petting every %.1f s while results arrive at most %.1f s apart",
            interval_s / 2,
            self._stale_after_s,
        )

    def stop(self) -> None:
        """Stop the watchdog thread and wait for it."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join(timeout=STOP_TIMEOUT_S)
        if thread.is_alive():
            log.warning("watchdog thread did not stop within %.1f s", STOP_TIMEOUT_S)

    def _run(self, period_s: float) -> None:
        """Watchdog thread: every ``period_s``, pet if progress is fresh."""
        while not self._stop.wait(period_s):
            self._tick()

    def _tick(self) -> None:
        last = self._last_progress
        if last is None:
            return  # no result yet: start-up is bounded by TimeoutStartSec, not the watchdog
        age_s = time.monotonic() - last
        failed = self._failed_parts()
        if failed:
            if not self._stalled:
                log.error(
                    "%s cannot run; withholding the systemd watchdog so the service is restarted",
                    ", ".join(failed),
                )
            self._stalled = True
        elif age_s <= self._stale_after_s:
            if self._stalled:
                log.info("inference results arrive again; resuming the systemd watchdog")
            self._stalled = False
            self._notifier.watchdog()
        elif not self._stalled:
            self._stalled = True
            log.warning(
                "no inference result for %.1f s; withholding the systemd watchdog "
                "so the service gets restarted if this persists",
                age_s,
            )
