"""Errors raised by the runtime, split by whose fault they are.

Every error carries a message that says what happened and a ``hint`` that says
what to do about it; the CLI prints both and no traceback.

::

    EdgefleetError                     root of every edgefleet error
    ├── ModelError                     the model file is at fault (bad input)
    │   ├── ModelNotFound
    │   ├── NotATFLiteModel
    │   ├── CorruptModel               truncated or fails the flatbuffer verifier
    │   ├── UnresolvedCustomOp         needs an op this interpreter does not have
    │   │   └── ModelCompiledForEdgeTPU
    │   ├── TensorAllocationFailed
    │   └── UnsupportedModel           loads, but no task here knows its outputs
    ├── InputError                     what was fed to the model is at fault (bad input)
    │   ├── InputMismatch              wrong shape or dtype
    │   ├── ImageError                 an image that cannot be read
    │   └── LabelsError                a label file that cannot be read
    ├── SettingError                   a setting or option is invalid (bad input)
    └── EnvironmentProblem             this machine lacks something (our environment)
        ├── BackendUnavailable         no LiteRT / tflite-runtime importable
        │   └── SystemTooOld           installed, but its libraries need a newer OS (glibc)
        ├── DelegateUnavailable        delegate library missing or failing to load
        └── InferenceFailed            the interpreter failed while running

Bugs are not wrapped: they surface as the ordinary Python exception they are.
"""

from __future__ import annotations

from pathlib import Path

_EDGETPU_SUFFIX = "_edgetpu"


def cpu_build_of(path: Path | str) -> str:
    """Where the CPU build of an Edge TPU model is, in words: the compiler's input file.

    ``edgetpu_compiler model.tflite`` writes ``model_edgetpu.tflite``; a renamed file
    gives no clue, and the hint says so rather than guess.
    """
    name = Path(path).name
    if _EDGETPU_SUFFIX in name:
        return f"'{name.replace(_EDGETPU_SUFFIX, '', 1)}' (the file edgetpu_compiler was given)"
    return (
        f"the file edgetpu_compiler was given to make '{name}' (its name does not say which: "
        f"the compiler names its output <input>{_EDGETPU_SUFFIX}.tflite)"
    )


class EdgefleetError(Exception):
    """Root of every edgefleet error; ``str()`` is the message, ``hint`` what to do."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class ModelError(EdgefleetError):
    """The model file is at fault."""

    def __init__(self, path: Path | str, message: str, *, hint: str = "") -> None:
        super().__init__(f"{path}: {message}", hint=hint)
        self.path = str(path)


class ModelNotFound(ModelError):
    """The model path does not exist or is not a readable file."""

    def __init__(self, path: Path | str, reason: str = "no such file") -> None:
        super().__init__(path, reason, hint="check the path")


class NotATFLiteModel(ModelError):
    """The file is not a TensorFlow Lite flatbuffer at all."""

    def __init__(self, path: Path | str, detail: str) -> None:
        super().__init__(
            path,
            f"not a TensorFlow Lite model ({detail})",
            hint="pass a .tflite file (exported with the TFLite converter)",
        )


class CorruptModel(ModelError):
    """The file starts like a TFLite model but is truncated or corrupt."""

    def __init__(self, path: Path | str, detail: str) -> None:
        super().__init__(
            path,
            f"corrupt or truncated TensorFlow Lite model ({detail})",
            hint="copy or download the file again and compare its sha256",
        )


class UnresolvedCustomOp(ModelError):
    """The model uses a custom op that this interpreter cannot resolve."""

    def __init__(self, path: Path | str, op: str, *, message: str = "", hint: str = "") -> None:
        super().__init__(
            path,
            message or f"uses custom op '{op}', which this interpreter does not provide",
            hint=hint
            or "use a runtime or delegate that registers this op, or re-export the model "
            "with builtin ops only",
        )
        self.op = op


class ModelCompiledForEdgeTPU(UnresolvedCustomOp):
    """The model was compiled for the Coral Edge TPU but no Edge TPU delegate is in use.

    ``fell_back`` is the case of ``--allow-cpu-fallback`` with no Edge TPU present: the
    fallback cannot help, since the compiled graph runs on the Edge TPU only.
    """

    def __init__(self, path: Path | str, *, fell_back: bool = False) -> None:
        cpu_build = cpu_build_of(path)
        if fell_back:
            message = (
                "compiled for the Coral Edge TPU, and no Edge TPU could be loaded: "
                "--allow-cpu-fallback cannot run it, the CPU needs a CPU build of the model"
            )
            hint = f"attach the Coral (and install libedgetpu1-std), or run {cpu_build} on the CPU"
        else:
            message = "compiled for the Coral Edge TPU, but no Edge TPU delegate is loaded"
            hint = (
                "run it with the Edge TPU delegate (--delegate edgetpu; install libedgetpu1-std "
                f"and attach a Coral device), or run the CPU build of the model: {cpu_build}"
            )
        super().__init__(path, "edgetpu-custom-op", message=message, hint=hint)


class TensorAllocationFailed(ModelError):
    """The interpreter could not allocate the model's tensors."""

    def __init__(self, path: Path | str, detail: str) -> None:
        super().__init__(
            path,
            f"tensor allocation failed ({detail})",
            hint="check the model's input shapes and free memory, or try another delegate",
        )


class UnsupportedModel(ModelError):
    """The model loads, but its outputs fit no task this runtime knows."""


class InputError(EdgefleetError):
    """What was fed to the model is at fault."""


class InputMismatch(InputError):
    """An input tensor of the wrong shape or dtype."""


class ImageError(InputError):
    """An image file that cannot be read or decoded."""


class LabelsError(InputError):
    """A label file that cannot be read."""


class SettingError(EdgefleetError):
    """A setting or command-line option is invalid."""


class EnvironmentProblem(EdgefleetError):
    """This machine lacks something the request needs."""


class BackendUnavailable(EnvironmentProblem):
    """No usable TFLite interpreter backend is installed."""


class SystemTooOld(BackendUnavailable):
    """A backend is installed but its libraries need a newer glibc or libstdc++ than this OS has."""

    def __init__(self, message: str, *, missing: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.missing = missing
        """The symbol version the dynamic loader did not find, e.g. ``GLIBC_2.34``."""


class DelegateUnavailable(EnvironmentProblem):
    """A delegate library is missing or fails to load."""


class InferenceFailed(EnvironmentProblem):
    """The interpreter failed while running a model that loaded."""
