"""Anchor detectors (MediaPipe BlazeFace, BlazePalm) on the real models, against the assets
README, and their decoding and weighted NMS on crafted arrays."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import Assets

from edgefleet.runtime import (
    Detection,
    Engine,
    Labels,
    Predictor,
    SettingError,
    UnsupportedModel,
    inspect_model,
    load_image,
    read_model,
)
from edgefleet.runtime.anchors import (
    ANCHOR_PRESETS,
    AnchorDetectionTask,
    AnchorSpec,
    anchor_spec_for,
    anchors,
    decode,
    weighted_nms,
)
from edgefleet.runtime.preprocess import Frame

pytestmark = pytest.mark.backend

FACE_MODEL = "mediapipe_face_detection_short_range.tflite"
PALM_MODEL = "mediapipe_palm_detection_lite.tflite"
FACE = ANCHOR_PRESETS["mediapipe-face-short-range"]
PALM = ANCHOR_PRESETS["mediapipe-palm-lite"]
# MediaPipe's face keypoint order.
RIGHT_EYE, LEFT_EYE, NOSE, MOUTH = 0, 1, 2, 3
IMAGES = (
    "grace_hopper.bmp",
    "astronaut.png",
    "cat.bmp",
    "kite_and_cold.jpg",
    "camera.png",
    "parrot.jpg",
)


def predictor_for(path: Path, spec: AnchorSpec) -> Predictor:
    return Predictor(Engine(read_model(path), threads=2), AnchorDetectionTask(spec))


@pytest.fixture(scope="module")
def face_detector(assets: Assets) -> Iterator[Predictor]:
    with predictor_for(assets.model(FACE_MODEL), FACE) as predictor:
        yield predictor


@pytest.fixture(scope="module")
def palm_detector(assets: Assets) -> Iterator[Predictor]:
    with predictor_for(assets.model(PALM_MODEL), PALM) as predictor:
        yield predictor


@pytest.fixture(scope="module")
def frame(assets: Assets) -> dict[str, Frame]:
    """The images these tests use, decoded once, by file name."""
    return {name: load_image(assets.image(name)) for name in IMAGES}


def only_detections(results: Sequence[object]) -> list[Detection]:
    detections = [r for r in results if isinstance(r, Detection)]
    assert len(detections) == len(results)
    return detections


# --- anchors --------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "count"), [(FACE, 896), (PALM, 2016)])
def test_presets_have_mediapipe_anchor_counts(spec: AnchorSpec, count: int) -> None:
    assert anchors(spec).shape == (count, 2)
    assert spec.count == count


def test_equal_strides_share_one_grid_with_two_anchors_per_layer() -> None:
    centres = anchors(FACE)

    # Stride 8: a 16x16 grid, 2 anchors per cell, row by row, centres at (x + 0.5) / 16.
    assert centres[0].tolist() == centres[1].tolist() == [0.5 / 16, 0.5 / 16]
    assert centres[2].tolist() == [1.5 / 16, 0.5 / 16]
    assert centres[2 * 16].tolist() == [0.5 / 16, 1.5 / 16]
    # Strides 16, 16, 16 merged: an 8x8 grid, 6 anchors per cell, from anchor 512 on.
    stride_16 = centres[512:]
    assert stride_16[:6].tolist() == [[0.5 / 8, 0.5 / 8]] * 6
    assert stride_16[6].tolist() == [1.5 / 8, 0.5 / 8]
    assert stride_16[-1].tolist() == [7.5 / 8, 7.5 / 8]


@pytest.mark.parametrize(("model", "spec"), [(FACE_MODEL, FACE), (PALM_MODEL, PALM)])
def test_anchor_models_are_recognised_by_their_outputs(
    assets: Assets, model: str, spec: AnchorSpec
) -> None:
    assert anchor_spec_for(inspect_model(read_model(assets.model(model)))) == spec


def test_ssd_and_classifier_are_not_anchor_models(assets: Assets) -> None:
    assert anchor_spec_for(inspect_model(read_model(assets.ssd))) is None
    assert anchor_spec_for(inspect_model(read_model(assets.mobilenet_v2))) is None


# --- decoding and weighted NMS on crafted arrays --------------------------------------


def crafted_outputs(spec: AnchorSpec) -> tuple[np.ndarray, np.ndarray]:
    """Outputs in which no anchor fires: zero offsets, logits far below the threshold."""
    regressors = np.zeros((1, spec.count, spec.regressor_width), dtype=np.float32)
    logits = np.full((1, spec.count, 1), -50.0, dtype=np.float32)
    return regressors, logits


def test_decode_adds_offsets_in_input_pixels_to_the_anchor_centre() -> None:
    regressors, logits = crafted_outputs(FACE)
    anchor = 512 + 6 * (8 * 3 + 2)  # stride-16 grid, cell x=2, y=3: centre (2.5/8, 3.5/8)
    regressors[0, anchor, :6] = [6.4, -12.8, 25.6, 38.4, 12.8, 0.0]  # 128 px = 1.0
    logits[0, anchor, 0] = 2.0

    (found,) = decode(FACE, regressors, logits)

    centre_x, centre_y = 2.5 / 8 + 0.05, 3.5 / 8 - 0.1
    expected = (centre_y - 0.15, centre_x - 0.1, centre_y + 0.15, centre_x + 0.1)
    assert found.box == pytest.approx(expected, abs=1e-6)
    assert found.score == pytest.approx(1 / (1 + math.exp(-2.0)), abs=1e-6)
    assert len(found.keypoints) == FACE.num_keypoints
    assert found.keypoints[0] == pytest.approx((2.5 / 8 + 0.1, 3.5 / 8), abs=1e-6)


def test_decode_clips_huge_logits_and_drops_low_scores() -> None:
    regressors, logits = crafted_outputs(FACE)
    regressors[0, :, 2:4] = 12.8  # every box 0.1 wide and high
    logits[0, 0, 0] = 1e6  # clipped to 100: a score of 1, no overflow
    logits[0, 400, 0] = -0.1  # just below 0.5

    found = decode(FACE, regressors, logits)

    assert [d.score for d in found] == [1.0]
    assert decode(FACE, regressors, logits, min_score=0.4)[1].score < 0.5


def test_weighted_nms_merges_overlapping_candidates_and_keeps_a_far_one() -> None:
    boxes = np.array(
        [
            [0.10, 0.10, 0.50, 0.50],  # best
            [0.14, 0.12, 0.54, 0.52],  # IoU ~0.8 with the best: merged into it
            [0.60, 0.60, 0.90, 0.90],  # no overlap: its own detection
        ]
    )
    scores = np.array([0.9, 0.6, 0.7])
    keypoints = np.array([[[0.2, 0.2]], [[0.3, 0.4]], [[0.7, 0.7]]])

    merged, far = weighted_nms(boxes, scores, keypoints, threshold=0.3)

    assert merged.score == 0.9
    assert merged.box == pytest.approx((0.9 * boxes[0] + 0.6 * boxes[1]) / 1.5)
    assert merged.keypoints[0] == pytest.approx((0.24, 0.28))
    assert far.score == 0.7
    assert far.box == pytest.approx(boxes[2])


def test_weighted_nms_keeps_at_most_max_results() -> None:
    boxes = np.array([[0.0, 0.0, 0.1, 0.1], [0.5, 0.5, 0.6, 0.6], [0.8, 0.8, 0.9, 0.9]])
    scores = np.array([0.6, 0.9, 0.7])

    found = weighted_nms(boxes, scores, np.zeros((3, 0, 2)), threshold=0.3, max_results=2)

    assert [d.score for d in found] == [0.9, 0.7]


def test_label_file_names_class_zero_else_the_preset_does() -> None:
    assert AnchorDetectionTask(FACE).label == "face"
    assert AnchorDetectionTask(PALM).label == "palm"
    assert AnchorDetectionTask(FACE, Labels({0: "person"})).label == "person"


# --- the real models on the real images (assets README) -------------------------------


@pytest.mark.parametrize(
    ("image", "score", "box"),
    [
        ("grace_hopper.bmp", 0.90, (0.24, 0.35, 0.58, 0.70)),
        ("astronaut.png", 0.92, (0.16, 0.35, 0.35, 0.54)),
    ],
)
def test_face_detector_finds_the_one_face(
    face_detector: Predictor,
    frame: dict[str, Frame],
    image: str,
    score: float,
    box: tuple[float, ...],
) -> None:
    (face,) = only_detections(face_detector.predict(frame[image]).results)

    assert face.label == "face"
    assert face.class_id == 0
    assert face.score == pytest.approx(score, abs=0.03)
    assert face.box == pytest.approx(box, abs=0.05)


@pytest.mark.parametrize("image", ["cat.bmp", "kite_and_cold.jpg"])
def test_face_detector_finds_no_face_where_there_is_none(
    face_detector: Predictor, frame: dict[str, Frame], image: str
) -> None:
    assert face_detector.predict(frame[image]).results == []


@pytest.mark.parametrize("image", ["grace_hopper.bmp", "astronaut.png"])
def test_face_keypoints_lie_in_the_box_with_the_eyes_above_the_mouth(
    face_detector: Predictor, frame: dict[str, Frame], image: str
) -> None:
    (face,) = only_detections(face_detector.predict(frame[image]).results)
    ymin, xmin, ymax, xmax = face.box
    margin = 0.02

    assert len(face.keypoints) == 6
    for x, y in face.keypoints:
        assert xmin - margin <= x <= xmax + margin
        assert ymin - margin <= y <= ymax + margin
    mouth_y = face.keypoints[MOUTH][1]
    assert face.keypoints[RIGHT_EYE][1] < mouth_y
    assert face.keypoints[LEFT_EYE][1] < mouth_y


@pytest.mark.parametrize("image", ["camera.png", "parrot.jpg", "grace_hopper.bmp"])
def test_palm_detector_runs_and_its_boxes_lie_in_the_frame(
    palm_detector: Predictor, frame: dict[str, Frame], image: str
) -> None:
    palms = only_detections(palm_detector.predict(frame[image]).results)

    for palm in palms:
        ymin, xmin, ymax, xmax = palm.box
        assert 0.0 <= ymin <= ymax <= 1.0
        assert 0.0 <= xmin <= xmax <= 1.0
        assert palm.label == "palm"
        assert len(palm.keypoints) == 7


def test_a_preset_made_for_another_model_is_refused_naming_the_shapes(
    assets: Assets, frame: dict[str, Frame]
) -> None:
    with (
        predictor_for(assets.model(FACE_MODEL), PALM) as predictor,
        pytest.raises(UnsupportedModel, match=r"\[1, 2016, 18\].*\[1, 896, 16\]"),
    ):
        predictor.predict(frame["grace_hopper.bmp"])


def test_a_declared_anchor_layout_decodes_as_the_preset(assets: Assets) -> None:
    model = assets.model("mediapipe_face_detection_short_range.tflite")
    frame = load_image(assets.image("grace_hopper.bmp"))
    with (
        Predictor.open(model, threads=2) as preset,
        Predictor.open(model, threads=2, anchors="8,16,16,16@2") as declared,
    ):
        (by_preset,) = preset.predict(frame).results
        (by_declaration,) = declared.predict(frame).results

    assert isinstance(by_preset, Detection)
    assert isinstance(by_declaration, Detection)
    assert by_declaration.box == by_preset.box
    assert by_declaration.score == by_preset.score
    assert by_declaration.label == "object"  # no preset, no label file: nothing more is known


def test_a_declared_layout_with_another_anchor_count_is_refused_with_both(assets: Assets) -> None:
    model = assets.model("mediapipe_face_detection_short_range.tflite")

    with pytest.raises(SettingError) as refused:
        Predictor.open(model, anchors="16@2")

    assert "gives 128 anchors" in refused.value.message
    assert "has 896 of 16" in refused.value.message
