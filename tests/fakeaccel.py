"""A fake accelerator for the fallback tests and benchmark: hardware this machine lacks.

``build_library`` compiles a real external delegate library (C, the system compiler): it
loads into the real interpreter, claiming no ops so the CPU kernels still compute, and
refuses to load while a control file exists, as libedgetpu does with no Coral attached.
A Coral pulled out mid-stream makes ``invoke`` fail; a delegate that claims no ops cannot
do that, so ``UnpluggableEngine`` stands in for it at the engine's seam: the real
interpreter, whose invoke fails while the same control file exists.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from edgefleet.agent.config import ModelSettings
from edgefleet.agent.pipeline import LoadedModel, load_model, model_ref
from edgefleet.runtime import Engine, InferenceFailed, Predictor, TaskName, read_model
from edgefleet.runtime.recognition import detect_task, make_task

OPTION = "unplugged_if"
"""The delegate option naming the control file."""

_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

/* TfLiteDelegate as tensorflow/lite/core/c/common.h lays it out. */
typedef struct TfLiteDelegate {
  void* data_;
  int (*Prepare)(void* context, struct TfLiteDelegate* delegate);
  void* CopyFromBufferHandle;
  void* CopyToBufferHandle;
  void* FreeBufferHandle;
  int64_t flags;
  void* opaque_delegate_builder;
} TfLiteDelegate;

/* Claims no node: the interpreter keeps its own kernels (kTfLiteOk). */
static int prepare(void* context, TfLiteDelegate* delegate) {
  (void)context;
  (void)delegate;
  return 0;
}
static TfLiteDelegate accelerator = {NULL, prepare, NULL, NULL, NULL, 0, NULL};

TfLiteDelegate* tflite_plugin_create_delegate(char** keys, char** values, size_t n,
                                              void (*report_error)(const char*)) {
  for (size_t i = 0; i < n; i++) {
    if (strcmp(keys[i], "unplugged_if") == 0 && access(values[i], F_OK) == 0) {
      if (report_error) report_error("fake accelerator: no device attached");
      return NULL;
    }
  }
  return &accelerator;
}

void tflite_plugin_destroy_delegate(TfLiteDelegate* delegate) { (void)delegate; }
"""


def build_library(directory: Path) -> Path | None:
    """Compile the fake accelerator into ``directory``; None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = directory / "fake_accelerator.c"
    source.write_text(_SOURCE)
    library = directory / "libfake_accelerator.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


def delegate(library: Path, unplugged: Path) -> dict[str, object]:
    """The ``delegate`` config entry of a build on the fake accelerator."""
    return {"type": "external", "library": str(library), "options": {OPTION: str(unplugged)}}


class UnpluggableEngine(Engine):
    """The real interpreter, whose invoke fails while ``unplugged`` exists: a Coral pulled
    out mid-stream, which this machine does not have."""

    def __init__(self, *args: object, unplugged: Path, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.unplugged = unplugged

    def invoke(self) -> float:
        if self.unplugged.exists():
            raise InferenceFailed("edgetpu: the device stopped answering (unplugged)")
        return super().invoke()


def open_build(unplugged: Path) -> Callable[[ModelSettings], LoadedModel]:
    """``StreamRunner``'s ``open_build``: builds on the fake accelerator get the unpluggable
    engine (the task detected as ``load_model`` does), every other build the real loader."""

    def opened(settings: ModelSettings) -> LoadedModel:
        if settings.delegate.type != "external":
            return load_model(settings)
        engine = UnpluggableEngine(
            read_model(settings.path), delegate=settings.delegate, unplugged=unplugged
        )
        task = make_task(
            TaskName(settings.task) if settings.task else detect_task(engine.info), engine.info
        )
        predictor = Predictor(engine, task)
        return LoadedModel(predictor, model_ref(settings, predictor))

    return opened
