"""What used to go wrong silently, now loud: wrong task overrides, label files of another
model, sideways photos, inputs nobody feeds, Edge TPU files on a machine without one."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tflite_builder as tb
from conftest import Assets
from PIL import Image
from test_cli import assert_clean_failure, edgefleet, json_lines

from edgefleet.runtime import (
    Labels,
    ModelCompiledForEdgeTPU,
    Predictor,
    SettingError,
    UnsupportedModel,
    choose_task,
    inspect_model,
    load_image,
    read_model,
)
from edgefleet.runtime.delegates import EdgeTpuDelegate

pytestmark = pytest.mark.backend

EXIF_ORIENTATION = 0x0112
ROTATED_90_CW = 6  # "turn the stored pixels 90 degrees clockwise to view them"


@pytest.mark.parametrize(
    ("model", "task", "needed"),
    [
        ("deeplabv3_mnv2_pascal_quant.tflite", "classification", "one score vector output [1, N]"),
        ("mobilenet_v2_1.0_224_quant.tflite", "pose", "one keypoint output [1, 1, 17, 3]"),
        ("mobilenet_v2_1.0_224_quant.tflite", "detection", "a YOLO output [1, 4+C, N]"),
        ("mobilenet_v2_1.0_224_quant.tflite", "segmentation", "[1, H, W] class ids"),
    ],
)
def test_a_task_override_that_does_not_fit_is_refused_with_the_shapes(
    assets: Assets, model: str, task: str, needed: str
) -> None:
    path = assets.model(model)
    actual = str([list(t.shape) for t in inspect_model(read_model(path)).outputs])

    with pytest.raises(UnsupportedModel) as caught:
        Predictor.open(path, task=task)

    assert needed in caught.value.message
    assert actual in caught.value.message
    assert choose_task(inspect_model(read_model(path))).name.value in caught.value.hint


def test_the_cli_refuses_a_wrong_override_in_words(assets: Assets) -> None:
    result = edgefleet(
        "model", "run", assets.model("deeplabv3_mnv2_pascal_quant.tflite"),
        assets.image("cat.bmp"), "--task", "classification",
    )  # fmt: skip

    assert_clean_failure(result, "classification needs one score vector", "[[1, 513, 513]]")


def test_a_label_file_of_another_length_is_a_warning_naming_both_counts(
    assets: Assets, caplog: pytest.LogCaptureFixture
) -> None:
    coco80 = Labels.from_file(assets.model("coco80_labels.txt"))
    with caplog.at_level(logging.WARNING), Predictor.open(assets.mobilenet_v2, labels=coco80):
        pass

    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "has 80 labels" in warning
    assert "has 1001 classes" in warning


def test_matching_label_files_and_the_placeholder_convention_give_no_warning(
    assets: Assets, imagenet_labels: Labels, caplog: pytest.LogCaptureFixture
) -> None:
    ssd_style = Labels.from_file(assets.coco_labels)  # '???' first, 90 classes
    with caplog.at_level(logging.WARNING):
        Predictor.open(assets.mobilenet_v2, labels=imagenet_labels).close()
        Predictor.open(assets.ssd, labels=ssd_style).close()

    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_one_line_short_label_file_names_the_background_convention(
    assets: Assets, imagenet_labels: Labels, caplog: pytest.LogCaptureFixture
) -> None:
    without_background = Labels({i - 1: n for i, n in imagenet_labels.names.items() if i})
    with caplog.at_level(logging.WARNING):
        Predictor.open(assets.mobilenet_v2, labels=without_background).close()

    assert "1000 labels" in caplog.text
    assert "'background'" in caplog.text


def test_a_sideways_phone_photo_is_scored_like_the_upright_one(
    assets: Assets, imagenet_labels: Labels, tmp_path: Path
) -> None:
    upright = Image.open(assets.image("parrot.jpg")).convert("RGB")
    upright_file, sideways_file = tmp_path / "upright.jpg", tmp_path / "sideways.jpg"
    upright.save(upright_file, quality=95)
    # What a phone held sideways stores: the pixels turned, and a tag saying how to view them.
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90_CW
    upright.transpose(Image.Transpose.ROTATE_90).save(sideways_file, quality=95, exif=exif)

    assert load_image(sideways_file).shape == load_image(upright_file).shape
    with Predictor.open(assets.mobilenet_v2, labels=imagenet_labels, threads=2) as predictor:
        scores = [
            predictor.predict(load_image(f)).results[0] for f in (upright_file, sideways_file)
        ]

    assert scores[0].label == scores[1].label == "macaw"
    assert scores[1].score == pytest.approx(scores[0].score, abs=0.02)


def test_an_input_nobody_feeds_is_reported_and_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "image_and_state.tflite"
    model.write_bytes(tb.image_and_state_model())
    with caplog.at_level(logging.WARNING), Predictor.open(model, task="raw") as predictor:
        feeds = {f.name: f for f in predictor.inputs}

    assert feeds["image"].source.startswith("the frame: RGB 4x4")
    assert feeds["state"].zero_filled
    assert "input 'state' [1, 4, 4, 3] float32 gets zeros" in caplog.text
    assert "--input state=FILE.npy" in caplog.text


def test_an_input_fed_from_a_file_is_used_and_said(assets: Assets, tmp_path: Path) -> None:
    model = tmp_path / "image_and_state.tflite"
    model.write_bytes(tb.image_and_state_model())
    state = tmp_path / "state.npy"
    np.save(state, np.full((1, 4, 4, 3), 1000.0, dtype=np.float32))

    result = edgefleet(
        "model", "run", model, assets.image("cat.bmp"), "--task", "raw",
        "--input", f"state={state}", "--normalize", "0,1", "--json",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    (record,) = json_lines(result.stdout)
    values = np.asarray(record["tensors"][0]["values"])
    assert values.min() >= 1000.0  # the pixels (0..255) plus the file's 1000
    assert "gets zeros" not in result.stderr


def test_a_model_without_image_inputs_runs_from_files_alone(tmp_path: Path) -> None:
    model = tmp_path / "two_inputs.tflite"
    model.write_bytes(tb.two_output_model(size=4))
    x, y = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(x, np.array([[1.0, 2.0, 3.0, 4.0]]))  # float64: cast to the input's float32
    np.save(y, np.array([[10.0, 20.0, 30.0, 40.0]], dtype=np.float32))

    result = edgefleet("model", "run", model, "--input", f"x={x}", "--input", f"y={y}", "--json")

    assert result.returncode == 0, result.stderr
    (record,) = json_lines(result.stdout)
    sums, products = (t["values"] for t in record["tensors"])
    assert sums == [[11.0, 22.0, 33.0, 44.0]]
    assert products == [[10.0, 40.0, 90.0, 160.0]]


def test_a_non_image_input_without_a_file_is_refused_with_the_flag_to_use(tmp_path: Path) -> None:
    model = tmp_path / "two_inputs.tflite"
    model.write_bytes(tb.two_output_model(size=4))

    result = edgefleet("model", "run", model, tmp_path / "unused.png", "--task", "raw")

    assert_clean_failure(result, "input 'x' has shape [1, 4]", "--input x=FILE.npy")


def test_an_input_file_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "two_inputs.tflite"
    model.write_bytes(tb.two_output_model(size=4))
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((1, 5), dtype=np.float32))

    result = edgefleet("model", "run", model, "--input", f"x={bad}", "--input", f"y={bad}")

    assert_clean_failure(result, "input 'x' expects shape [1, 4] float32, got [1, 5] float32")


def test_outputs_carried_to_inputs_accumulate_over_frames(tmp_path: Path) -> None:
    model = tmp_path / "image_and_state.tflite"
    model.write_bytes(tb.image_and_state_model())
    frame = np.full((4, 4, 3), 10, dtype=np.uint8)
    with Predictor.open(model, task="raw", carry={"state": "sum"}) as predictor:
        pre = predictor.preprocess
        assert pre is not None
        one = (10.0 - pre.mean[0]) / pre.std[0]
        sums = [predictor.predict(frame).results[0].values[0][0][0][0] for _ in range(3)]
        feeds = {f.name: f.source for f in predictor.inputs}

    assert sums == pytest.approx([one, 2 * one, 3 * one])
    assert feeds["state"] == "output 'sum' of the previous frame (zeros at first)"


def test_the_grayscale_photo_runs_through_a_one_channel_model(
    assets: Assets, tmp_path: Path
) -> None:
    model = tmp_path / "gray.tflite"
    model.write_bytes(tb.reshape_model(8, 8, channels=1))
    camera = assets.image("camera.png")
    expected = np.asarray(Image.open(camera).convert("L").resize((8, 8), Image.Resampling.BICUBIC))

    result = edgefleet("model", "run", model, camera, "--task", "raw", "--json")

    assert result.returncode == 0, result.stderr
    (record,) = json_lines(result.stdout)
    assert np.asarray(record["tensors"][0]["values"]).reshape(8, 8).tolist() == expected.tolist()
    assert record["inputs"]["image"].startswith("the frame: grayscale 8x8")


def test_inspect_says_which_task_and_why_and_what_each_input_gets(assets: Assets) -> None:
    result = edgefleet("model", "inspect", assets.ssd)

    assert result.returncode == 0, result.stderr
    assert "task           detection: SSD: the graph ends in TFLite_Detection_PostProcess" in (
        result.stdout
    )
    assert "receives     normalized_input_image_tensor: the frame: RGB 300x300, stretch" in (
        result.stdout
    )


def test_inspect_names_a_custom_op_the_runtime_cannot_resolve(assets: Assets) -> None:
    result = edgefleet("model", "inspect", assets.invoking_error, "--json")

    assert result.returncode == 0, result.stderr
    (record,) = json_lines(result.stdout)
    assert record["custom_ops"] == {
        "fake-op-double": "NOT resolved by this runtime: the model cannot run here"
    }


def test_the_edge_tpu_hint_names_the_cpu_build(assets: Assets, tmp_path: Path) -> None:
    with pytest.raises(ModelCompiledForEdgeTPU) as named:
        Predictor.open(assets.edgetpu)
    renamed = tmp_path / "shop_classifier.tflite"
    shutil.copyfile(assets.edgetpu, renamed)
    with pytest.raises(ModelCompiledForEdgeTPU) as anonymous:
        Predictor.open(renamed)

    assert "'mobilenet_v1_0.25_128_quant.tflite'" in named.value.hint
    assert "its name does not say which" in anonymous.value.hint
    assert "shop_classifier.tflite" in anonymous.value.hint


def test_cpu_fallback_on_an_edge_tpu_model_says_a_cpu_build_is_needed(assets: Assets) -> None:
    # No Edge TPU (nor libedgetpu) on this machine: the fallback is all that could happen.
    with pytest.raises(ModelCompiledForEdgeTPU) as caught:
        Predictor.open(assets.edgetpu, delegate=EdgeTpuDelegate(allow_cpu_fallback=True))

    assert "--allow-cpu-fallback cannot run it" in caught.value.message
    assert "'mobilenet_v1_0.25_128_quant.tflite'" in caught.value.hint


def test_an_input_or_carried_output_the_model_lacks_is_named_with_the_real_ones(
    tmp_path: Path,
) -> None:
    model = tmp_path / "image_and_state.tflite"
    model.write_bytes(tb.image_and_state_model())
    values = tmp_path / "v.npy"
    np.save(values, np.zeros((1, 4, 4, 3), dtype=np.float32))

    result = edgefleet("model", "run", model, "--input", f"hidden={values}")
    with pytest.raises(SettingError) as carried:
        Predictor.open(model, task="raw", carry={"state": "state_out"})

    assert_clean_failure(result, "has no input 'hidden'", "its inputs are: image, state")
    assert "has no output 'state_out'" in carried.value.message
    assert carried.value.hint == "its outputs are: sum"
