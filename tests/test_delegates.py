"""Delegate settings, loading, and the CPU fallback."""

from __future__ import annotations

import ctypes.util
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import tflite_builder as tb
from conftest import Assets

from edgefleet.runtime import (
    CpuDelegate,
    DelegateUnavailable,
    EdgeTpuDelegate,
    Engine,
    ExternalDelegate,
    GpuDelegate,
    ModelBytes,
    SettingError,
    parse_delegate,
    read_model,
    select_backend,
)
from edgefleet.runtime.delegates import load_delegate

pytestmark = pytest.mark.backend

_FAILING_DELEGATE_C = r"""
#include <stddef.h>
void* tflite_plugin_create_delegate(char** keys, char** values, size_t n,
                                    void (*report_error)(const char*)) {
  report_error(MESSAGE);
  return NULL;
}
void tflite_plugin_destroy_delegate(void* delegate) {}
"""


def compile_failing_delegate(directory: Path, message: str) -> Path:
    """Build a delegate library whose create call reports ``message`` and fails."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the stub delegate library (apt-get install gcc)")
    source = directory / "failing_delegate.c"
    source.write_text(_FAILING_DELEGATE_C)
    library = directory / "libfailing_delegate.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", f'-DMESSAGE="{message}"', "-o", str(library), str(source)],
        check=True,
    )
    return library


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cpu", CpuDelegate()),
        ("edgetpu", EdgeTpuDelegate()),
        ("edgetpu:usb", EdgeTpuDelegate(device="usb")),
        ("edgetpu:usb:1", EdgeTpuDelegate(device="usb:1")),
        ("edgetpu:pci:0", EdgeTpuDelegate(device="pci:0")),
        ("gpu", GpuDelegate()),
        (
            "external:/opt/libx.so,a=1,b=two",
            ExternalDelegate(library="/opt/libx.so", options={"a": "1", "b": "two"}),
        ),
    ],
)
def test_parse_delegate_accepts_the_documented_forms(text: str, expected: object) -> None:
    assert parse_delegate(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("tpu", "invalid delegate 'tpu'"),
        ("edgetpu:usb:x", "String should match pattern"),
        ("edgetpu:wifi", "String should match pattern"),
        ("external", "Field required"),
        ("external:/opt/libx.so,novalue", "invalid delegate option 'novalue'"),
        ("cpu:4", "takes no arguments"),
    ],
)
def test_parse_delegate_rejects_bad_forms_with_the_syntax(text: str, reason: str) -> None:
    with pytest.raises(SettingError, match=reason) as caught:
        parse_delegate(text)
    assert "edgetpu[:usb[:N]|:pci[:N]]" in caught.value.hint


@pytest.mark.skipif(
    ctypes.util.find_library("edgetpu") is not None, reason="an Edge TPU runtime is installed"
)
def test_missing_libedgetpu_is_named_with_install_hint() -> None:
    with pytest.raises(
        DelegateUnavailable, match=r"edgetpu \(usb:0\): cannot open libedgetpu.so.1"
    ) as e:
        load_delegate(EdgeTpuDelegate(device="usb:0"), select_backend())
    assert "libedgetpu1-std" in e.value.hint


def test_library_that_is_not_a_delegate_is_named() -> None:
    libc = ctypes.util.find_library("c")
    assert libc, "the C library is always present on Linux"

    with pytest.raises(DelegateUnavailable, match="is not a TFLite delegate") as caught:
        load_delegate(ExternalDelegate(library=libc), select_backend())
    assert "tflite_plugin_create_delegate" in str(caught.value)


def test_delegate_that_fails_to_initialise_names_the_backend(tmp_path: Path) -> None:
    # A real external delegate library whose create call fails, as libedgetpu's
    # does when no TPU is attached or it was built for another TFLite version.
    library = compile_failing_delegate(tmp_path, "no Edge TPU device found")
    backend = select_backend()

    with pytest.raises(DelegateUnavailable, match="failed to initialise") as caught:
        load_delegate(EdgeTpuDelegate(library=str(library), device="usb:0"), backend)
    assert "no Edge TPU device found" in caught.value.message
    assert backend.label in caught.value.hint


def test_fallback_to_cpu_only_where_allowed(caplog: pytest.LogCaptureFixture) -> None:
    settings = ExternalDelegate(library="libno-such-delegate.so", allow_cpu_fallback=True)
    caplog.set_level(logging.WARNING)

    loaded = load_delegate(settings, select_backend())

    assert loaded.handle is None
    assert loaded.description == "cpu (fallback: external (libno-such-delegate.so) unavailable)"
    assert "falling back to the CPU" in caplog.text


def test_engine_runs_on_cpu_after_allowed_fallback() -> None:
    model = ModelBytes.from_bytes(tb.reshape_model(2, 2), "fallback.tflite")
    settings = GpuDelegate(library="libno-such-gpu-delegate.so", allow_cpu_fallback=True)

    with Engine(model, delegate=settings) as engine:
        engine.invoke()
        assert engine.delegate.description.startswith("cpu (fallback: gpu")


def test_edgetpu_model_with_unavailable_tpu_and_fallback_still_refuses(assets: Assets) -> None:
    # Falling back to the CPU cannot help a model whose every op is compiled for the TPU.
    settings = EdgeTpuDelegate(library="libno-such-edgetpu.so.1", allow_cpu_fallback=True)

    with pytest.raises(Exception, match="Edge TPU") as caught:
        Engine(read_model(assets.edgetpu), delegate=settings)
    assert type(caught.value).__name__ == "ModelCompiledForEdgeTPU"
