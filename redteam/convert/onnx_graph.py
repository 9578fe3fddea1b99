"""Run an ONNX model as a differentiable PyTorch module (no onnxruntime, no onnx2torch).

The ``onnx`` package parses the protobuf; every node is compiled once into a small torch closure. Nodes whose inputs
are all constant (initializers, ``Constant`` nodes, ``Identity`` over weights, shape arithmetic on constants) are
evaluated once while building, and a BatchNormalization that only follows a Conv is folded into the Conv's weights.
Float constants the ops use become ``nn.Parameter``s, so a converted model can be fine-tuned; integer constants
(shapes, axes, indices) stay plain values. Tensors keep ONNX's layout (NCHW for images). :func:`load_onnx` caches the
folded graph by the model's checksum, as the TF converters cache theirs.

New ops are added with ``@register_op("OpType")``; a graph with ops that have no rule is refused with one error
listing them all.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from torch import Tensor, nn

from redteam.convert.cache import convert_once
from redteam.convert.graph import CompiledOp, GraphModule, UnsupportedModelError, same_padding
from redteam.convert.image_conv import conv2d
from redteam.errors import RedteamError
from redteam.registry import RuleTable


@dataclass
class OnnxNode:
    op: str
    name: str
    inputs: list[str]  # "" marks an omitted optional input
    outputs: list[str]
    attrs: dict[str, Any]


def _attribute(attribute: onnx.AttributeProto) -> Any:
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def _nodes(graph: onnx.GraphProto) -> list[OnnxNode]:
    nodes = []
    for k, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedModelError(f"node {node.name!r}: custom op domain {node.domain!r}")
        attrs = {a.name: _attribute(a) for a in node.attribute}
        nodes.append(
            OnnxNode(node.op_type, node.name or f"{node.op_type}_{k}", list(node.input), list(node.output), attrs)
        )
    return nodes


def _constant_value(node: OnnxNode) -> np.ndarray:
    """The tensor a ``Constant`` node holds (``value`` or one of the scalar/list attributes)."""
    if "value" in node.attrs:
        return node.attrs["value"]
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32)):
        if key in node.attrs:
            return np.asarray(node.attrs[key], dtype=dtype)
    for key in ("value_int", "value_ints"):
        if key in node.attrs:
            return np.asarray(node.attrs[key], dtype=np.int64)
    raise UnsupportedModelError(f"Constant {node.name!r}: attributes {sorted(node.attrs)}")


#: How a compiled node reads one of its inputs from its run-time inputs ``xs`` (``None``: an omitted optional input).
InputGetter = Callable[[Sequence[Tensor]], Tensor | None]


def _fixed_input(value: Tensor) -> InputGetter:
    return lambda xs: value


def _parameter_input(get: Callable[[], Tensor]) -> InputGetter:
    return lambda xs: get()


def _runtime_input(k: int) -> InputGetter:
    return lambda xs: xs[k]


class GraphBuilder:
    """Compiles nodes one by one; rules read constants and register parameters through it.

    Without ``weights`` it folds constants: float constants stay plain tensors (the node's result becomes a constant
    itself) instead of becoming parameters.
    """

    def __init__(self, opset: int, consts: dict[str, np.ndarray], weights: nn.ParameterDict | None):
        self.opset, self.consts, self.weights = opset, consts, weights
        self._keys: dict[str, str] = {}

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def require_const(self, node: OnnxNode, index: int) -> np.ndarray:
        value = self.const(node.inputs[index]) if index < len(node.inputs) else None
        if value is None:
            raise UnsupportedModelError(f"{node.op} {node.name!r}: input {index} must be a constant")
        return value

    def optional_const(self, node: OnnxNode, index: int) -> np.ndarray | None:
        """A constant optional input: ``None`` when omitted; an error when computed at run time."""
        if index >= len(node.inputs) or not node.inputs[index]:
            return None
        return self.require_const(node, index)

    def param(self, name: str, array: np.ndarray) -> Callable[[], Tensor]:
        """A float constant as a parameter of the module (one per constant name) -> getter."""
        tensor = torch.from_numpy(np.array(array, dtype=np.float32))
        weights = self.weights
        if weights is None:
            return lambda: tensor
        if name not in self._keys:
            key = base = re.sub(r"[^0-9A-Za-z_]", "_", name) or "constant"
            suffix = 0
            while key in weights:
                suffix += 1
                key = f"{base}_{suffix}"
            weights[key] = nn.Parameter(tensor)
            self._keys[name] = key
        key = self._keys[name]
        return lambda: weights[key]

    def inputs(self, node: OnnxNode) -> tuple[list[str], Callable[[Sequence[Tensor]], list[Tensor | None]]]:
        """Resolve every input of ``node``: constants (float -> parameter, others -> fixed tensor), omitted optional
        inputs (``None``) and run-time values. Returns the run-time input names and ``args(xs)`` -> all inputs."""
        runtime: list[str] = []
        getters: list[InputGetter] = []
        for name in node.inputs:
            value = self.const(name)
            if not name:
                getters.append(lambda xs: None)
            elif value is not None and value.dtype.kind == "f":
                getters.append(_parameter_input(self.param(name, value)))
            elif value is not None:
                getters.append(_fixed_input(torch.from_numpy(np.array(value))))
            else:
                getters.append(_runtime_input(len(runtime)))
                runtime.append(name)
        return runtime, lambda xs: [get(xs) for get in getters]


OpRule = Callable[[GraphBuilder, OnnxNode], CompiledOp]
_OPS: RuleTable[OpRule] = RuleTable()
register_op = _OPS.register


def _simple(
    builder: GraphBuilder, node: OnnxNode, fn: Callable[..., Tensor | tuple[Tensor, ...]], count: int | None = None
) -> CompiledOp:
    """A rule whose torch function takes the node's inputs (constants resolved, omitted ones ``None``): all of them,
    or the first ``count`` when the rest are settings the rule has read while building."""
    runtime, args = builder.inputs(node if count is None else dataclasses.replace(node, inputs=node.inputs[:count]))
    return CompiledOp(lambda *xs: fn(*args(xs)), runtime)


@dataclass
class FoldedGraph:
    """An ONNX graph reduced to what runs at run time: constants folded, batch norms merged into their convs (the
    form :func:`load_onnx` caches)."""

    opset: int
    input_names: list[str]
    #: Declared input shapes (ints, or names for dynamic axes), e.g. to tell NCHW from NHWC.
    input_shapes: list[list[int | str]]
    output_names: list[str]
    nodes: list[OnnxNode]  # in execution order
    consts: dict[str, np.ndarray]  # the constants the nodes and outputs read


def fold_model(model: onnx.ModelProto) -> FoldedGraph:
    """Keep the nodes the outputs need, evaluate those whose inputs are all constant, merge batch norms into convs.

    Raises:
        UnsupportedModelError: listing every op of the graph that has no torch rule.
    """
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in consts]
    input_names = [i.name for i in inputs]
    output_names = [o.name for o in graph.output]
    nodes = _needed(_nodes(graph), output_names)
    unknown = sorted({n.op for n in nodes if n.op not in _OPS and n.op != "Constant"})
    if unknown:
        raise UnsupportedModelError(f"ONNX ops without a torch rule: {', '.join(unknown)}")
    runtime = _fold_constants(GraphBuilder(opset, consts, weights=None), nodes, set(input_names))
    runtime = _fold_batch_norms(runtime, consts, output_names)
    read = {i for n in runtime for i in n.inputs} | set(output_names)
    return FoldedGraph(
        opset,
        input_names,
        [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in inputs],
        output_names,
        runtime,
        {name: value for name, value in consts.items() if name in read},
    )


class OnnxModule(GraphModule):
    """An ONNX graph as an ``nn.Module``: ``forward`` takes the graph inputs in order and returns its outputs in
    order (a single tensor when the graph has one output). Built from a model, or from a graph it has folded."""

    def __init__(self, model: onnx.ModelProto | FoldedGraph):
        graph = model if isinstance(model, FoldedGraph) else fold_model(model)
        super().__init__(graph.input_names, graph.output_names)
        self.input_shapes = graph.input_shapes
        builder = GraphBuilder(graph.opset, graph.consts, self.weights)
        self.set_plan([(tuple(node.outputs), _OPS[node.op](builder, node)) for node in graph.nodes])
        self._constant_outputs = {
            o: builder.inputs(OnnxNode("Output", o, [o], [], {}))[1] for o in self.output_names if o in graph.consts
        }

    def read_output(self, name: str, values: dict[str, Tensor]) -> Tensor:
        if name in self._constant_outputs:
            value = self._constant_outputs[name](())[0]
            assert value is not None  # the output is a constant of the graph, never an omitted input
            return value
        return values[name]


def _needed(nodes: list[OnnxNode], outputs: list[str]) -> list[OnnxNode]:
    """The nodes the outputs depend on, in graph order (ONNX stores nodes topologically sorted)."""
    wanted, needed = set(outputs), []
    for node in reversed(nodes):
        if wanted.intersection(node.outputs):
            needed.append(node)
            wanted.update(i for i in node.inputs if i)
    return needed[::-1]


def _fold_constants(builder: GraphBuilder, nodes: list[OnnxNode], graph_inputs: set[str]) -> list[OnnxNode]:
    """Evaluate nodes whose inputs are all constant; return the nodes left to run."""
    runtime, known = [], set(graph_inputs)
    for node in nodes:
        missing = [i for i in node.inputs if i and i not in known and i not in builder.consts]
        if missing:
            raise ValueError(f"{node.op} {node.name!r} reads {missing}, which no earlier node produces")
        known.update(node.outputs)
        if node.op == "Constant":
            builder.consts[node.outputs[0]] = _constant_value(node)
        elif all(not i or i in builder.consts for i in node.inputs):
            result = _OPS[node.op](builder, node).fn()
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(node.outputs, results):
                builder.consts[name] = value.detach().numpy()
        else:
            runtime.append(node)
    return runtime


def _fold_batch_norms(nodes: list[OnnxNode], consts: dict[str, np.ndarray], keep: list[str]) -> list[OnnxNode]:
    """Merge each BatchNormalization that is the only reader of a Conv's output into that Conv's weights."""
    readers = Counter(i for n in nodes for i in n.inputs if i)
    producer = {o: n for n in nodes for o in n.outputs}
    replaced: dict[int, OnnxNode | None] = {}
    for bn in nodes:
        if bn.op != "BatchNormalization" or len([o for o in bn.outputs if o]) != 1:
            continue
        conv = producer.get(bn.inputs[0])
        names = bn.inputs[1:5]
        stats = [consts[i] for i in names if i in consts]
        if (
            conv is None
            or conv.op != "Conv"
            or readers[conv.outputs[0]] != 1
            or conv.outputs[0] in keep
            or len(stats) != len(names)
            or conv.inputs[1] not in consts
            or (len(conv.inputs) > 2 and conv.inputs[2] and conv.inputs[2] not in consts)
        ):
            continue
        scale, shift, mean, var = (s.astype(np.float64) for s in stats)
        multiplier = scale / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        weight = consts[conv.inputs[1]].astype(np.float64)
        bias = consts[conv.inputs[2]].astype(np.float64) if len(conv.inputs) > 2 and conv.inputs[2] else 0.0
        folded = f"{conv.name}+{bn.name}"
        consts[f"{folded}/weight"] = (weight * multiplier.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.float32)
        consts[f"{folded}/bias"] = ((bias - mean) * multiplier + shift).astype(np.float32)
        merged = OnnxNode(
            "Conv", folded, [conv.inputs[0], f"{folded}/weight", f"{folded}/bias"], bn.outputs[:1], conv.attrs
        )
        replaced[id(conv)], replaced[id(bn)] = merged, None
    kept = (replaced.get(id(n), n) for n in nodes)
    return [n for n in kept if n is not None]


#: Bump when the stored graph or what folding computes changes (folding runs the op rules), so stale entries are redone.
CACHE_FORMAT = 1


def load_onnx(source: Path | str | bytes) -> OnnxModule:
    """Parse an ONNX model (a file path or the serialized bytes) and convert it; the folded graph is cached by the
    model's checksum.

    Raises:
        UnsupportedModelError: listing every op of the graph that has no torch rule.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()

    def convert() -> FoldedGraph:
        # onnx.load on a path also reads weights kept in external files beside the model.
        return fold_model(onnx.load_model_from_string(data) if isinstance(source, bytes) else onnx.load(str(source)))

    graph = convert_once(
        f"onnx-{hashlib.sha256(data).hexdigest()[:16]}-v{CACHE_FORMAT}",
        convert,
        to_data=lambda folded: {**vars(folded), "nodes": [vars(n) for n in folded.nodes]},
        from_data=lambda stored: FoldedGraph(**{**stored, "nodes": [OnnxNode(**n) for n in stored["nodes"]]}),
    )
    return OnnxModule(graph)


# ---------------------------------------------------------------------------------------------- op rules


def normalises_its_input(model: onnx.ModelProto | Path) -> bool:
    """InsightFace's rule for its MXNet exports: Sub and Mul among the first 8 nodes mean the graph takes raw pixels
    and normalises them itself (InsightFace's own loader feeds those raw pixels)."""
    if isinstance(model, Path):
        try:
            model = onnx.load(str(model), load_external_data=False)
        except DecodeError as error:
            raise RedteamError(f"{model} is not an ONNX model ({error}).") from None
    return {"Sub", "Mul"} <= {node.op_type for node in model.graph.node[:8]}


def _to_common_device(*tensors: Tensor) -> list[Tensor]:
    """Shape arithmetic lives on the CPU while data may be on an accelerator: follow the largest operand."""
    device = max(tensors, key=lambda t: t.numel()).device
    return [t.to(device) for t in tensors]


_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Identity": lambda x: x,
    "Dropout": lambda x: x,  # inference
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Erf": torch.erf,
    "Softplus": F.softplus,
    "HardSwish": F.hardswish,
}


@register_op(*_UNARY)
def _unary(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1]:
        raise UnsupportedModelError(f"Dropout {node.name!r}: mask output")
    return _simple(builder, node, _UNARY[node.op], count=1)


@register_op("LeakyRelu")
def _leaky_relu(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    alpha = node.attrs.get("alpha", 0.01)
    return _simple(builder, node, lambda x: F.leaky_relu(x, alpha))


@register_op("Elu")
def _elu(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    alpha = node.attrs.get("alpha", 1.0)
    return _simple(builder, node, lambda x: F.elu(x, alpha))


@register_op("HardSigmoid")
def _hard_sigmoid(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    alpha, beta = node.attrs.get("alpha", 0.2), node.attrs.get("beta", 0.5)
    return _simple(builder, node, lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0))


@register_op("PRelu")
def _prelu(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    return _simple(builder, node, lambda x, slope: torch.where(x >= 0, x, x * slope))


@register_op("Clip")
def _clip(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    if builder.opset < 11:  # bounds are attributes before opset 11
        low, high = node.attrs.get("min"), node.attrs.get("max")
        return _simple(builder, node, lambda x: torch.clamp(x, low, high))
    bounds = [builder.optional_const(node, i) for i in (1, 2)]
    low, high = (None if b is None else float(b) for b in bounds)
    return _simple(builder, node, lambda x: torch.clamp(x, low, high), count=1)


def _divide(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _divide,
    "Pow": torch.pow,
    "Equal": torch.eq,
    "Greater": torch.gt,
    "Less": torch.lt,
}


@register_op(*_BINARY)
def _binary(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    fn = _BINARY[node.op]
    return _simple(builder, node, lambda a, b: fn(*_to_common_device(a, b)))


_VARIADIC: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Sum": torch.add,
    "Max": torch.maximum,
    "Min": torch.minimum,
}


@register_op(*_VARIADIC)
def _variadic(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    fn = _VARIADIC[node.op]
    return _simple(builder, node, lambda *xs: functools.reduce(fn, _to_common_device(*xs)))


@register_op("Where")
def _where(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    return _simple(builder, node, lambda c, a, b: torch.where(*_to_common_device(c, a, b)))


# ---- shapes and indexing (run on small int64 tensors; constant ones are folded while building)


@register_op("Shape")
def _shape(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    return _simple(builder, node, lambda x: torch.tensor(x.shape[start:end], dtype=torch.int64))


@register_op("Gather")
def _gather(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    axis = node.attrs.get("axis", 0)

    def gather(x: Tensor, indices: Tensor) -> Tensor:
        dim = axis % x.dim()
        flat = indices.reshape(-1).to(x.device) % x.shape[dim]
        picked = torch.index_select(x, dim, flat)
        return picked.reshape((*x.shape[:dim], *indices.shape, *x.shape[dim + 1 :]))

    return _simple(builder, node, gather)


def _axes(builder: GraphBuilder, node: OnnxNode, since: int) -> list[int] | None:
    """``axes`` as an attribute (before opset ``since``) or a constant second input (from it)."""
    if builder.opset < since:
        return node.attrs.get("axes")
    value = builder.optional_const(node, 1)
    return None if value is None else [int(a) for a in np.atleast_1d(value)]


@register_op("Unsqueeze")
def _unsqueeze(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    axes = _axes(builder, node, since=13)
    if axes is None:  # required: an attribute before opset 13, an input from it
        raise UnsupportedModelError(f"Unsqueeze {node.name!r} without axes")

    def unsqueeze(x: Tensor) -> Tensor:
        rank = x.dim() + len(axes)
        for axis in sorted(a % rank for a in axes):
            x = x.unsqueeze(axis)
        return x

    return _simple(builder, node, unsqueeze, count=1)


@register_op("Squeeze")
def _squeeze(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    axes = _axes(builder, node, since=13)  # none: every size-1 axis

    def squeeze(x: Tensor) -> Tensor:
        return x.squeeze(tuple(a % x.dim() for a in axes)) if axes else x.squeeze()

    return _simple(builder, node, squeeze, count=1)


@register_op("Concat")
def _concat(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    axis = node.attrs["axis"]
    return _simple(builder, node, lambda *xs: torch.cat(_to_common_device(*xs), dim=axis))


@register_op("Split")
def _split(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    axis = node.attrs.get("axis", 0)
    sizes = node.attrs.get("split") if builder.opset < 13 else builder.optional_const(node, 1)
    count = len(node.outputs)

    def split(x: Tensor) -> tuple[Tensor, ...]:
        if sizes is None:  # equal parts (the last one smaller when it does not divide)
            return torch.split(x, math.ceil(x.shape[axis] / count), dim=axis)
        return torch.split(x, [int(s) for s in sizes], dim=axis)

    return _simple(builder, node, split, count=1)


@register_op("Slice")
def _slice(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    if builder.opset < 10:
        bounds = [node.attrs["starts"], node.attrs["ends"], node.attrs.get("axes"), None]
        return _simple(builder, node, lambda x: _slice_tensor(x, *bounds))

    def slice_(
        x: Tensor, starts: Tensor, ends: Tensor, axes: Tensor | None = None, steps: Tensor | None = None
    ) -> Tensor:
        axes_list = None if axes is None else axes.tolist()
        steps_list = None if steps is None else steps.tolist()
        return _slice_tensor(x, starts.tolist(), ends.tolist(), axes_list, steps_list)

    return _simple(builder, node, slice_)


def _slice_tensor(x: Tensor, starts: list, ends: list, axes: list | None, steps: list | None) -> Tensor:
    index: list[slice] = [slice(None)] * x.dim()
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step < 1:
            raise UnsupportedModelError(f"Slice with step {step}")
        index[axis % x.dim()] = slice(start, end, step)  # Python slices clamp out-of-range bounds like ONNX
    return x[tuple(index)]


_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


@register_op("Cast")
def _cast(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    if node.attrs["to"] not in _DTYPES:
        raise UnsupportedModelError(f"Cast {node.name!r} to ONNX type {node.attrs['to']}")
    dtype = _DTYPES[node.attrs["to"]]
    return _simple(builder, node, lambda x: x.to(dtype))


@register_op("Reshape")
def _reshape(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    allow_zero = node.attrs.get("allowzero", 0)

    def reshape(x: Tensor, shape: Tensor) -> Tensor:
        target = shape.tolist()
        if not allow_zero:  # 0 copies the input's size on that axis
            target = [x.shape[k] if s == 0 else s for k, s in enumerate(target)]
        return x.reshape(target)

    return _simple(builder, node, reshape)


@register_op("Flatten")
def _flatten(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    axis = node.attrs.get("axis", 1)
    return _simple(builder, node, lambda x: x.reshape(math.prod(x.shape[: axis % (x.dim() + 1)]), -1))


@register_op("Transpose")
def _transpose(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    perm = node.attrs.get("perm")
    return _simple(builder, node, lambda x: x.permute(perm if perm is not None else tuple(range(x.dim()))[::-1]))


# ---- layers


def _spatial_padding(node: OnnxNode) -> list[int]:
    """ONNX ``pads`` ``[top, left, bottom, right]`` -> ``F.pad`` order ``(left, right, top, bottom)``."""
    pads = node.attrs.get("pads") or [0, 0, 0, 0]
    if len(pads) != 4:
        raise UnsupportedModelError(f"{node.op} {node.name!r}: only 2-D windows are supported (pads {pads})")
    return [pads[1], pads[3], pads[0], pads[2]]


def _auto_pads(x: Tensor, node: OnnxNode, kernel, stride, dilation) -> tuple[int, int, int, int]:
    """``auto_pad`` SAME_UPPER (extra pixel after, as TF's SAME) or SAME_LOWER (extra pixel before) on ``x``: the
    padding ``(top, bottom, left, right)``."""
    pads = []
    for size, k, s, d in zip(x.shape[2:], kernel, stride, dilation):
        before, after = same_padding(size, k, s, d)
        pads += [after, before] if node.attrs["auto_pad"] == "SAME_LOWER" else [before, after]
    top, bottom, left, right = pads
    return top, bottom, left, right


def _auto_pad(x: Tensor, node: OnnxNode, kernel, stride, dilation, value: float = 0.0) -> Tensor:
    """``x`` padded as ``auto_pad`` asks (:func:`_auto_pads`) with ``value``."""
    top, bottom, left, right = _auto_pads(x, node, kernel, stride, dilation)
    return F.pad(x, (left, right, top, bottom), value=value)


def _window(node: OnnxNode, kernel: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int], list[int], bool]:
    """Strides, dilations, explicit padding (``F.pad`` order) and whether ``auto_pad`` asks for SAME padding."""
    if len(kernel) != 2:
        raise UnsupportedModelError(f"{node.op} {node.name!r}: only 2-D windows are supported (kernel {kernel})")
    stride = tuple(node.attrs.get("strides") or (1, 1))
    dilation = tuple(node.attrs.get("dilations") or (1, 1))
    auto = node.attrs.get("auto_pad", "NOTSET")
    return stride, dilation, _spatial_padding(node) if auto == "NOTSET" else [0] * 4, auto.startswith("SAME")


@register_op("Conv")
def _conv(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    weight = builder.require_const(node, 1)
    kernel = weight.shape[2:]
    stride, dilation, pads, same = _window(node, kernel)
    groups = node.attrs.get("group", 1)
    left, right, top, bottom = pads

    def conv(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        padding = _auto_pads(x, node, kernel, stride, dilation) if same else (top, bottom, left, right)
        return conv2d(x, w, b, stride, padding, dilation, groups)

    return _simple(builder, node, conv)


@register_op("BatchNormalization")
def _batch_norm(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    """Inference batch norm not folded into a Conv (e.g. before one, or on embeddings)."""
    if len([o for o in node.outputs if o]) > 1 or node.attrs.get("training_mode"):
        raise UnsupportedModelError(f"BatchNormalization {node.name!r}: training mode")
    scale, shift, mean, var = (builder.require_const(node, i).astype(np.float64) for i in range(1, 5))
    multiplier = scale / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
    get_scale = builder.param(f"{node.name}/scale", multiplier)
    get_shift = builder.param(f"{node.name}/shift", shift - mean * multiplier)

    def batch_norm(x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * get_scale().view(shape) + get_shift().view(shape)

    return _simple(builder, node, batch_norm, count=1)


@register_op("Gemm")
def _gemm(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
    trans_a, trans_b = node.attrs.get("transA", 0), node.attrs.get("transB", 0)

    def gemm(a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
        y = (a.T if trans_a else a) @ (b.T if trans_b else b)
        y = y if alpha == 1.0 else alpha * y
        return y if c is None else y + (c if beta == 1.0 else beta * c)

    return _simple(builder, node, gemm)


@register_op("MatMul")
def _matmul(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    return _simple(builder, node, torch.matmul)


@register_op("MaxPool")
def _max_pool(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    if len(node.outputs) > 1 and node.outputs[1]:
        raise UnsupportedModelError(f"MaxPool {node.name!r}: indices output")
    kernel = node.attrs["kernel_shape"]
    stride, dilation, pads, same = _window(node, kernel)
    ceil = bool(node.attrs.get("ceil_mode", 0))

    def max_pool(x: Tensor) -> Tensor:
        if same:
            x = _auto_pad(x, node, kernel, stride, dilation, -math.inf)
        elif any(pads):
            x = F.pad(x, pads, value=-math.inf)
        return F.max_pool2d(x, kernel, stride, 0, dilation, ceil_mode=ceil)

    return _simple(builder, node, max_pool)


@register_op("AveragePool")
def _average_pool(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    kernel = node.attrs["kernel_shape"]
    stride, dilation, pads, same = _window(node, kernel)
    if dilation != (1, 1):
        raise UnsupportedModelError(f"AveragePool {node.name!r}: dilations {dilation}")
    ceil = bool(node.attrs.get("ceil_mode", 0))
    include_pad = bool(node.attrs.get("count_include_pad", 0))
    left, right, top, bottom = pads

    def average_pool(x: Tensor) -> Tensor:
        if not same and left == right and top == bottom:
            return F.avg_pool2d(x, kernel, stride, (top, left), ceil, include_pad)
        # Uneven or SAME padding: pad explicitly; divide by the window's real pixels unless padding counts.
        ones = torch.ones_like(x[:1, :1])
        padded, mask = (
            (_auto_pad(x, node, kernel, stride, dilation), _auto_pad(ones, node, kernel, stride, dilation))
            if same
            else (F.pad(x, pads), F.pad(ones, pads))
        )
        summed = F.avg_pool2d(padded, kernel, stride, 0, ceil, divisor_override=1)
        if include_pad:
            return summed / math.prod(kernel)
        return summed / F.avg_pool2d(mask, kernel, stride, 0, ceil, divisor_override=1)

    return _simple(builder, node, average_pool)


@register_op("GlobalAveragePool")
def _global_average_pool(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    return _simple(builder, node, lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True))


@register_op("GlobalMaxPool")
def _global_max_pool(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    return _simple(builder, node, lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True))


def _reduction(fn: Callable[..., Tensor]) -> OpRule:
    def rule(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
        # Axes became an input in opset 18 (ReduceSum: 13).
        axes = _axes(builder, node, since=13 if node.op == "ReduceSum" else 18)
        keep = bool(node.attrs.get("keepdims", 1))

        def reduce(x: Tensor) -> Tensor:
            dims = tuple(range(x.dim())) if not axes else tuple(a % x.dim() for a in axes)
            return fn(x, dim=dims, keepdim=keep)

        return _simple(builder, node, reduce, count=1)

    return rule


register_op("ReduceMean")(_reduction(torch.mean))
register_op("ReduceSum")(_reduction(torch.sum))
register_op("ReduceMax")(_reduction(torch.amax))


@register_op("Softmax")
def _softmax(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    axis = node.attrs.get("axis", 1 if builder.opset < 13 else -1)
    if builder.opset >= 13:
        return _simple(builder, node, lambda x: F.softmax(x, dim=axis))

    def softmax(x: Tensor) -> Tensor:  # before opset 13: over all axes from ``axis`` on, flattened
        start = axis % x.dim()
        return F.softmax(x.flatten(start), dim=start).reshape(x.shape)

    return _simple(builder, node, softmax)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


@register_op("Pad")
def _pad(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    mode = _PAD_MODES[node.attrs.get("mode", "constant")]
    if builder.opset < 11:
        pads, value = node.attrs["pads"], float(node.attrs.get("value", 0.0))
    else:
        pads = builder.require_const(node, 1).tolist()
        constant = builder.optional_const(node, 2)
        value = 0.0 if constant is None else float(constant)
        if len(node.inputs) > 3 and node.inputs[3]:
            raise UnsupportedModelError(f"Pad {node.name!r}: axes input")
    rank = len(pads) // 2
    # ONNX lists all begins then all ends, outer axis first; F.pad wants (begin, end) pairs from the last axis back,
    # and only as far out as there is padding (reflect/replicate support the last few axes only).
    pairs = [(pads[a], pads[a + rank]) for a in reversed(range(rank))]
    while pairs and pairs[-1] == (0, 0):
        pairs.pop()
    flat = [v for pair in pairs for v in pair]
    return _simple(builder, node, lambda x: F.pad(x, flat, mode=mode, value=value if mode == "constant" else None), 1)


def _resize_mode(node: OnnxNode) -> tuple[str, bool | None]:
    """ONNX interpolation settings -> ``F.interpolate`` mode and ``align_corners`` (only exact equivalents)."""
    mode = node.attrs.get("mode", "nearest")
    transform = node.attrs.get("coordinate_transformation_mode", "half_pixel" if node.op == "Resize" else "asymmetric")
    if (
        mode == "nearest"
        and transform == "asymmetric"
        and node.attrs.get("nearest_mode", "round_prefer_floor") in ("floor",)
    ):
        return "nearest", None
    if mode == "nearest" and node.op == "Upsample":  # Upsample's nearest is asymmetric + floor
        return "nearest", None
    if mode in ("linear", "bilinear") and transform in ("half_pixel", "pytorch_half_pixel"):
        return "bilinear", False
    if mode in ("linear", "bilinear") and transform == "align_corners":
        return "bilinear", True
    raise UnsupportedModelError(
        f"{node.op} {node.name!r}: mode {mode!r} with {transform!r} / {node.attrs.get('nearest_mode')!r}"
    )


@register_op("Resize", "Upsample")
def _resize(builder: GraphBuilder, node: OnnxNode) -> CompiledOp:
    mode, align_corners = _resize_mode(node)
    if node.op == "Upsample" and builder.opset < 9:
        scales = node.attrs["scales"]
        return _simple(builder, node, lambda x: _interpolate(x, None, scales, mode, align_corners), count=1)
    # Inputs: X, scales (Upsample, Resize-10) or X, roi, scales, sizes (Resize-11+). Sizes are often computed
    # from Shape at run time; scales are constant.
    scales_index = 1 if node.op == "Upsample" or builder.opset < 11 else 2
    sizes_name = node.inputs[3] if scales_index == 2 and len(node.inputs) > 3 else ""
    sizes = builder.const(sizes_name)
    if sizes_name and (sizes is None or sizes.size):
        reduced = dataclasses.replace(node, inputs=[node.inputs[0], sizes_name])
        return _simple(builder, reduced, lambda x, s: _interpolate(x, s.tolist(), None, mode, align_corners))
    scales = builder.require_const(node, scales_index).tolist()
    return _simple(builder, node, lambda x: _interpolate(x, None, scales, mode, align_corners), count=1)


def _interpolate(x: Tensor, sizes: list | None, scales: list | None, mode: str, align_corners: bool | None) -> Tensor:
    """Resize to ``sizes`` when given, else by ``scales`` (one of the two is given)."""
    if sizes is not None:
        kept = sizes[:2]
    elif scales is not None:
        kept = [s * n for s, n in zip(scales[:2], x.shape[:2])]
    else:
        raise ValueError("Resize needs sizes or scales")
    if list(kept) != list(x.shape[:2]):
        raise UnsupportedModelError("Resize of the batch or channel axis")
    if sizes is not None:
        return F.interpolate(x, size=[int(s) for s in sizes[2:]], mode=mode, align_corners=align_corners)
    # ONNX maps output pixel x to x / scale, as torch does with the given scale factor (not recomputed).
    assert scales is not None  # checked above
    return F.interpolate(x, scale_factor=[float(s) for s in scales[2:]], mode=mode, align_corners=align_corners)
