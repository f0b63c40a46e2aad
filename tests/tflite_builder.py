"""Builds small, valid .tflite files for shapes and failure cases no real model covers.

Uses the flatbuffer schema bindings that LiteRT ships
(``ai_edge_litert.schema_py_generated``), so the files are what the real
converter would write for the same graph.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

_TYPES = {
    "float32": schema.TensorType.FLOAT32,
    "uint8": schema.TensorType.UINT8,
    "int8": schema.TensorType.INT8,
    "int32": schema.TensorType.INT32,
    "bool": schema.TensorType.BOOL,
}


@dataclass(frozen=True)
class Quant:
    """Per-tensor quantization."""

    scale: float
    zero_point: int


def _tensor(
    name: str, shape: tuple[int, ...], dtype: str, buffer: int, quant: Quant | None = None
) -> schema.TensorT:
    t = schema.TensorT()
    t.name = name
    t.shape = list(shape)
    t.type = _TYPES[dtype]
    t.buffer = buffer
    if quant is not None:
        q = schema.QuantizationParametersT()
        q.scale = [quant.scale]
        q.zeroPoint = [quant.zero_point]
        t.quantization = q
    return t


def _buffer(data: bytes = b"") -> schema.BufferT:
    b = schema.BufferT()
    b.data = list(data) if data else None
    return b


def _opcode(builtin: int, custom: str | None = None) -> schema.OperatorCodeT:
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = 1
    code.customCode = custom
    return code


def _operator(opcode: int, inputs: list[int], outputs: list[int]) -> schema.OperatorT:
    op = schema.OperatorT()
    op.opcodeIndex = opcode
    op.inputs = inputs
    op.outputs = outputs
    return op


def _finish(model: schema.ModelT) -> bytes:
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _model(
    subgraph: schema.SubGraphT, codes: list[schema.OperatorCodeT], buffers: list
) -> schema.ModelT:
    model = schema.ModelT()
    model.version = 3
    model.description = "built by edgefleet tests"
    model.operatorCodes = codes
    model.subgraphs = [subgraph]
    model.buffers = buffers
    return model


def reshape_model(
    height: int,
    width: int,
    dtype: str = "uint8",
    quant: Quant | None = None,
    *,
    target: tuple[int, ...] | None = None,
    channels: int = 3,
) -> bytes:
    """Input ``[1, H, W, C]`` reshaped to ``target`` (default ``[1, H*W*C]``): output = input.

    The output holds the input's values in order, so tests can check exactly
    what pre-processing wrote. A ``target`` with another element count makes
    tensor allocation fail.
    """
    target = target or (1, height * width * channels)
    g = schema.SubGraphT()
    g.tensors = [
        _tensor("image", (1, height, width, channels), dtype, 1, quant),
        _tensor("new_shape", (len(target),), "int32", 2),
        _tensor("flat", target, dtype, 3, quant),
    ]
    g.inputs, g.outputs = [0], [2]
    g.operators = [_operator(0, [0, 1], [2])]
    g.name = "main"
    shape_bytes = np.asarray(target, dtype="<i4").tobytes()
    buffers = [_buffer(), _buffer(), _buffer(shape_bytes), _buffer()]
    return _finish(_model(g, [_opcode(schema.BuiltinOperator.RESHAPE)], buffers))


def two_output_model(size: int = 4) -> bytes:
    """Float input ``[1, size]`` feeding two outputs: no task but ``raw`` fits it."""
    g = schema.SubGraphT()
    g.tensors = [
        _tensor("x", (1, size), "float32", 1),
        _tensor("y", (1, size), "float32", 2),
        _tensor("relu", (1, size), "float32", 3),
        _tensor("relu6", (1, size), "float32", 4),
    ]
    g.inputs, g.outputs = [0, 1], [2, 3]
    g.operators = [_operator(0, [0, 1], [2]), _operator(1, [0, 1], [3])]
    codes = [_opcode(schema.BuiltinOperator.ADD), _opcode(schema.BuiltinOperator.MUL)]
    return _finish(_model(g, codes, [_buffer() for _ in range(5)]))


def image_and_state_model(height: int = 4, width: int = 4) -> bytes:
    """Float image ``[1, H, W, 3]`` plus a ``state`` input of the same shape: output ``sum``
    = image + state. Carrying ``sum`` back into ``state`` accumulates the frames (an RNN's
    state in miniature); left unfed, ``state`` is zeros and ``sum`` is the image."""
    shape = (1, height, width, 3)
    g = schema.SubGraphT()
    g.tensors = [
        _tensor("image", shape, "float32", 1),
        _tensor("state", shape, "float32", 2),
        _tensor("sum", shape, "float32", 3),
    ]
    g.inputs, g.outputs = [0, 1], [2]
    g.operators = [_operator(0, [0, 1], [2])]
    codes = [_opcode(schema.BuiltinOperator.ADD)]
    return _finish(_model(g, codes, [_buffer() for _ in range(4)]))


def hang_when_bright_model(height: int = 8, width: int = 8) -> bytes:
    """Float image model whose ``invoke`` never returns when the frame is bright.

    ``WHILE mean(x) > 0.5: x = x + 0``. With the usual ``(pixel - 127.5) / 127.5``
    input, a frame averaging above ~191 loops forever inside the interpreter: a
    real hung inference, for watchdog tests. Darker frames pass straight through.
    """
    shape = (1, height, width, 3)
    main = schema.SubGraphT()
    main.name = "main"
    main.tensors = [_tensor("image", shape, "float32", 1), _tensor("out", shape, "float32", 2)]
    main.inputs, main.outputs = [0], [1]
    loop = _operator(0, [0], [1])
    loop.builtinOptionsType = schema.BuiltinOptions.WhileOptions
    loop.builtinOptions = schema.WhileOptionsT()
    loop.builtinOptions.condSubgraphIndex = 1
    loop.builtinOptions.bodySubgraphIndex = 2
    main.operators = [loop]

    cond = schema.SubGraphT()
    cond.name = "bright"
    cond.tensors = [
        _tensor("x", shape, "float32", 3),
        _tensor("axes", (4,), "int32", 4),
        _tensor("mean", (), "float32", 5),
        _tensor("half", (), "float32", 6),
        _tensor("is_bright", (), "bool", 7),
    ]
    cond.inputs, cond.outputs = [0], [4]
    mean = _operator(1, [0, 1], [2])
    mean.builtinOptionsType = schema.BuiltinOptions.ReducerOptions
    mean.builtinOptions = schema.ReducerOptionsT()
    mean.builtinOptions.keepDims = False
    cond.operators = [mean, _operator(2, [2, 3], [4])]

    body = schema.SubGraphT()
    body.name = "same"
    body.tensors = [
        _tensor("x", shape, "float32", 8),
        _tensor("zero", (1,), "float32", 9),
        _tensor("y", shape, "float32", 10),
    ]
    body.inputs, body.outputs = [0], [2]
    body.operators = [_operator(3, [0, 1], [2])]

    buffers = [_buffer() for _ in range(11)]
    buffers[4] = _buffer(np.asarray([0, 1, 2, 3], dtype="<i4").tobytes())
    buffers[6] = _buffer(np.asarray(0.5, dtype="<f4").tobytes())
    buffers[9] = _buffer(np.asarray([0.0], dtype="<f4").tobytes())
    codes = [
        _opcode(schema.BuiltinOperator.WHILE),
        _opcode(schema.BuiltinOperator.MEAN),
        _opcode(schema.BuiltinOperator.GREATER),
        _opcode(schema.BuiltinOperator.ADD),
    ]
    model = _model(main, codes, buffers)
    model.subgraphs = [main, cond, body]
    return _finish(model)


def custom_op_model(op_name: str, shape: tuple[int, ...] = (1, 8, 8, 3)) -> bytes:
    """One custom op between input and output: loads only where ``op_name`` is registered."""
    g = schema.SubGraphT()
    g.tensors = [_tensor("in", shape, "uint8", 1), _tensor("out", shape, "uint8", 2)]
    g.inputs, g.outputs = [0], [1]
    g.operators = [_operator(0, [0], [1])]
    codes = [_opcode(schema.BuiltinOperator.CUSTOM, op_name)]
    return _finish(_model(g, codes, [_buffer(), _buffer(), _buffer()]))


def with_label_metadata(
    model_bytes: bytes, labels: list[str], filename: str = "labels.txt"
) -> bytes:
    """Attach TFLite metadata naming ``filename`` as the output's axis labels, and pack it.

    Writes the ModelMetadata fields the way the metadata writer does: an
    AssociatedFile of type TENSOR_AXIS_LABELS on the first output tensor, the
    file itself in a zip archive appended to the model.
    """
    model = schema.ModelT.InitFromPackedBuf(model_bytes, 0)
    model.buffers.append(_buffer(_label_metadata(filename)))
    entry = schema.MetadataT()
    entry.name = "TFLITE_METADATA"
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(filename, "\n".join(labels) + "\n")
    return _finish(model) + archive.getvalue()


def _label_metadata(filename: str) -> bytes:
    # metadata_schema.fbs: AssociatedFile{name:0, description:1, type:2}, TensorMetadata{
    # associated_files:6}, SubGraphMetadata{output_tensor_metadata:3}, ModelMetadata{
    # name:0, subgraph_metadata:3}. TENSOR_AXIS_LABELS = 2.
    b = flatbuffers.Builder(256)
    name = b.CreateString(filename)
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, name, 0)
    b.PrependInt8Slot(2, 2, 0)
    assoc = b.EndObject()
    files = _vector_of(b, [assoc])
    b.StartObject(7)
    b.PrependUOffsetTRelativeSlot(6, files, 0)
    tensor = b.EndObject()
    outputs = _vector_of(b, [tensor])
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(3, outputs, 0)
    subgraph = b.EndObject()
    subgraphs = _vector_of(b, [subgraph])
    model_name = b.CreateString("test model")
    b.StartObject(8)
    b.PrependUOffsetTRelativeSlot(0, model_name, 0)
    b.PrependUOffsetTRelativeSlot(3, subgraphs, 0)
    b.Finish(b.EndObject(), file_identifier=b"M001")
    return bytes(b.Output())


def _vector_of(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return b.EndVector()


def fails_when_bright_model(height: int = 8, width: int = 8, limit: int = 128) -> bytes:
    """``uint8 [1, H, W, 3]`` image whose ``invoke`` fails when any pixel is ``limit`` or more.

    ``GATHER(table[limit], CAST(image, int32))``: each pixel indexes a table of ``limit``
    floats, and the interpreter refuses an index out of its bounds at run time. Dark
    frames pass, bright ones raise: a model that loads and validates on a dark frame,
    then fails in production, for probation tests.
    """
    shape = (1, height, width, 3)
    g = schema.SubGraphT()
    g.name = "main"
    g.tensors = [
        _tensor("image", shape, "uint8", 1),
        _tensor("indices", shape, "int32", 2),
        _tensor("table", (limit,), "float32", 3),
        _tensor("out", shape, "float32", 4),
    ]
    g.inputs, g.outputs = [0], [3]
    cast = _operator(0, [0], [1])
    gather = _operator(1, [2, 1], [3])
    gather.builtinOptionsType = schema.BuiltinOptions.GatherOptions
    gather.builtinOptions = schema.GatherOptionsT()
    gather.builtinOptions.axis = 0
    g.operators = [cast, gather]
    table = np.linspace(0.0, 1.0, limit, dtype="<f4").tobytes()
    buffers = [_buffer(), _buffer(), _buffer(), _buffer(table), _buffer()]
    codes = [_opcode(schema.BuiltinOperator.CAST), _opcode(schema.BuiltinOperator.GATHER)]
    return _finish(_model(g, codes, buffers))


def tile_model(height: int = 8, width: int = 8, copies: int = 1000) -> bytes:
    """``uint8 [1, H, W, 3]`` image through ``CAST`` to float32, ``TILE`` x ``copies``, ``SLICE``
    back: output = the image as floats, through an intermediate of ``H*W*3*copies*4`` bytes.

    A tiny, valid file whose tensor arena is as large as a test wants: with ``copies`` in the
    millions it needs gigabytes, for memory-budget tests; with a few thousand it is simply
    slow (the tile is written on every invoke), for pace tests.
    """
    shape = (1, height, width, 3)
    tiled = (1, height, width, 3 * copies)
    g = schema.SubGraphT()
    g.name = "main"
    g.tensors = [
        _tensor("image", shape, "uint8", 1),
        _tensor("pixels", shape, "float32", 2),
        _tensor("multiples", (4,), "int32", 3),
        _tensor("tiled", tiled, "float32", 4),
        _tensor("begin", (4,), "int32", 5),
        _tensor("size", (4,), "int32", 6),
        _tensor("out", shape, "float32", 7),
    ]
    g.inputs, g.outputs = [0], [6]
    g.operators = [_operator(0, [0], [1]), _operator(1, [1, 2], [3]), _operator(2, [3, 4, 5], [6])]
    buffers = [_buffer() for _ in range(8)]
    buffers[3] = _buffer(np.asarray([1, 1, 1, copies], dtype="<i4").tobytes())
    buffers[5] = _buffer(np.asarray([0, 0, 0, 0], dtype="<i4").tobytes())
    buffers[6] = _buffer(np.asarray(shape, dtype="<i4").tobytes())
    codes = [
        _opcode(schema.BuiltinOperator.CAST),
        _opcode(schema.BuiltinOperator.TILE),
        _opcode(schema.BuiltinOperator.SLICE),
    ]
    return _finish(_model(g, codes, buffers))


def slows_down_model(
    height: int = 8, width: int = 8, *, fast_invokes: int = 40, loops: int = 1_000_000
) -> bytes:
    """``uint8 [1, H, W, 3]`` image to its float copy; fast for ``fast_invokes`` invokes of
    one interpreter, then every invoke spins a ``WHILE`` loop ``loops`` times first.

    A resource variable (initialised once by ``CALL_ONCE``) counts the invokes, and the loop
    runs ``min(max(count - fast_invokes, 0), 1) * loops`` times: a model that passes a
    validation's few invokes and then, on the live stream, takes far longer than the frame
    interval, with no more memory. For probation's throughput tests.
    """
    shape = (1, height, width, 3)
    codes = [
        _opcode(schema.BuiltinOperator.CALL_ONCE),  # 0
        _opcode(schema.BuiltinOperator.VAR_HANDLE),  # 1
        _opcode(schema.BuiltinOperator.READ_VARIABLE),  # 2
        _opcode(schema.BuiltinOperator.ASSIGN_VARIABLE),  # 3
        _opcode(schema.BuiltinOperator.ADD),  # 4
        _opcode(schema.BuiltinOperator.SUB),  # 5
        _opcode(schema.BuiltinOperator.MAXIMUM),  # 6
        _opcode(schema.BuiltinOperator.MINIMUM),  # 7
        _opcode(schema.BuiltinOperator.MUL),  # 8
        _opcode(schema.BuiltinOperator.WHILE),  # 9
        _opcode(schema.BuiltinOperator.LESS),  # 10
        _opcode(schema.BuiltinOperator.CAST),  # 11
    ]
    buffers = [_buffer()]

    def buf(data: bytes = b"") -> int:
        buffers.append(_buffer(data))
        return len(buffers) - 1

    def scalar(value: int) -> int:
        return buf(np.asarray(value, dtype="<i4").tobytes())

    def var_handle(index: int) -> schema.OperatorT:
        op = _operator(1, [], [index])
        op.builtinOptionsType = schema.BuiltinOptions.VarHandleOptions
        op.builtinOptions = schema.VarHandleOptionsT()
        op.builtinOptions.sharedName = "invokes"
        return op

    main = schema.SubGraphT()
    main.name = "main"
    main.tensors = [
        _tensor("image", shape, "uint8", buf()),  # 0
        _tensor("handle", (), "int32", buf()),  # 1 (resource, set below)
        _tensor("count", (), "int32", buf()),  # 2
        _tensor("one", (), "int32", scalar(1)),  # 3
        _tensor("count1", (), "int32", buf()),  # 4
        _tensor("fast", (), "int32", scalar(fast_invokes)),  # 5
        _tensor("over", (), "int32", buf()),  # 6
        _tensor("zero", (), "int32", scalar(0)),  # 7
        _tensor("over0", (), "int32", buf()),  # 8
        _tensor("slow", (), "int32", buf()),  # 9
        _tensor("loops", (), "int32", scalar(loops)),  # 10
        _tensor("n", (), "int32", buf()),  # 11
        _tensor("i_out", (), "int32", buf()),  # 12
        _tensor("n_out", (), "int32", buf()),  # 13
        _tensor("out", shape, "float32", buf()),  # 14
    ]
    main.tensors[1].type = schema.TensorType.RESOURCE
    call_once = _operator(0, [], [])
    call_once.builtinOptionsType = schema.BuiltinOptions.CallOnceOptions
    call_once.builtinOptions = schema.CallOnceOptionsT()
    call_once.builtinOptions.initSubgraphIndex = 3
    loop = _operator(9, [7, 11], [12, 13])
    loop.builtinOptionsType = schema.BuiltinOptions.WhileOptions
    loop.builtinOptions = schema.WhileOptionsT()
    loop.builtinOptions.condSubgraphIndex = 1
    loop.builtinOptions.bodySubgraphIndex = 2
    main.operators = [
        call_once,
        var_handle(1),
        _operator(2, [1], [2]),
        _operator(4, [2, 3], [4]),
        _operator(3, [1, 4], []),
        _operator(5, [4, 5], [6]),
        _operator(6, [6, 7], [8]),
        _operator(7, [8, 3], [9]),
        _operator(8, [9, 10], [11]),
        loop,
        _operator(11, [0], [14]),
    ]
    main.inputs, main.outputs = [0], [14, 12]

    cond = schema.SubGraphT()
    cond.name = "more"
    cond.tensors = [
        _tensor("i", (), "int32", buf()),
        _tensor("n", (), "int32", buf()),
        _tensor("less", (), "bool", buf()),
    ]
    cond.inputs, cond.outputs = [0, 1], [2]
    cond.operators = [_operator(10, [0, 1], [2])]

    body = schema.SubGraphT()
    body.name = "spin"
    body.tensors = [
        _tensor("i", (), "int32", buf()),
        _tensor("n", (), "int32", buf()),
        _tensor("one", (), "int32", scalar(1)),
        _tensor("i1", (), "int32", buf()),
    ]
    body.inputs, body.outputs = [0, 1], [3, 1]
    body.operators = [_operator(4, [0, 2], [3])]

    init = schema.SubGraphT()
    init.name = "init"
    init.tensors = [
        _tensor("handle", (), "int32", buf()),
        _tensor("zero", (), "int32", scalar(0)),
    ]
    init.tensors[0].type = schema.TensorType.RESOURCE
    init.inputs, init.outputs = [], []
    init.operators = [var_handle(0), _operator(3, [0, 1], [])]

    model = _model(main, codes, buffers)
    model.subgraphs = [main, cond, body, init]
    return _finish(model)
