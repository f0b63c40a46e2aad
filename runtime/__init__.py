"""Everything about running a .tflite model: backends, delegates, inspection, tasks, benchmarks."""

from .anchors import ANCHOR_PRESETS, AnchorDetectionTask, AnchorSpec
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
from .landmarks import Crop, LandmarksTask, crop, in_frame
from .modelfile import ModelBytes, ModelInfo, TensorInfo, inspect_model, read_model
from .platforms import InterpreterFacts, RuntimeChoice, choose_runtime
from .predictor import RESULT_KEYS, Prediction, Predictor
from .preprocess import Preprocessor, ResizeMode, Transform
from .recognition import TaskChoice, choose_task, detect_task
from .segmentation import SegmentationTask, mask_image, save_mask_png, with_region_coverage
from .tasks import (
    Classification,
    Detection,
    Keypoint,
    Landmarks,
    RawTensor,
    Segment,
    TaskName,
)
from .yolo import YoloTask

__all__ = [
    "ANCHOR_PRESETS",
    "BACKEND_ENV",
    "RESULT_KEYS",
    "AnchorDetectionTask",
    "AnchorSpec",
    "Backend",
    "BackendName",
    "BackendUnavailable",
    "BenchResult",
    "Classification",
    "CorruptModel",
    "CpuDelegate",
    "Crop",
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
    "Landmarks",
    "LandmarksTask",
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
    "Segment",
    "SegmentationTask",
    "SettingError",
    "SystemTooOld",
    "TaskChoice",
    "TaskName",
    "TensorAllocationFailed",
    "TensorInfo",
    "Transform",
    "UnresolvedCustomOp",
    "UnsupportedModel",
    "YoloTask",
    "bench",
    "choose_runtime",
    "choose_task",
    "crop",
    "detect_task",
    "explain_import_failure",
    "in_frame",
    "inspect_model",
    "load_image",
    "mask_image",
    "parse_delegate",
    "read_model",
    "save_mask_png",
    "select_backend",
    "with_region_coverage",
]
