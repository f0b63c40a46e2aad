"""Inspecting models from their flatbuffer alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import tflite_builder as tb
from conftest import Assets
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.runtime import (
    CorruptModel,
    ModelBytes,
    ModelError,
    ModelNotFound,
    NotATFLiteModel,
    inspect_model,
    read_model,
)


def test_inspect_reports_ssd_tensors_ops_and_hash(assets: Assets) -> None:
    info = inspect_model(read_model(assets.ssd))

    assert info.inputs[0].shape == (1, 300, 300, 3)
    assert info.inputs[0].dtype == "uint8"
    assert (info.inputs[0].scale, info.inputs[0].zero_point) == (0.0078125, 128)
    assert len(info.outputs) == 4
    assert "TFLite_Detection_PostProcess" in info.op_names
    assert "CONV_2D" in info.op_names
    assert info.sha256 == hashlib.sha256(assets.ssd.read_bytes()).hexdigest()
    assert info.size == assets.ssd.stat().st_size
    assert not info.edgetpu_compiled


def test_inspect_flags_edgetpu_model_and_reads_its_metadata_labels(assets: Assets) -> None:
    info = inspect_model(read_model(assets.edgetpu))

    assert info.edgetpu_compiled
    assert info.op_names == ("edgetpu-custom-op",)
    assert info.metadata_labels is not None
    assert len(info.metadata_labels) == 1001
    assert info.metadata_labels[0] == "background"
    assert info.outputs[0].shape == (1, 1001)


def test_inspect_reads_labels_packed_in_built_metadata() -> None:
    model = tb.with_label_metadata(tb.reshape_model(2, 2), ["zero", "one", "two"])

    info = inspect_model(ModelBytes.from_bytes(model, "meta.tflite"))

    assert info.metadata_labels == ("zero", "one", "two")


def test_model_without_metadata_has_no_labels(assets: Assets) -> None:
    assert inspect_model(read_model(assets.ssd)).metadata_labels is None


def test_to_dict_is_what_inspect_json_prints(assets: Assets) -> None:
    data = inspect_model(read_model(assets.mobilenet_v2)).to_dict()

    assert data["edgetpu_compiled"] is False
    assert data["inputs"][0] == {
        "name": "input",
        "shape": [1, 224, 224, 3],
        "dtype": "uint8",
        "scale": 0.0078125,
        "zero_point": 128,
    }
    assert data["outputs"][0]["shape"] == [1, 1001]
    assert data["metadata_label_count"] == 1001


def test_missing_path_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no such file"):
        read_model(tmp_path / "absent.tflite")


def test_directory_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="is a directory"):
        read_model(tmp_path)


def test_text_file_is_not_a_tflite_model(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("these are not the weights you are looking for\n")

    with pytest.raises(NotATFLiteModel, match="TFL3") as caught:
        read_model(text)
    assert "pass a .tflite file" in caught.value.hint


def test_empty_file_is_not_a_tflite_model(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tflite"
    empty.write_bytes(b"")

    with pytest.raises(NotATFLiteModel, match="only 0 bytes"):
        read_model(empty)


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_truncated_model_is_corrupt(assets: Assets, fraction: float) -> None:
    content = assets.ssd.read_bytes()
    truncated = ModelBytes.from_bytes(content[: int(len(content) * fraction)], "cut.tflite")

    with pytest.raises(CorruptModel, match="corrupt or truncated"):
        inspect_model(truncated)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=512))
def test_inspect_of_random_bytes_raises_only_model_errors(data: bytes) -> None:
    candidate = ModelBytes.from_bytes(data[:4] + b"TFL3" + data[4:], "random.tflite")
    assert_parses_or_names_the_problem(candidate)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_inspect_of_damaged_real_model_raises_only_model_errors(data: st.DataObject) -> None:
    model = bytearray(tb.reshape_model(4, 4, "uint8", tb.Quant(0.5, 3)))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(8, len(model) - 1))
        model[position] = data.draw(st.integers(0, 255))
    assert_parses_or_names_the_problem(ModelBytes.from_bytes(bytes(model), "damaged.tflite"))


def assert_parses_or_names_the_problem(model: ModelBytes) -> None:
    """Bytes from outside may be anything: the only acceptable failure is a ModelError."""
    try:
        info = inspect_model(model)
    except ModelError as exc:
        assert exc.path == model.source
        assert exc.hint
    else:
        assert info.size == model.size
