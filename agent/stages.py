"""Second-stage models: each detection of a frame cut out and looked at closer.

MediaPipe's detect-then-landmark design, for any pair: face detection then the face
mesh, a person detector then a pose model, a detector then a fine-grained classifier.
For each stage (``streams[].stages``), the frame's best detections with the stage's
labels (up to ``max_crops``) are cut from the full-resolution frame (``runtime.crop``:
widened, square, upright from the detection's eye keypoints), run through the stage's
model, and their results (landmarks mapped back to the frame) are attached to the
detection under the stage's name: one event per tracked object carries them all.
Each stage's time per crop is measured apart from the first model's.

Runs on the stream's inference thread, like the first model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from edgefleet.runtime import Detection, EdgefleetError, Predictor, crop, in_frame
from edgefleet.runtime.preprocess import Frame
from edgefleet.runtime.tasks import Result

from .config import ModelSettings, StageSettings
from .metrics import LatencyWindow
from .sources import SourceError
from .sources.base import CapturedFrame

log = logging.getLogger(__name__)


class SecondStages:
    """A stream's second-stage models, loaded, and their latency per crop."""

    def __init__(
        self,
        settings: Sequence[StageSettings],
        open_model: Callable[[ModelSettings], Predictor],
        *,
        stream: str,
    ) -> None:
        self._stream = stream
        self._stages: list[tuple[StageSettings, Predictor]] = []
        try:
            for stage in settings:
                self._stages.append((stage, open_model(stage.model)))
        except BaseException:
            self.close()  # the ones loaded before the one that failed
            raise
        self.latency = {stage.name: LatencyWindow() for stage in settings}
        """Milliseconds per crop (pre-processing, invoke, decoding), per stage."""
        self._warned: set[str] = set()

    def apply(self, results: list[Result], frame: CapturedFrame) -> list[Result]:
        """``results`` with each chosen detection's stage results attached."""
        chosen = [(stage, model, self._chosen(stage, results)) for stage, model in self._stages]
        if not any(indices for _, _, indices in chosen):
            return results  # no crop to cut: the full-size frame is not made (a hot path)
        pixels = self._full(frame)
        found: dict[int, dict[str, tuple[Result, ...]]] = {}
        for stage, predictor, indices in chosen:
            for index in indices:
                detection = results[index]
                assert isinstance(detection, Detection)
                seen = self._look(stage, predictor, pixels, detection)
                if seen is not None:
                    found.setdefault(index, {})[stage.name] = seen
        return [_with_stages(r, found[i]) if i in found else r for i, r in enumerate(results)]

    def close(self) -> None:
        """Release the stage models."""
        for _, predictor in self._stages:
            predictor.close()

    def _full(self, frame: CapturedFrame) -> Frame:
        if frame.full is None:
            return frame.pixels
        try:
            return frame.full()
        except SourceError as exc:
            self._warn("full-size frame", f"cropping the model's frame instead: {exc.message}")
            return frame.pixels

    @staticmethod
    def _chosen(stage: StageSettings, results: list[Result]) -> list[int]:
        """Positions of the stage's detections, best score first, at most ``max_crops``."""
        wanted = [
            (r.score, i)
            for i, r in enumerate(results)
            if isinstance(r, Detection) and (stage.on_labels is None or r.label in stage.on_labels)
        ]
        wanted.sort(reverse=True)
        return [i for _, i in wanted[: stage.max_crops]]

    def _look(
        self, stage: StageSettings, predictor: Predictor, pixels: Frame, detection: Detection
    ) -> tuple[Result, ...] | None:
        pre = predictor.preprocess
        if pre is None:
            self._warn(stage.name, "its model takes no image, so it cannot look at crops")
            return None
        started = time.perf_counter()
        try:
            size = (pre.width, pre.height)
            cut = crop(pixels, detection, size, expand=stage.expand, rotate=stage.rotate)
            results = predictor.predict(cut.pixels).results
        except EdgefleetError as exc:
            self._warn(stage.name, exc.message)
            return None
        self.latency[stage.name].add((time.perf_counter() - started) * 1000.0)
        return tuple(in_frame(r, cut) for r in results)

    def _warn(self, what: str, message: str) -> None:
        if what not in self._warned:  # once: the same failure would fill the log every frame
            self._warned.add(what)
            log.warning("stream %s: stage %s: %s", self._stream, what, message)


def _with_stages(result: Result, stages: dict[str, tuple[Result, ...]]) -> Result:
    assert isinstance(result, Detection)  # only detections are cut out
    return dataclasses.replace(result, stages=stages)
