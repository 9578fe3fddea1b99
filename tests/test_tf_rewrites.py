"""The TF graph rewrites on the real graphs they were written for: each fuses what it should, and the rewritten graph
computes what the graph as written computes, bit for bit where the rewrite is exact, within a stated tolerance where
it rounds differently."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from redteam.convert.tf_graph import TFGraphModule
from redteam.convert.tf_nodes import GraphNode
from redteam.convert.tf_rewrites import fold_pads, fold_residual_scales, fuse_bias_activation, fuse_prelu, simplify

Rewrite = Callable[[list[GraphNode]], list[GraphNode]]


def outputs_and_gradients(nodes: list[GraphNode], inputs: list[str], output: str, x: Tensor) -> tuple[Tensor, Tensor]:
    net = TFGraphModule(nodes, inputs, [output], rewrite=False)
    leaf = x.clone().requires_grad_(True)
    y = net(leaf)
    weights = torch.linspace(-1, 1, y.shape[-1])  # not the squared norm: normalised embeddings would give zero
    (gradient,) = torch.autograd.grad((y * weights).sum(), leaf)
    return y.detach(), gradient


def compare(nodes: list[GraphNode], rewrite: Rewrite, inputs: list[str], output: str, x: Tensor):
    """(steps as written, steps rewritten, outputs as written, rewritten, gradients as written, rewritten)."""
    written = TFGraphModule(nodes, inputs, [output], rewrite=False)
    rewritten = TFGraphModule(rewrite(nodes), inputs, [output], rewrite=False)
    return (
        len(written._plan),
        len(rewritten._plan),
        *outputs_and_gradients(nodes, inputs, output, x),
        *outputs_and_gradients(rewrite(nodes), inputs, output, x),
    )


def faces_at(faces, size: int, count: int = 2) -> Tensor:
    return torch.nn.functional.interpolate(faces.load(list(range(count))), size=(size, size), mode="bilinear")


def test_relu_abs_prelu_of_mobilefacenet_is_one_op_with_identical_values(faces):
    """arcface's TFLite file writes PReLU as relu(x) + c (x - |x|) at 33 sites: five steps each become one. Its
    slopes reach 9.4, where the fused backward's lerp rounds differently from ``2c * grad`` (``convert/prelu.py``):
    the gradient agrees to float32 rounding, the values exactly."""
    from redteam.convert.tflite import nodes_from_tflite
    from redteam.targets.arcface import MOBILEFACENET_TFLITE

    nodes = nodes_from_tflite(MOBILEFACENET_TFLITE.path().read_bytes())
    before, after, y, gradient, y_fused, gradient_fused = compare(
        nodes, fuse_prelu, ["input"], "embeddings", faces_at(faces, 112) * 2 - 1
    )
    assert before - after == 4 * 33
    assert torch.equal(y, y_fused)
    assert (gradient - gradient_fused).norm() < 1e-5 * gradient.norm()


def test_max_min_prelu_of_mobileface_is_one_op_with_identical_values(faces):
    """mobileface's TF.js graph writes PReLU as max(x, 0) + a min(x, 0) at 13 sites: four steps each become one.
    Values are identical; gradients agree to float32 rounding, as for arcface's slopes above 0.5."""
    from redteam.convert.tfjs import nodes_from_model_json
    from redteam.targets.arcface import MOBILEFACE

    nodes = nodes_from_model_json(*MOBILEFACE.read())
    before, after, y, gradient, y_fused, gradient_fused = compare(
        nodes, fuse_prelu, ["data"], "batchnorm0/add_1", faces_at(faces, 112) * 255
    )
    assert before - after == 3 * 13
    assert sum(n.op == "Prelu" for n in fuse_prelu(nodes)) == 13
    assert torch.equal(y, y_fused)
    assert (gradient - gradient_fused).norm() < 1e-5 * gradient.norm()


def test_max_against_a_constant_other_than_zero_is_not_a_prelu():
    """max(x, 6) + a min(x, 6) is no PReLU: the matcher checks the constant, and the graph stays as written."""
    constant = {"value": np.float32(6.0)}
    nodes = [
        GraphNode("x", "Placeholder", [], {"shape": [1, 4]}),
        GraphNode("six", "Const", [], constant),
        GraphNode("slope", "Const", [], {"value": np.full(4, 0.25, np.float32)}),
        GraphNode("high", "Maximum", ["x", "six"]),
        GraphNode("low", "Minimum", ["six", "x"]),
        GraphNode("scaled", "Mul", ["slope", "low"]),
        GraphNode("y", "AddV2", ["high", "scaled"]),
    ]
    assert fuse_prelu(nodes) == nodes
    nodes[1] = GraphNode("six", "Const", [], {"value": np.float32(0.0)})
    assert [n.op for n in fuse_prelu(nodes)][-1] == "Prelu"


@pytest.fixture(scope="module")
def facenet_nodes() -> list[GraphNode]:
    from redteam.convert.tf_graph import nodes_from_graphdef
    from redteam.targets.facenet import GRAPH

    return nodes_from_graphdef(GRAPH.path().read_bytes())


def facenet_input(faces) -> Tensor:
    return (faces_at(faces, 160) * 255 - 127.5) / 128


def test_facenet_convolutions_take_their_bias_and_relu(facenet_nodes, faces):
    """132 Conv2D -> BiasAdd steps become 132 steps, with 111 of the ReLUs after them (the other 20 follow a residual
    sum, and the 21 residual branches end in a scale). Not bit for bit: oneDNN adds the bias
    inside the convolution, rounding differently by a float32 ulp or so; a unit whose input lies that close to zero
    flips its ReLU, so gradients agree to 1e-3 of their norm rather than exactly."""
    before, after, y, gradient, y_fused, gradient_fused = compare(
        facenet_nodes, fuse_bias_activation, ["input"], "embeddings", facenet_input(faces)
    )
    assert before - after == 132 + 111
    assert (y - y_fused).abs().max() < 1e-6  # unit-length embeddings
    assert (gradient - gradient_fused).norm() < 1e-3 * gradient.norm()


def test_facenet_residual_scales_fold_into_the_convolutions(facenet_nodes, faces):
    """The 21 residual branches' scales (0.1, 0.2, 1) multiply their convolution's weights and bias instead of its
    output; every other rewrite applied first, as the module applies them."""
    fused = fuse_bias_activation(facenet_nodes)
    before, after, y, gradient, y_folded, gradient_folded = compare(
        fused, fold_residual_scales, ["input"], "embeddings", facenet_input(faces)
    )
    assert before - after == 21
    assert (y - y_folded).abs().max() < 1e-6
    assert (gradient - gradient_folded).norm() < 1e-3 * gradient.norm()
    assert len(TFGraphModule(simplify(facenet_nodes), ["input"], ["embeddings"], rewrite=False)._plan) == after


def test_mobilefaces_zero_pads_fold_into_the_convolutions_that_read_them(faces):
    """mobileface's TF.js graph pads with zeros before 13 VALID convolutions: each Pad step goes, the convolution pads
    as it reads; every other rewrite applied first, as the module applies them."""
    from redteam.convert.tfjs import nodes_from_model_json
    from redteam.targets.arcface import MOBILEFACE

    nodes = nodes_from_model_json(*MOBILEFACE.read())
    fused = fuse_bias_activation(fuse_prelu(nodes))
    before, after, y, gradient, y_folded, gradient_folded = compare(
        fused, fold_pads, ["data"], "batchnorm0/add_1", faces_at(faces, 112) * 255
    )
    assert before - after == 13
    assert len(TFGraphModule(simplify(nodes), ["data"], ["batchnorm0/add_1"], rewrite=False)._plan) == after
    assert torch.equal(y, y_folded)
    assert torch.equal(gradient, gradient_folded)


def test_a_pad_other_than_around_the_image_or_read_by_more_than_a_convolution_stays():
    """Only a Pad of rows and columns whose one reader is a VALID convolution folds: not one that pads channels (a
    residual's widening), and not one that a second node also reads."""
    kernel = {"value": np.ones((3, 3, 2, 2), np.float32)}
    nodes = [
        GraphNode("x", "Placeholder", [], {"shape": [1, 8, 8, 2]}),
        GraphNode("paddings", "Const", [], {"value": np.array([[0, 0], [1, 1], [1, 1], [0, 0]], np.int32)}),
        GraphNode("padded", "Pad", ["x", "paddings"]),
        GraphNode("kernel", "Const", [], kernel),
        GraphNode("y", "Conv2D", ["padded", "kernel"], {"padding": "VALID", "strides": [1, 1, 1, 1]}),
    ]
    assert [n.attrs.get("explicit_paddings") for n in fold_pads(nodes)][-1] == [0, 0, 1, 1, 1, 1, 0, 0]
    channels = {"value": np.array([[0, 0], [0, 0], [0, 0], [0, 2]], np.int32)}
    assert fold_pads([*nodes[:1], GraphNode("paddings", "Const", [], channels), *nodes[2:]])[-1] == nodes[-1]
    assert fold_pads([*nodes, GraphNode("z", "Relu", ["padded"])]) == [*nodes, GraphNode("z", "Relu", ["padded"])]
