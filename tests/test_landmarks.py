"""Detect, then landmark: MediaPipe's face detector, its crop, the 468-point face mesh."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import Assets
from PIL import Image

from edgefleet.runtime import (
    Classification,
    Crop,
    Detection,
    Keypoint,
    Landmarks,
    Predictor,
    TaskName,
    crop,
    detect_task,
    in_frame,
    inspect_model,
    load_image,
    read_model,
)
from edgefleet.runtime.landmarks import landmark_layout

pytestmark = pytest.mark.backend

FACES = "mediapipe_face_detection_short_range.tflite"
MESH = "mediapipe_face_landmark.tflite"
HAND = "mediapipe_hand_landmark_lite.tflite"


def _face_then_mesh(assets: Assets, frame: np.ndarray) -> tuple[Detection, Landmarks]:
    with Predictor.open(assets.model(FACES)) as faces, Predictor.open(assets.model(MESH)) as mesh:
        (face,) = faces.predict(frame).results
        assert isinstance(face, Detection)
        pre = mesh.preprocess
        assert pre is not None
        cut = crop(frame, face, (pre.width, pre.height))
        (found,) = mesh.predict(cut.pixels).results
        assert isinstance(found, Landmarks)
        return face, in_frame(found, cut)


@pytest.mark.parametrize("image", ["grace_hopper.bmp", "astronaut.png"])
def test_the_face_mesh_on_the_detectors_crop_lies_on_the_face(assets: Assets, image: str) -> None:
    face, mesh = _face_then_mesh(assets, load_image(assets.image(image)))

    assert len(mesh.points) == 468
    assert mesh.score > 0.9
    ymin, xmin, ymax, xmax = face.box
    mymin, mxmin, mymax, mxmax = mesh.box
    slack = 0.15 * (ymax - ymin)  # the mesh reaches the forehead and chin, past the box a little
    assert ymin - slack <= mymin < mymax <= ymax + slack
    assert xmin - slack <= mxmin < mxmax <= xmax + slack


def test_a_tilted_face_is_cut_upright_and_meshed_where_it_is(assets: Assets) -> None:
    upright = load_image(assets.image("grace_hopper.bmp"))
    tilted = np.asarray(Image.fromarray(upright).rotate(25, resample=Image.Resampling.BICUBIC))

    face, mesh = _face_then_mesh(assets, tilted)

    (x0, y0), (x1, y1) = face.keypoints[:2]
    assert abs(math.degrees(math.atan2(y1 - y0, x1 - x0))) > 10  # the eyes are tilted
    assert mesh.score > 0.9  # the crop, turned upright, still reads as a face
    cx, cy = (face.box[1] + face.box[3]) / 2, (face.box[0] + face.box[2]) / 2
    mx = sum(p[0] for p in mesh.points) / len(mesh.points)
    my = sum(p[1] for p in mesh.points) / len(mesh.points)
    assert abs(mx - cx) < 0.05
    assert abs(my - cy) < 0.08


def test_landmark_models_are_recognised_and_others_are_not(assets: Assets) -> None:
    mesh = inspect_model(read_model(assets.model(MESH)))
    hand = inspect_model(read_model(assets.model(HAND)))

    assert detect_task(mesh) is TaskName.LANDMARKS
    assert landmark_layout(mesh) is not None
    assert landmark_layout(mesh).count == 468  # type: ignore[union-attr]
    assert landmark_layout(hand).count == 21  # type: ignore[union-attr]
    for other in (assets.ssd, assets.mobilenet_v2, assets.movenet, assets.model(FACES)):
        assert landmark_layout(inspect_model(read_model(other))) is None


def test_results_found_on_a_turned_crop_map_back_to_the_frame() -> None:
    # A 100 px crop centred at (300, 200) of a 600x400 frame, turned a quarter turn.
    cut = Crop(np.zeros((8, 8, 3), np.uint8), (300.0, 200.0), 100.0, math.pi / 2, (600, 400))

    right_edge = in_frame(Keypoint("nose", 1.0, 0.5, 0.9), cut)
    box = in_frame(Detection(0, "eye", 0.8, (0.4, 0.5, 0.6, 1.0)), cut)

    assert isinstance(right_edge, Keypoint)
    # The crop's right edge, 50 px from its centre, lies below the centre once turned.
    assert (right_edge.x, right_edge.y) == pytest.approx((300 / 600, 250 / 400))
    assert isinstance(box, Detection)
    assert box.box == pytest.approx((200 / 400, (300 - 10) / 600, 250 / 400, (300 + 10) / 600))
    assert in_frame(Classification(1, "cat", 0.7), cut) == Classification(1, "cat", 0.7)
