"""Run a frozen TensorFlow inference graph as a differentiable PyTorch module.

The graph comes as a list of :class:`GraphNode` (from a GraphDef ``.pb`` or a TF.js ``model.json``); every op is
compiled once into a small torch closure. Image tensors live channels-first inside the module (fast convolutions on
CPU and CUDA) while keeping TensorFlow's NHWC semantics: each value carries its layout, and axis-dependent ops
(concat, reshape, reductions, broadcasting constants) translate between the two. Float constants become
``nn.Parameter``s (already in torch layout), so a converted model can be fine-tuned.

New ops are added with ``@register_op("OpName")``; a TF op without a rule is reported when the graph is built.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from redteam.assets import RegistryFile
from redteam.convert import graph
from redteam.convert.cache import convert_once
from redteam.convert.graph import GraphModule, UnsupportedModelError, same_padding
from redteam.convert.image_conv import conv2d
from redteam.convert.prelu import prelu
from redteam.convert.tf_nodes import GraphNode, clean_input, const_value, data_inputs
from redteam.convert.tf_rewrites import simplify
from redteam.registry import RuleTable


class Layout(Enum):
    PLAIN = "plain"  # stored exactly as TensorFlow sees it
    NCHW = "nchw"  # a TF NHWC tensor stored channels-first


_NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}


@dataclass
class CompiledOp(graph.CompiledOp):
    """A compiled node: ``fn(*input tensors) -> tensor`` plus the layout of its result."""

    layout: Layout


def to_nchw(x: Tensor, layout: Layout) -> Tensor:
    return x if layout is Layout.NCHW or x.dim() != 4 else x.permute(0, 3, 1, 2)


def to_plain(x: Tensor, layout: Layout) -> Tensor:
    return x.permute(0, 2, 3, 1) if layout is Layout.NCHW else x


class GraphBuilder:
    """Compiles nodes one by one; ops read constants and register parameters through it."""

    def __init__(self, nodes: list[GraphNode], module: TFGraphModule):
        self.nodes = {n.name: n for n in nodes}
        self.module = module
        self.layouts: dict[str, Layout] = {}

    def const(self, name: str) -> np.ndarray | None:
        return const_value(self.nodes, name)

    def require_const(self, node: GraphNode, index: int) -> np.ndarray:
        value = self.const(clean_input(node.inputs[index]) or "")
        if value is None:
            raise UnsupportedModelError(f"{node.op} {node.name!r}: input {index} must be a constant")
        return value

    def param(self, node: GraphNode, role: str, array: np.ndarray) -> str:
        key = re.sub(r"[^0-9A-Za-z_]", "_", f"{node.name}/{role}")
        if key in self.module.weights:
            raise ValueError(f"duplicate parameter name {key}")
        self.module.weights[key] = nn.Parameter(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))
        return key

    def layout(self, name: str) -> Layout:
        return self.layouts[name]


Pair = tuple[int, int]
OpRule = Callable[[GraphBuilder, GraphNode], CompiledOp]
_OPS: RuleTable[OpRule] = RuleTable()
register_op = _OPS.register


class TFGraphModule(GraphModule):
    """A frozen TF graph as an ``nn.Module``. ``forward`` takes the graph inputs (images as NCHW) in order.
    ``rewrite``: run the graph through :func:`redteam.convert.tf_rewrites.simplify` first (fewer, fused steps; off
    only to check the rewrites against the graph as written)."""

    def __init__(self, nodes: list[GraphNode], inputs: list[str], outputs: list[str], rewrite: bool = True):
        super().__init__(inputs, outputs)
        nodes = simplify(nodes) if rewrite else nodes
        builder = GraphBuilder(nodes, self)
        needed = self._needed(nodes, outputs, stop=set(inputs))
        unknown = sorted(
            {n.op for n in nodes if n.name in needed and n.name not in inputs and n.op not in _OPS and n.op != "Const"}
        )
        if unknown:
            raise UnsupportedModelError(f"TF ops without a torch rule: {', '.join(unknown)}")
        for name in inputs:
            node = builder.nodes[name]
            shape = node.attrs.get("shape") or []
            builder.layouts[name] = Layout.NCHW if len(shape) == 4 else Layout.PLAIN
        plan: list[graph.Step] = []
        for node in self._topological(nodes, needed, set(inputs)):
            if node.op == "Const":
                continue
            compiled = _OPS[node.op](builder, node)
            builder.layouts[node.name] = compiled.layout
            plan.append(((node.name,), compiled))
        self.set_plan(plan)
        self._output_layouts = {o: builder.layouts[o] for o in outputs}

    @staticmethod
    def _needed(nodes: list[GraphNode], outputs: list[str], stop: set[str]) -> set[str]:
        by_name = {n.name: n for n in nodes}
        needed, todo = set(), list(outputs)
        while todo:
            name = todo.pop()
            if name in needed:
                continue
            needed.add(name)
            if name not in stop:
                todo.extend(data_inputs(by_name[name]))
        return needed

    @staticmethod
    def _topological(nodes: list[GraphNode], needed: set[str], ready: set[str]) -> list[GraphNode]:
        order, done, pending = [], set(ready), [n for n in nodes if n.name in needed and n.name not in ready]
        while pending:
            progressed = []
            for node in pending:
                if all(i in done or i not in needed for i in data_inputs(node)):
                    order.append(node)
                    done.add(node.name)
                else:
                    progressed.append(node)
            if len(progressed) == len(pending):
                raise ValueError("graph has a cycle")
            pending = progressed
        return order

    def read_output(self, name: str, values: dict[str, Tensor]) -> Tensor:
        return to_plain(values[name], self._output_layouts[name])  # TensorFlow's layout outside


# ---------------------------------------------------------------------------------------------- op rules


def _spatial(attr: list[int] | None, default: int = 1) -> tuple[int, int]:
    """NHWC 4-vector attribute (strides, ksize, dilations) -> (h, w)."""
    if not attr:
        return default, default
    return int(attr[1]), int(attr[2])


def _check_nhwc(node: GraphNode) -> None:
    fmt = node.attrs.get("data_format", "NHWC") or "NHWC"
    if fmt != "NHWC":
        raise UnsupportedModelError(f"{node.op} {node.name!r}: data_format {fmt}")


def _same_pads(x: Tensor, kernel: Pair, stride: Pair, dilation: Pair) -> tuple[int, int, int, int]:
    """TF's SAME padding of the NCHW map ``x`` for this window: ``(top, bottom, left, right)``."""
    top, bottom = same_padding(x.shape[2], kernel[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[3], kernel[1], stride[1], dilation[1])
    return top, bottom, left, right


def _pad_same(x: Tensor, kernel: Pair, stride: Pair, dilation: Pair, value=0.0):
    top, bottom, left, right = _same_pads(x, kernel, stride, dilation)
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


def _conv_rule(builder: GraphBuilder, node: GraphNode, depthwise: bool) -> CompiledOp:
    _check_nhwc(node)
    weight = builder.require_const(node, 1)  # HWIO, or HW C M for depthwise
    if depthwise:
        kh, kw, channels, multiplier = weight.shape
        torch_weight = weight.transpose(2, 3, 0, 1).reshape(channels * multiplier, 1, kh, kw)
        groups = channels
    else:
        kh, kw = weight.shape[:2]
        torch_weight = weight.transpose(3, 2, 0, 1)
        groups = 1
    key = builder.param(node, "weight", torch_weight)
    stride, dilation = _spatial(node.attrs.get("strides")), _spatial(node.attrs.get("dilations"))
    padding = node.attrs.get("padding", "VALID")
    explicit = node.attrs.get("explicit_paddings") or []
    bias_key = None
    fused = node.attrs.get("fused_ops") or []
    if fused and fused[0] == "BiasAdd":
        bias_key = builder.param(node, "bias", builder.require_const(node, 2))
    activation = _fused_activation(builder, node, fused[1:] if fused else [])
    weights = builder.module.weights
    source = data_inputs(node)[0]
    in_layout = builder.layout(source)

    def conv(x: Tensor) -> Tensor:
        x = to_nchw(x, in_layout)
        pads = (0, 0, 0, 0)
        if padding == "SAME":
            pads = _same_pads(x, (kh, kw), stride, dilation)
        elif padding == "EXPLICIT":
            pads = tuple(explicit[2:6])  # NHWC (before, after) pairs: rows, then columns
        bias = weights[bias_key] if bias_key else None
        return activation(conv2d(x, weights[key], bias, stride, pads, dilation, groups))

    return CompiledOp(conv, [source], Layout.NCHW)


def _fused_activation(builder: GraphBuilder, node: GraphNode, ops: list[str]) -> Callable[[Tensor], Tensor]:
    """A fused op's activation, on an NCHW map or a ``[B, C]`` matrix (a PReLU's slopes run along dim 1)."""
    if not ops:
        return lambda x: x
    if ops == ["Relu"]:
        return F.relu
    if ops == ["Relu6"]:
        return lambda x: F.hardtanh(x, 0.0, 6.0)
    if ops == ["Elu"]:
        return F.elu
    if ops == ["Prelu"]:
        alpha_key = builder.param(node, "alpha", builder.require_const(node, 3).reshape(-1))  # one per channel
        weights = builder.module.weights
        return lambda x: prelu(x, weights[alpha_key])
    raise UnsupportedModelError(f"{node.op} {node.name!r}: fused activation {ops}")


@register_op("Conv2D", "_FusedConv2D", "FusedConv2D")
def _conv2d(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    return _conv_rule(builder, node, depthwise=False)


@register_op("DepthwiseConv2dNative", "FusedDepthwiseConv2dNative")
def _depthwise(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    return _conv_rule(builder, node, depthwise=True)


@register_op("BiasAdd")
def _bias_add(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    source = data_inputs(node)[0]
    key = builder.param(node, "bias", builder.require_const(node, 1))
    layout, weights = builder.layout(source), builder.module.weights

    def bias_add(x: Tensor) -> Tensor:
        b = weights[key]
        return x + (b.view(1, -1, 1, 1) if layout is Layout.NCHW else b)

    return CompiledOp(bias_add, [source], layout)


def _pool_rule(node: GraphNode, builder: GraphBuilder, kind: str) -> CompiledOp:
    _check_nhwc(node)
    kernel, stride = _spatial(node.attrs["ksize"]), _spatial(node.attrs["strides"])
    padding = node.attrs.get("padding", "VALID")
    source = data_inputs(node)[0]
    layout = builder.layout(source)

    def pool(x: Tensor) -> Tensor:
        x = to_nchw(x, layout)
        if kind == "max":
            if padding == "SAME":
                x = _pad_same(x, kernel, stride, (1, 1), value=float("-inf"))
            return F.max_pool2d(x, kernel, stride)
        if padding == "SAME":  # TF averages over the valid pixels only
            ones = _pad_same(torch.ones_like(x[:1, :1]), kernel, stride, (1, 1))
            summed = F.avg_pool2d(_pad_same(x, kernel, stride, (1, 1)), kernel, stride, divisor_override=1)
            return summed / F.avg_pool2d(ones, kernel, stride, divisor_override=1)
        return F.avg_pool2d(x, kernel, stride)

    return CompiledOp(pool, [source], Layout.NCHW)


@register_op("MaxPool")
def _max_pool(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    return _pool_rule(node, builder, "max")


@register_op("AvgPool")
def _avg_pool(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    return _pool_rule(node, builder, "avg")


_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Identity": lambda x: x,
    "Relu": F.relu,
    "Relu6": lambda x: F.hardtanh(x, 0.0, 6.0),
    "Elu": F.elu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Square": torch.square,
    "Sqrt": torch.sqrt,
    "Rsqrt": torch.rsqrt,
    "Exp": torch.exp,
    "Neg": torch.neg,
    "Abs": torch.abs,
}


@register_op(*_UNARY)
def _unary(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    source = data_inputs(node)[0]
    return CompiledOp(_UNARY[node.op], [source], builder.layout(source))


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add,
    "AddV2": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "RealDiv": torch.div,
    "Maximum": torch.maximum,
    "Minimum": torch.minimum,
}


def _broadcast_const_nchw(array: np.ndarray) -> np.ndarray:
    """A constant broadcast against an NHWC tensor, rearranged to broadcast against its NCHW storage."""
    if array.ndim == 0:
        return array
    as_4d = array.reshape((1,) * (4 - array.ndim) + array.shape)
    return as_4d.transpose(0, 3, 1, 2)


@register_op(*_BINARY)
def _binary(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    names = data_inputs(node)
    fn = _BINARY[node.op]
    consts = [builder.const(n) for n in names]
    image = any(c is None and builder.layout(n) is Layout.NCHW for n, c in zip(names, consts))
    operands: list[Callable[..., Tensor]] = []
    runtime_inputs: list[str] = []
    weights = builder.module.weights
    for index, (name, const) in enumerate(zip(names, consts)):
        if const is not None:
            array = _broadcast_const_nchw(const) if image else const
            if array.ndim == 0:
                scalar = float(array)
                operands.append(lambda *_, s=scalar: s)
            else:
                key = builder.param(node, f"operand{index}", array)
                operands.append(lambda *_, k=key: weights[k])
        else:
            position, layout = len(runtime_inputs), builder.layout(name)
            runtime_inputs.append(name)
            if image and layout is Layout.PLAIN:
                operands.append(lambda *xs, p=position: _plain_to_nchw_broadcast(xs[p]))
            else:
                operands.append(lambda *xs, p=position: xs[p])

    def binary(*xs: Tensor) -> Tensor:
        a, b = (op(*xs) for op in operands)
        like = a if isinstance(a, Tensor) else b
        a, b = (
            v if isinstance(v, Tensor) else torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in (a, b)
        )
        return fn(a, b)

    return CompiledOp(binary, runtime_inputs, Layout.NCHW if image else Layout.PLAIN)


@register_op("Prelu")
def _prelu(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    """``x`` where ``x >= 0``, else ``alpha * x`` (inputs ``x``, constant ``alpha`` broadcast NHWC-style): one
    PReLU kernel (:func:`redteam.convert.prelu.prelu`) for per-channel slopes of an image tensor, elementwise
    otherwise."""
    x = data_inputs(node)[0]
    alpha = builder.require_const(node, 1)
    layout, weights = builder.layout(x), builder.module.weights
    channels = alpha.shape[-1] if alpha.ndim else 1
    if layout is Layout.NCHW and alpha.size == channels:
        key = builder.param(node, "alpha", alpha.reshape(-1))
        return CompiledOp(lambda v: prelu(v, weights[key]), [x], layout)
    key = builder.param(node, "alpha", _broadcast_const_nchw(alpha) if layout is Layout.NCHW else alpha)
    return CompiledOp(lambda v: torch.where(v >= 0, v, v * weights[key]), [x], layout)


def _plain_to_nchw_broadcast(x: Tensor) -> Tensor:
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x.permute(0, 3, 1, 2)


@register_op("ConcatV2")
def _concat(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    names = data_inputs(node)
    axis = int(builder.require_const(node, len(names) - 1))
    sources = names[:-1]
    layouts = [builder.layout(n) for n in sources]
    image = Layout.NCHW in layouts
    if image:
        axis = _NHWC_TO_NCHW_AXIS[axis % 4]

    def concat(*xs: Tensor) -> Tensor:
        if image:
            xs = tuple(to_nchw(x, layout) for x, layout in zip(xs, layouts))
        return torch.cat(xs, dim=axis)

    return CompiledOp(concat, sources, Layout.NCHW if image else Layout.PLAIN)


@register_op("Reshape")
def _reshape(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    source = data_inputs(node)[0]
    shape = [int(s) for s in builder.require_const(node, 1).reshape(-1)]
    layout = builder.layout(source)

    def reshape(x: Tensor) -> Tensor:
        x = to_plain(x, layout)
        # Frozen graphs often bake batch size 1 into reshapes: keep the batch dimension of the input.
        target = [x.shape[0], *shape[1:]] if shape and shape[0] in (1, -1) else shape
        return x.reshape(target)

    return CompiledOp(reshape, [source], Layout.PLAIN)


@register_op("Squeeze")
def _squeeze(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    source = data_inputs(node)[0]
    axes = node.attrs.get("squeeze_dims") or []  # none listed: every size-1 axis, as in TF
    layout = builder.layout(source)

    def squeeze(x: Tensor) -> Tensor:
        x = to_plain(x, layout)
        return x.squeeze(tuple(a % x.dim() for a in axes)) if axes else x.squeeze()

    return CompiledOp(squeeze, [source], Layout.PLAIN)


@register_op("Pad")
def _pad(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    source = data_inputs(node)[0]
    paddings = builder.require_const(node, 1).astype(int)  # [rank, 2]: (before, after) per TF axis
    layout = builder.layout(source)
    if layout is Layout.NCHW:
        paddings = paddings[[0, 3, 1, 2]]
    # F.pad lists (before, after) pairs from the last axis backwards.
    pad = tuple(int(v) for pair in paddings[::-1] for v in pair)
    return CompiledOp(lambda x: F.pad(x, pad), [source], layout)


@register_op("MatMul", "_FusedMatMul")
def _matmul(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    """A dense layer; the fused form (TF.js graph models) adds its bias and activation."""
    if node.attrs.get("transpose_a"):
        raise UnsupportedModelError(f"{node.op} {node.name!r}: transpose_a")
    weight = builder.require_const(node, 1)
    weight = weight if node.attrs.get("transpose_b") else weight.T  # F.linear wants (out, in)
    key = builder.param(node, "weight", weight)
    fused = node.attrs.get("fused_ops") or []
    bias_key = builder.param(node, "bias", builder.require_const(node, 2)) if fused[:1] == ["BiasAdd"] else None
    activation = _fused_activation(builder, node, fused[1:])
    source, weights = data_inputs(node)[0], builder.module.weights
    layout = builder.layout(source)

    def dense(x: Tensor) -> Tensor:
        return activation(F.linear(to_plain(x, layout), weights[key], weights[bias_key] if bias_key else None))

    return CompiledOp(dense, [source], Layout.PLAIN)


@register_op("Softmax")
def _softmax(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    """Softmax over the last (TF) axis."""
    source = data_inputs(node)[0]
    layout = builder.layout(source)
    return CompiledOp(lambda x: F.softmax(to_plain(x, layout), dim=-1), [source], Layout.PLAIN)


@register_op("FusedBatchNorm", "FusedBatchNormV3")
def _batch_norm(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
    _check_nhwc(node)
    if node.attrs.get("is_training"):
        raise UnsupportedModelError(f"{node.name!r}: training-mode batch norm")
    scale, offset, mean, var = (builder.require_const(node, i).astype(np.float64) for i in range(1, 5))
    multiplier = scale / np.sqrt(var + node.attrs.get("epsilon", 1e-3))
    mul_key = builder.param(node, "scale", multiplier)
    add_key = builder.param(node, "shift", offset - mean * multiplier)
    source, weights = data_inputs(node)[0], builder.module.weights
    layout = builder.layout(source)

    def batch_norm(x: Tensor) -> Tensor:
        x = to_nchw(x, layout)
        return x * weights[mul_key].view(1, -1, 1, 1) + weights[add_key].view(1, -1, 1, 1)

    return CompiledOp(batch_norm, [source], Layout.NCHW)


def _reduction(fn: Callable[..., Tensor]) -> OpRule:
    def rule(builder: GraphBuilder, node: GraphNode) -> CompiledOp:
        source = data_inputs(node)[0]
        axes = [int(a) for a in np.atleast_1d(builder.require_const(node, 1))]
        keep = bool(node.attrs.get("keep_dims", False))
        layout = builder.layout(source)
        if layout is Layout.NCHW and keep:
            dims = [_NHWC_TO_NCHW_AXIS[a % 4] for a in axes]
            return CompiledOp(lambda x: fn(x, dim=dims, keepdim=True), [source], Layout.NCHW)
        return CompiledOp(lambda x: fn(to_plain(x, layout), dim=axes, keepdim=keep), [source], Layout.PLAIN)

    return rule


def _amax(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    return torch.amax(x, dim=dim, keepdim=keepdim)


register_op("Sum")(_reduction(torch.sum))
register_op("Mean")(_reduction(torch.mean))
register_op("Max")(_reduction(_amax))


def nodes_from_graphdef(data: bytes) -> list[GraphNode]:
    """Nodes of a serialized TensorFlow GraphDef (a frozen ``.pb``)."""
    from redteam.convert.protobuf import parse_graphdef

    return [GraphNode(name, op, inputs, attrs) for name, op, inputs, attrs in parse_graphdef(data)]


#: Bump when the stored node format changes, so stale conversions are redone.
CACHE_FORMAT = 1


def load_converted(
    key: str, convert: Callable[[], list[GraphNode]], inputs: list[str], outputs: list[str]
) -> TFGraphModule:
    """A graph converted once by ``convert()`` and cached under ``key`` (its source's checksum, with a prefix
    naming the format); later loads read the cache instead."""
    nodes = convert_once(
        f"{key}-v{CACHE_FORMAT}",
        convert,
        to_data=lambda converted: [(n.name, n.op, n.inputs, n.attrs) for n in converted],
        from_data=lambda data: [GraphNode(*fields) for fields in data],
    )
    return TFGraphModule(nodes, inputs, outputs)


def load_frozen_graph(source: RegistryFile, inputs: list[str], outputs: list[str]) -> TFGraphModule:
    """A frozen GraphDef as a module, converted once (cached by the source's checksum)."""
    return load_converted(source.sha256[:16], lambda: nodes_from_graphdef(source.path().read_bytes()), inputs, outputs)
