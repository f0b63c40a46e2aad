"""Everything about running a .tflite model: backends, delegates, inspection, tasks, benchmarks."""

from .backends import BACKEND_ENV, Backend, BackendName, explain_import_failure, select_backend
from .bench import BenchResult, bench
from .delegates import (
    CpuDelegate,
    DelegateSettings,
    EdgeTpuDelegate,
    ExternalDelegate,
    GpuDelegate,
    parse_delegate,
)
from .engine import Engine
from .errors import (
    BackendUnavailable,
    CorruptModel,
    DelegateUnavailable,
    EdgefleetError,
    EnvironmentProblem,
    ImageError,
    InferenceFailed,
    InputError,
    InputMismatch,
    LabelsError,
    ModelCompiledForEdgeTPU,
    ModelError,
    ModelNotFound,
    NotATFLiteModel,
    SettingError,
    SystemTooOld,
    TensorAllocationFailed,
    UnresolvedCustomOp,
    UnsupportedModel,
)
from .images import load_image
from .labels import Labels
from .modelfile import ModelBytes, ModelInfo, TensorInfo, inspect_model, read_model
from .platforms import InterpreterFacts, RuntimeChoice, choose_runtime
from .predictor import RESULT_KEYS, Prediction, Predictor
from .preprocess import Preprocessor, ResizeMode, Transform
from .tasks import Classification, Detection, Keypoint, RawTensor, TaskName, detect_task

__all__ = [
    "BACKEND_ENV",
    "RESULT_KEYS",
    "Backend",
    "BackendName",
    "BackendUnavailable",
    "BenchResult",
    "Classification",
    "CorruptModel",
    "CpuDelegate",
    "DelegateSettings",
    "DelegateUnavailable",
    "Detection",
    "EdgeTpuDelegate",
    "EdgefleetError",
    "Engine",
    "EnvironmentProblem",
    "ExternalDelegate",
    "GpuDelegate",
    "ImageError",
    "InferenceFailed",
    "InputError",
    "InputMismatch",
    "InterpreterFacts",
    "Keypoint",
    "Labels",
    "LabelsError",
    "ModelBytes",
    "ModelCompiledForEdgeTPU",
    "ModelError",
    "ModelInfo",
    "ModelNotFound",
    "NotATFLiteModel",
    "Prediction",
    "Predictor",
    "Preprocessor",
    "RawTensor",
    "ResizeMode",
    "RuntimeChoice",
    "SettingError",
    "SystemTooOld",
    "TaskName",
    "TensorAllocationFailed",
    "TensorInfo",
    "Transform",
    "UnresolvedCustomOp",
    "UnsupportedModel",
    "bench",
    "choose_runtime",
    "detect_task",
    "explain_import_failure",
    "inspect_model",
    "load_image",
    "parse_delegate",
    "read_model",
    "select_backend",
]
