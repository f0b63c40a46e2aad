"""Reading and inspecting a .tflite file without running it.

Inspection parses the flatbuffer (with the ``tflite`` package's bindings
generated from the TFLite schema), so it works for models this machine cannot
load, such as an Edge TPU model on a board without a TPU.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flatbuffers  # type: ignore[import-untyped]
import tflite

from .errors import CorruptModel, ModelNotFound, NotATFLiteModel

TFLITE_IDENTIFIER = b"TFL3"
EDGETPU_CUSTOM_OP = "edgetpu-custom-op"
DETECTION_POSTPROCESS_OP = "TFLite_Detection_PostProcess"
METADATA_NAME = "TFLITE_METADATA"
_MIN_SIZE = 8  # root offset + file identifier

_TENSOR_TYPES = {v: k.lower() for k, v in vars(tflite.TensorType).items() if k.isupper()}
_BUILTIN_OPS = {v: k for k, v in vars(tflite.BuiltinOperator).items() if k.isupper()}
_BUILTIN_NAMES = frozenset(_BUILTIN_OPS.values())


@dataclass(frozen=True)
class ModelBytes:
    """The exact bytes of a model, with where they came from and their sha256."""

    source: str
    content: bytes
    sha256: str

    @classmethod
    def from_bytes(cls, content: bytes, source: str = "<bytes>") -> ModelBytes:
        """Wrap in-memory bytes (for example a download whose hash was just checked)."""
        return cls(source=source, content=content, sha256=hashlib.sha256(content).hexdigest())

    @property
    def size(self) -> int:
        """Size in bytes."""
        return len(self.content)


def read_model(path: Path | str) -> ModelBytes:
    """Read a model file whole; missing paths and non-TFLite files are named errors."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise ModelNotFound(path) from None
    except IsADirectoryError:
        raise ModelNotFound(path, "is a directory, not a model file") from None
    except PermissionError:
        raise ModelNotFound(path, "permission denied") from None
    model = ModelBytes.from_bytes(content, str(path))
    check_identifier(model)
    return model


def check_identifier(model: ModelBytes) -> None:
    """Raise ``NotATFLiteModel`` unless the bytes carry the TFLite file identifier."""
    if model.size < _MIN_SIZE:
        raise NotATFLiteModel(model.source, f"only {model.size} bytes")
    if model.content[4:8] != TFLITE_IDENTIFIER:
        raise NotATFLiteModel(model.source, f"no '{TFLITE_IDENTIFIER.decode()}' file identifier")


@dataclass(frozen=True)
class TensorInfo:
    """One input or output tensor: shape, dtype and per-tensor quantization."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        """True for integer tensors that carry a scale."""
        return self.scale != 0.0


@dataclass(frozen=True)
class Normalization:
    """How float inputs are made from pixels: ``(pixel - mean) / std``, per channel or for all."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def range(self) -> tuple[float, float]:
        """The values pixels 0 and 255 become (for the first channel)."""
        return (-self.mean[0] / self.std[0], (255.0 - self.mean[0]) / self.std[0])


@dataclass(frozen=True)
class OperatorInfo:
    """One node of the graph: its op name and its input and output tensor indices."""

    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """What a model is, from its flatbuffer alone."""

    source: str
    size: int
    sha256: str
    schema_version: int
    description: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    operators: tuple[OperatorInfo, ...]
    metadata_labels: tuple[str, ...] | None = field(default=None)
    normalization: Normalization | None = field(default=None)
    """The first input's ``(pixel - mean) / std`` from the TFLite metadata, where it has one."""

    @property
    def op_names(self) -> tuple[str, ...]:
        """Distinct operator names, in first-use order."""
        return tuple(dict.fromkeys(op.name for op in self.operators))

    @property
    def custom_ops(self) -> tuple[str, ...]:
        """The op names that are custom ops (not TFLite builtins), in first-use order."""
        return tuple(name for name in self.op_names if name not in _BUILTIN_NAMES)

    @property
    def edgetpu_compiled(self) -> bool:
        """True when the model holds ops compiled for the Coral Edge TPU."""
        return EDGETPU_CUSTOM_OP in self.op_names

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, as ``edgefleet model inspect --json`` prints it."""
        return {
            "model": self.source,
            "size_bytes": self.size,
            "sha256": self.sha256,
            "schema_version": self.schema_version,
            "description": self.description,
            "edgetpu_compiled": self.edgetpu_compiled,
            "inputs": [_tensor_dict(t) for t in self.inputs],
            "outputs": [_tensor_dict(t) for t in self.outputs],
            "operators": list(self.op_names),
            "metadata_label_count": len(self.metadata_labels) if self.metadata_labels else 0,
            "metadata_normalization": (
                {"mean": list(self.normalization.mean), "std": list(self.normalization.std)}
                if self.normalization
                else None
            ),
        }


def _tensor_dict(t: TensorInfo) -> dict[str, Any]:
    return {
        "name": t.name,
        "shape": list(t.shape),
        "dtype": t.dtype,
        "scale": t.scale,
        "zero_point": t.zero_point,
    }


def inspect_model(model: ModelBytes) -> ModelInfo:
    """Parse the flatbuffer of ``model`` (main subgraph) into a ``ModelInfo``."""
    check_identifier(model)
    try:
        return _parse(model)
    except (IndexError, ValueError, TypeError, struct.error) as exc:
        # The generated readers index straight into the buffer: a truncated file
        # surfaces as an out-of-range read somewhere in the tree.
        raise CorruptModel(model.source, f"flatbuffer does not parse: {exc}") from exc


def _parse(model: ModelBytes) -> ModelInfo:
    root = tflite.Model.GetRootAs(model.content, 0)
    if root.SubgraphsLength() < 1:
        raise CorruptModel(model.source, "no subgraph")
    graph = root.Subgraphs(0)
    tensors = [_tensor(graph, i) for i in range(graph.TensorsLength())]
    op_names = [_op_name(root.OperatorCodes(i)) for i in range(root.OperatorCodesLength())]
    operators = tuple(
        OperatorInfo(
            name=op_names[op.OpcodeIndex()],
            inputs=tuple(int(i) for i in op.InputsAsNumpy()) if op.InputsLength() else (),
            outputs=tuple(int(i) for i in op.OutputsAsNumpy()) if op.OutputsLength() else (),
        )
        for op in (graph.Operators(i) for i in range(graph.OperatorsLength()))
    )
    return ModelInfo(
        source=model.source,
        size=model.size,
        sha256=model.sha256,
        schema_version=root.Version(),
        description=(root.Description() or b"").decode("utf-8", "replace"),
        inputs=tuple(tensors[i] for i in graph.InputsAsNumpy()),
        outputs=tuple(tensors[i] for i in graph.OutputsAsNumpy()),
        operators=operators,
        metadata_labels=_metadata_labels(root, model.content),
        normalization=_metadata_normalization(root),
    )


def _tensor(graph: Any, index: int) -> TensorInfo:
    t = graph.Tensors(index)
    q = t.Quantization()
    scale = float(q.Scale(0)) if q is not None and q.ScaleLength() else 0.0
    zero = int(q.ZeroPoint(0)) if q is not None and q.ZeroPointLength() else 0
    return TensorInfo(
        index=index,
        name=(t.Name() or b"").decode("utf-8", "replace"),
        shape=tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else (),
        dtype=_TENSOR_TYPES.get(t.Type(), f"type{t.Type()}"),
        scale=scale,
        zero_point=zero,
    )


def _op_name(code: Any) -> str:
    # Schema rule: the real builtin code is the larger of the two fields
    # (deprecated_builtin_code is an int8 kept for old readers).
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    if builtin == tflite.BuiltinOperator.CUSTOM:
        return (code.CustomCode() or b"").decode("utf-8", "replace")
    return str(_BUILTIN_OPS.get(builtin, f"BUILTIN_{builtin}"))


# --- TFLite metadata: labels packed with the model, input normalisation -----
# The TFLITE_METADATA buffer holds a ModelMetadata flatbuffer (metadata_schema.fbs);
# the files it names are stored in a zip archive appended to the model. Only the
# few fields needed to find the label file and the input's NormalizationOptions are
# read; field numbers follow the schema.
_AXIS_LABELS = 2  # AssociatedFileType.TENSOR_AXIS_LABELS
_MODEL_SUBGRAPHS, _MODEL_FILES = 3, 6  # ModelMetadata.subgraph_metadata, .associated_files
_SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS = 2, 3  # SubGraphMetadata.input/output_tensor_metadata
_TENSOR_PROCESS_UNITS, _TENSOR_FILES = 4, 6  # TensorMetadata.process_units, .associated_files
_UNIT_TYPE, _UNIT_OPTIONS = 0, 1  # ProcessUnit.options_type, .options (a union)
_NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions.NormalizationOptions
_NORM_MEAN, _NORM_STD = 0, 1  # NormalizationOptions.mean, .std
_FILE_NAME, _FILE_TYPE = 0, 2  # AssociatedFile.name, .type


def _metadata_root(root: Any) -> Any | None:
    """The ModelMetadata table of the TFLITE_METADATA buffer, or None."""
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry.Name() != METADATA_NAME.encode():
            continue
        buffer = root.Buffers(entry.Buffer())
        if not buffer.DataLength():
            return None
        buf = bytearray(buffer.DataAsNumpy().tobytes())
        start = flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0)
        return flatbuffers.table.Table(buf, start)
    return None


def _metadata_labels(root: Any, content: bytes) -> tuple[str, ...] | None:
    metadata = _metadata_root(root)
    return None if metadata is None else _read_packed_labels(content, _label_file_names(metadata))


def _metadata_normalization(root: Any) -> Normalization | None:
    metadata = _metadata_root(root)
    subgraphs = _vector(metadata, _MODEL_SUBGRAPHS) if metadata is not None else []
    inputs = _vector(subgraphs[0], _SUBGRAPH_INPUTS) if subgraphs else []
    for unit in _vector(inputs[0], _TENSOR_PROCESS_UNITS) if inputs else []:
        kind_offset = unit.Offset(4 + 2 * _UNIT_TYPE)
        kind = (
            unit.Get(flatbuffers.number_types.Uint8Flags, kind_offset + unit.Pos)
            if kind_offset
            else 0
        )
        options_offset = unit.Offset(4 + 2 * _UNIT_OPTIONS)
        if kind != _NORMALIZATION_OPTIONS or not options_offset:
            continue
        options = flatbuffers.table.Table(unit.Bytes, unit.Indirect(options_offset + unit.Pos))
        mean, std = _floats(options, _NORM_MEAN), _floats(options, _NORM_STD)
        if mean and std and all(s > 0 for s in std):
            return Normalization(tuple(mean), tuple(std))
    return None


def _floats(table: Any, field_number: int) -> list[float]:
    offset = table.Offset(4 + 2 * field_number)
    if not offset:
        return []
    start = table.Vector(offset)
    flags = flatbuffers.number_types.Float32Flags
    return [float(table.Get(flags, start + 4 * i)) for i in range(table.VectorLen(offset))]


def _label_file_names(root: Any) -> list[str]:
    files = _vector(root, _MODEL_FILES)
    for subgraph in _vector(root, _MODEL_SUBGRAPHS):
        for tensor in _vector(subgraph, _SUBGRAPH_OUTPUTS):
            files.extend(_vector(tensor, _TENSOR_FILES))
    names = []
    for f in files:
        kind_offset = f.Offset(4 + 2 * _FILE_TYPE)
        kind = f.Get(flatbuffers.number_types.Int8Flags, kind_offset + f.Pos) if kind_offset else 0
        name_offset = f.Offset(4 + 2 * _FILE_NAME)
        if kind == _AXIS_LABELS and name_offset:
            names.append(f.String(name_offset + f.Pos).decode("utf-8", "replace"))
    return names


def _vector(table: Any, field_number: int) -> list[Any]:
    offset = table.Offset(4 + 2 * field_number)
    if not offset:
        return []
    start = table.Vector(offset)
    return [
        flatbuffers.table.Table(table.Bytes, table.Indirect(start + 4 * i))
        for i in range(table.VectorLen(offset))
    ]


def _read_packed_labels(content: bytes, names: list[str]) -> tuple[str, ...] | None:
    if not names:
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            text = archive.read(names[0]).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError):
        return None
    return tuple(line.strip() for line in text.splitlines())
