"""One loaded interpreter: the only module that calls the backend's ``Interpreter``.

Models are loaded from bytes (``model_content=``), never from a path: the
Python wrapper runs the flatbuffer verifier only for in-memory models, and the
caller loads exactly the bytes whose hash it knows. Backend exceptions are
translated here into the typed errors of ``errors.py``.

An ``Engine`` is used by one thread at a time (the interpreter is not
thread-safe); ``invoke`` releases the GIL, so other threads keep running.

The interpreter's C++ code writes to file descriptor 2, below Python's
``sys.stderr``: "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on the
first model a process loads. ``_native_stderr_to_log`` captures that descriptor
while an interpreter is created and allocated, sends its ``INFO:`` lines to the
DEBUG log (``-v`` shows them) and writes every other line back to stderr, so
warnings and errors still show. One lock serialises the capture: file descriptor
2 is the whole process's.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from .backends import Backend, BackendName, select_backend
from .delegates import CpuDelegate, DelegateSettings, EdgeTpuDelegate, LoadedDelegate, load_delegate
from .errors import (
    CorruptModel,
    InferenceFailed,
    InputMismatch,
    ModelCompiledForEdgeTPU,
    ModelError,
    TensorAllocationFailed,
    UnresolvedCustomOp,
)
from .modelfile import EDGETPU_CUSTOM_OP, ModelBytes, ModelInfo, TensorInfo, inspect_model

_UNRESOLVED_OP = re.compile(r"unresolved custom op: ([^\s.]+)")
# What the interpreter's native logger prints at INFO severity (TFLITE_LOG_PROD).
_NATIVE_INFO = re.compile(rb"^INFO: ")
_STDERR_FD = 2
_native_stderr_lock = threading.Lock()
log = logging.getLogger(__name__)

T = TypeVar("T")


class Engine:
    """A model loaded into an interpreter with its delegate, ready to invoke."""

    def __init__(
        self,
        model: ModelBytes,
        *,
        delegate: DelegateSettings | None = None,
        threads: int | None = None,
        backend: Backend | BackendName | str | None = None,
    ) -> None:
        self.model = model
        self.info: ModelInfo = inspect_model(model)
        self.backend = backend if isinstance(backend, Backend) else select_backend(backend)
        settings = delegate or CpuDelegate()
        if self.info.edgetpu_compiled and not isinstance(settings, EdgeTpuDelegate):
            raise ModelCompiledForEdgeTPU(model.source)
        self.threads = threads
        self.delegate: LoadedDelegate = load_delegate(settings, self.backend)
        if self.info.edgetpu_compiled and self.delegate.handle is None:
            raise ModelCompiledForEdgeTPU(model.source, fell_back=True)
        started = time.perf_counter()
        self._interpreter = self._create()
        self.load_ms = (time.perf_counter() - started) * 1000.0
        self.inputs = tuple(_tensor_info(d) for d in self._interpreter.get_input_details())
        self.outputs = tuple(_tensor_info(d) for d in self._interpreter.get_output_details())
        self._input_views = [self._interpreter.tensor(t.index) for t in self.inputs]

    def _create(self) -> Any:
        kwargs: dict[str, Any] = {"model_content": self.model.content, "num_threads": self.threads}
        if self.delegate.handle is not None:
            kwargs["experimental_delegates"] = [self.delegate.handle]
        with _native_stderr_to_log():
            try:
                interpreter = self.backend.interpreter(**kwargs)
            except (RuntimeError, ValueError) as exc:
                raise self._translate_load_error(exc) from exc
            try:
                # XNNPACK is applied here, and says so once per process.
                interpreter.allocate_tensors()
            except RuntimeError as exc:
                raise self._translate_load_error(exc, allocating=True) from exc
        return interpreter

    def _translate_load_error(self, exc: Exception, *, allocating: bool = False) -> ModelError:
        text = str(exc)
        source = self.model.source
        match = _UNRESOLVED_OP.search(text)
        if match:
            op = match.group(1)
            if op == EDGETPU_CUSTOM_OP:
                return ModelCompiledForEdgeTPU(source)
            return UnresolvedCustomOp(source, op)
        if "not a valid flatbuffer" in text.lower():
            return CorruptModel(source, "the flatbuffer verifier rejected it")
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        if allocating:
            return TensorAllocationFailed(source, first_line)
        return ModelError(
            source,
            f"{self.backend.label} could not load the model ({first_line})",
            hint="check that the model was converted for TFLite and matches this runtime",
        )

    @property
    def description(self) -> str:
        """``backend, delegate, threads`` in one line, for logs and results."""
        threads = f", {self.threads} threads" if self.threads else ""
        return f"{self.backend.label}, {self.delegate.description}{threads}"

    def write_input(self, write: Callable[[npt.NDArray[Any]], T], index: int = 0) -> T:
        """Let ``write`` fill input ``index`` in place, without a copy; returns its result."""
        view = self._input_views[index]()
        try:
            return write(view)
        finally:
            # The interpreter refuses to run while a view on its buffers is alive.
            del view

    def set_input(self, array: npt.NDArray[Any], index: int = 0) -> None:
        """Copy ``array`` into input ``index``, which must match its shape and dtype exactly."""
        spec = self.inputs[index]
        if tuple(array.shape) != spec.shape or array.dtype != np.dtype(spec.dtype):
            raise InputMismatch(
                f"input '{spec.name}' expects shape {list(spec.shape)} {spec.dtype}, "
                f"got {list(array.shape)} {array.dtype}",
                hint="resize and convert the data to the model's input (the task "
                "pre-processing does this for images)",
            )
        self.write_input(lambda view: np.copyto(view, array), index)

    def invoke(self) -> float:
        """Run the model once; returns the invoke time in milliseconds."""
        started = time.perf_counter()
        try:
            self._interpreter.invoke()
        except RuntimeError as exc:
            raise InferenceFailed(
                f"{self.model.source}: inference failed under {self.description} ({exc})",
                hint="check the input and the delegate; the model may need another runtime",
            ) from exc
        return (time.perf_counter() - started) * 1000.0

    def tensor(self, index: int) -> npt.NDArray[Any]:
        """A copy of tensor ``index`` (an output, or any tensor the backend preserves)."""
        return self._interpreter.get_tensor(index)  # type: ignore[no-any-return]

    def output(self, position: int = 0) -> npt.NDArray[Any]:
        """A copy of the ``position``-th model output."""
        return self.tensor(self.outputs[position].index)

    def close(self) -> None:
        """Release the interpreter and its delegate."""
        self._input_views.clear()
        self._interpreter = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def unresolved_custom_op(
    model: ModelBytes, backend: Backend | BackendName | str | None = None
) -> str | None:
    """The first custom op of ``model`` that the backend cannot resolve, or None.

    The interpreter resolves ops while allocating tensors and stops at the first one it
    lacks, so a model with two unknown ops names one; the Edge TPU's op counts as
    unresolved, since no delegate is loaded here. Nothing is invoked.
    """
    try:
        Engine(model, backend=backend).close()
    except UnresolvedCustomOp as exc:
        return exc.op
    return None


@contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """Capture file descriptor 2 meanwhile: ``INFO:`` lines to the DEBUG log, the rest back."""
    with _native_stderr_lock, tempfile.TemporaryFile() as capture:
        try:
            sys.stderr.flush()
            saved = os.dup(_STDERR_FD)
        except (OSError, ValueError):  # no stderr at all (closed): nothing to keep quiet
            yield
            return
        os.dup2(capture.fileno(), _STDERR_FD)
        try:
            yield
        finally:
            sys.stderr.flush()  # what Python wrote meanwhile belongs in the capture too
            os.dup2(saved, _STDERR_FD)
            os.close(saved)
            capture.seek(0)
            _replay(capture.read())


def _replay(captured: bytes) -> None:
    kept = []
    for line in captured.splitlines(keepends=True):
        if _NATIVE_INFO.match(line):
            log.debug("interpreter: %s", line.decode(errors="replace").strip())
        else:
            kept.append(line)
    if kept:
        os.write(_STDERR_FD, b"".join(kept))


def _tensor_info(detail: dict[str, Any]) -> TensorInfo:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorInfo(
        index=int(detail["index"]),
        name=str(detail["name"]),
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        scale=float(scale),
        zero_point=int(zero_point),
    )
