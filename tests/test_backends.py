"""Choosing between LiteRT and tflite-runtime: what a machine can install, and what it imports."""

from __future__ import annotations

import configparser
import importlib.util
import os
import platform
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from edgefleet.runtime import (
    BACKEND_ENV,
    BackendName,
    BackendUnavailable,
    InterpreterFacts,
    SettingError,
    SystemTooOld,
    choose_runtime,
    explain_import_failure,
    platforms,
    select_backend,
)

pytestmark = pytest.mark.backend

_INSTALLED = {
    BackendName.LITERT: importlib.util.find_spec("ai_edge_litert") is not None,
    BackendName.TFLITE_RUNTIME: importlib.util.find_spec("tflite_runtime") is not None,
}


def test_environment_variable_forces_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = [name for name, present in _INSTALLED.items() if present]
    for name in installed:
        monkeypatch.setenv(BACKEND_ENV, name.value)
        assert select_backend().name is name


def test_explicit_choice_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "no-such-backend")
    assert select_backend("litert").name is BackendName.LITERT


def test_auto_prefers_litert_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "auto")
    expected = BackendName.LITERT if _INSTALLED[BackendName.LITERT] else BackendName.TFLITE_RUNTIME
    assert select_backend().name is expected


def test_backend_label_has_name_and_version() -> None:
    backend = select_backend("litert")
    assert backend.label.startswith("litert ")
    assert backend.version[0].isdigit()


def test_unknown_backend_name_lists_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "tensorflow")
    with pytest.raises(SettingError, match="EDGEFLEET_BACKEND: unknown backend 'tensorflow'") as e:
        select_backend()
    assert "litert" in e.value.hint
    assert "tflite-runtime" in e.value.hint


@pytest.mark.skipif(
    _INSTALLED[BackendName.TFLITE_RUNTIME], reason="tflite-runtime is installed in this environment"
)
def test_forcing_a_missing_backend_says_how_to_install_it() -> None:
    with pytest.raises(BackendUnavailable, match="tflite-runtime is not importable") as caught:
        select_backend("tflite-runtime")
    assert "numpy<2" in caught.value.hint


def test_the_run_uses_the_backend_the_environment_names() -> None:
    # CI runs this suite once per backend; this makes sure each run is the one it claims.
    forced = os.environ.get(BACKEND_ENV, "auto")
    if forced == "auto":
        pytest.skip(f"{BACKEND_ENV} not set: the automatic choice is tested above")
    assert select_backend().name.value == forced


# What a machine can install: runtime/platforms.py, a pure function of the interpreter's facts.
# Pi OS rows: bookworm has Python 3.11 and glibc 2.36, trixie Python 3.13 and glibc 2.41.


def _facts(
    machine: str, bits: int, python: tuple[int, int], glibc: tuple[int, int] | None
) -> InterpreterFacts:
    return InterpreterFacts(machine=machine, pointer_bits=bits, python=python, glibc=glibc)


def test_32_bit_pi_os_under_a_64_bit_kernel_installs_tflite_runtime_not_litert() -> None:
    # A Pi 4/5 on 32-bit bookworm: the kernel says aarch64, the interpreter is 32-bit.
    facts = _facts("aarch64", 32, (3, 11), (2, 36))

    choice = choose_runtime(facts)

    assert facts.userland == "armv7l"
    assert choice.backend == "tflite-runtime"
    assert "32-bit" in choice.reason
    # PyPI has no armv7l wheel for these; Debian has them.
    assert {"python3-numpy", "python3-pil", "python3-psutil", "python3-yaml"} <= set(
        choice.system_packages
    )


def test_32_bit_trixie_under_a_64_bit_kernel_has_no_backend_and_says_what_to_do() -> None:
    choice = choose_runtime(_facts("aarch64", 32, (3, 13), (2, 41)))

    assert choice.backend is None
    assert "Python 3.13, 32-bit armv7l userland on an aarch64 kernel" in choice.reason
    assert "tflite-runtime stopped at Python 3.11" in choice.reason
    assert "install the 64-bit Raspberry Pi OS" in choice.reason


def test_32_bit_bookworm_on_a_32_bit_kernel_installs_tflite_runtime() -> None:
    choice = choose_runtime(_facts("armv7l", 32, (3, 11), (2, 36)))

    assert choice.backend == "tflite-runtime"
    assert "python3-numpy" in choice.system_packages


def test_32_bit_trixie_on_a_32_bit_kernel_has_no_backend() -> None:
    choice = choose_runtime(_facts("armv7l", 32, (3, 13), (2, 41)))

    assert choice.backend is None
    assert "64-bit Raspberry Pi OS" in choice.reason


@pytest.mark.parametrize(
    ("python", "glibc"), [((3, 11), (2, 36)), ((3, 13), (2, 41))], ids=["bookworm", "trixie"]
)
def test_64_bit_pi_os_installs_litert_from_wheels(
    python: tuple[int, int], glibc: tuple[int, int]
) -> None:
    choice = choose_runtime(_facts("aarch64", 64, python, glibc))

    assert choice.backend == "litert"
    assert choice.system_packages == ()


def test_64_bit_arm_older_than_bookworm_takes_tflite_runtime_while_its_python_has_one() -> None:
    # LiteRT's aarch64 libraries need glibc 2.34 (bullseye has 2.31), whatever the wheel's tag.
    choice = choose_runtime(_facts("aarch64", 64, (3, 10), (2, 31)))

    assert choice.backend == "tflite-runtime"
    assert "glibc 2.34" in choice.reason
    assert "bookworm" in choice.reason


def test_64_bit_arm_older_than_bookworm_with_a_newer_python_has_no_backend() -> None:
    choice = choose_runtime(_facts("aarch64", 64, (3, 12), (2, 31)))

    assert choice.backend is None
    assert "bookworm" in choice.reason


def test_bullseye_python_is_too_old_for_edgefleet_itself() -> None:
    choice = choose_runtime(_facts("aarch64", 64, (3, 9), (2, 31)))

    assert choice.backend is None
    assert "needs Python 3.10 or newer" in choice.reason
    assert "bookworm" in choice.reason


def test_armv6_boards_have_no_backend() -> None:
    choice = choose_runtime(_facts("armv6l", 32, (3, 11), (2, 36)))

    assert choice.backend is None
    assert "ARMv6" in choice.reason


@pytest.mark.parametrize("python", [(3, 10), (3, 12), (3, 14)])
def test_a_64_bit_pc_installs_litert(python: tuple[int, int]) -> None:
    assert choose_runtime(_facts("x86_64", 64, python, (2, 35))).backend == "litert"


def test_a_32_bit_x86_userland_has_no_backend() -> None:
    choice = choose_runtime(_facts("x86_64", 32, (3, 11), (2, 36)))

    assert choice.backend is None
    assert "i686" in choice.reason


def test_a_c_library_other_than_glibc_has_no_backend() -> None:
    choice = choose_runtime(_facts("x86_64", 64, (3, 12), None))

    assert choice.backend is None
    assert "glibc" in choice.reason


def test_the_facts_of_this_interpreter_are_what_it_reports() -> None:
    facts = InterpreterFacts.of_this_interpreter()

    assert facts.machine == platform.machine()
    assert facts.pointer_bits == 8 * struct.calcsize("P")
    assert facts.python == sys.version_info[:2]
    libc, version = platform.libc_ver()
    if libc == "glibc":
        assert facts.glibc == tuple(int(part) for part in version.split(".")[:2])


def test_the_bootstrap_line_is_the_choice_for_the_python_that_runs_the_file() -> None:
    # scripts/bootstrap.sh runs the file with python3 before edgefleet is installed.
    done = subprocess.run(
        [sys.executable, "-I", platforms.__file__], capture_output=True, text=True, check=False
    )
    choice = choose_runtime(InterpreterFacts.of_this_interpreter())

    if choice.backend is None:
        assert (done.returncode, done.stdout, done.stderr.strip()) == (3, "", choice.reason)
    else:
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [choice.backend, *choice.system_packages]


def test_every_backend_the_decision_picks_is_an_extra_named_like_the_backend() -> None:
    extras = _setup_cfg()["options.extras_require"]
    picked = {"litert", "tflite-runtime"}

    assert picked == {name.value for name in BackendName} - {"auto"}
    assert picked <= set(extras)


def test_a_plain_install_demands_no_backend_wheel_where_a_32_bit_python_may_run() -> None:
    # pip evaluates the marker with the kernel's machine: on a Pi 4/5 with 32-bit Pi OS that
    # is aarch64 (the bug: install_requires demanded an ai-edge-litert wheel that has no
    # 32-bit build, even with the tflite-runtime extra).
    requirements = [
        Requirement(line)
        for line in _setup_cfg()["options"]["install_requires"].splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for machine in ("aarch64", "armv7l", "armv8l", "armv6l"):
        environment = {"platform_machine": machine, "python_version": "3.11", "extra": ""}
        wanted = {
            r.name for r in requirements if r.marker is None or r.marker.evaluate(environment)
        }
        assert not wanted & {"ai-edge-litert", "tflite-runtime"}, machine


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(Path(__file__).parents[1] / "setup.cfg")
    return parser


# An installed backend the dynamic loader refuses: the error names the minimum OS.


def test_a_missing_glibc_version_says_litert_needs_bookworm() -> None:
    # What importing ai_edge_litert prints on bullseye's glibc 2.31 (aarch64).
    loader = ImportError(
        "/lib/aarch64-linux-gnu/libc.so.6: version `GLIBC_2.34' not found (required by "
        "/home/pi/edgefleet/.venv/lib/python3.11/site-packages/ai_edge_litert/"
        "libpywrap_litert_common.so)"
    )

    error = explain_import_failure(BackendName.LITERT, loader)

    assert isinstance(error, SystemTooOld)
    assert error.missing == "GLIBC_2.34"
    assert "cannot load on this system" in error.message
    assert "/lib/aarch64-linux-gnu/libc.so.6" in error.message
    assert "Raspberry Pi OS bookworm or newer" in error.hint
    assert "edgefleet[tflite-runtime]" in error.hint


def test_a_missing_libstdcxx_version_is_the_same_error_naming_libstdcxx() -> None:
    loader = OSError(
        "/lib/aarch64-linux-gnu/libstdc++.so.6: version `GLIBCXX_3.4.30' not found (required "
        "by /usr/local/lib/python3.11/dist-packages/ai_edge_litert/libLiteRt.so)"
    )

    error = explain_import_failure(BackendName.LITERT, loader)

    assert isinstance(error, SystemTooOld)
    assert error.missing == "GLIBCXX_3.4.30"
    assert "libstdc++" in error.message
    assert "bookworm" in error.hint


def test_an_import_failure_that_is_not_the_loader_says_how_to_install() -> None:
    error = explain_import_failure(
        BackendName.TFLITE_RUNTIME, ModuleNotFoundError("No module named 'tflite_runtime'")
    )

    assert not isinstance(error, SystemTooOld)
    assert "backend tflite-runtime is not importable" in error.message
    assert "numpy<2" in error.hint


def test_the_real_dynamic_loader_message_is_recognised(tmp_path: Path) -> None:
    # An extension module linked against a library version that the library no longer has:
    # the same refusal as LiteRT's on an old glibc, printed by this machine's loader.
    extension = _extension_needing_a_missing_version(tmp_path, "GLIBC_2.99")
    spec = importlib.util.spec_from_file_location("wrapper", extension)
    assert spec is not None
    with pytest.raises(ImportError) as refused:
        importlib.util.module_from_spec(spec)

    error = explain_import_failure(BackendName.LITERT, refused.value)

    assert isinstance(error, SystemTooOld), refused.value
    assert error.missing == "GLIBC_2.99"
    assert str(tmp_path / "libstub.so") in error.message


def _extension_needing_a_missing_version(directory: Path, version: str) -> Path:
    """``wrapper.so`` needing ``stub_value@version`` from ``libstub.so``, which lacks it."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        if os.environ.get("CI"):
            pytest.fail("no C compiler (CI must run every test): apt-get install gcc")
        pytest.skip("no C compiler to build the stub libraries (apt-get install gcc)")
    (directory / "stub.c").write_text("int stub_value(void) { return 1; }\n")
    (directory / "wrapper.c").write_text(
        "extern int stub_value(void);\nint PyInit_wrapper(void) { return stub_value(); }\n"
    )

    def stub(node: str) -> None:
        (directory / "stub.map").write_text(f"{node} {{ global: stub_value; local: *; }};\n")
        subprocess.run(
            [compiler, "-shared", "-fPIC", "-Wl,--version-script=stub.map",
             "-Wl,-soname,libstub.so", "-o", "libstub.so", "stub.c"],
            cwd=directory, check=True, capture_output=True,
        )  # fmt: skip

    stub(version)
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", "wrapper.so", "wrapper.c", "-L.", "-lstub",
         f"-Wl,-rpath,{directory}"],
        cwd=directory, check=True, capture_output=True,
    )  # fmt: skip
    stub("OTHER_1.0")  # the library the extension finds at run time lacks the version
    return directory / "wrapper.so"
