"""Tasks on the real models and images, against the results in the assets README."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tflite_builder as tb
from conftest import Assets

from edgefleet.runtime import (
    Classification,
    Detection,
    Keypoint,
    Labels,
    ModelBytes,
    Predictor,
    RawTensor,
    ResizeMode,
    SettingError,
    TaskName,
    UnsupportedModel,
    detect_task,
    inspect_model,
    read_model,
)
from edgefleet.runtime.preprocess import Frame

pytestmark = pytest.mark.backend


@pytest.fixture(scope="module")
def detector(ssd_model: ModelBytes, coco_labels: Labels) -> Predictor:
    return Predictor.open(ssd_model, labels=coco_labels, threads=2)


@pytest.fixture(scope="module")
def classifier(assets: Assets, imagenet_labels: Labels) -> Predictor:
    return Predictor.open(assets.mobilenet_v2, labels=imagenet_labels, threads=2)


def labels_of(detections: list) -> dict[str, float]:
    """Best score per label."""
    best: dict[str, float] = {}
    for d in detections:
        assert isinstance(d, Detection)
        best[d.label] = max(best.get(d.label, 0.0), d.score)
    return best


def test_tasks_are_detected_from_the_models(assets: Assets) -> None:
    assert detect_task(inspect_model(read_model(assets.ssd))) is TaskName.DETECTION
    assert detect_task(inspect_model(read_model(assets.mobilenet_v2))) is TaskName.CLASSIFICATION
    assert detect_task(inspect_model(read_model(assets.movenet))) is TaskName.POSE
    two_outputs = ModelBytes.from_bytes(tb.two_output_model(), "two.tflite")
    assert detect_task(inspect_model(two_outputs)) is TaskName.RAW


def test_detector_finds_person_and_tie_on_grace_hopper(
    detector: Predictor, images: dict[str, Frame]
) -> None:
    found = labels_of(detector.predict(images["grace_hopper.bmp"]).results)

    assert found["person"] == pytest.approx(0.71, abs=0.04)
    assert found["tie"] >= 0.6


@pytest.mark.parametrize(
    ("image", "label", "score"), [("cat.bmp", "cat", 0.73), ("parrot.jpg", "bird", 0.81)]
)
def test_detector_top_label_matches_reference(
    detector: Predictor, images: dict[str, Frame], image: str, label: str, score: float
) -> None:
    results = detector.predict(images[image]).results

    top = max(results, key=lambda d: d.score)
    assert isinstance(top, Detection)
    assert top.label == label
    assert top.score == pytest.approx(score, abs=0.04)


def test_detector_finds_several_people_and_kites(
    detector: Predictor, images: dict[str, Frame]
) -> None:
    labels = [d.label for d in detector.predict(images["kite_and_cold.jpg"]).results]

    assert labels.count("person") >= 2
    assert labels.count("kite") >= 2


def test_detection_boxes_are_normalised_and_ordered(
    detector: Predictor, images: dict[str, Frame]
) -> None:
    for d in detector.predict(images["kite_and_cold.jpg"]).results:
        assert isinstance(d, Detection)
        ymin, xmin, ymax, xmax = d.box
        assert 0.0 <= ymin <= ymax <= 1.0
        assert 0.0 <= xmin <= xmax <= 1.0
        assert d.score >= 0.5


def test_coco_class_ids_skip_the_placeholder_line(
    detector: Predictor, images: dict[str, Frame], coco_labels: Labels
) -> None:
    person = next(
        d
        for d in detector.predict(images["grace_hopper.bmp"]).results
        if isinstance(d, Detection) and d.label == "person"
    )

    assert person.class_id == 0
    assert coco_labels.name(0) == "???"
    assert coco_labels.name(person.class_id + 1) == "person"


def test_letterboxed_detection_maps_boxes_back_to_the_frame(
    ssd_model: ModelBytes, coco_labels: Labels, images: dict[str, Frame]
) -> None:
    frame = images["kite_and_cold.jpg"]
    with Predictor.open(ssd_model, labels=coco_labels, resize=ResizeMode.LETTERBOX) as predictor:
        prediction = predictor.predict(frame)

    assert prediction.transform.offset_y > 0  # 1352x900 is wider than 300x300
    assert {"person", "kite"} <= {d.label for d in prediction.results if isinstance(d, Detection)}
    for d in prediction.results:
        assert isinstance(d, Detection)
        assert 0.0 <= d.box[0] <= d.box[2] <= 1.0


@pytest.mark.parametrize(
    ("image", "index", "label", "score"),
    [
        ("parrot.jpg", 89, "macaw", 0.996),
        ("grace_hopper.bmp", 653, "military uniform", 0.89),
        ("cat.bmp", 286, "Egyptian cat", 0.76),
    ],
)
def test_classifier_top1_matches_reference(
    classifier: Predictor,
    images: dict[str, Frame],
    image: str,
    index: int,
    label: str,
    score: float,
) -> None:
    top = classifier.predict(images[image]).results[0]

    assert isinstance(top, Classification)
    assert (top.index, top.label) == (index, label)
    assert top.score == pytest.approx(score, abs=0.05)


def test_classifier_scores_are_dequantized_and_sorted(
    classifier: Predictor, images: dict[str, Frame]
) -> None:
    results = classifier.predict(images["cat.bmp"]).results

    scores = [r.score for r in results if isinstance(r, Classification)]
    assert len(scores) == 5
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_classifier_uses_labels_from_model_metadata(
    assets: Assets, images: dict[str, Frame]
) -> None:
    model = assets.model("mobilenet_v1_0.25_128_quant.tflite")
    with Predictor.open(model) as predictor:
        top = predictor.predict(images["parrot.jpg"]).results[0]

    assert isinstance(top, Classification)
    assert (top.index, top.label) == (89, "macaw")
    assert top.score == pytest.approx(0.79, abs=0.06)


def test_movenet_gives_17_keypoints_on_grace_hopper(
    assets: Assets, images: dict[str, Frame]
) -> None:
    with Predictor.open(assets.movenet) as predictor:
        keypoints = predictor.predict(images["grace_hopper.bmp"]).results

    assert len(keypoints) == 17
    assert all(isinstance(k, Keypoint) for k in keypoints)
    by_name = {k.name: k for k in keypoints if isinstance(k, Keypoint)}
    # A portrait: the eyes are above the shoulders, the shoulders either side of the nose.
    assert by_name["right_eye"].y < by_name["right_shoulder"].y
    assert by_name["right_shoulder"].x < by_name["nose"].x < by_name["left_shoulder"].x


def test_raw_task_returns_every_output_dequantized() -> None:
    model = ModelBytes.from_bytes(tb.reshape_model(1, 2, "uint8", tb.Quant(0.5, 10)), "r.tflite")
    with Predictor.open(model, task="raw") as predictor:
        results = predictor.predict(np.array([[[10, 12, 14], [0, 255, 20]]], np.uint8)).results

    assert results == [RawTensor("flat", (1, 6), [[0.0, 1.0, 2.0, -5.0, 122.5, 5.0]])]


def test_raw_task_gives_a_scalar_output_as_a_one_value_list() -> None:
    # tolist() of a 0-d tensor is a bare number, which the event payload refused.
    model = ModelBytes.from_bytes(tb.slows_down_model(fast_invokes=0, loops=1), "s.tflite")
    with Predictor.open(model, task="raw") as predictor:
        frame = np.zeros(predictor.engine.inputs[0].shape[1:], np.uint8)
        results = predictor.predict(frame).results

    scalars = [r for r in results if isinstance(r, RawTensor) and r.shape == ()]
    assert scalars, "the model has a scalar output"
    assert all(isinstance(r.values, list) and len(r.values) == 1 for r in scalars)


def test_detection_task_on_a_classifier_is_refused(assets: Assets) -> None:
    with pytest.raises(UnsupportedModel, match="TFLite_Detection_PostProcess"):
        Predictor.open(assets.mobilenet_v2, task="detection")


def test_labels_with_ids_use_the_ids(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("0  person\n1  bicycle\n3  motorcycle\n")

    labels = Labels.from_file(path)

    assert (labels.name(0), labels.name(3), labels.name(2)) == ("person", "motorcycle", "2")


def test_plain_labels_keep_blank_lines_as_positions() -> None:
    labels = Labels.from_lines(["a", "", "c", ""])

    assert (labels.name(0), labels.name(1), labels.name(2), len(labels)) == ("a", "1", "c", 3)


def test_placeholder_is_dropped_only_when_present() -> None:
    coco = Labels.from_lines(["???", "person", "bicycle"]).without_placeholder()
    imagenet = Labels.from_lines(["background", "tench"]).without_placeholder()

    assert (coco.name(0), coco.name(1)) == ("person", "bicycle")
    assert imagenet.name(0) == "background"


def test_unknown_task_name_lists_the_choices(assets: Assets) -> None:
    with pytest.raises(SettingError, match="unknown task 'tracking'") as caught:
        Predictor.open(assets.mobilenet_v2, task="tracking")
    assert "classification" in caught.value.hint
