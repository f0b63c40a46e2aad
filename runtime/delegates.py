"""Accelerator delegates: CPU (XNNPACK), Coral Edge TPU, GPU, any external delegate library.

Each delegate is a small pydantic model chosen by its ``type`` field, so a
YAML config, a manifest and the CLI (``--delegate edgetpu:usb:0``) all speak
the same language. Loading a delegate first checks that its shared library
can be opened at all, so a missing ``libedgetpu.so.1`` is a named error with
an install hint instead of a backend-specific stack trace.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .backends import Backend
from .errors import DelegateUnavailable, SettingError

log = logging.getLogger(__name__)

EDGETPU_LIBRARY = "libedgetpu.so.1"
GPU_LIBRARY = "libtensorflowlite_gpu_delegate.so"


class _Delegate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_cpu_fallback: bool = Field(
        False,
        description="If the delegate cannot be loaded, log a warning and run on the CPU "
        "instead of failing.",
    )


class CpuDelegate(_Delegate):
    """Run on the CPU (LiteRT applies XNNPACK to supported ops)."""

    type: Literal["cpu"] = Field("cpu", description="Delegate kind.")


class EdgeTpuDelegate(_Delegate):
    """A Coral Edge TPU through ``libedgetpu``."""

    type: Literal["edgetpu"] = Field("edgetpu", description="Delegate kind.")
    device: str | None = Field(
        None,
        pattern=r"^(usb|pci)(:\d+)?$",
        description="Which Edge TPU: 'usb', 'usb:N', 'pci' or 'pci:N'; any device if unset.",
    )
    library: str = Field(EDGETPU_LIBRARY, description="The libedgetpu shared library to load.")


class GpuDelegate(_Delegate):
    """The TFLite GPU delegate (OpenCL/OpenGL ES), from a shared library."""

    type: Literal["gpu"] = Field("gpu", description="Delegate kind.")
    library: str = Field(GPU_LIBRARY, description="The GPU delegate shared library to load.")
    options: dict[str, str] = Field(
        default_factory=dict, description="Options passed to the delegate library."
    )


class ExternalDelegate(_Delegate):
    """Any TFLite external delegate library, with its options."""

    type: Literal["external"] = Field("external", description="Delegate kind.")
    library: str = Field(description="Path or soname of the delegate shared library.")
    options: dict[str, str] = Field(
        default_factory=dict, description="Options passed to the delegate library."
    )


DelegateSettings = Annotated[
    CpuDelegate | EdgeTpuDelegate | GpuDelegate | ExternalDelegate,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[DelegateSettings] = TypeAdapter(DelegateSettings)

DELEGATE_SYNTAX = "cpu | edgetpu[:usb[:N]|:pci[:N]] | gpu | external:LIBRARY[,KEY=VALUE...]"


def parse_delegate(text: str, *, allow_cpu_fallback: bool = False) -> DelegateSettings:
    """Parse the command-line form, e.g. ``edgetpu:usb:0`` or ``external:libx.so,k=v``."""
    kind, _, rest = text.strip().partition(":")
    fields: dict[str, Any] = {"type": kind, "allow_cpu_fallback": allow_cpu_fallback}
    if kind == "edgetpu" and rest:
        fields["device"] = rest
    elif kind in ("gpu", "external") and rest:
        library, *pairs = rest.split(",")
        if library:
            fields["library"] = library
        fields["options"] = _parse_options(text, pairs)
    elif rest:
        raise SettingError(f"delegate {text!r} takes no arguments", hint=f"use {DELEGATE_SYNTAX}")
    try:
        return _ADAPTER.validate_python(fields)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        raise SettingError(
            f"invalid delegate {text!r}: {reason}", hint=f"use {DELEGATE_SYNTAX}"
        ) from exc


def _parse_options(text: str, pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SettingError(
                f"invalid delegate option {pair!r} in {text!r}",
                hint=f"write options as KEY=VALUE: {DELEGATE_SYNTAX}",
            )
        options[key] = value
    return options


@dataclass(frozen=True)
class LoadedDelegate:
    """A delegate ready to hand to an interpreter (``handle`` is None for the CPU)."""

    settings: DelegateSettings
    handle: Any
    description: str


def _describe(settings: DelegateSettings) -> str:
    """A short human name, e.g. ``edgetpu (usb:0)``."""
    if isinstance(settings, EdgeTpuDelegate):
        return f"edgetpu ({settings.device or 'any device'})"
    if isinstance(settings, GpuDelegate | ExternalDelegate):
        return f"{settings.type} ({settings.library})"
    return "cpu"


def load_delegate(settings: DelegateSettings, backend: Backend) -> LoadedDelegate:
    """Load ``settings`` through ``backend``; fall back to the CPU only where allowed."""
    if isinstance(settings, CpuDelegate):
        return LoadedDelegate(settings, None, "cpu")
    try:
        handle = _load_library(settings, backend)
    except DelegateUnavailable as exc:
        if not settings.allow_cpu_fallback:
            raise
        log.warning("delegate unavailable, falling back to the CPU: %s", exc)
        return LoadedDelegate(settings, None, f"cpu (fallback: {_describe(settings)} unavailable)")
    return LoadedDelegate(settings, handle, _describe(settings))


# The external-delegate entry points (tensorflow/lite/delegates/external).
_DELEGATE_SYMBOLS = ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate")
_LibraryDelegate = EdgeTpuDelegate | GpuDelegate | ExternalDelegate


def _load_library(settings: _LibraryDelegate, backend: Backend) -> Any:
    try:
        library = ctypes.CDLL(settings.library)
    except OSError as exc:
        raise DelegateUnavailable(
            f"{_describe(settings)}: cannot open {settings.library} ({exc})",
            hint=_missing_library_hint(settings),
        ) from exc
    missing = [symbol for symbol in _DELEGATE_SYMBOLS if not hasattr(library, symbol)]
    if missing:
        # Checked here because the backends' Delegate wrappers fail messily on such a library.
        raise DelegateUnavailable(
            f"{_describe(settings)}: {settings.library} is not a TFLite delegate "
            f"(no {', '.join(missing)})",
            hint="point the delegate at a library built as a TFLite external delegate",
        )
    options = dict(settings.options) if not isinstance(settings, EdgeTpuDelegate) else {}
    if isinstance(settings, EdgeTpuDelegate) and settings.device:
        options["device"] = settings.device
    try:
        return backend.load_delegate(settings.library, options)
    except (ValueError, RuntimeError, OSError) as exc:
        raise DelegateUnavailable(
            f"{_describe(settings)}: {settings.library} loaded but the delegate failed to "
            f"initialise under {backend.label} ({exc})",
            hint="check that the device is attached and that the library was built for "
            f"this TFLite version ({backend.label}); --backend selects another runtime",
        ) from exc


def _missing_library_hint(settings: _LibraryDelegate) -> str:
    if isinstance(settings, EdgeTpuDelegate):
        return (
            "install the Edge TPU runtime (Debian package libedgetpu1-std from the Coral "
            "repository) and attach the device, or run on the CPU with a non-Edge-TPU model"
        )
    return "install the delegate library or give its full path"
