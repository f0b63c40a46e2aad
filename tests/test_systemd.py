"""sd_notify: readiness, status and the progress-gated watchdog, against a real notification socket.

systemd itself is not running here; a datagram socket bound where
``$NOTIFY_SOCKET`` points stands in for it and receives exactly what systemd would.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.systemd import Notifier, Watchdog
from edgefleet.runtime import SettingError

DEADLINE_S = 5.0
# 100 ms: the watchdog thread pets every 50 ms.
WATCHDOG_USEC = "100000"


class NotifyListener:
    """A datagram socket where systemd's notification socket would be."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # as it appears in $NOTIFY_SOCKET

    def receive(self, timeout_s: float = DEADLINE_S) -> str | None:
        """The next notification, or None if none arrives within ``timeout_s``."""
        self.sock.settimeout(timeout_s)
        try:
            return self.sock.recv(4096).decode()
        except (TimeoutError, BlockingIOError):  # BlockingIOError: nothing queued, timeout 0
            return None

    def drain(self) -> list[str]:
        """Everything received so far, without waiting."""
        messages = []
        while (message := self.receive(timeout_s=0)) is not None:
            messages.append(message)
        return messages


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    """A notification socket bound to a path in tmp_path."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield NotifyListener(sock, str(path))


def receive_until(listener: NotifyListener, expected: str) -> bool:
    """Poll the listener until ``expected`` arrives or the deadline passes."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if listener.receive(timeout_s=0.05) == expected:
            return True
    return False


def test_ready_sends_ready_with_status(notify: NotifyListener) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify.address})

    notifier.ready(status="front: 12.0 fps, model ssd v3")

    assert notifier.enabled
    assert notify.receive() == "READY=1\nSTATUS=front: 12.0 fps, model ssd v3"


def test_status_is_sent_as_one_line(notify: NotifyListener) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify.address})

    notifier.status("camera lost\n  retrying in 5 s")

    assert notify.receive() == "STATUS=camera lost retrying in 5 s"


def test_stopping_and_reloading_are_sent(notify: NotifyListener) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify.address})

    notifier.reloading()
    notifier.stopping()

    reloading = notify.receive()
    assert reloading is not None
    first, second = reloading.split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert 0 < int(value) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.receive() == "STOPPING=1"


def test_abstract_namespace_socket_receives_notifications() -> None:
    name = f"edgefleet-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        listener = NotifyListener(sock, "@" + name)
        notifier = Notifier({"NOTIFY_SOCKET": listener.address})

        notifier.ready()

        assert listener.receive() == "READY=1"


def test_watchdog_interval_comes_from_watchdog_usec(notify: NotifyListener) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "30000000"})

    assert notifier.watchdog_interval_s == 30.0


def test_watchdog_pid_of_this_process_enables_the_watchdog(notify: NotifyListener) -> None:
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "30000000"}

    notifier = Notifier({**env, "WATCHDOG_PID": str(os.getpid())})

    assert notifier.watchdog_interval_s == 30.0


def test_watchdog_pid_of_another_process_disables_the_watchdog(notify: NotifyListener) -> None:
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "30000000"}

    notifier = Notifier({**env, "WATCHDOG_PID": str(os.getpid() + 1)})

    assert notifier.watchdog_interval_s is None
    watchdog = Watchdog(notifier, stale_after_s=1.0)
    watchdog.start()
    assert not watchdog.running


def test_malformed_watchdog_usec_disables_the_watchdog(notify: NotifyListener) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "soon"})

    assert notifier.watchdog_interval_s is None


def test_without_notify_socket_nothing_is_enabled_and_calls_do_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = Notifier({"WATCHDOG_USEC": WATCHDOG_USEC})
    watchdog = Watchdog(notifier, stale_after_s=1.0)

    notifier.ready(status="up")
    notifier.status("up")
    notifier.watchdog()
    notifier.reloading()
    notifier.stopping()
    watchdog.start()
    watchdog.progress()
    watchdog.stop()

    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert not watchdog.running
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_send_failure_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})

    notifier.ready()
    notifier.status("still here")
    notifier.watchdog()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot notify systemd" in warnings[0].getMessage()


def test_sending_recovers_after_the_socket_returns(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    notifier.status("nobody listening")

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier.status("listening now")

        assert NotifyListener(sock, str(path)).receive() == "STATUS=listening now"


def test_watchdog_stale_after_must_be_positive(notify: NotifyListener) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": WATCHDOG_USEC})

    with pytest.raises(SettingError, match="stale_after_s"):
        Watchdog(notifier, stale_after_s=0)


def test_watchdog_pets_while_progress_is_reported(notify: NotifyListener) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": WATCHDOG_USEC})
    watchdog = Watchdog(notifier, stale_after_s=2.0)
    watchdog.start()
    try:
        pets = 0
        deadline = time.monotonic() + DEADLINE_S
        while pets < 3 and time.monotonic() < deadline:
            watchdog.progress()
            if notify.receive(timeout_s=0.05) == "WATCHDOG=1":
                pets += 1
    finally:
        watchdog.stop()

    assert pets == 3
    assert not watchdog.running


def test_watchdog_sends_nothing_before_the_first_result(notify: NotifyListener) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": WATCHDOG_USEC})
    watchdog = Watchdog(notifier, stale_after_s=2.0)
    watchdog.start()
    try:
        received = notify.receive(timeout_s=0.3)  # six watchdog periods
    finally:
        watchdog.stop()

    assert received is None


def test_watchdog_withholds_pets_when_progress_stops_and_resumes_with_it(
    notify: NotifyListener, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": WATCHDOG_USEC})
    watchdog = Watchdog(notifier, stale_after_s=0.2)
    watchdog.start()
    try:
        watchdog.progress()
        assert receive_until(notify, "WATCHDOG=1")

        deadline = time.monotonic() + DEADLINE_S
        while not watchdog.stalled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watchdog.stalled
        notify.drain()  # pets sent before the stall was noticed
        during_stall = notify.receive(timeout_s=0.3)  # six watchdog periods

        watchdog.progress()
        resumed = receive_until(notify, "WATCHDOG=1")
    finally:
        watchdog.stop()

    assert during_stall is None
    assert resumed
    stall_warnings = [r for r in caplog.records if "withholding" in r.getMessage()]
    assert len(stall_warnings) == 1
    assert stall_warnings[0].levelno == logging.WARNING


def test_watchdog_thread_is_named_and_stops(notify: NotifyListener) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": WATCHDOG_USEC})
    watchdog = Watchdog(notifier, stale_after_s=1.0)

    watchdog.start()
    names = [t.name for t in threading.enumerate()]
    watchdog.stop()

    assert "edgefleet-watchdog" in names
    assert not watchdog.running
