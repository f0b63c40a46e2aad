"""Memory pressure fails clearly: under an address-space limit the agent runs, or exits with
one line naming the limit (no traceback, no silent stopped stream).

The real agent process runs under ``prlimit --as`` (util-linux), the limit set before
exec. Measured on the 2-core test machine with one stream (the small classifier on the kite video):
below about 140 MiB numpy's OpenBLAS exits with its own one line; 150-250 MiB the
imports fail (one line from the entry point); 300-700 MiB start-up fails to start a
thread, or the frame conversion fails later (the supervisor names the limit and the
agent exits after 5 failures); from about 1000 MiB it runs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from agentproc import AGENT, AgentProcess
from broker import Mosquitto
from conftest import Assets
from fleet import SMALL, STREAM, agent_config, device_probe, event_count, healths, video

TOO_SMALL_MIB = 200
ENOUGH_MIB = 2048


class LimitedAgent(AgentProcess):
    """The agent process under ``RLIMIT_AS`` of ``mib`` MiB."""

    def __init__(self, workdir: Path, config: dict[str, object], mib: int) -> None:
        super().__init__(workdir, config)
        self.mib = mib

    def start(self) -> LimitedAgent:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "prlimit",
                    f"--as={self.mib * 2**20}",
                    "--",
                    str(AGENT),
                    "run",
                    "--config",
                    str(self.config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
            )
        return self


def test_a_limit_too_small_to_start_is_one_line_naming_it(
    tmp_path: Path, broker: Mosquitto, assets: Assets
) -> None:
    config = agent_config(tmp_path, broker.port, assets.model(SMALL), video(assets))
    with LimitedAgent(tmp_path / "agent", config, TOO_SMALL_MIB) as agent:
        assert agent.process is not None
        code = agent.process.wait(120)
        output = agent.log()
    assert code == 1, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    naming = [line for line in lines if f"(RLIMIT_AS) {TOO_SMALL_MIB} MiB" in line]
    assert len(naming) == 1, output
    assert naming[0] == lines[-1]
    assert "out of memory" in naming[0]
    assert "raise the limit" in naming[0]


def test_under_a_limit_it_can_run_in_the_agent_runs(
    tmp_path: Path, broker: Mosquitto, assets: Assets
) -> None:
    config = agent_config(tmp_path, broker.port, assets.model(SMALL), video(assets))
    probe = device_probe(broker)
    with LimitedAgent(tmp_path / "agent", config, ENOUGH_MIB) as agent:
        probe.wait_until(lambda: event_count(probe) > 30, "events from the limited agent", 60)
        probe.wait_until(
            lambda: any(
                h.streams.get(STREAM) and h.streams[STREAM].processed for h in healths(probe)
            ),
            "health with frames processed",
            30,
        )
        latest = healths(probe)[-1]
        assert latest.streams[STREAM].state == "running"
        assert all(p.state == "running" for p in latest.parts.values())
        assert agent.terminate() == 0
        output = agent.log()
    assert "out of memory" not in output
    assert "Traceback" not in output
