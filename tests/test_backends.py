"""Choosing between LiteRT and tflite-runtime."""

from __future__ import annotations

import importlib.util
import os

import pytest

from edgefleet.runtime import (
    BACKEND_ENV,
    BackendName,
    BackendUnavailable,
    SettingError,
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
