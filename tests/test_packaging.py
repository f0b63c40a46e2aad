"""What the package installs: the systemd units as systemd reads them, their exposure
scores, the udev rules against the groups the agent's unit joins, and the agent under
MemoryDenyWriteExecute (the kernel's PR_SET_MDWE, the same refusal of writable-and-
executable memory, set on the real agent process)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from agentproc import AgentProcess
from broker import Mosquitto, MqttProbe
from conftest import REPO, Assets

from edgefleet.agent.protocol import EventMessage

UNITS = REPO / "packaging" / "systemd"
UDEV_RULES = REPO / "packaging" / "udev" / "60-edgefleet.rules"
INSTALLED_BIN = "/opt/edgefleet/bin"
MAX_EXPOSURE = {"edgefleet-agent.service": 2.0, "edgefleet-controller.service": 2.5}


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (Debian package systemd)")
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return found


def installed_units(tmp_path: Path) -> list[Path]:
    """The units with ExecStart in this checkout's virtualenv instead of /opt/edgefleet:
    verify checks that each command exists, and the package's tree is not here."""
    units = []
    for unit in sorted(UNITS.glob("*.service")):
        text = unit.read_text().replace(INSTALLED_BIN, str(Path(sys.executable).parent))
        (tmp_path / unit.name).write_text(text)
        units.append(tmp_path / unit.name)
    return units


def test_systemd_verify_accepts_both_units_without_a_word(tmp_path: Path) -> None:
    units = installed_units(tmp_path)
    assert [u.name for u in units] == list(MAX_EXPOSURE)

    done = subprocess.run(
        [systemd_analyze(), "verify", *map(str, units)], check=False, capture_output=True, text=True
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""  # unknown keys and devices are only warnings


@pytest.mark.parametrize("unit", list(MAX_EXPOSURE))
def test_each_unit_scores_within_its_exposure_limit(unit: str) -> None:
    done = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", str(UNITS / unit)],
        check=False,
        capture_output=True,
        text=True,
    )
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)

    assert score is not None, done.stdout + done.stderr
    print(f"{unit}: exposure {score[1]} (limit {MAX_EXPOSURE[unit]})")
    assert float(score[1]) <= MAX_EXPOSURE[unit]


def unit_settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings.setdefault(key, []).append(value)
    return settings


def udev_rules() -> list[dict[str, str]]:
    """Each rule as {KEY (with its attribute): value}; a line udev(7) would not parse fails."""
    pair = re.compile(r'\s*([A-Z]+(?:\{[^}]+\})?)\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(,|$)')
    rules = []
    for line in UDEV_RULES.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rule, at = {}, 0
        while at < len(line):
            found = pair.match(line, at)
            assert found is not None, f"{UDEV_RULES.name}: cannot parse {line[at:]!r}"
            rule[found[1]] = found[3]
            at = found.end()
        rules.append(rule)
    return rules


def test_udev_rules_give_the_agents_groups_each_device_its_unit_allows() -> None:
    rules = udev_rules()
    groups = set(unit_settings("edgefleet-agent.service")["SupplementaryGroups"][0].split())
    allowed = {v.split()[0] for v in unit_settings("edgefleet-agent.service")["DeviceAllow"]}
    usb_ids = {
        (r["ATTRS{idVendor}"], r["ATTRS{idProduct}"]) for r in rules if "ATTRS{idVendor}" in r
    }

    assert {r["GROUP"] for r in rules} <= groups
    assert all(r["MODE"] == "0660" for r in rules)
    assert usb_ids == {("1a6e", "089a"), ("18d1", "9302")}  # before and after its firmware
    subsystems = {r["SUBSYSTEM"] for r in rules if "SUBSYSTEM" in r}
    assert {"video4linux", "media", "dma_heap", "apex", "usb"} <= subsystems
    assert {
        "char-video4linux", "char-media", "char-dma_heap", "char-apex", "char-usb_device",
        "char-vcio",
    } == allowed  # fmt: skip


# -- MemoryDenyWriteExecute ---------------------------------------------------------------


DENY_WRITE_EXECUTE = [
    sys.executable,
    "-c",
    "import ctypes, os, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:\n"
    "    sys.exit('prctl(PR_SET_MDWE): ' + os.strerror(ctypes.get_errno()))\n"
    "os.execv(sys.argv[1], sys.argv[1:])",
]
"""Runs its arguments with PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN set: the kernel refuses
memory that is or becomes executable after being writable, as MemoryDenyWriteExecute=yes
does, and the setting passes to every child (the validation processes)."""


@pytest.fixture
def mdwe() -> None:
    probe = subprocess.run(
        [*DENY_WRITE_EXECUTE, sys.executable, "-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"],
        check=False,
        capture_output=True,
        text=True,
    )
    if "prctl(PR_SET_MDWE)" in probe.stderr:
        pytest.skip(f"this kernel ({os.uname().release}) has no PR_SET_MDWE (Linux 6.3+)")
    assert "Permission denied" in probe.stderr  # in force: a W+X mapping is refused


@pytest.mark.usefixtures("mdwe")
def test_the_model_tools_run_with_write_execute_memory_denied(assets: Assets) -> None:
    done = subprocess.run(
        [*DENY_WRITE_EXECUTE, str(Path(sys.executable).with_name("edgefleet")), "model",
         "run", "--json", str(assets.ssd), str(assets.image("grace_hopper.bmp")), "--labels",
         str(assets.coco_labels)],
        check=False, capture_output=True, text=True,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert '"person"' in done.stdout


@pytest.mark.usefixtures("mdwe")
def test_the_agent_runs_with_write_execute_memory_denied(
    assets: Assets, broker: Mosquitto, tmp_path: Path
) -> None:
    probe = MqttProbe(broker, "observer")
    probe.connect()
    probe.subscribe("edgefleet/v1/dev-mdwe/events/#", qos=1)
    config = {
        "device_id": "dev-mdwe",
        "broker": {"host": "127.0.0.1", "port": broker.port},
        "streams": [
            {
                "name": "yard",
                "source": {"type": "file", "path": str(assets.image("kite_pan_640x480_30fps.mp4"))},
                "model": {"path": str(assets.ssd), "labels": str(assets.coco_labels)},
                "events": {"labels": ["person", "kite"]},
            }
        ],
        "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
        "updates": {"store_dir": str(tmp_path / "store"), "trusted_keys": []},
    }
    with AgentProcess(tmp_path / "agent", config, prefix=DENY_WRITE_EXECUTE) as agent:
        event = probe.wait_until(
            lambda: next(
                (EventMessage.model_validate_json(m.payload) for m in probe.messages()), None
            ),
            "an event from the agent under MDWE",
            timeout_s=60,
        )
        assert agent.terminate() == 0, agent.log()

    assert event.stream == "yard"
