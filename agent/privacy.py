"""Keeping people's images on the device: snapshots leave it only with faces or people hidden.

Events carry metadata only (labels, boxes, scores), never pixels. A snapshot is the
one way pixels leave the device, and it is redacted here first, per stream
(``privacy.redact``):

- ``faces``: a face detector (``privacy.face_model``, MediaPipe face detection for one)
  runs on the full-resolution frame, and each face's box, widened by
  ``privacy.margin``, is filled with its mean colour. Pixelation is not enough: the
  same detector still found a face in 6x6 blocks of astronaut.png, and what a
  detector finds, a person recognises;
- ``people``: a person segmentation model (``privacy.people_model``, MediaPipe selfie
  segmentation) masks every person's pixels, which are pixelated;
- ``none``: the frame as it is (a deliberate choice in the config).

A snapshot that cannot be redacted (the model fails to load or to run) is not sent:
``RedactionFailed`` says why, and the command's reply carries it. The redaction model
has its own interpreter, loaded on first use and kept; one lock serialises its use
between the two threads that take snapshots (commands, and the stream's snapshot rule).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefleet.runtime import (
    Detection,
    EdgefleetError,
    Predictor,
    SegmentationTask,
    TaskName,
)

Pixels = npt.NDArray[np.uint8]
_BLOCKS = 12  # a pixelated region is this many blocks across its longer side, at most


class Redact(str, Enum):
    """What a stream's snapshots hide."""

    FACES = "faces"
    PEOPLE = "people"
    NONE = "none"


class PrivacySettings(BaseModel):
    """What a stream's snapshots hide before they leave the device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redact: Redact | None = Field(
        None,
        description="faces (a face detector: face_model), people (a person segmentation "
        "model: people_model) or none; default: faces when face_model is set, else none.",
    )
    face_model: Path | None = Field(
        None, description="Face detector for redact: faces (e.g. MediaPipe face detection)."
    )
    people_model: Path | None = Field(
        None,
        description="Person segmentation model for redact: people (e.g. MediaPipe selfie "
        "segmentation).",
    )
    margin: float = Field(
        0.25, ge=0.0, le=2.0, description="How much wider than the face box is hidden (0.25: 25%)."
    )
    min_score: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="Lowest face score that is hidden: lower than an event's, since a face "
        "left visible costs more than a patch hidden for nothing.",
    )

    @model_validator(mode="after")
    def _model_for_the_choice(self) -> PrivacySettings:
        if self.mode is Redact.FACES and self.face_model is None:
            raise ValueError("redact: faces needs face_model (a face detector .tflite)")
        if self.mode is Redact.PEOPLE and self.people_model is None:
            raise ValueError("redact: people needs people_model (a person segmentation .tflite)")
        return self

    @property
    def mode(self) -> Redact:
        """The redaction in force: the one asked for, else faces when a face model is set."""
        if self.redact is not None:
            return self.redact
        return Redact.FACES if self.face_model is not None else Redact.NONE


class RedactionFailed(EdgefleetError):
    """The snapshot could not be redacted, so it is not sent."""


@dataclass(frozen=True)
class Redacted:
    """A frame with what the settings hide made unrecognisable, and how many regions."""

    pixels: Pixels
    mode: Redact
    regions: int


class Redactor:
    """Redacts frames for one stream's snapshots. Any thread; one at a time."""

    def __init__(self, settings: PrivacySettings) -> None:
        self.settings = settings
        self._predictor: Predictor | None = None
        self._lock = threading.Lock()

    def redact(self, pixels: Pixels) -> Redacted:
        """``pixels`` with the faces (or people) hidden; ``RedactionFailed`` if it cannot."""
        mode = self.settings.mode
        if mode is Redact.NONE:
            return Redacted(pixels, mode, 0)
        with self._lock:
            try:
                predictor = self._loaded()
                prediction = predictor.predict(pixels)
            except EdgefleetError as exc:
                raise RedactionFailed(
                    f"the {mode.value} model could not run, so the snapshot is not sent: "
                    f"{exc.message}",
                    hint=exc.hint or "check privacy.face_model / privacy.people_model",
                ) from exc
            if mode is Redact.FACES:
                return self._faces(pixels, prediction.results)
            return self._people(pixels, predictor)

    def close(self) -> None:
        """Release the redaction model."""
        with self._lock:
            if self._predictor is not None:
                self._predictor.close()
                self._predictor = None

    def _loaded(self) -> Predictor:
        if self._predictor is None:
            settings = self.settings
            if settings.mode is Redact.FACES:
                assert settings.face_model is not None  # the validator saw to it
                self._predictor = Predictor.open(
                    settings.face_model, task=TaskName.DETECTION, min_score=settings.min_score
                )
            else:
                assert settings.people_model is not None
                self._predictor = Predictor.open(settings.people_model, task=TaskName.SEGMENTATION)
        return self._predictor

    def _faces(self, pixels: Pixels, results: Sequence[object]) -> Redacted:
        out = pixels.copy()
        height, width = pixels.shape[:2]
        faces = [r for r in results if isinstance(r, Detection)]
        for face in faces:
            ymin, xmin, ymax, xmax = _widened(face.box, self.settings.margin)
            top, bottom = round(ymin * height), round(ymax * height)
            left, right = round(xmin * width), round(xmax * width)
            if bottom > top and right > left:
                region = out[top:bottom, left:right]
                region[:] = region.reshape(-1, 3).mean(axis=0).astype(np.uint8)
        return Redacted(out, Redact.FACES, len(faces))

    def _people(self, pixels: Pixels, predictor: Predictor) -> Redacted:
        task = predictor.task
        assert isinstance(task, SegmentationTask)  # opened with the segmentation task
        height, width = pixels.shape[:2]
        mask = Image.fromarray(task.mask()).resize((width, height), Image.Resampling.NEAREST)
        person = np.asarray(mask) > 0
        if not person.any():
            return Redacted(pixels, Redact.PEOPLE, 0)
        out = np.where(person[:, :, np.newaxis], _pixelated(pixels), pixels).astype(np.uint8)
        return Redacted(out, Redact.PEOPLE, 1)  # the people's pixels, as one region


def _widened(
    box: tuple[float, float, float, float], margin: float
) -> tuple[float, float, float, float]:
    ymin, xmin, ymax, xmax = box
    dy, dx = (ymax - ymin) * margin / 2, (xmax - xmin) * margin / 2
    return max(0.0, ymin - dy), max(0.0, xmin - dx), min(1.0, ymax + dy), min(1.0, xmax + dx)


def _pixelated(region: Pixels) -> Pixels:
    """``region`` as coarse blocks: no feature survives, the scene stays readable."""
    height, width = region.shape[:2]
    scale = max(height, width) / _BLOCKS
    small = (max(1, round(width / scale)), max(1, round(height / scale)))
    image = Image.fromarray(region).resize(small, Image.Resampling.BOX)
    return np.asarray(image.resize((width, height), Image.Resampling.NEAREST))
