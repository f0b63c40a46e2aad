"""Which TFLite interpreter this Python can install: a pure decision over the interpreter's facts.

pip's environment markers see the kernel, not the userland: a Raspberry Pi 4 or 5 running
32-bit Raspberry Pi OS boots a 64-bit kernel, so ``platform_machine`` is ``aarch64`` while
Python is an armhf build that takes only 32-bit ARM (armv7l) wheels. A marker therefore cannot
choose the backend; :func:`choose_runtime` does, from what the running interpreter says about
itself (:meth:`InterpreterFacts.of_this_interpreter`): its pointer size, the machine, its
version and the C library's version.

What PyPI publishes (ai-edge-litert 2.3.0, tflite-runtime 2.14.0, checked with pip against
each platform's tags):

============== ============================ ================ ==========================
package        machines (userland)          Pythons          C library it loads with
============== ============================ ================ ==========================
ai-edge-litert x86_64, aarch64 (64-bit)     3.10 and newer   x86_64 glibc 2.27; aarch64
                                                             glibc 2.34 and GCC 12's
                                                             libstdc++ (GLIBCXX_3.4.30),
                                                             although the wheel is
                                                             tagged manylinux_2_27
tflite-runtime x86_64, aarch64, armv7l      3.9 to 3.11      glibc 2.17 (2.13), 2.34
                                                             (2.14 on ARM); no further
                                                             releases
============== ============================ ================ ==========================

On a 32-bit ARM userland numpy, pillow, psutil, pyyaml, ruamel.yaml.clib and cffi have no
wheels on PyPI either; Raspberry Pi OS's pip finds them on piwheels, and plain Debian has them
as python3-* packages, except cffi 2, which pip builds (:attr:`RuntimeChoice.system_packages`).

Standard library only, no imports from the package: ``scripts/bootstrap.sh`` runs this file
with the system's ``python3`` before edgefleet is installed, and it prints the choice (see
:func:`main`).
"""

from __future__ import annotations

import os
import platform
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import Literal

BackendExtra = Literal["litert", "tflite-runtime"]
"""The setup.cfg extra that installs a backend (the same spelling as ``BackendName``)."""

MINIMUM_PYTHON = (3, 10)
"""The oldest Python edgefleet runs on (setup.cfg's ``python_requires``)."""

TFLITE_RUNTIME_LAST_PYTHON = (3, 11)
"""The newest Python tflite-runtime has wheels for; its last release (2.14.0) is from 2023."""

LITERT_GLIBC = {"x86_64": (2, 27), "aarch64": (2, 34)}
"""The glibc each LiteRT wheel's libraries need, by machine (what they link, not their tag)."""

TFLITE_RUNTIME_MACHINES = ("x86_64", "aarch64", "armv7l")
"""Userland machines tflite-runtime publishes wheels for."""

ARMHF_SYSTEM_PACKAGES = (
    *("python3-numpy", "python3-pil", "python3-psutil", "python3-yaml", "python3-ruamel.yaml.clib"),
    # cffi 2 (for cryptography) has no armv7l wheel and Debian's is 1.15: pip builds it.
    *("gcc", "libffi-dev", "python3-dev"),
)
"""Debian packages for the dependencies PyPI has no 32-bit ARM (armv7l) wheel for.

Raspberry Pi OS's pip also finds wheels for them on piwheels; plain Debian armhf has only these.
"""

MINIMUM_OS = "Debian 12 / Raspberry Pi OS bookworm"
"""The oldest Raspberry Pi OS whose C library and libstdc++ LiteRT's ARM wheel loads with."""

_64_BIT_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
# A 32-bit userland on these kernels (or an armv8l personality) runs 32-bit ARM / x86 code.
_32_BIT_USERLAND = {
    **dict.fromkeys(("aarch64", "arm64", "armv8l", "armv7l"), "armv7l"),
    **dict.fromkeys(("x86_64", "amd64", "i386", "i686"), "i686"),
}
_LITERT_NEEDS = {
    "x86_64": "glibc 2.27",
    "aarch64": f"glibc 2.34 and GCC 12's libstdc++ ({MINIMUM_OS} or newer)",
}
_GLIBC_VERSION = re.compile(r"(\d+)\.(\d+)")
_TO_64_BIT = (
    "install the 64-bit Raspberry Pi OS (any Pi 3, 4, 5 or Zero 2 W runs it), which has LiteRT"
)


def _dotted(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


@dataclass(frozen=True)
class InterpreterFacts:
    """What the running Python says about itself, all the decision reads."""

    machine: str
    """``platform.machine()``: the kernel's machine, e.g. ``aarch64`` under a 32-bit userland."""
    pointer_bits: int
    """``8 * struct.calcsize("P")``: 32 or 64, the userland's width."""
    python: tuple[int, int]
    """``sys.version_info[:2]``."""
    glibc: tuple[int, int] | None
    """The glibc version (``os.confstr("CS_GNU_LIBC_VERSION")``); None: not glibc."""
    system: str = "Linux"
    """``platform.system()``."""

    @classmethod
    def of_this_interpreter(cls) -> InterpreterFacts:
        """The facts of the Python running this code."""
        return cls(
            machine=platform.machine(),
            pointer_bits=8 * struct.calcsize("P"),
            python=(sys.version_info[0], sys.version_info[1]),
            glibc=_glibc_version(),
            system=platform.system(),
        )

    @property
    def userland(self) -> str:
        """The machine the interpreter's code is built for, e.g. ``armv7l`` on a 64-bit kernel."""
        machine = self.machine.lower()
        if self.pointer_bits >= 64:
            return _64_BIT_MACHINES.get(machine, machine)
        return _32_BIT_USERLAND.get(machine, machine)

    def describe(self) -> str:
        """One line for messages: ``Python 3.13, 32-bit armv7l userland on an aarch64 kernel``."""
        kernel = "" if self.userland == self.machine else f" on an {self.machine} kernel"
        libc = f", glibc {_dotted(self.glibc)}" if self.glibc else ""
        return (
            f"Python {_dotted(self.python)}, {self.pointer_bits}-bit {self.userland} "
            f"userland{kernel}{libc}"
        )


def _glibc_version() -> tuple[int, int] | None:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"
    except (ValueError, OSError, AttributeError):
        text = ""
    if not text.startswith("glibc"):
        libc, version = platform.libc_ver()
        text = f"glibc {version}" if libc == "glibc" else ""
    match = _GLIBC_VERSION.search(text)
    return (int(match[1]), int(match[2])) if match else None


@dataclass(frozen=True)
class RuntimeChoice:
    """The backend to install for an interpreter, or None with the reason there is none."""

    backend: BackendExtra | None
    """The extra to install (``edgefleet[litert]``), or None: no interpreter exists here."""
    reason: str
    """One or two sentences: why this backend, or why none and what to do instead."""
    system_packages: tuple[str, ...] = field(default=())
    """Debian packages for dependencies PyPI has no wheel for on this userland."""


def choose_runtime(facts: InterpreterFacts) -> RuntimeChoice:
    """The TFLite backend ``facts``'s interpreter can install from PyPI: LiteRT when it can."""
    refusal = _unsupported(facts)
    if refusal is not None:
        return RuntimeChoice(None, refusal)
    if _litert_loads(facts):
        return RuntimeChoice("litert", f"LiteRT has wheels for {facts.describe()}")
    if _tflite_runtime_installs(facts):
        packages = ARMHF_SYSTEM_PACKAGES if facts.userland == "armv7l" else ()
        return RuntimeChoice("tflite-runtime", _why_tflite_runtime(facts), packages)
    return RuntimeChoice(None, _why_none(facts))


def _unsupported(facts: InterpreterFacts) -> str | None:
    """Why edgefleet itself cannot run with this interpreter, whichever backend."""
    if facts.system != "Linux":
        return f"edgefleet runs on Linux boards; this is {facts.system}"
    if facts.python < MINIMUM_PYTHON:
        return (
            f"edgefleet needs Python {_dotted(MINIMUM_PYTHON)} or newer; this is "
            f"{_dotted(facts.python)} (Raspberry Pi OS bullseye has 3.9): upgrade to "
            f"{MINIMUM_OS} or later"
        )
    if facts.glibc is None:
        return "the TFLite wheels are built for glibc; this C library is not glibc (musl?)"
    return None


def _litert_loads(facts: InterpreterFacts) -> bool:
    needed = LITERT_GLIBC.get(facts.userland)
    return needed is not None and facts.glibc is not None and facts.glibc >= needed


def _tflite_runtime_installs(facts: InterpreterFacts) -> bool:
    return facts.userland in TFLITE_RUNTIME_MACHINES and facts.python <= TFLITE_RUNTIME_LAST_PYTHON


def _why_tflite_runtime(facts: InterpreterFacts) -> str:
    if facts.userland in LITERT_GLIBC:
        return (
            f"LiteRT needs {_LITERT_NEEDS[facts.userland]}; {facts.describe()} installs "
            "tflite-runtime instead"
        )
    return f"LiteRT has no 32-bit wheels; tflite-runtime has one for {facts.describe()}"


def _why_none(facts: InterpreterFacts) -> str:
    what = f"no TensorFlow Lite interpreter can be installed for {facts.describe()}"
    if facts.userland == "armv7l":
        return (
            f"{what}: LiteRT publishes 64-bit wheels only and tflite-runtime stopped at Python "
            f"{_dotted(TFLITE_RUNTIME_LAST_PYTHON)} (32-bit bookworm has 3.11, trixie 3.13); "
            f"{_TO_64_BIT}"
        )
    if facts.userland in LITERT_GLIBC:
        return (
            f"{what}: LiteRT needs {_LITERT_NEEDS[facts.userland]} and tflite-runtime stopped "
            f"at Python {_dotted(TFLITE_RUNTIME_LAST_PYTHON)}: upgrade the OS"
        )
    if facts.userland == "armv6l":
        return f"{what}: neither LiteRT nor tflite-runtime builds for ARMv6 (Pi 1, Pi Zero)"
    return f"{what}: neither LiteRT nor tflite-runtime publishes wheels for {facts.userland}"


def main(argv: list[str]) -> int:
    """``python3 runtime/platforms.py [--explain]``: print the choice for this interpreter.

    Prints one line, the extra followed by any Debian packages it needs
    (``tflite-runtime python3-numpy ...``), and the reason on stderr with ``--explain``. With no
    backend: the reason on stderr and exit status 3.
    """
    choice = choose_runtime(InterpreterFacts.of_this_interpreter())
    if choice.backend is None:
        print(choice.reason, file=sys.stderr)
        return 3
    if "--explain" in argv:
        print(choice.reason, file=sys.stderr)
    print(" ".join((choice.backend, *choice.system_packages)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
