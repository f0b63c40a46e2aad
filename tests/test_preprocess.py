"""Pre-processing: exactly what ends up in the input tensor, read back through a reshape model."""

from __future__ import annotations

import numpy as np
import pytest
import tflite_builder as tb

from edgefleet.runtime import Engine, InputMismatch, ModelBytes, Preprocessor, ResizeMode, Transform

pytestmark = pytest.mark.backend


def engine_for(height: int, width: int, dtype: str, quant: tb.Quant | None = None) -> Engine:
    model = tb.reshape_model(height, width, dtype, quant)
    return Engine(ModelBytes.from_bytes(model, f"{dtype}.tflite"))


def written(engine: Engine, frame: np.ndarray, resize: ResizeMode) -> tuple[np.ndarray, Transform]:
    """Pre-process ``frame``, run the reshape model, and return the input it saw as [H, W, 3]."""
    pre = Preprocessor(engine.inputs[0], resize=resize)
    transform = engine.write_input(lambda view: pre(frame, view))
    engine.invoke()
    return engine.output().reshape(engine.inputs[0].shape[1:]), transform


def gradient(height: int, width: int) -> np.ndarray:
    return np.arange(height * width * 3, dtype=np.uint32).reshape(height, width, 3).astype(np.uint8)


def test_frame_at_model_size_is_copied_unchanged() -> None:
    frame = gradient(4, 6)
    with engine_for(4, 6, "uint8", tb.Quant(1 / 128, 128)) as engine:
        seen, transform = written(engine, frame, ResizeMode.STRETCH)

    np.testing.assert_array_equal(seen, frame)
    assert transform == Transform()


def test_int8_input_gets_pixels_minus_128() -> None:
    frame = gradient(4, 6)
    with engine_for(4, 6, "int8", tb.Quant(1 / 128, 0)) as engine:
        seen, _ = written(engine, frame, ResizeMode.STRETCH)

    np.testing.assert_array_equal(seen.astype(np.int16), frame.astype(np.int16) - 128)


def test_float_input_is_normalised_to_minus_one_one() -> None:
    frame = np.array([[[0, 127, 255]]], dtype=np.uint8)
    with engine_for(1, 1, "float32") as engine:
        seen, _ = written(engine, frame, ResizeMode.STRETCH)

    np.testing.assert_allclose(seen[0, 0], [-1.0, -0.5 / 127.5, 1.0], atol=1e-6)


def test_stretch_fills_the_whole_input() -> None:
    frame = np.full((10, 40, 3), 200, dtype=np.uint8)
    with engine_for(8, 8, "uint8") as engine:
        seen, transform = written(engine, frame, ResizeMode.STRETCH)

    assert (seen == 200).all()
    assert transform == Transform()


def test_letterbox_pads_top_and_bottom_of_a_wide_frame() -> None:
    frame = np.full((10, 40, 3), 200, dtype=np.uint8)  # 4:1 into 8x8: 8x2 image, 3 rows pad
    with engine_for(8, 8, "uint8") as engine:
        seen, transform = written(engine, frame, ResizeMode.LETTERBOX)

    assert (seen[:3] == 0).all()
    assert (seen[3:5] == 200).all()
    assert (seen[5:] == 0).all()
    assert transform.offset_y == pytest.approx(3 / 8)
    assert transform.scale_y == pytest.approx(8 / 2)
    assert (transform.offset_x, transform.scale_x) == (0.0, 1.0)


def test_letterbox_pads_int8_with_black_too() -> None:
    frame = np.full((40, 10, 3), 255, dtype=np.uint8)
    with engine_for(8, 8, "int8", tb.Quant(1 / 128, 0)) as engine:
        seen, _ = written(engine, frame, ResizeMode.LETTERBOX)

    assert (seen[:, :3] == -128).all()
    assert (seen[:, 3:5] == 127).all()


def test_letterbox_transform_maps_the_image_area_back_to_the_whole_frame() -> None:
    transform = Transform(offset_y=3 / 8, scale_y=4.0)

    assert transform.box(3 / 8, 0.0, 5 / 8, 1.0) == pytest.approx((0.0, 0.0, 1.0, 1.0))
    assert transform.point(0.5, 0.25) == pytest.approx((0.5, 0.25))
    assert transform.point(0.0, 0.0) == (0.0, 0.0)  # padding clips to the frame edge


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros((4, 4), np.uint8),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((4, 4, 3), np.float32),
    ],
    ids=["grey", "rgba", "float"],
)
def test_frame_that_is_not_8bit_rgb_is_rejected(frame: np.ndarray) -> None:
    with engine_for(4, 4, "uint8") as engine:
        pre = Preprocessor(engine.inputs[0])
        with pytest.raises(InputMismatch, match="HxWx3 uint8 RGB"):
            engine.write_input(lambda view: pre(frame, view))
