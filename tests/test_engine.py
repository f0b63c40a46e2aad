"""Loading models into the real interpreter, and every way that can fail."""

from __future__ import annotations

import numpy as np
import pytest
import tflite_builder as tb
from conftest import Assets

from edgefleet.runtime import (
    CorruptModel,
    Engine,
    InputMismatch,
    ModelBytes,
    ModelCompiledForEdgeTPU,
    TensorAllocationFailed,
    UnresolvedCustomOp,
    read_model,
    select_backend,
)

pytestmark = pytest.mark.backend


def built(content: bytes, name: str = "built.tflite") -> ModelBytes:
    return ModelBytes.from_bytes(content, name)


def test_engine_reports_tensors_from_the_interpreter(assets: Assets) -> None:
    with Engine(read_model(assets.mobilenet_v2), threads=2) as engine:
        assert engine.inputs[0].shape == (1, 224, 224, 3)
        assert engine.outputs[0].shape == (1, 1001)
        assert engine.outputs[0].scale == pytest.approx(1 / 256)
        assert engine.load_ms > 0
        assert engine.backend.label in engine.description
        assert "2 threads" in engine.description


def test_engine_uses_the_selected_backend() -> None:
    with Engine(built(tb.reshape_model(2, 2))) as engine:
        assert engine.backend == select_backend()


def test_edgetpu_model_without_delegate_names_the_edge_tpu(assets: Assets) -> None:
    with pytest.raises(ModelCompiledForEdgeTPU) as caught:
        Engine(read_model(assets.edgetpu))

    assert "Edge TPU" in caught.value.message
    assert "--delegate edgetpu" in caught.value.hint
    assert "libedgetpu" in caught.value.hint


def test_interpreter_failure_on_edgetpu_op_is_translated() -> None:
    # A built model that the flatbuffer check cannot flag up front: the op code
    # only shows at interpreter construction, and must still become the named error.
    with pytest.raises(ModelCompiledForEdgeTPU):
        Engine(built(tb.custom_op_model("edgetpu-custom-op")))


def test_unresolved_custom_op_is_named(assets: Assets) -> None:
    with pytest.raises(UnresolvedCustomOp) as caught:
        Engine(read_model(assets.invoking_error))

    assert caught.value.op == "fake-op-double"
    assert "'fake-op-double'" in str(caught.value)


def test_truncated_model_fails_as_corrupt_not_a_crash(assets: Assets) -> None:
    content = assets.mobilenet_v2.read_bytes()

    with pytest.raises(CorruptModel):
        Engine(built(content[: len(content) // 2], "half.tflite"))


def test_tensor_allocation_failure_is_named() -> None:
    bad_reshape = tb.reshape_model(2, 2, target=(1, 5))

    with pytest.raises(TensorAllocationFailed, match="allocation failed"):
        Engine(built(bad_reshape))


def test_set_input_rejects_wrong_shape_and_dtype() -> None:
    with Engine(built(tb.reshape_model(2, 3))) as engine:
        with pytest.raises(InputMismatch, match=r"\[1, 2, 3, 3\] uint8, got \[1, 3, 2, 3\]"):
            engine.set_input(np.zeros((1, 3, 2, 3), np.uint8))
        with pytest.raises(InputMismatch, match="got \\[1, 2, 3, 3\\] float32"):
            engine.set_input(np.zeros((1, 2, 3, 3), np.float32))


def test_set_input_and_invoke_round_trip_through_the_interpreter() -> None:
    data = np.arange(18, dtype=np.uint8).reshape(1, 2, 3, 3)
    with Engine(built(tb.reshape_model(2, 3))) as engine:
        engine.set_input(data)
        latency_ms = engine.invoke()

        assert latency_ms >= 0
        np.testing.assert_array_equal(engine.output(), data.reshape(1, 18))
