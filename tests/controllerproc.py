"""``edgefleet controller run`` as a real process for tests: its config file, its URL, stop
and SIGKILL."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from broker import Mosquitto

from edgefleet.ops.controller.service import hash_token

EDGEFLEET = Path(sys.executable).with_name("edgefleet")
TOKEN = "service-test-token"
WAIT_S = 20.0
_T = TypeVar("_T")
_LISTENING = re.compile(r"API on (?P<url>https?://\S+?);")


def write_config(
    tmp_path: Path, mosquitto: Mosquitto, overrides: dict[str, Any] | None = None
) -> Path:
    """A config file: SQLite beside it, the test broker's plain listener, bearer tokens."""
    (tmp_path / "tokens.txt").write_text(f"# the test's\n{hash_token(TOKEN)} tester\n")
    config: dict[str, Any] = {
        "database": "controller.sqlite3",
        "broker": {"host": mosquitto.host, "port": mosquitto.port, "insecure": True},
        "releases_dir": "releases",
        "http": {"host": "127.0.0.1", "port": 0, "tokens_file": "tokens.txt"},
    }
    config.update(overrides or {})
    path = tmp_path / "controller.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def eventually(check: Callable[[], _T | None], what: str, timeout_s: float = WAIT_S) -> _T:
    """Poll ``check`` until it returns something (an HTTP API has no event to wait on)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found is not None:
            return found
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)


class ControllerProcess:
    """``edgefleet controller run`` in a subprocess; its first stdout line read on a thread."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self._log = config.with_name("controller.log")
        with self._log.open("a") as log:  # a file: a pipe nobody reads could fill and block it
            self.process = subprocess.Popen(
                [str(EDGEFLEET), "controller", "run", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self._line: list[str] = []
        self._read = threading.Thread(target=self._first_line, name="controller-stdout")
        self._read.start()

    def _first_line(self) -> None:
        assert self.process.stdout is not None
        self._line.append(self.process.stdout.readline())

    def url(self) -> str:
        """Where it says it listens."""
        self._read.join(WAIT_S)
        line = self._line[0] if self._line else ""
        match = _LISTENING.search(line)
        assert match is not None, f"stdout {line!r}; stderr {self.stderr()}"
        return match["url"]

    def stderr(self) -> str:
        return self._log.read_text()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(WAIT_S)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the database and the broker can tell."""
        self.process.kill()
        self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT_S)
        self._read.join(WAIT_S)
        assert self.process.stdout is not None
        self.process.stdout.close()
