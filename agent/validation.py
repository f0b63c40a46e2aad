"""Validating a downloaded model in a separate, short-lived process before it is activated.

Why a separate process: a model is a program. A corrupt or hostile flatbuffer
that slips past the verifier, a delegate that aborts, an op that loops
forever can crash or hang the interpreter, and with it the process that
loaded it. The daemon never loads an unvalidated model itself: it starts
``python -m edgefleet.agent.validation``, hands it the bytes whose sha256 and
signature it already checked (through a pipe, never a path, so nothing can
swap the file in between), and waits at most ``timeout_s`` for one reply. The
child loads the bytes from memory (``model_content=``, so the flatbuffer
verifier runs), checks the inputs and outputs against the manifest, runs one
smoke inference on a camera frame and a short benchmark against the
manifest's latency budget, then, when the parent sends the running model too,
the same benchmark of that one in the same process on the same frame (so the
two medians compare on one machine state, however loaded), then exits.

Budgets. Before it loads anything the child caps its own address space
(``RLIMIT_AS``) at its size then plus the memory budget plus
``address_space_headroom`` (the interpreter's libraries, thread stacks and
mappings, which reserve address space they never touch), and its CPU time
(``RLIMIT_CPU``). A model whose tensors need more than that fails to allocate
them: ``load_failed``, with the budget in the reason. One that fits the
address space but whose resident memory grew by more than the budget is
``too_big``. The report carries the growth and the peak RSS.

Framing. Request on the child's stdin: one JSON line (``_Request``: the
manifest, delegate, threads, backend, run counts, the model's length and the
frame's shape), then exactly that many model bytes, then the running model's bytes
(``reference_size`` of them, maybe none), then the raw HxWx3 uint8 frame bytes if a
frame was given. Reply on the child's stdout: one JSON line,
``{"ok": true, "report": {...}}`` or ``{"ok": false, "code": ..., "message":
..., "hint": ...}``. No pickle: the parent trusts nothing the child sends
beyond what the pydantic models accept. The child points file descriptor 1 at
stderr before loading anything, so native code that prints cannot corrupt the
reply; its logging goes to stderr.

Refusals (``ValidationRefused.code``)::

    load_failed        the runtime could not load the model: corrupt bytes, an Edge TPU model
                       without a TPU, a missing delegate, an unresolvable custom op, tensors
                       that need more memory than the budget, ...
    input_mismatch     an input's shape or dtype differs from the manifest (a null shape
                       in the manifest is set at run time: only the dtype is checked)
    output_mismatch    an output's shape or dtype differs from the manifest (when it lists them)
    inference_failed   the smoke inference or the benchmark raised
    too_slow           the median invoke time is over the manifest's max_latency_ms
    too_big            loading and running it grew the process by more than the memory budget
    crashed            the child died from a signal, or exited without a report
    timeout            the child ran past timeout_s and was killed, or used up its CPU time

Threads: ``validate_model`` runs on the agent's update thread (before
activating a model) and on the command thread (``bench_model``). It blocks
its caller for at most ``timeout_s`` plus a short reap, starts no thread and
never leaves the child running. ``_child_main`` runs on the child's main thread.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, BinaryIO, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edgefleet.agent.protocol import Manifest, TaskSpec, TensorSpec
from edgefleet.runtime import (
    BackendName,
    DelegateSettings,
    EdgefleetError,
    Labels,
    ModelBytes,
    Prediction,
    Predictor,
    TensorAllocationFailed,
    TensorInfo,
)

__all__ = [
    "RefusalCode",
    "ValidationLimits",
    "ValidationRefused",
    "ValidationReport",
    "validate_model",
]

log = logging.getLogger(__name__)

RefusalCode = Literal[
    "load_failed",
    "input_mismatch",
    "output_mismatch",
    "inference_failed",
    "too_slow",
    "too_big",
    "crashed",
    "timeout",
]

_CHILD_MODULE = "edgefleet.agent.validation"
_SOURCE = "<update>"
_MAX_HEADER_BYTES = 1 << 20  # a manifest is at most 64 KiB of JSON
_REAP_TIMEOUT_S = 5.0  # after a kill, for the pipes to close
_STDERR_TAIL_LINES = 5
_GREY = 128  # the synthetic smoke frame when no camera frame is given
_MIB = 1 << 20
_MEMORY_HINT = (
    "keep the current model: this one needs more memory than the board has free beside what "
    "runs; use a smaller model, or raise updates.validation_memory_mib where the board has it"
)
_CPU_HARD_EXTRA_S = 5  # SIGXCPU at the soft limit; SIGKILL this much later if it is caught
_RUN_TIME_SHAPE_HINT = (
    "the manifest promises a scalar ([]): a tensor whose shape is set at run time is written "
    "with shape null; sign the manifest again with `edgefleet manifest create`, which does so"
)


@dataclass(frozen=True)
class ValidationReport:
    """What the validation process found: the model loads, fits, runs, and how fast."""

    backend: str  # interpreter backend and version, e.g. "litert 2.3.0"
    delegate: str  # as loaded, e.g. "cpu" or "cpu (fallback: edgetpu (usb) unavailable)"
    inputs: list[TensorSpec]  # the model's own, as the interpreter reports them
    outputs: list[TensorSpec]
    task: str  # classification, detection, pose or raw
    latency_p50_ms: float  # invoke time over the measured runs
    latency_p90_ms: float
    runs: int  # measured invokes
    smoke_results: int  # results the smoke inference gave (classes, detections, ...)
    memory_bytes: int = 0  # resident memory the model added: peak RSS minus RSS before loading
    peak_rss_bytes: int = 0  # the validation process's peak RSS while it ran the model
    reference_p50_ms: float | None = None  # the running model, timed the same way, same frame


class ValidationRefused(EdgefleetError):
    """The model failed validation; ``code`` says at which step (see the module docstring)."""

    def __init__(self, code: RefusalCode, message: str, *, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.code: RefusalCode = code


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ValidationLimits(_Wire):
    """What the validation process may use: memory the model may add, CPU time."""

    memory_budget_bytes: int | None = Field(
        None, gt=0, description="Resident memory the model may add; None: no limit."
    )
    address_space_headroom_bytes: int = Field(
        0,
        ge=0,
        description="Address space allowed beyond the budget, for the interpreter's libraries, "
        "thread stacks and reserved mappings.",
    )
    cpu_s: int | None = Field(None, ge=1, description="CPU seconds (all threads); None: no limit.")


class _Request(_Wire):
    """The JSON header line of a request; the model and frame bytes follow it."""

    manifest: Manifest | None = Field(description="Expectations; None checks nothing.")
    delegate: DelegateSettings = Field(description="Delegate to load the model with.")
    threads: int | None = Field(ge=1, description="Interpreter threads; the backend's default.")
    backend: BackendName = Field(description="Interpreter backend.")
    warmup_runs: int = Field(ge=0, description="Unmeasured invokes after the smoke inference.")
    bench_runs: int = Field(ge=1, description="Measured invokes.")
    model_size: int = Field(ge=0, description="Model bytes following the header.")
    reference_size: int = Field(
        0, ge=0, description="Bytes of the running model following the model; 0: none."
    )
    limits: ValidationLimits = Field(
        default_factory=ValidationLimits, description="The child's resource limits."
    )
    frame_shape: tuple[int, int, int] | None = Field(
        description="Shape of the uint8 frame following the model; None for a synthetic one."
    )


class _Passed(_Wire):
    ok: Literal[True] = True
    report: ValidationReport


class _Refused(_Wire):
    ok: Literal[False] = False
    code: RefusalCode
    message: str
    hint: str


_REPLY: TypeAdapter[_Passed | _Refused] = TypeAdapter(
    Annotated[_Passed | _Refused, Field(discriminator="ok")]
)


# -- parent ------------------------------------------------------------------------------


def validate_model(
    content: bytes,
    *,
    manifest: Manifest | None,
    delegate: DelegateSettings,
    threads: int | None,
    backend: BackendName,
    frame: npt.NDArray[np.uint8] | None,
    bench_runs: int = 20,
    warmup_runs: int = 2,
    timeout_s: float = 60.0,
    limits: ValidationLimits | None = None,
    reference: bytes | None = None,
) -> ValidationReport:
    """Load, check, smoke-test and time ``content`` in a child process; raise if it is refused.

    ``reference`` (the running model's bytes) is timed after it in the same process, on the
    same frame: the report's ``reference_p50_ms``.
    """
    if frame is not None and (frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8):
        raise ValueError(f"frame must be HxWx3 uint8, not {list(frame.shape)} {frame.dtype}")
    header = _Request(
        manifest=manifest,
        delegate=delegate,
        threads=threads,
        backend=backend,
        warmup_runs=warmup_runs,
        bench_runs=bench_runs,
        model_size=len(content),
        reference_size=len(reference or b""),
        limits=limits or ValidationLimits(),
        frame_shape=None if frame is None else (frame.shape[0], frame.shape[1], 3),
    )
    context = {"model": f"{manifest.model_id} v{manifest.version}"} if manifest else {}
    started = time.monotonic()
    try:
        request = _encode(header, content + (reference or b""), frame)
        returncode, stdout, stderr = _run_child(request, timeout_s)
        report = _decode_reply(returncode, stdout, stderr, header.limits)
    except ValidationRefused as exc:
        log.info("model refused (%s): %s", exc.code, exc.message, extra=context)
        raise
    log.info(
        "model validated in %.1f s: %s, %s, %s, invoke p50 %.2f ms, +%d MiB resident",
        time.monotonic() - started,
        report.task,
        report.backend,
        report.delegate,
        report.latency_p50_ms,
        report.memory_bytes // _MIB,
        extra=context,
    )
    return report


def _encode(header: _Request, content: bytes, frame: npt.NDArray[np.uint8] | None) -> bytes:
    frame_bytes = b"" if frame is None else np.ascontiguousarray(frame).tobytes()
    return header.model_dump_json().encode() + b"\n" + content + frame_bytes


def _run_child(request: bytes, timeout_s: float) -> tuple[int, bytes, bytes]:
    """Run the child on ``request``; returns its exit status, stdout and stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", _CHILD_MODULE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = process.communicate(input=request, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=_REAP_TIMEOUT_S)
        raise ValidationRefused(
            "timeout",
            f"validation did not finish within {timeout_s:g} s; the process was killed",
            hint="the model may hang the interpreter, or the board is too slow or busy: "
            "time it with `edgefleet model bench` on such a board",
        ) from None
    finally:
        # Whatever went wrong on this side (an interrupt, a timeout while reaping), the
        # child never outlives the call.
        if process.poll() is None:
            process.kill()
            process.wait(timeout=_REAP_TIMEOUT_S)
    return process.returncode, stdout, stderr


def _decode_reply(
    returncode: int, stdout: bytes, stderr: bytes, limits: ValidationLimits
) -> ValidationReport:
    if returncode == -signal.SIGXCPU and limits.cpu_s is not None:
        raise ValidationRefused(
            "timeout",
            f"validation used up its {limits.cpu_s} s of CPU time and was stopped",
            hint="the model is far too heavy for this board (or loops): time it with "
            "`edgefleet model bench`, or raise updates.validation_cpu_s",
        )
    if returncode < 0:
        raise _crashed(f"was killed by {_signal_name(-returncode)}", stderr)
    if returncode > 0:
        raise _crashed(f"exited with code {returncode}", stderr)
    try:
        reply = _REPLY.validate_json(stdout)
    except ValidationError as exc:
        raise _crashed("exited without a readable report", stderr) from exc
    if isinstance(reply, _Refused):
        raise ValidationRefused(reply.code, reply.message, hint=reply.hint)
    return reply.report


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _crashed(what: str, stderr: bytes) -> ValidationRefused:
    lines = stderr.decode("utf-8", errors="replace").strip().splitlines()
    tail = " | ".join(lines[-_STDERR_TAIL_LINES:]) or "nothing"
    return ValidationRefused(
        "crashed",
        f"the validation process {what}; its stderr ended with: {tail}",
        hint="keep the current model: this one crashes the interpreter (or the board ran out "
        "of memory); reproduce with `edgefleet model run` on a test board",
    )


# -- child -------------------------------------------------------------------------------


def _child_main() -> int:
    """Read one request from stdin, validate, write one reply line to the real stdout."""
    reply_to = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    # From here on anything that writes to fd 1 (native code included) lands in stderr.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    request, content, reference, frame = _read_request(sys.stdin.buffer)
    reply: _Passed | _Refused
    try:
        reply = _Passed(report=_validate(request, content, reference, frame))
    except ValidationRefused as exc:
        reply = _Refused(code=exc.code, message=exc.message, hint=exc.hint)
    with reply_to:
        reply_to.write(_REPLY.dump_json(reply) + b"\n")
    return 0


def _read_request(
    stream: BinaryIO,
) -> tuple[_Request, bytes, bytes | None, npt.NDArray[np.uint8] | None]:
    request = _Request.model_validate_json(stream.readline(_MAX_HEADER_BYTES))
    content = _read_exactly(stream, request.model_size)
    reference = _read_exactly(stream, request.reference_size) if request.reference_size else None
    if request.frame_shape is None:
        return request, content, reference, None
    pixels = _read_exactly(stream, int(np.prod(request.frame_shape)))
    frame = np.frombuffer(pixels, np.uint8).reshape(request.frame_shape)
    return request, content, reference, frame


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"request truncated: expected {size} bytes, got {len(data)}")
    return data


def _validate(
    request: _Request,
    content: bytes,
    reference: bytes | None,
    frame: npt.NDArray[np.uint8] | None,
) -> ValidationReport:
    manifest = request.manifest
    rss_before = _rss_bytes()
    _limit_self(request.limits)
    with _open(request, content, request.limits) as predictor:
        engine = predictor.engine
        if manifest is not None:
            _check_tensors("input", manifest.inputs, engine.inputs)
            if manifest.outputs is not None:
                _check_tensors("output", manifest.outputs, engine.outputs)
        if frame is None and predictor.preprocess is not None:
            shape = (predictor.preprocess.height, predictor.preprocess.width, 3)
            frame = np.full(shape, _GREY, dtype=np.uint8)
        smoke = _smoke(predictor, frame)
        p50, p90 = _time_invokes(predictor, request.warmup_runs, request.bench_runs)
        peak = _peak_rss_bytes()
        _check_memory(peak - rss_before, peak, request.limits)
        if manifest is not None and manifest.max_latency_ms is not None:
            _check_budget(p50, manifest.max_latency_ms)
        report = ValidationReport(
            backend=engine.backend.label,
            delegate=engine.delegate.description,
            inputs=[_spec(t) for t in engine.inputs],
            outputs=[_spec(t) for t in engine.outputs],
            task=predictor.task.name.value,
            latency_p50_ms=p50,
            latency_p90_ms=p90,
            runs=request.bench_runs,
            smoke_results=len(smoke.results),
            memory_bytes=max(0, peak - rss_before),
            peak_rss_bytes=peak,
        )
    if reference is None:
        return report
    return replace(report, reference_p50_ms=_time_reference(request, reference, frame))


def _time_reference(
    request: _Request, reference: bytes, frame: npt.NDArray[np.uint8] | None
) -> float | None:
    """The running model's median, timed like the candidate's, on the same frame."""
    try:
        with Predictor.open(
            ModelBytes.from_bytes(reference, source="<running model>"),
            delegate=request.delegate,
            threads=request.threads,
            backend=request.backend,
        ) as predictor:
            predictor.predict(frame)
            return _time_invokes(predictor, request.warmup_runs, request.bench_runs)[0]
    except (EdgefleetError, ValidationRefused) as exc:
        # The comparison is left out, and the parent says so; the running model runs anyway.
        log.warning("the running model could not be timed for comparison: %s", exc)
        return None


def _limit_self(limits: ValidationLimits) -> None:
    """Cap this process's address space (its size now, plus budget and headroom) and CPU."""
    if limits.memory_budget_bytes is not None:
        cap = _address_space_bytes() + limits.memory_budget_bytes
        cap += limits.address_space_headroom_bytes
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if limits.cpu_s is not None:
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime) + limits.cpu_s
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + _CPU_HARD_EXTRA_S))


def _status_kib(field: str) -> int:
    """A ``VmXxx`` figure of ``/proc/self/status``, in KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _address_space_bytes() -> int:
    return _status_kib("VmSize") * 1024


def _rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _peak_rss_bytes() -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the forked copy of
    # the parent, so a child of a large process reported the parent's size as its peak
    # (436 MiB "taken" by mobilenet under pytest). VmHWM belongs to this process's own memory.
    return _status_kib("VmHWM") * 1024


def _check_memory(grown: int, peak: int, limits: ValidationLimits) -> None:
    budget = limits.memory_budget_bytes
    if budget is not None and grown > budget:
        raise ValidationRefused(
            "too_big",
            f"the model took {grown // _MIB} MiB of memory (peak RSS {peak // _MIB} MiB), more "
            f"than the {budget // _MIB} MiB budget beside the running models",
            hint=_MEMORY_HINT,
        )


def _open(request: _Request, content: bytes, limits: ValidationLimits) -> Predictor:
    task = request.manifest.task if request.manifest else TaskSpec()
    try:
        return Predictor.open(
            ModelBytes.from_bytes(content, source=_SOURCE),
            delegate=request.delegate,
            threads=request.threads,
            backend=request.backend,
            **_task_options(task),
        )
    except MemoryError as exc:
        raise _over_budget(limits, "out of memory") from exc
    except TensorAllocationFailed as exc:
        # Under the cap an arena that does not fit fails here; without one, the model's shapes.
        if limits.memory_budget_bytes is None:
            raise ValidationRefused("load_failed", exc.message, hint=exc.hint) from exc
        raise _over_budget(limits, exc.message) from exc
    except EdgefleetError as exc:
        raise ValidationRefused("load_failed", exc.message, hint=exc.hint) from exc


def _over_budget(limits: ValidationLimits, detail: str) -> ValidationRefused:
    budget = limits.memory_budget_bytes or 0
    return ValidationRefused(
        "load_failed",
        f"the model's tensors could not be allocated within the {budget // _MIB} MiB memory "
        "budget beside the running models: it needs more than that, unless its shapes are "
        f"broken (the interpreter: {detail})",
        hint=_MEMORY_HINT,
    )


def _task_options(task: TaskSpec) -> dict[str, Any]:
    """``Predictor.open``'s task arguments, for the fields the manifest sets (else its defaults)."""
    options: dict[str, Any] = {"task": task.task, "min_score": task.min_score}
    if task.labels:
        options["labels"] = Labels.from_lines(task.labels, "manifest labels")
    if task.top_k is not None:
        options["top_k"] = task.top_k
    return options


def _check_tensors(
    kind: Literal["input", "output"], expected: Sequence[TensorSpec], found: Sequence[TensorInfo]
) -> None:
    code: RefusalCode = "input_mismatch" if kind == "input" else "output_mismatch"
    hint = f"the model's {kind}s differ from its manifest: fix the manifest or the model"
    if len(expected) != len(found):
        raise ValidationRefused(
            code, f"expected {len(expected)} {kind}(s), found {len(found)}", hint=hint
        )
    for position, (want, have) in enumerate(zip(expected, found, strict=True)):
        if not _matches(want, have):
            shape = "(shape set at run time)" if want.shape is None else list(want.shape)
            raise ValidationRefused(
                code,
                f"{kind} {position} ('{have.name}'): expected {shape} {want.dtype}, "
                f"found {list(have.shape)} {have.dtype}",
                hint=_RUN_TIME_SHAPE_HINT if want.shape == () and have.shape else hint,
            )


def _matches(want: TensorSpec, have: TensorInfo) -> bool:
    """Same dtype, and the same shape unless the manifest says it is set at run time."""
    if want.dtype != have.dtype:
        return False
    return want.shape is None or tuple(want.shape) == have.shape


def _smoke(predictor: Predictor, frame: npt.NDArray[np.uint8] | None) -> Prediction:
    try:
        return predictor.predict(frame)
    except EdgefleetError as exc:
        raise ValidationRefused("inference_failed", exc.message, hint=exc.hint) from exc


def _time_invokes(predictor: Predictor, warmup_runs: int, runs: int) -> tuple[float, float]:
    """Invoke on the smoke frame's input: ``warmup_runs`` unmeasured, then ``runs`` timed."""
    try:
        for _ in range(warmup_runs):
            predictor.engine.invoke()
        latencies = [predictor.engine.invoke() for _ in range(runs)]
    except EdgefleetError as exc:
        raise ValidationRefused("inference_failed", exc.message, hint=exc.hint) from exc
    p50, p90 = np.percentile(latencies, (50, 90))
    return float(p50), float(p90)


def _check_budget(p50_ms: float, max_latency_ms: float) -> None:
    if p50_ms > max_latency_ms:
        raise ValidationRefused(
            "too_slow",
            f"median invoke time {p50_ms:.3f} ms is over the manifest's budget of "
            f"{max_latency_ms:g} ms",
            hint="use a faster delegate or a smaller model for this board, or raise "
            "max_latency_ms in the manifest",
        )


def _spec(tensor: TensorInfo) -> TensorSpec:
    return TensorSpec(shape=tensor.shape, dtype=tensor.dtype)


if __name__ == "__main__":
    sys.exit(_child_main())
