"""TFLite converter: the real MobileFaceNet.tflite equals the LiteRT interpreter on real faces, and each op family
(written into small flatbuffer models here) equals LiteRT on random inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import flatbuffers
import numpy as np
import pytest
import tflite
import torch

from redteam.convert.tf_graph import TFGraphModule
from redteam.convert.tflite import UnsupportedTFLiteError, load_tflite, nodes_from_tflite

litert = pytest.importorskip("ai_edge_litert.interpreter", reason="the LiteRT interpreter (PyPI ai-edge-litert)")


def run_litert(model: bytes, *inputs: np.ndarray) -> np.ndarray:
    """The reference: LiteRT's interpreter on NHWC inputs -> the first output."""
    interpreter = litert.Interpreter(model_content=model)
    for detail, x in zip(interpreter.get_input_details(), inputs):
        interpreter.resize_tensor_input(detail["index"], x.shape)
    interpreter.allocate_tensors()
    for detail, x in zip(interpreter.get_input_details(), inputs):
        interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def run_ours(model: bytes, inputs: list[str], output: str, *arrays: np.ndarray) -> np.ndarray:
    net = TFGraphModule(nodes_from_tflite(model), inputs, [output])
    images = [torch.from_numpy(x).permute(0, 3, 1, 2) if x.ndim == 4 else torch.from_numpy(x) for x in arrays]
    with torch.no_grad():
        return net(*images).numpy()


# ---------------------------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def arcface():
    from redteam.engine import load_target

    return load_target("arcface", torch.device("cpu"))


def test_mobilefacenet_matches_litert_on_real_faces(arcface, faces):
    from redteam.targets.arcface import MOBILEFACENET_TFLITE

    x = arcface.preprocess(faces.load(range(0, 80, 10)))  # 8 real faces, as the network takes them
    with torch.no_grad():
        ours = arcface.net(x).numpy()
    model = MOBILEFACENET_TFLITE.path().read_bytes()
    nhwc = x.permute(0, 2, 3, 1).numpy()
    reference = np.concatenate([run_litert(model, nhwc[k : k + 2]) for k in range(0, 8, 2)])  # batch 2 baked in
    assert reference.shape == ours.shape == (8, 192)
    difference = np.abs(ours - reference).max()
    assert difference < 1e-4, difference
    assert np.abs(reference).max() > 1  # raw (unnormalised) embeddings: the bound is not trivially met


def test_conversion_is_cached_by_checksum():
    from redteam.assets import cache_dir
    from redteam.targets.arcface import MOBILEFACENET_TFLITE

    first = load_tflite(MOBILEFACENET_TFLITE, ["input"], ["embeddings"])
    cached = cache_dir() / "converted" / f"tflite-{MOBILEFACENET_TFLITE.sha256[:16]}-v1.pt"
    assert cached.is_file()
    again = load_tflite(MOBILEFACENET_TFLITE, ["input"], ["embeddings"])
    for key, value in first.weights.items():
        assert torch.equal(value, again.weights[key])


# ---------------------------------------------------------------------------------------------- op families


@dataclass
class TinyModel:
    """Writes a one-subgraph TFLite flatbuffer: tensors (constants carry a buffer), builtin ops with scalar options."""

    tensors: list[dict] = field(default_factory=list)
    buffers: list[bytes] = field(default_factory=lambda: [b""])
    ops: list[tuple[str, list[int], list[int], str | None, dict]] = field(default_factory=list)

    def tensor(self, shape, name: str = "", dtype: int = tflite.TensorType.FLOAT32, data: bytes = b"", **quant) -> int:
        buffer = 0
        if data:
            self.buffers.append(data)
            buffer = len(self.buffers) - 1
        self.tensors.append(
            dict(shape=list(shape), name=name or f"t{len(self.tensors)}", type=dtype, buffer=buffer, quant=quant)
        )
        return len(self.tensors) - 1

    def const(self, value: np.ndarray, dtype: int = tflite.TensorType.FLOAT32, **quant) -> int:
        return self.tensor(value.shape, dtype=dtype, data=value.tobytes(), **quant)

    def op(self, name: str, inputs: list[int], shape, options: str | None = None, **fields) -> int:
        out = self.tensor(shape)
        self.ops.append((name, inputs, [out], options, fields))
        return out

    def build(self, inputs: list[int], outputs: list[int]) -> bytes:
        b = flatbuffers.Builder(1 << 16)

        def vector(start, items, prepend):
            start(b, len(items))
            for item in reversed(items):
                prepend(item)
            return b.EndVector()

        buffers = []
        for data in self.buffers:
            blob = b.CreateNumpyVector(np.frombuffer(data, np.uint8)) if data else None
            tflite.BufferStart(b)
            if blob is not None:
                tflite.BufferAddData(b, blob)
            buffers.append(tflite.BufferEnd(b))
        tensors = []
        for t in self.tensors:
            name, shape = b.CreateString(t["name"]), b.CreateNumpyVector(np.array(t["shape"], np.int32))
            quant = None
            if t["quant"]:
                scale = b.CreateNumpyVector(np.asarray(t["quant"]["scale"], np.float32))
                zero = b.CreateNumpyVector(np.asarray(t["quant"]["zero_point"], np.int64))
                tflite.QuantizationParametersStart(b)
                tflite.QuantizationParametersAddScale(b, scale)
                tflite.QuantizationParametersAddZeroPoint(b, zero)
                tflite.QuantizationParametersAddQuantizedDimension(b, t["quant"].get("axis", 0))
                quant = tflite.QuantizationParametersEnd(b)
            tflite.TensorStart(b)
            tflite.TensorAddShape(b, shape)
            tflite.TensorAddType(b, t["type"])
            tflite.TensorAddBuffer(b, t["buffer"])
            tflite.TensorAddName(b, name)
            if quant is not None:
                tflite.TensorAddQuantization(b, quant)
            tensors.append(tflite.TensorEnd(b))
        codes = sorted({name for name, *_ in self.ops})
        operator_codes = []
        for name in codes:
            code = getattr(tflite.BuiltinOperator, name)
            tflite.OperatorCodeStart(b)
            tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            tflite.OperatorCodeAddBuiltinCode(b, code)
            tflite.OperatorCodeAddVersion(b, 1)
            operator_codes.append(tflite.OperatorCodeEnd(b))
        operators = []
        for name, ins, outs, options, fields in self.ops:
            table = None
            if options:
                getattr(tflite, f"{options}Start")(b)
                for key, value in fields.items():
                    getattr(tflite, f"{options}Add{key}")(b, value)
                table = getattr(tflite, f"{options}End")(b)
            ins_vector = b.CreateNumpyVector(np.array(ins, np.int32))
            outs_vector = b.CreateNumpyVector(np.array(outs, np.int32))
            tflite.OperatorStart(b)
            tflite.OperatorAddOpcodeIndex(b, codes.index(name))
            tflite.OperatorAddInputs(b, ins_vector)
            tflite.OperatorAddOutputs(b, outs_vector)
            if table is not None:
                tflite.OperatorAddBuiltinOptionsType(b, getattr(tflite.BuiltinOptions, options))
                tflite.OperatorAddBuiltinOptions(b, table)
            operators.append(tflite.OperatorEnd(b))
        tensor_vector = vector(tflite.SubGraphStartTensorsVector, tensors, b.PrependUOffsetTRelative)
        operator_vector = vector(tflite.SubGraphStartOperatorsVector, operators, b.PrependUOffsetTRelative)
        input_vector = b.CreateNumpyVector(np.array(inputs, np.int32))
        output_vector = b.CreateNumpyVector(np.array(outputs, np.int32))
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, tensor_vector)
        tflite.SubGraphAddInputs(b, input_vector)
        tflite.SubGraphAddOutputs(b, output_vector)
        tflite.SubGraphAddOperators(b, operator_vector)
        subgraph = tflite.SubGraphEnd(b)
        subgraphs = vector(tflite.ModelStartSubgraphsVector, [subgraph], b.PrependUOffsetTRelative)
        code_vector = vector(tflite.ModelStartOperatorCodesVector, operator_codes, b.PrependUOffsetTRelative)
        buffer_vector = vector(tflite.ModelStartBuffersVector, buffers, b.PrependUOffsetTRelative)
        tflite.ModelStart(b)
        tflite.ModelAddVersion(b, 3)
        tflite.ModelAddOperatorCodes(b, code_vector)
        tflite.ModelAddSubgraphs(b, subgraphs)
        tflite.ModelAddBuffers(b, buffer_vector)
        b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())


RELU, RELU6 = tflite.ActivationFunctionType.RELU, tflite.ActivationFunctionType.RELU6
SAME, VALID = tflite.Padding.SAME, tflite.Padding.VALID


def _random(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def convolutions(m: TinyModel, x: int, rng: np.random.Generator) -> int:
    """Strided SAME (uneven padding) with RELU6; dilated VALID; depthwise with multiplier 2, SAME, RELU."""
    y = m.op(
        "CONV_2D", [x, m.const(_random(rng, 6, 3, 3, 4)), m.const(_random(rng, 6))], [1, 4, 4, 6], "Conv2DOptions",
        Padding=SAME, StrideH=2, StrideW=2, FusedActivationFunction=RELU6, DilationHFactor=1, DilationWFactor=1,
    )  # fmt: skip
    y = m.op(
        "CONV_2D", [y, m.const(_random(rng, 5, 2, 2, 6)), m.const(_random(rng, 5))], [1, 2, 2, 5], "Conv2DOptions",
        Padding=VALID, StrideH=1, StrideW=1, DilationHFactor=2, DilationWFactor=2,
    )  # fmt: skip
    return m.op(
        "DEPTHWISE_CONV_2D", [y, m.const(_random(rng, 1, 3, 3, 10)), m.const(_random(rng, 10))], [1, 2, 2, 10],
        "DepthwiseConv2DOptions", Padding=SAME, StrideH=1, StrideW=1, DepthMultiplier=2,
        FusedActivationFunction=RELU, DilationHFactor=1, DilationWFactor=1,
    )  # fmt: skip


def activations(m: TinyModel, x: int, rng: np.random.Generator) -> int:
    shape = [1, 7, 7, 4]
    y = m.op("PRELU", [x, m.const(_random(rng, 4) * 0.3)], shape)
    for name in ("TANH", "ABS", "SQRT"):
        y = m.op(name, [y], shape)
    y = m.op("SUB", [y, m.const(np.float32([0.5]))], shape, "SubOptions")  # both signs for ELU
    for name in ("ELU", "LOGISTIC", "RSQRT", "RELU6", "EXP", "NEG"):
        y = m.op(name, [y], shape)
    return y


def elementwise(m: TinyModel, x: int, rng: np.random.Generator) -> int:
    """Constant operands broadcast over channels; fused ReLU on ADD."""
    shape = [1, 7, 7, 4]
    y = m.op("ADD", [x, m.const(_random(rng, 4))], shape, "AddOptions", FusedActivationFunction=RELU)
    y = m.op("MUL", [y, x], shape, "MulOptions")
    y = m.op("DIV", [y, m.const(np.abs(_random(rng, 4)) + 0.5)], shape, "DivOptions")
    y = m.op("MAXIMUM", [y, m.const(np.float32([-0.2]))], shape)
    return m.op("MINIMUM", [y, m.op("SQUARE", [x], shape)], shape)


def pools(m: TinyModel, x: int, rng: np.random.Generator) -> int:
    """SAME average pooling counts only the pixels inside the image at the edges."""
    y = m.op(
        "AVERAGE_POOL_2D", [x], [1, 4, 4, 4], "Pool2DOptions",
        Padding=SAME, StrideH=2, StrideW=2, FilterHeight=3, FilterWidth=3,
    )  # fmt: skip
    return m.op(
        "MAX_POOL_2D", [y], [1, 2, 2, 4], "Pool2DOptions",
        Padding=SAME, StrideH=2, StrideW=2, FilterHeight=3, FilterWidth=2, FusedActivationFunction=RELU,
    )  # fmt: skip


def shapes(m: TinyModel, x: int, rng: np.random.Generator) -> int:
    """PAD, CONCATENATION on channels, RESHAPE to the NHWC-ordered flat vector."""
    padding = m.const(np.array([[0, 0], [1, 0], [0, 2], [0, 0]], np.int32), tflite.TensorType.INT32)
    y = m.op("PAD", [x, padding], [1, 8, 9, 4])
    y = m.op("CONCATENATION", [y, m.op("NEG", [y], [1, 8, 9, 4])], [1, 8, 9, 8], "ConcatenationOptions", Axis=3)
    return m.op("RESHAPE", [y, m.const(np.array([1, 8 * 9 * 8], np.int32), tflite.TensorType.INT32)], [1, 576])


def embedding_head(m: TinyModel, x: int, rng: np.random.Generator) -> int:
    """Global MEAN, FULLY_CONNECTED from a 4-D input (flattened in NHWC order), L2_NORMALIZATION."""
    axes = m.const(np.array([1, 2], np.int32), tflite.TensorType.INT32)
    pooled = m.op("MEAN", [x, axes], [1, 1, 1, 4], "ReducerOptions", KeepDims=True)
    y = m.op("FULLY_CONNECTED", [pooled, m.const(_random(rng, 6, 4)), m.const(_random(rng, 6))], [1, 6],
             "FullyConnectedOptions")  # fmt: skip
    y = m.op("FULLY_CONNECTED", [m.op("RESHAPE", [x, m.const(np.array([1, 7, 28], np.int32),
             tflite.TensorType.INT32)], [1, 7, 28]), m.const(_random(rng, 6, 7 * 28)), -1], [1, 6],
             "FullyConnectedOptions", FusedActivationFunction=RELU)  # fmt: skip
    return m.op("L2_NORMALIZATION", [y], [1, 6], "L2NormOptions")


def quantised_weights(m: TinyModel, x: int, rng: np.random.Generator) -> int:
    """Float16 filters and per-channel int8 filters, each through a DEQUANTIZE op."""
    half = m.const(_random(rng, 5, 3, 3, 4).astype(np.float16), tflite.TensorType.FLOAT16)
    filters = m.op("DEQUANTIZE", [half], [5, 3, 3, 4])
    y = m.op(
        "CONV_2D", [x, filters, m.const(_random(rng, 5))], [1, 7, 7, 5], "Conv2DOptions",
        Padding=SAME, StrideH=1, StrideW=1, DilationHFactor=1, DilationWFactor=1,
    )  # fmt: skip
    q = rng.integers(-127, 128, (1, 3, 3, 5)).astype(np.int8)
    scale = np.abs(_random(rng, 5)) * 0.02 + 0.01
    quantised = m.const(q, tflite.TensorType.INT8, scale=scale, zero_point=np.zeros(5), axis=3)
    filters = m.op("DEQUANTIZE", [quantised], [1, 3, 3, 5])
    return m.op(
        "DEPTHWISE_CONV_2D", [y, filters, m.const(_random(rng, 5))], [1, 7, 7, 5], "DepthwiseConv2DOptions",
        Padding=SAME, StrideH=1, StrideW=1, DepthMultiplier=1, DilationHFactor=1, DilationWFactor=1,
    )  # fmt: skip


@pytest.mark.parametrize(
    "family", [convolutions, activations, elementwise, pools, shapes, embedding_head, quantised_weights]
)
def test_op_family_matches_litert(family):
    rng = np.random.default_rng(0)
    m = TinyModel()
    x = m.tensor([1, 7, 7, 4], name="x")
    y = family(m, x, rng)
    model = m.build([x], [y])
    image = rng.standard_normal((3, 7, 7, 4)).astype(np.float32)  # batch 3: the baked batch of 1 must not stick
    reference = np.concatenate([run_litert(model, image[k : k + 1]) for k in range(3)])
    ours = run_ours(model, ["x"], m.tensors[y]["name"], image)  # NCHW inside, NHWC again at the output
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < 1e-5 * max(1.0, np.abs(reference).max())
    assert np.abs(reference).max() > 0.05  # the check is not trivially met by zeros


def test_unsupported_ops_are_listed_in_one_error():
    m = TinyModel()
    x = m.tensor([1, 4], name="x")
    y = m.op("SOFTMAX", [x], [1, 4], "SoftmaxOptions", Beta=1.0)
    y = m.op("HARD_SWISH", [y], [1, 4])
    with pytest.raises(UnsupportedTFLiteError, match="HARD_SWISH, SOFTMAX"):
        nodes_from_tflite(m.build([x], [y]))


def test_quantised_activations_are_refused():
    m = TinyModel()
    x = m.tensor([1, 4], name="x", dtype=tflite.TensorType.INT8, scale=[0.1], zero_point=[0])
    y = m.op("RELU", [x], [1, 4])
    with pytest.raises(UnsupportedTFLiteError, match="not float32"):
        nodes_from_tflite(m.build([x], [y]))


def test_converted_graphs_refuse_a_deep_copy_that_would_share_weights():
    import copy

    from redteam.targets.arcface import MOBILEFACENET_TFLITE

    with pytest.raises(TypeError, match="load the target again"):
        copy.deepcopy(load_tflite(MOBILEFACENET_TFLITE, ["input"], ["embeddings"]))
