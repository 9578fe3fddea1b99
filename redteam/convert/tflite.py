"""Read TensorFlow Lite models without TensorFlow.

A ``.tflite`` file is a flatbuffer (read with the schema classes of PyPI ``tflite``): subgraph 0 lists operators in
execution order, each reading and writing numbered tensors; constant tensors carry their data in a buffer. Each builtin
operator becomes the TensorFlow graph ops of :mod:`redteam.convert.tf_graph` that compute the same thing (CONV_2D ->
a Conv2D with its bias fused, PRELU -> Relu + alpha * Minimum(x, 0), ...), so one module runs both formats with the
same semantics: NHWC outside and NCHW inside, TensorFlow's SAME padding, constants as ``nn.Parameter``s.

Weights stored as float16 or as int8/uint8 with scales (per tensor or per channel, read directly by hybrid kernels or
through a DEQUANTIZE op) are dequantised to float32 while reading. Models whose activations are quantised are refused.

TFLite files bake in their batch size: a RESHAPE whose leading size equals the model input's batch keeps the batch of
whatever is fed instead (tf_graph already does so for a leading 1 or -1).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol, TypeVar

import numpy as np
import tflite

from redteam.assets import RegistryFile
from redteam.convert.graph import UnsupportedModelError
from redteam.convert.tf_graph import GraphNode, TFGraphModule, load_converted
from redteam.errors import RedteamError
from redteam.registry import RuleTable

#: The name importers (and tests) know this converter's error by.
UnsupportedTFLiteError = UnsupportedModelError

_DTYPES: dict[int, np.dtype] = {
    tflite.TensorType.FLOAT32: np.dtype("<f4"),
    tflite.TensorType.FLOAT16: np.dtype("<f2"),
    tflite.TensorType.INT32: np.dtype("<i4"),
    tflite.TensorType.INT64: np.dtype("<i8"),
    tflite.TensorType.INT16: np.dtype("<i2"),
    tflite.TensorType.INT8: np.dtype("i1"),
    tflite.TensorType.UINT8: np.dtype("u1"),
    tflite.TensorType.BOOL: np.dtype("?"),
}
_ACTIVATIONS = {
    tflite.ActivationFunctionType.RELU: "Relu",
    tflite.ActivationFunctionType.RELU6: "Relu6",
    tflite.ActivationFunctionType.TANH: "Tanh",
}
_PADDING = {tflite.Padding.SAME: "SAME", tflite.Padding.VALID: "VALID"}
# TFLite's L2_NORMALIZATION divides by max(norm, 1e-6).
_L2_EPSILON = np.array(1e-6, np.float32)


class _Translator:
    """Walks subgraph 0 once, appending the equivalent :class:`GraphNode`s; rules call back for tensors and options."""

    def __init__(self, data: bytes):
        if data[4:8] != b"TFL3":
            raise RedteamError("not a TFLite model (its flatbuffer identifier is not TFL3)")
        self.data = data
        self.model = tflite.Model.GetRootAs(data, 0)
        self.graph = self.model.Subgraphs(0)
        self.names = _tensor_names(self.graph)
        self.nodes: list[GraphNode] = []
        self.folded: dict[int, np.ndarray] = {}  # outputs of DEQUANTIZE on constants
        self._emitted: set[str] = set()
        self.current = ""  # the operator being translated, for error messages
        input_shape = self.shape(self.graph.Inputs(0))
        self.batch = input_shape[0] if input_shape else None  # baked into the file

    def shape(self, index: int) -> list[int]:
        tensor = self.graph.Tensors(index)
        return [int(s) for s in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else []

    def array(self, index: int) -> np.ndarray | None:
        """A constant tensor's value (weights dequantised to float32), or ``None`` for a run-time tensor."""
        if index in self.folded:
            return self.folded[index]
        tensor = self.graph.Tensors(index)
        buffer = self.model.Buffers(tensor.Buffer())
        if buffer.Offset() > 1:  # large models keep buffers after the flatbuffer
            raw = self.data[buffer.Offset() : buffer.Offset() + buffer.Size()]
        elif buffer.DataLength():
            raw = buffer.DataAsNumpy().tobytes()
        else:
            return None
        if tensor.Type() not in _DTYPES:
            raise UnsupportedModelError(f"tensor {self.names[index]!r}: TFLite type {tensor.Type()}")
        value = np.frombuffer(raw, dtype=_DTYPES[tensor.Type()]).reshape(self.shape(index)).copy()  # writable
        if tensor.Type() == tflite.TensorType.FLOAT16:
            return value.astype(np.float32)
        quantisation = tensor.Quantization()
        if quantisation is not None and quantisation.ScaleLength():
            return _dequantise(value, quantisation)
        return value

    def require(self, index: int) -> np.ndarray:
        value = self.array(index) if index >= 0 else None
        if value is None:
            raise UnsupportedModelError(f"{self.current}: an input that must be constant is computed or absent")
        return value

    def tensor(self, index: int) -> str:
        """The node name of an input tensor (a constant gets its Const node on first use)."""
        name = self.names[index]
        value = self.array(index)
        if value is not None and name not in self._emitted:
            self.constant(name, value)
            self._emitted.add(name)
        return name

    def constant(self, name: str, value: np.ndarray) -> str:
        return self.node(name, "Const", [], {"value": value})

    def node(self, name: str, op: str, inputs: list[str], attrs: dict | None = None) -> str:
        self.nodes.append(GraphNode(name, op, inputs, attrs or {}))
        return name

    def emit(self, out: int, op: str, inputs: list[str], attrs: dict | None = None, activation: int = 0) -> None:
        """The node computing tensor ``out``, then its fused activation as a node of its own."""
        name = self.names[out]
        if activation == tflite.ActivationFunctionType.NONE:
            self.node(name, op, inputs, attrs)
            return
        if activation not in _ACTIVATIONS:
            raise UnsupportedModelError(f"{self.current}: fused activation {activation}")
        self.node(name, _ACTIVATIONS[activation], [self.node(f"{name}/linear", op, inputs, attrs)])


def _tensor_names(graph: tflite.SubGraph) -> list[str]:
    """Unique node names for the tensors: their own, without a ``:N`` suffix (graph inputs strip ``:0``)."""
    names, seen = [], set()
    for index in range(graph.TensorsLength()):
        name = re.sub(r":(\d+)$", r"_\1", (graph.Tensors(index).Name() or b"").decode()) or f"tensor_{index}"
        if name in seen:
            name = f"{name}_{index}"
        seen.add(name)
        names.append(name)
    return names


def _dequantise(value: np.ndarray, quantisation: tflite.QuantizationParameters) -> np.ndarray:
    """``(q - zero_point) * scale``, per tensor or per channel along the quantised dimension."""
    scale = quantisation.ScaleAsNumpy().astype(np.float32)
    zero = quantisation.ZeroPointAsNumpy() if quantisation.ZeroPointLength() else np.zeros(1, np.int64)
    if scale.size > 1:
        shape = [1] * value.ndim
        shape[quantisation.QuantizedDimension()] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((value.astype(np.int64) - zero).astype(np.float32) * scale).astype(np.float32)


Rule = Callable[[_Translator, str, tflite.Operator, list[int], int], None]
_RULES: RuleTable[Rule] = RuleTable()
_rule = _RULES.register


class _Table(Protocol):
    """A flatbuffer table class of PyPI ``tflite``, such as an operator's options."""

    def Init(self, buf: bytes, pos: int) -> None: ...


_Options = TypeVar("_Options", bound=_Table)


def _options(op: tflite.Operator, kind: type[_Options]) -> _Options:
    table = op.BuiltinOptions()
    options = kind()
    if table is None:
        raise UnsupportedModelError(f"operator without its {kind.__name__}")
    options.Init(table.Bytes, table.Pos)
    return options


def _window(options) -> dict:
    """Strides (and dilations) in TensorFlow's NHWC attribute form, with the padding mode."""
    attrs = {"strides": [1, options.StrideH(), options.StrideW(), 1], "padding": _PADDING[options.Padding()]}
    if hasattr(options, "DilationHFactor"):  # convolutions
        attrs["dilations"] = [1, options.DilationHFactor(), options.DilationWFactor(), 1]
    return attrs


@_rule("CONV_2D", "DEPTHWISE_CONV_2D")
def _conv(t: _Translator, name: str, op: tflite.Operator, ins: list[int], out: int) -> None:
    depthwise = name == "DEPTHWISE_CONV_2D"
    options = _options(op, tflite.DepthwiseConv2DOptions if depthwise else tflite.Conv2DOptions)
    weight = t.require(ins[1])  # [O, KH, KW, I]; depthwise [1, KH, KW, C * M]
    channels = t.shape(ins[0])[3]
    if depthwise:
        filters = weight[0].reshape(*weight.shape[1:3], channels, -1)  # TF's [KH, KW, C, M]
    elif weight.shape[3] != channels:
        raise UnsupportedModelError(f"{t.current}: grouped convolution")
    else:
        filters = weight.transpose(1, 2, 3, 0)  # TF's HWIO
    inputs = [t.tensor(ins[0]), t.constant(f"{t.names[out]}/filters", filters), t.tensor(ins[2])]  # bias required
    op_name = "FusedDepthwiseConv2dNative" if depthwise else "_FusedConv2D"
    attrs = {**_window(options), "fused_ops": ["BiasAdd"]}
    t.emit(out, op_name, inputs, attrs, options.FusedActivationFunction())


@_rule("FULLY_CONNECTED")
def _fully_connected(t: _Translator, name: str, op: tflite.Operator, ins: list[int], out: int) -> None:
    options = _options(op, tflite.FullyConnectedOptions)
    if options.WeightsFormat() != tflite.FullyConnectedOptionsWeightsFormat.DEFAULT:
        raise UnsupportedModelError(f"{t.current}: shuffled weights")
    weight = t.require(ins[1])  # [O, I]
    prefix = t.names[out]
    # TFLite flattens every leading axis into rows.
    flat_shape = t.constant(f"{prefix}/rows", np.array([-1, weight.shape[1]], np.int32))
    rows = t.node(f"{prefix}/flat", "Reshape", [t.tensor(ins[0]), flat_shape])
    result = t.node(
        f"{prefix}/matmul", "MatMul", [rows, t.constant(f"{prefix}/weights", weight)], {"transpose_b": True}
    )
    if len(ins) > 2 and ins[2] >= 0:
        result = t.node(f"{prefix}/biased", "BiasAdd", [result, t.tensor(ins[2])])
    shape = t.shape(out)
    if options.KeepNumDims() and len(shape) > 2:
        result = t.node(f"{prefix}/shaped", "Reshape", [result, t.constant(f"{prefix}/shape", _batched(t, shape))])
    t.emit(out, "Identity", [result], activation=options.FusedActivationFunction())


def _batched(t: _Translator, shape: list[int]) -> np.ndarray:
    """A baked-in target shape whose leading size is the model's batch -> -1 there (follow the batch fed)."""
    shape = list(shape)
    if shape and shape[0] == t.batch:
        shape[0] = -1
    return np.array(shape, np.int32)


@_rule("RESHAPE")
def _reshape(t: _Translator, name: str, op: tflite.Operator, ins: list[int], out: int) -> None:
    shape = t.array(ins[1]) if len(ins) > 1 and ins[1] >= 0 else None
    if shape is None:
        shape = _options(op, tflite.ReshapeOptions).NewShapeAsNumpy()
    target = t.constant(f"{t.names[out]}/shape", _batched(t, [int(s) for s in np.atleast_1d(shape)]))
    t.emit(out, "Reshape", [t.tensor(ins[0]), target])


@_rule("SQUEEZE")
def _squeeze(t: _Translator, name: str, op: tflite.Operator, ins: list[int], out: int) -> None:
    options = _options(op, tflite.SqueezeOptions)
    t.emit(out, "Squeeze", [t.tensor(ins[0])], {"squeeze_dims": [int(a) for a in options.SqueezeDimsAsNumpy()]})


_BINARY = {
    "ADD": ("AddV2", tflite.AddOptions),
    "SUB": ("Sub", tflite.SubOptions),
    "MUL": ("Mul", tflite.MulOptions),
    "DIV": ("RealDiv", tflite.DivOptions),
    "MAXIMUM": ("Maximum", None),
    "MINIMUM": ("Minimum", None),
}


@_rule(*_BINARY)
def _binary(t: _Translator, name: str, op: tflite.Operator, ins: list[int], out: int) -> None:
    tf_op, kind = _BINARY[name]
    activation = _options(op, kind).FusedActivationFunction() if kind and op.BuiltinOptions() else 0
    t.emit(out, tf_op, [t.tensor(i) for i in ins], activation=activation)


_UNARY = {
    "RELU": "Relu",
    "RELU6": "Relu6",
    "LOGISTIC": "Sigmoid",
    "TANH": "Tanh",
    "ELU": "Elu",
    "ABS": "Abs",
    "NEG": "Neg",
    "EXP": "Exp",
    "SQRT": "Sqrt",
    "RSQRT": "Rsqrt",
    "SQUARE": "Square",
}


@_rule(*_UNARY)
def _unary(t: _Translator, name: str, op: tflite.Operator, ins: list[int], out: int) -> None:
    t.emit(out, _UNARY[name], [t.tensor(ins[0])])


@_rule("PRELU")
def _prelu(t: _Translator, name: str, op: tflite.Operator, ins: list[int], out: int) -> None:
    t.emit(out, "Prelu", [t.tensor(ins[0]), t.tensor(ins[1])])


@_rule("L2_NORMALIZATION")
def _l2_normalization(t: _Translator, name: str, op: tflite.Operator, ins: list[int], out: int) -> None:
    x, prefix = t.tensor(ins[0]), t.names[out]
    squared = t.node(f"{prefix}/squared", "Square", [x])
    axis = t.constant(f"{prefix}/axis", np.array([-1], np.int32))
    total = t.node(f"{prefix}/sum", "Sum", [squared, axis], {"keep_dims": True})
    norm = t.node(f"{prefix}/norm", "Sqrt", [total])
    floored = t.node(f"{prefix}/floored", "Maximum", [norm, t.constant(f"{prefix}/epsilon", _L2_EPSILON)])
    activation = _options(op, tflite.L2NormOptions).FusedActivationFunction() if op.BuiltinOptions() else 0
    t.emit(out, "RealDiv", [x, floored], activation=activation)


@_rule("AVERAGE_POOL_2D", "MAX_POOL_2D")
def _pool(t: _Translator, name: str, op: tflite.Operator, ins: list[int], out: int) -> None:
    options = _options(op, tflite.Pool2DOptions)
    attrs = {**_window(options), "ksize": [1, options.FilterHeight(), options.FilterWidth(), 1]}
    tf_op = "AvgPool" if name == "AVERAGE_POOL_2D" else "MaxPool"
    t.emit(out, tf_op, [t.tensor(ins[0])], attrs, options.FusedActivationFunction())


@_rule("MEAN")
def _mean(t: _Translator, name: str, op: tflite.Operator, ins: list[int], out: int) -> None:
    keep = bool(_options(op, tflite.ReducerOptions).KeepDims()) if op.BuiltinOptions() else False
    t.emit(out, "Mean", [t.tensor(ins[0]), t.tensor(ins[1])], {"keep_dims": keep})


@_rule("CONCATENATION")
def _concatenation(t: _Translator, name: str, op: tflite.Operator, ins: list[int], out: int) -> None:
    options = _options(op, tflite.ConcatenationOptions)
    axis = t.constant(f"{t.names[out]}/axis", np.array(options.Axis(), np.int32))
    t.emit(out, "ConcatV2", [*(t.tensor(i) for i in ins), axis], activation=options.FusedActivationFunction())


@_rule("PAD")
def _pad(t: _Translator, name: str, op: tflite.Operator, ins: list[int], out: int) -> None:
    t.require(ins[1])
    t.emit(out, "Pad", [t.tensor(ins[0]), t.tensor(ins[1])])


def _operator_name(model: tflite.Model, op: tflite.Operator) -> str:
    code = model.OperatorCodes(op.OpcodeIndex())
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # schema 3a keeps small codes in the old field
    if builtin == tflite.BuiltinOperator.CUSTOM:
        return f"custom op {(code.CustomCode() or b'?').decode()}"
    return tflite.opcode2name(builtin)


def nodes_from_tflite(data: bytes) -> list[GraphNode]:
    """The TensorFlow graph nodes equivalent to a TFLite model's first subgraph.

    Inputs become ``Placeholder`` nodes (with their NHWC shape) and keep their tensor names, as do the operators'
    outputs (``:N`` suffixes become ``_N``); build the module with ``TFGraphModule(nodes, inputs, outputs)``.

    Raises:
        UnsupportedModelError: listing every operator without a rule, or for quantised activations.
    """
    t = _Translator(data)
    graph = t.graph
    operators = [graph.Operators(k) for k in range(graph.OperatorsLength())]
    names = [_operator_name(t.model, op) for op in operators]
    unknown = sorted({n for n in names if n not in _RULES and n != "DEQUANTIZE"})
    if unknown:
        raise UnsupportedModelError(f"TFLite operators without a torch rule: {', '.join(unknown)}")
    for k in range(graph.InputsLength()):
        index = graph.Inputs(k)
        if graph.Tensors(index).Type() != tflite.TensorType.FLOAT32:
            raise UnsupportedModelError(f"input {t.names[index]!r} is not float32: quantised models are not supported")
        t.node(t.names[index], "Placeholder", [], {"shape": t.shape(index)})
    for name, op in zip(names, operators):
        ins, out = [int(i) for i in op.InputsAsNumpy()], int(op.Outputs(0))
        t.current = f"{name} -> {t.names[out]!r}"
        if name == "DEQUANTIZE":  # float16 / int8 weights: fold them into float32 constants
            t.folded[out] = t.require(ins[0]).astype(np.float32)
            continue
        _RULES[name](t, name, op, ins, out)
    return t.nodes


def tflite_io_names(data: bytes) -> tuple[list[str], list[str]]:
    """A TFLite model's input and output node names, as :func:`nodes_from_tflite` names them."""
    graph = _Translator(data).graph
    names = _tensor_names(graph)
    inputs = [names[graph.Inputs(k)] for k in range(graph.InputsLength())]
    return inputs, [names[graph.Outputs(k)] for k in range(graph.OutputsLength())]


def load_tflite(source: RegistryFile, inputs: list[str], outputs: list[str]) -> TFGraphModule:
    """A TFLite model as a module, converted once (cached by the source's checksum)."""
    return load_converted(
        f"tflite-{source.sha256[:16]}", lambda: nodes_from_tflite(source.path().read_bytes()), inputs, outputs
    )
