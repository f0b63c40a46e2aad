"""Health metrics: latency percentiles, the CPU thermal zone, vcgencmd throttling, this process."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.agent.metrics import LatencyWindow, SystemMetrics, parse_throttled
from edgefleet.runtime import SettingError

NO_VCGENCMD = "edgefleet-test-no-such-vcgencmd"
VCGENCMD_SCRIPT = """#!/bin/sh
# Stands in for the Raspberry Pi firmware tool: only `get_throttled` is known.
[ "$1" = get_throttled ] || { echo "unknown command $1" >&2; exit 2; }
echo "@OUTPUT@"
"""


def write_thermal_zone(root: Path, number: int, kind: str, temp: str) -> None:
    zone = root / f"thermal_zone{number}"
    zone.mkdir(parents=True)
    (zone / "type").write_text(kind + "\n")
    (zone / "temp").write_text(temp + "\n")


def write_vcgencmd(directory: Path, output: str, *, exit_code: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "vcgencmd"
    script.write_text(VCGENCMD_SCRIPT.replace("@OUTPUT@", output) + f"exit {exit_code}\n")
    script.chmod(0o755)
    return script


def no_thermal(tmp_path: Path) -> Path:
    return tmp_path / "no-thermal"


def test_percentiles_match_numpy_on_known_data() -> None:
    values = np.random.default_rng(7).gamma(shape=2.0, scale=10.0, size=500)
    window = LatencyWindow()

    for value in values:
        window.add(float(value))
    result = window.percentiles()

    assert result["count"] == 500
    assert result["p50_ms"] == pytest.approx(np.percentile(values, 50))
    assert result["p99_ms"] == pytest.approx(np.percentile(values, 99))


def test_window_keeps_only_the_last_samples() -> None:
    window = LatencyWindow(size=10)

    for value in range(100):
        window.add(float(value))
    result = window.percentiles()

    assert result["count"] == 10
    assert result["p50_ms"] == pytest.approx(np.percentile(np.arange(90, 100), 50))
    assert result["p99_ms"] == pytest.approx(np.percentile(np.arange(90, 100), 99))


def test_empty_window_reports_none() -> None:
    assert LatencyWindow().percentiles() == {"p50_ms": None, "p99_ms": None, "count": 0}


def test_window_size_must_be_positive() -> None:
    with pytest.raises(SettingError, match="at least 1"):
        LatencyWindow(size=0)


def test_concurrent_adds_and_reads_lose_nothing_and_never_fail() -> None:
    writers, per_writer = 4, 5000
    window = LatencyWindow(size=writers * per_writer)
    stop = threading.Event()
    reader_errors: list[BaseException] = []

    def write(offset: int) -> None:
        for i in range(per_writer):
            window.add(float(offset * per_writer + i))

    def read() -> None:
        while not stop.is_set():
            try:
                window.percentiles()
            except Exception as exc:  # any failure is the finding: collected, asserted below
                reader_errors.append(exc)
                return

    reader = threading.Thread(target=read, name="test-reader")
    threads = [
        threading.Thread(target=write, args=(n,), name=f"test-writer-{n}") for n in range(writers)
    ]
    reader.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    stop.set()
    reader.join(timeout=30)
    result = window.percentiles()

    assert reader_errors == []
    everything = np.arange(writers * per_writer, dtype=np.float64)
    assert result["count"] == writers * per_writer
    assert result["p50_ms"] == pytest.approx(np.percentile(everything, 50))
    assert result["p99_ms"] == pytest.approx(np.percentile(everything, 99))


def test_cpu_temperature_comes_from_the_zone_whose_type_names_the_cpu(tmp_path: Path) -> None:
    thermal = tmp_path / "thermal"
    write_thermal_zone(thermal, 0, "acpitz", "27800")
    write_thermal_zone(thermal, 2, "cpu-thermal", "48312")
    write_thermal_zone(thermal, 10, "gpu-thermal", "60000")

    snapshot = SystemMetrics(thermal_root=thermal, vcgencmd=NO_VCGENCMD).snapshot()

    assert snapshot.cpu_temperature_c == pytest.approx(48.312)


def test_cpu_temperature_falls_back_to_zone0(tmp_path: Path) -> None:
    thermal = tmp_path / "thermal"
    write_thermal_zone(thermal, 1, "acpitz", "27800")
    write_thermal_zone(thermal, 0, "x86_pkg_temp", "51000")

    snapshot = SystemMetrics(thermal_root=thermal, vcgencmd=NO_VCGENCMD).snapshot()

    assert snapshot.cpu_temperature_c == pytest.approx(51.0)


def test_unreadable_temperature_is_none_and_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    thermal = tmp_path / "thermal"
    write_thermal_zone(thermal, 0, "cpu-thermal", "not a number")
    metrics = SystemMetrics(thermal_root=thermal, vcgencmd=NO_VCGENCMD)

    first, second = metrics.snapshot(), metrics.snapshot()

    assert first.cpu_temperature_c is None
    assert second.cpu_temperature_c is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_vcgencmd_on_path_is_run_and_its_flags_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    write_vcgencmd(bin_dir, "throttled=0x50005")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")

    snapshot = SystemMetrics(thermal_root=no_thermal(tmp_path)).snapshot()

    assert snapshot.throttled == {
        "under_voltage": True,
        "freq_capped": False,
        "throttled": True,
        "soft_temp_limit": False,
        "under_voltage_occurred": True,
        "freq_capped_occurred": False,
        "throttled_occurred": True,
        "soft_temp_limit_occurred": False,
    }


def test_vcgencmd_reporting_nothing_wrong_decodes_to_all_false(tmp_path: Path) -> None:
    script = write_vcgencmd(tmp_path / "bin", "throttled=0x0")

    snapshot = SystemMetrics(thermal_root=no_thermal(tmp_path), vcgencmd=str(script)).snapshot()

    assert snapshot.throttled is not None
    assert len(snapshot.throttled) == 8
    assert not any(snapshot.throttled.values())


@pytest.mark.parametrize(
    ("output", "exit_code"),
    [("throttled=0x50005", 1), ("VCHI initialization failed", 0), ("", 0)],
)
def test_failing_vcgencmd_gives_none_and_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, output: str, exit_code: int
) -> None:
    script = write_vcgencmd(tmp_path / "bin", output, exit_code=exit_code)
    metrics = SystemMetrics(thermal_root=no_thermal(tmp_path), vcgencmd=str(script))

    first, second = metrics.snapshot(), metrics.snapshot()

    assert first.throttled is None
    assert second.throttled is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_machine_without_thermal_zones_or_vcgencmd_reports_none_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot = SystemMetrics(thermal_root=no_thermal(tmp_path), vcgencmd=NO_VCGENCMD).snapshot()

    assert snapshot.cpu_temperature_c is None
    assert snapshot.throttled is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_process_figures_are_sane(tmp_path: Path) -> None:
    metrics = SystemMetrics(thermal_root=no_thermal(tmp_path), vcgencmd=NO_VCGENCMD)
    process = psutil.Process()
    start = sum(process.cpu_times()[:2])
    deadline = time.monotonic() + 10
    while sum(process.cpu_times()[:2]) - start < 0.05 and time.monotonic() < deadline:
        sum(i * i for i in range(10_000))  # use some CPU so the next snapshot has work to see

    snapshot = metrics.snapshot()

    assert 0 < snapshot.cpu_percent <= 100 * (os.cpu_count() or 1)
    assert 1 < snapshot.rss_mb < psutil.virtual_memory().total / 2**20
    assert snapshot.uptime_s > 0
    assert snapshot.load_1m >= 0


@given(st.text())
def test_parse_throttled_never_fails_on_arbitrary_output(output: str) -> None:
    value = parse_throttled(output)

    assert value is None or value >= 0


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_parse_throttled_reads_any_value_vcgencmd_prints(value: int) -> None:
    assert parse_throttled(f"throttled={value:#x}\n") == value
