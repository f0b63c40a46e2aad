"""The TFLite interpreter backends: LiteRT (preferred) and tflite-runtime (fallback).

LiteRT (``ai_edge_litert``) is the maintained successor and much faster on
quantized models (XNNPACK for uint8/int8 ops). ``tflite_runtime`` is what older
Coral images ship and what some libedgetpu builds are linked against, so it
stays selectable. The choice is made once per process unless forced per call.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from enum import Enum
from functools import cache
from importlib import metadata
from types import ModuleType
from typing import Any

from .errors import BackendUnavailable, SettingError

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
    BackendName.LITERT: "pip install ai-edge-litert",
    BackendName.TFLITE_RUNTIME: "pip install 'edgefleet[tflite-runtime]' (needs numpy<2)",
}


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


@cache
def _import(name: BackendName) -> Backend:
    module_name, dist = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(
            f"backend {name.value} is not importable ({exc})", hint=_INSTALL_HINTS[name]
        ) from exc
    return Backend(name=name, version=metadata.version(dist), module=module)


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
        hint=f"{_INSTALL_HINTS[BackendName.LITERT]} (64-bit boards), or "
        f"{_INSTALL_HINTS[BackendName.TFLITE_RUNTIME]}",
    )
