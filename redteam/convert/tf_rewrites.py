"""Rewrites of a TF graph's nodes into fewer, cheaper steps that compute the same function.

Published graphs spell common layers out op by op: a convolution, then its bias, then its ReLU (three passes over
the activation, forward and backward); PReLU as four or five elementwise ops; a residual branch's scale as one more
multiplication. Each rewrite here matches one such spelling and replaces it with one node the op rules already know
(``_FusedConv2D``, ``Prelu``). Nodes a rewrite replaces are left in the list unused (the module only builds what its
outputs need). :func:`simplify` applies them all; ``tests/test_convert.py`` checks each on real graphs against the
graph as written.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from redteam.convert.tf_nodes import GraphNode, clean_input, const_value, data_inputs

#: A plain convolution -> its fused form (which the conv rule reads with ``fused_ops``).
_FUSED_CONV = {"Conv2D": "_FusedConv2D", "DepthwiseConv2dNative": "FusedDepthwiseConv2dNative"}
_CONVS = {*_FUSED_CONV, *_FUSED_CONV.values()}


class _Uses:
    """Who reads what: the lookups the rewrites share."""

    def __init__(self, nodes: list[GraphNode]):
        self.by_name = {n.name: n for n in nodes}
        self.readers: dict[str, list[GraphNode]] = defaultdict(list)
        for node in nodes:
            for name in {c for i in node.inputs if (c := clean_input(i))}:
                self.readers[name].append(node)

    def only_use(self, name: str, *ops: str) -> GraphNode | None:
        """The node ``name`` if it is one of ``ops`` and exactly one node reads it (so it can be folded away)."""
        node = self.by_name.get(name)
        return node if node is not None and node.op in ops and len(self.readers[name]) == 1 else None

    def sole_reader(self, name: str, *ops: str) -> GraphNode | None:
        """The one node reading ``name``, if there is exactly one and it is one of ``ops``."""
        readers = self.readers[name]
        return readers[0] if len(readers) == 1 and readers[0].op in ops else None

    def const(self, name: str) -> np.ndarray | None:
        return const_value(self.by_name, name)

    def against_zero(self, node: GraphNode) -> str | None:
        """The other operand of a binary op whose one operand is the constant 0."""
        operands = data_inputs(node)
        for zero, other in (operands, operands[::-1]) if len(operands) == 2 else ():
            value = self.const(zero)
            if value is not None and value.size == 1 and float(value) == 0.0 and self.const(other) is None:
                return other
        return None


def _prelu_slope(node: GraphNode, uses: _Uses) -> tuple[str, np.ndarray] | None:
    """``(x, alpha)`` if ``node`` adds up a PReLU spelled out, in either of two spellings:

    - ``relu(x) + c * (x - |x|)`` (TF-Slim MobileFaceNets): ``x`` for ``x >= 0``, ``2 c x`` below, so ``alpha = 2c``;
    - ``max(x, 0) + a * min(x, 0)`` (MXNet models through TF.js): ``alpha = a``, the same values bit for bit.
    """
    operands = data_inputs(node)
    if node.op not in ("Add", "AddV2") or len(operands) != 2:
        return None
    for positive_name, scaled_name in (operands, operands[::-1]):
        scaled = uses.only_use(scaled_name, "Mul")
        if scaled is None or len(factors := data_inputs(scaled)) != 2:
            continue
        for slope_name, negative_name in (factors, factors[::-1]):
            slope = uses.const(slope_name)
            if slope is None:
                continue
            if (relu := uses.only_use(positive_name, "Relu")) and (sub := uses.only_use(negative_name, "Sub")):
                x, absolute = data_inputs(sub)
                source = uses.only_use(absolute, "Abs")
                if source is not None and data_inputs(source) == [x] and data_inputs(relu) == [x]:
                    return x, slope.astype(np.float32) * 2
            if (high := uses.only_use(positive_name, "Maximum")) and (low := uses.only_use(negative_name, "Minimum")):
                shared = uses.against_zero(high)
                if shared is not None and shared == uses.against_zero(low):
                    return shared, slope.astype(np.float32)
    return None


def fuse_prelu(nodes: list[GraphNode]) -> list[GraphNode]:
    """PReLU spelled out (see :func:`_prelu_slope`) -> one ``Prelu(x, alpha)`` node: one pass over the activation
    instead of four or five, forward and backward."""
    uses, rewritten = _Uses(nodes), []
    for node in nodes:
        match = _prelu_slope(node, uses)
        if match is None:
            rewritten.append(node)
            continue
        alpha = GraphNode(f"{node.name}/alpha", "Const", [], {"value": match[1]})
        rewritten += [alpha, GraphNode(node.name, "Prelu", [match[0], alpha.name])]
    return rewritten


def fuse_bias_activation(nodes: list[GraphNode]) -> list[GraphNode]:
    """``Conv2D -> BiasAdd (-> Relu)`` with a constant bias -> one fused convolution under the last node's name: the
    convolution adds the bias itself and the ReLU runs on its output, two passes fewer per layer. Exact: the same
    operations on the same values."""
    uses = _Uses(nodes)
    fused: dict[str, GraphNode] = {}  # the name of the node a fused convolution replaces -> that convolution
    for node in nodes:
        if node.op not in _FUSED_CONV or node.attrs.get("fused_ops"):
            continue
        bias_add = uses.sole_reader(node.name, "BiasAdd")
        if bias_add is None or uses.const(bias := data_inputs(bias_add)[1]) is None:
            continue
        relu = uses.sole_reader(bias_add.name, "Relu")
        ops, last = (["BiasAdd", "Relu"], relu) if relu is not None else (["BiasAdd"], bias_add)
        attrs = {**node.attrs, "fused_ops": ops}
        fused[last.name] = GraphNode(last.name, _FUSED_CONV[node.op], [*data_inputs(node)[:2], bias], attrs)
    return [fused.get(n.name, n) for n in nodes]


def fold_residual_scales(nodes: list[GraphNode]) -> list[GraphNode]:
    """``s * (conv(x, w) + b)`` for a scalar ``s`` (Inception-ResNet's residual scale, one more pass over the
    branch's output) -> ``conv(x, s w) + s b``. Not bit-identical: rounding ``s w`` moves results by a few float32
    ulps (tests/test_convert.py states the tolerance)."""
    uses, folded = _Uses(nodes), []
    for node in nodes:
        match = None
        for scale_name, conv_name in (operands, operands[::-1]) if len(operands := data_inputs(node)) == 2 else ():
            scale, conv = uses.const(scale_name), uses.only_use(conv_name, *_FUSED_CONV.values())
            if node.op != "Mul" or scale is None or scale.size != 1 or conv is None:
                continue
            weight, bias = (uses.const(name) for name in data_inputs(conv)[1:3])
            if conv.attrs["fused_ops"] == ["BiasAdd"] and weight is not None and bias is not None:
                match = conv, np.float32(scale.reshape(())), weight, bias
        if match is None:
            folded.append(node)
            continue
        conv, scale, weight, bias = match
        scaled = [
            GraphNode(f"{node.name}/folded_{role}", "Const", [], {"value": (value * scale).astype(np.float32)})
            for role, value in (("weights", weight), ("bias", bias))
        ]
        inputs = [data_inputs(conv)[0], *(s.name for s in scaled)]
        folded += [*scaled, GraphNode(node.name, conv.op, inputs, conv.attrs)]
    return folded


def fold_pads(nodes: list[GraphNode]) -> list[GraphNode]:
    """``Pad`` (zeros around the rows and columns) read only by a VALID convolution -> the convolution with those
    paddings (``EXPLICIT``): the convolution pads as it reads, instead of a padded copy of the activation forward and
    a cropped copy of its gradient backward (mobileface: 13 sites). Exact: the same zeros in the same places."""
    uses = _Uses(nodes)
    folded: dict[str, GraphNode] = {}
    for node in (n for n in nodes if n.op == "Pad"):
        paddings, conv = uses.const(data_inputs(node)[1]), uses.sole_reader(node.name, *_CONVS)
        if paddings is None or conv is None or conv.attrs.get("padding", "VALID") != "VALID":
            continue
        (n_before, n_after), (top, bottom), (left, right), (c_before, c_after) = paddings.astype(int).tolist()
        if data_inputs(conv)[0] != node.name or n_before or n_after or c_before or c_after:
            continue
        attrs = {**conv.attrs, "padding": "EXPLICIT", "explicit_paddings": [0, 0, top, bottom, left, right, 0, 0]}
        folded[conv.name] = GraphNode(conv.name, conv.op, [data_inputs(node)[0], *conv.inputs[1:]], attrs)
    return [folded.get(n.name, n) for n in nodes]


def simplify(nodes: list[GraphNode]) -> list[GraphNode]:
    """Every rewrite, in the order each needs: PReLUs, then biases and ReLUs into convolutions, then scales, then
    pads."""
    return fold_pads(fold_residual_scales(fuse_bias_activation(fuse_prelu(nodes))))
