"""The agent as a real process, the way systemd runs it: ``edgefleet-agent run --config``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

AGENT = Path(sys.executable).with_name("edgefleet-agent")


class AgentProcess:
    """Writes a config, starts the agent, and stops or kills it; the log is kept in a file."""

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any],
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "agent.yaml"
        self.write_config(config)
        self.log_path = workdir / "agent.log"
        self._env = {**os.environ, **(env or {})}
        self._prefix = list(prefix)  # a command that sets up the process, then execs the agent
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self, config: Mapping[str, Any]) -> None:
        """(Re)write the YAML config the agent reads."""
        self.config_path.write_text(yaml.safe_dump(json.loads(json.dumps(config))))

    def start(self) -> AgentProcess:
        """Start ``edgefleet-agent run``."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self._prefix, str(AGENT), "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
            )
        return self

    @property
    def pid(self) -> int:
        """The agent's process id."""
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: int) -> None:
        """Send a signal to the agent."""
        assert self.process is not None
        self.process.send_signal(signum)

    def terminate(self, timeout_s: float = 20) -> int:
        """SIGTERM and wait: the orderly shutdown systemd does. Returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL: a crash or power cut, as far as the broker can tell."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        """Everything the agent logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout_s: float) -> None:
        """Wait until ``text`` appears in the log; fail with the log if it doesn't."""
        wait_until(lambda: text in self.log(), f"'{text}' in the agent log", timeout_s, self.log)

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


def wait_until(
    ready: Callable[[], Any], what: str, timeout_s: float, context: Callable[[], str] = str
) -> Any:
    """Poll ``ready`` until it is truthy; fail after ``timeout_s`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = ready()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout_s} s\n{context()}")
