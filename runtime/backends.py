"""The TFLite interpreter backends: LiteRT (preferred) and tflite-runtime (fallback).

LiteRT (``ai_edge_litert``) is the maintained successor and much faster on
quantized models (XNNPACK for uint8/int8 ops). ``tflite_runtime`` is what older
Coral images ship and what some libedgetpu builds are linked against, so it
stays selectable. The choice is made once per process unless forced per call.

Which backend a machine can install at all is :mod:`.platforms`'s decision; this module only
imports what is installed. An installed backend whose libraries the dynamic loader refuses
(LiteRT's aarch64 wheel on an OS older than bookworm: ``version `GLIBC_2.34' not found``) is
reported by :func:`explain_import_failure` as :class:`SystemTooOld`, naming the oldest OS it
loads on, not as the loader's message alone.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from enum import Enum
from functools import cache
from importlib import metadata
from types import ModuleType
from typing import Any

from .errors import BackendUnavailable, SettingError, SystemTooOld
from .platforms import (
    LITERT_GLIBC,
    MINIMUM_OS,
    TFLITE_RUNTIME_LAST_PYTHON,
    InterpreterFacts,
    choose_runtime,
)

BACKEND_ENV = "EDGEFLEET_BACKEND"


class BackendName(str, Enum):
    """A backend's name as settings and the ``EDGEFLEET_BACKEND`` variable spell it."""

    AUTO = "auto"
    LITERT = "litert"
    TFLITE_RUNTIME = "tflite-runtime"


_MODULES = {
    BackendName.LITERT: ("ai_edge_litert.interpreter", "ai-edge-litert"),
    BackendName.TFLITE_RUNTIME: ("tflite_runtime.interpreter", "tflite-runtime"),
}
_INSTALL_HINTS = {
    BackendName.LITERT: "pip install 'edgefleet[litert]'",
    BackendName.TFLITE_RUNTIME: "pip install 'edgefleet[tflite-runtime]' (needs numpy<2)",
}
_TOO_OLD_HINTS = {
    BackendName.LITERT: f"LiteRT's libraries load on {MINIMUM_OS} or newer (glibc "
    f"{'.'.join(map(str, LITERT_GLIBC['aarch64']))}, GCC 12's libstdc++): upgrade the OS, or "
    f"on Python {'.'.join(map(str, TFLITE_RUNTIME_LAST_PYTHON))} or older use "
    + _INSTALL_HINTS[BackendName.TFLITE_RUNTIME],
    BackendName.TFLITE_RUNTIME: "reinstall it so pip picks the wheel built for this system: "
    "pip install --force-reinstall 'edgefleet[tflite-runtime]'",
}
# The dynamic loader's "/lib/.../libc.so.6: version `GLIBC_2.34' not found (required by X)".
_MISSING_VERSION = re.compile(
    r"(?P<library>\S+): version [`']?(?P<version>GLIBC(?:XX)?_[0-9.]+)'? not found"
)


@dataclass(frozen=True)
class Backend:
    """An importable interpreter backend."""

    name: BackendName
    version: str
    module: ModuleType

    @property
    def label(self) -> str:
        """``name version``, as logs, status and bench output show it."""
        return f"{self.name.value} {self.version}"

    def interpreter(self, **kwargs: Any) -> Any:
        """Construct the backend's ``Interpreter`` with the given keyword arguments."""
        return self.module.Interpreter(**kwargs)

    def load_delegate(self, library: str, options: dict[str, str]) -> Any:
        """Load an external delegate library through the backend."""
        return self.module.load_delegate(library, options)


def _parse_name(value: str, source: str) -> BackendName:
    try:
        return BackendName(value.strip().lower())
    except ValueError:
        choices = ", ".join(b.value for b in BackendName)
        raise SettingError(
            f"{source}: unknown backend {value!r}", hint=f"use one of: {choices}"
        ) from None


# What the dynamic loader says when mmap fails for want of address space or memory.
_OUT_OF_MEMORY = ("failed to map segment", "Cannot allocate memory")


def explain_import_failure(name: BackendName, exc: ImportError | OSError) -> BackendUnavailable:
    """The error to raise for a backend whose import failed with ``exc``.

    A symbol version the dynamic loader did not find (glibc, libstdc++) becomes
    :class:`SystemTooOld` naming the oldest OS the backend loads on; anything else says the
    backend is not importable and how to install it.
    """
    missing = _MISSING_VERSION.search(str(exc))
    if any(sign in str(exc) for sign in _OUT_OF_MEMORY):
        return BackendUnavailable(
            f"backend {name.value} is installed but there is no memory to load it ({exc})",
            hint="raise the process's memory limit (ulimit -v; LimitAS= or MemoryMax= in the "
            "systemd unit) or run fewer or smaller streams",
        )
    if missing is None:
        return BackendUnavailable(
            f"backend {name.value} is not importable ({exc})", hint=_INSTALL_HINTS[name]
        )
    version = missing["version"]
    library = "libstdc++" if version.startswith("GLIBCXX") else "the C library (glibc)"
    return SystemTooOld(
        f"backend {name.value} is installed but cannot load on this system: its libraries "
        f"need {version}, which {library} here lacks ({missing['library']})",
        missing=version,
        hint=_TOO_OLD_HINTS[name],
    )


@cache
def _import(name: BackendName) -> Backend:
    module_name, dist = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except (ImportError, OSError) as exc:
        raise explain_import_failure(name, exc) from exc
    return Backend(name=name, version=metadata.version(dist), module=module)


def _install_hint() -> str:
    """What to install on this machine, from :func:`.platforms.choose_runtime`."""
    choice = choose_runtime(InterpreterFacts.of_this_interpreter())
    if choice.backend is None:
        return choice.reason
    return _INSTALL_HINTS[BackendName(choice.backend)]


def select_backend(preferred: BackendName | str | None = None) -> Backend:
    """The backend to use: ``preferred``, else ``$EDGEFLEET_BACKEND``, else the first importable."""
    if preferred is None or preferred == "":
        preferred = _parse_name(os.environ.get(BACKEND_ENV, "auto"), BACKEND_ENV)
    elif not isinstance(preferred, BackendName):
        preferred = _parse_name(preferred, "backend")
    if preferred is not BackendName.AUTO:
        return _import(preferred)
    failures = []
    for name in (BackendName.LITERT, BackendName.TFLITE_RUNTIME):
        try:
            return _import(name)
        except BackendUnavailable as exc:
            failures.append(exc.message)
    raise BackendUnavailable(
        "no TensorFlow Lite interpreter is installed (" + "; ".join(failures) + ")",
        hint=_install_hint(),
    )
