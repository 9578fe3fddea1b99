"""The two graph interpreters on their shared base: converted graphs refuse deep copies, each value is freed after its
last reader, ONNX conversions are cached like the TF ones, and gradients equal finite differences in float64."""

from __future__ import annotations

import copy
import hashlib
import weakref
from collections.abc import Callable

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor

from redteam.convert import onnx_graph
from redteam.convert.graph import GraphModule
from redteam.convert.onnx_graph import OnnxModule, load_onnx
from redteam.convert.tf_graph import GraphNode, TFGraphModule
from redteam.convert.tflite import nodes_from_tflite
from redteam.targets.arcface import MOBILEFACENET_TFLITE
from redteam.targets.retinaface import WEIGHTS_PY, onnx_bytes

#: The end of MobileFaceNet's first residual block: convolutions, batch norms, PReLUs, a depthwise conv and an Add.
FIRST_RESIDUAL = "MobileFaceNet/MobileFaceNet/Conv2d_2_InvResBlock_1/Add"


def onnx_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list[int]],
    outputs: list[str],
    initializers: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A float graph (opset 13) from its nodes, input shapes, output names and constants."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(value, name) for name, value in (initializers or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def onnx_relu() -> OnnxModule:
    return OnnxModule(onnx_model([helper.make_node("Relu", ["x"], ["y"])], {"x": [1, 3]}, ["y"]))


def tf_relu() -> TFGraphModule:
    return TFGraphModule(
        [GraphNode("x", "Placeholder", [], {"shape": [1, 2, 2, 3]}), GraphNode("y", "Relu", ["x"])], ["x"], ["y"]
    )


@pytest.fixture(scope="module")
def retinaface_net() -> OnnxModule:
    return load_onnx(onnx_bytes(WEIGHTS_PY.path()))


@pytest.fixture(scope="module")
def mobilefacenet_nodes() -> list[GraphNode]:
    return nodes_from_tflite(MOBILEFACENET_TFLITE.path().read_bytes())


# ---------------------------------------------------------------------------------------------- shared base


@pytest.mark.parametrize("build", [onnx_relu, tf_relu], ids=["onnx", "tf"])
def test_converted_graphs_refuse_a_deep_copy_that_would_share_weights(build: Callable[[], GraphModule]):
    with pytest.raises(TypeError, match="load the target again"):
        copy.deepcopy(build())


def test_each_value_is_freed_after_its_last_reader():
    """y = sigmoid(exp(-a) + a) with a = relu(x): ``a`` lives until the Add, everything else one step."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Neg", ["a"], ["b"]),
        helper.make_node("Exp", ["b"], ["c"]),
        helper.make_node("Add", ["c", "a"], ["d"]),
        helper.make_node("Sigmoid", ["d"], ["y"]),
    ]
    net = OnnxModule(onnx_model(nodes, {"x": [2, 8]}, ["y"]))
    results: dict[str, weakref.ref] = {}
    alive_at_start: list[list[str]] = []
    for (name,), op in net._plan:  # wrap each op: note which results are still alive, then keep a weak reference

        def probe(*xs: Tensor, fn=op.fn, name=name) -> Tensor:
            alive_at_start.append(sorted(n for n, ref in results.items() if ref() is not None))
            result = fn(*xs)
            results[name] = weakref.ref(result)
            return result

        op.fn = probe
    with torch.no_grad():  # autograd would keep inputs alive for the backward
        y = net(torch.randn(2, 8))
    assert alive_at_start == [[], ["a"], ["a", "b"], ["a", "c"], ["d"]]
    assert [n for n, ref in results.items() if ref() is not None] == ["y"]
    assert y.shape == (2, 8)


def onnx_squared_relu() -> OnnxModule:
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Mul", ["a", "a"], ["y"])]
    return OnnxModule(onnx_model(nodes, {"x": [4]}, ["y"]))


def tf_squared_relu() -> TFGraphModule:
    nodes = [GraphNode("x", "Placeholder", [], {"shape": [4]}), GraphNode("a", "Relu", ["x"])]
    return TFGraphModule([*nodes, GraphNode("y", "Mul", ["a", "a"])], ["x"], ["y"])


@pytest.mark.parametrize("build", [onnx_squared_relu, tf_squared_relu], ids=["onnx", "tf"])
def test_a_value_read_twice_by_its_last_reader_is_freed_once(build: Callable[[], GraphModule]):
    x = torch.randn(4)
    assert torch.equal(build()(x), x.relu() * x.relu())


@pytest.fixture(params=["retinaface", "mobilefacenet-tflite"])
def real_graph(request) -> GraphModule:
    if request.param == "retinaface":
        return request.getfixturevalue("retinaface_net")
    return TFGraphModule(request.getfixturevalue("mobilefacenet_nodes"), ["input"], ["embeddings"])


def test_real_graphs_release_every_value_right_after_its_last_reader(real_graph: GraphModule):
    net = real_graph
    touched = [{*op.inputs, *(o for o in outputs if o)} for outputs, op in net._plan]
    released = [value for values in net._released for value in values]
    for step, names in enumerate(net._released):
        for value in names:
            assert value in touched[step] and not any(value in later for later in touched[step + 1 :])
    produced = {*net.input_names, *(o for outputs, _ in net._plan for o in outputs if o)}
    assert sorted(released) == sorted(produced - set(net.output_names))  # each once; only the outputs stay
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        assert set(net.run([x])) == set(net.output_names)


def test_onnx_conversion_is_cached_by_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("REDTEAM_CACHE", str(tmp_path))
    data = onnx_bytes(WEIGHTS_PY.path())
    first = load_onnx(data)
    key = f"onnx-{hashlib.sha256(data).hexdigest()[:16]}-v{onnx_graph.CACHE_FORMAT}"
    assert (tmp_path / "converted" / f"{key}.pt").is_file()

    def fail(model: onnx.ModelProto) -> None:
        pytest.fail("converted again instead of read from the cache")

    monkeypatch.setattr(onnx_graph, "fold_model", fail)
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    for again in (load_onnx(data), load_onnx(path)):  # the key is the content, however it is given
        assert list(again.weights) == list(first.weights)
        assert all(torch.equal(again.weights[k], first.weights[k]) for k in first.weights)
        x = torch.rand(2, 3, 64, 48) * 255 - 110
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(first(x), again(x)))


# ---------------------------------------------------------------------------------------------- gradients


def assert_directional_derivatives_match(f: Callable[[Tensor], Tensor], x: Tensor, generator: torch.Generator) -> None:
    """Autograd's derivative of the scalar ``f`` at ``x`` (float64) along 3 random directions equals central
    differences to 1e-6 relative (the step balances rounding, ~1e-16 / step, against curvature, ~step ** 2)."""
    step = 1e-5
    x = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(f(x), x)
    with torch.no_grad():
        for _ in range(3):
            direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            numerical = (f(x + step * direction) - f(x - step * direction)) / (2 * step)
            analytical = (gradient * direction).sum()
            assert abs(analytical - numerical) < 1e-6 * abs(numerical), (float(analytical), float(numerical))


def random_projection(net: GraphModule, x: Tensor, generator: torch.Generator) -> Callable[[Tensor], Tensor]:
    """``x -> sum_k <w_k, output_k(x)>`` with fixed random ``w_k``: a scalar that every output feeds."""
    with torch.no_grad():
        outputs = net(x)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    weights = [torch.randn(o.shape, generator=generator, dtype=torch.float64) for o in outputs]

    def project(x: Tensor) -> Tensor:
        outputs = net(x)
        return sum((w * o).sum() for w, o in zip(weights, outputs if isinstance(outputs, tuple) else (outputs,)))

    return project


def test_retinaface_gradients_match_finite_differences_in_float64():
    """The whole converted detector (convolutions, LeakyReLU, nearest Resize to run-time sizes, Softmax, reshapes)."""
    net = load_onnx(onnx_bytes(WEIGHTS_PY.path())).double()  # a copy of its own: the fixture stays float32
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=generator, dtype=torch.float64) * 255 - 110  # BGR minus the mean
    assert_directional_derivatives_match(random_projection(net, x, generator), x, generator)


def test_tf_graph_gradients_match_finite_differences_in_float64(mobilefacenet_nodes):
    """MobileFaceNet (TFLite) up to its first residual Add: NHWC semantics on NCHW storage, fused PReLU."""
    net = TFGraphModule(mobilefacenet_nodes, ["input"], [FIRST_RESIDUAL]).double()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 24, 24, generator=generator, dtype=torch.float64) * 2 - 1
    assert_directional_derivatives_match(random_projection(net, x, generator), x, generator)


def test_gradcheck_through_conv_batch_norm_prelu_add_and_resize():
    """Input and parameter gradients of a small ONNX graph: one batch norm folded into its conv, one run on its own."""
    rng = np.random.default_rng(0)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    stats = {
        "scale": normal(4),
        "shift": normal(4),
        "mean": normal(4),
        "var": rng.uniform(0.5, 2, 4).astype(np.float32),
    }
    initializers = {
        "w": normal(4, 2, 3, 3),
        "b": normal(4),
        "slope": 0.3 * normal(4, 1, 1),
        "skip_w": normal(4, 2, 1, 1),
        "scales": np.array([1, 1, 2, 2], np.float32),
        **stats,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", *stats], ["bn"]),
        helper.make_node("PRelu", ["bn", "slope"], ["prelu"]),
        helper.make_node("Conv", ["x", "skip_w"], ["skip"]),
        helper.make_node("Add", ["prelu", "skip"], ["sum"]),
        helper.make_node("BatchNormalization", ["sum", *stats], ["normalised"]),
        helper.make_node("Resize", ["normalised", "", "scales"], ["y"], mode="linear"),
    ]
    net = OnnxModule(onnx_model(nodes, {"x": [1, 2, 5, 5]}, ["y"], initializers)).double()
    assert [outputs for outputs, _ in net._plan] == [("bn",), ("prelu",), ("skip",), ("sum",), ("normalised",), ("y",)]
    names = [name for name, _ in net.named_parameters()]

    def run(x: Tensor, *parameters: Tensor) -> Tensor:
        return torch.func.functional_call(net, dict(zip(names, parameters)), (x,))

    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    inputs = (x, *(p.detach() for p in net.parameters()))
    assert torch.autograd.gradcheck(run, tuple(t.clone().requires_grad_(True) for t in inputs))
