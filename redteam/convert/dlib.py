"""Read dlib's DNN serialisation (``dlib::serialize(net)``) without dlib, and run its face-descriptor ResNet in torch.

Format facts (dlib/serialize.h, dlib/dnn/core.h, layers.h): an integer is one byte ``n | 0x80 if negative`` and
``n`` little-endian magnitude bytes; a scalar float is an integer mantissa and an integer exponent (value =
mantissa * 2**exponent); a string is its length then its bytes; a bool is the ASCII byte ``'0'``/``'1'``; a tensor
is a version (2), four dimensions, then raw little-endian float32; an alias tensor (a view's shape) is a version (1)
and four dimensions. A network is a loss layer wrapping nested ``add_layer``s: all the nesting version numbers come
first, outermost to innermost (2 for a layer, 1 for a tag or skip, 3 for the layer that owns the input), then the
input layer, then each layer's details innermost (first in the forward pass) to outermost, each followed by three
bools and three (empty) tensors of training state.

Tags and skips carry no data, so the file fixes the layer sequence but not where residual connections start; the
network here is the ResNet family of dlib's ``dnn_face_recognition_ex.cpp``: a stem (conv, affine, relu, max-pool),
residual blocks (conv, affine, relu, conv, affine, [avg-pool of the block input], add, relu), a global average pool
and a bias-free dense layer. :func:`read_dlib_net` checks the file has exactly that shape and ends where it should.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from redteam.errors import RedteamError
from redteam.runtime import channels_last


class DlibFormatError(RedteamError):
    pass


#: A dlib tensor's dimensions: num_samples, k, nr, nc.
_Shape = tuple[int, int, int, int]


class _Reader:
    """Sequential reader of dlib's primitive encodings."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"file ends inside a value at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        head = self._take(1)[0]
        value = int.from_bytes(self._take(head & 0x7F), "little")
        return -value if head & 0x80 else value

    def float(self) -> float:
        mantissa = self.int()
        return mantissa * 2.0 ** self.int()

    def string(self) -> str:
        length = self.int()
        if not 0 <= length <= 64:  # dlib's networks store only short layer and version names
            raise DlibFormatError(f"implausible string length {length} at byte {self.pos}")
        return self._take(length).decode("latin-1")

    def bool(self) -> bool:
        byte = self._take(1)
        if byte not in (b"0", b"1"):
            raise DlibFormatError(f"expected a bool at byte {self.pos - 1}, found {byte!r}")
        return byte == b"1"

    def shape(self, version: builtins.int) -> _Shape:  # in the class body, ``int`` names the method above
        if (found := self.int()) != version:
            raise DlibFormatError(f"unsupported tensor version {found} at byte {self.pos}")
        return self.int(), self.int(), self.int(), self.int()  # num_samples, k, nr, nc

    def tensor(self) -> np.ndarray:
        shape = self.shape(version=2)
        count = int(np.prod(shape))
        return np.frombuffer(self._take(4 * count), dtype="<f4").reshape(shape)

    def alias(self) -> _Shape:
        return self.shape(version=1)


@dataclass
class DlibLayer:
    """One computational layer in forward order: ``kind`` is con, affine, relu, max_pool, avg_pool, add_prev or fc."""

    kind: str
    params: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict[str, int] = field(default_factory=dict)


@dataclass
class DlibNet:
    input_size: tuple[int, int]
    mean_rgb: tuple[float, float, float]
    layers: list[DlibLayer]


def _layer(reader: _Reader) -> DlibLayer:
    name = reader.string()
    if name in ("con_4", "con_5"):
        params = reader.tensor().ravel()
        filters, nr, nc = reader.int(), reader.int(), reader.int()
        stride_y, stride_x, padding_y, padding_x = (reader.int() for _ in range(4))
        weight_shape, _ = reader.alias(), reader.alias()  # filter and bias views of params
        for _ in range(4):  # learning-rate and weight-decay multipliers
            reader.float()
        has_bias = reader.bool() if name == "con_5" else True
        weight_size = int(np.prod(weight_shape))
        if weight_shape[0] != filters or weight_shape[2:] != (nr, nc) or (stride_y, padding_y) != (stride_x, padding_x):
            raise DlibFormatError(f"unexpected convolution {weight_shape} stride {stride_y, stride_x}")
        if params.size != weight_size + has_bias * filters:
            raise DlibFormatError(f"convolution {weight_shape} has {params.size} parameters")
        weights = {"weight": params[:weight_size].reshape(weight_shape)}  # (out, in, rows, cols), like torch
        if has_bias:
            weights["bias"] = params[weight_size:]
        return DlibLayer("con", weights, {"stride": stride_y, "padding": padding_y})
    if name == "affine_":
        params = reader.tensor().ravel()
        gamma, _ = reader.alias(), reader.alias()
        if reader.int() != 0:  # 0 = CONV_MODE: one scale and shift per channel
            raise DlibFormatError("only per-channel (conv mode) affine layers are supported")
        channels = int(np.prod(gamma))
        return DlibLayer("affine", {"weight": params[:channels], "bias": params[channels : 2 * channels]})
    if name in ("max_pool_2", "avg_pool_2"):
        window_y, window_x, stride_y, stride_x, padding_y, padding_x = (reader.int() for _ in range(6))
        if (window_y, stride_y, padding_y) != (window_x, stride_x, padding_x):
            raise DlibFormatError(f"unsupported non-square pooling in {name}")
        return DlibLayer(name[:-2], settings={"window": window_y, "stride": stride_y, "padding": padding_y})
    if name in ("relu_", "add_prev_"):
        return DlibLayer(name[:-1])
    if name == "fc_2":
        outputs, inputs = reader.int(), reader.int()
        params = reader.tensor().ravel()
        reader.alias(), reader.alias()  # weights and biases views
        has_bias = reader.int() == 0  # FC_HAS_BIAS = 0, FC_NO_BIAS = 1
        for _ in range(4):  # learning-rate and weight-decay multipliers
            reader.float()
        if params.size != (inputs + has_bias) * outputs:
            raise DlibFormatError(f"dense layer {inputs}->{outputs} has {params.size} parameters")
        weights = {"weight": params[: inputs * outputs].reshape(inputs, outputs).T}  # stored (in, out)
        if has_bias:
            weights["bias"] = params[inputs * outputs :]
        return DlibLayer("fc", weights)
    raise DlibFormatError(f"unsupported dlib layer {name!r}")


def _training_state(reader: _Reader) -> None:
    for _ in range(3):  # setup called, gradient stale, output/gradient disabled
        reader.bool()
    for _ in range(3):  # gradient buffers and cached output (empty in saved models)
        reader.tensor()


def read_dlib_net(data: bytes) -> DlibNet:
    """Parse a serialised ``loss_metric`` network whose input layer is ``input_rgb_image_sized``.

    Raises:
        DlibFormatError: the bytes are not such a network, or do not end where the network does.
    """
    reader = _Reader(data)
    if reader.int() != 1:
        raise DlibFormatError("not a dlib network with a loss layer (version 1)")
    if (loss := reader.string()) != "loss_metric_2":
        raise DlibFormatError(f"unsupported loss layer {loss!r} (expected a metric-learning network)")
    reader.float(), reader.float()  # margin and distance threshold: training settings
    computational = 1  # the input-owning layer (version 3) plus every add_layer (version 2); tags/skips are 1
    while (version := reader.int()) != 3:
        if version not in (1, 2):
            raise DlibFormatError(f"unexpected layer version {version}")
        computational += version == 2
    if (name := reader.string()) != "input_rgb_image_sized":
        raise DlibFormatError(f"unsupported input layer {name!r}")
    mean_rgb = (reader.float(), reader.float(), reader.float())
    input_size = (reader.int(), reader.int())
    layers = []
    for index in range(computational):
        layers.append(_layer(reader))
        _training_state(reader)
        if index == 0:
            reader.int()  # sample expansion factor of the input-owning layer
    if reader.pos != len(data):
        raise DlibFormatError(f"{len(data) - reader.pos} bytes left after the network")
    return DlibNet(input_size, mean_rgb, layers)


def add_zero_padded(a: Tensor, b: Tensor) -> Tensor:
    """dlib's ``add_prev``: the sum over the larger of the two shapes, the smaller tensor zero-padded at the end of
    each of the channel, row and column axes. ``[B, C, H, W]`` each."""
    size = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def pad(x: Tensor) -> Tensor:
        c, h, w = (s - t for s, t in zip(size, x.shape[1:]))
        return F.pad(x, (0, w, 0, h, 0, c)) if c or h or w else x

    return pad(a) + pad(b)


class Affine(nn.Module):
    """Per-channel scale and shift (dlib's ``affine`` layer: a batch norm folded at the end of training)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight).view(-1, 1, 1))
        self.bias = nn.Parameter(torch.tensor(bias).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight + self.bias


def _conv(layer: DlibLayer) -> nn.Conv2d:
    weight = layer.params["weight"]
    conv = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        weight.shape[2:],
        stride=layer.settings["stride"],
        padding=layer.settings["padding"],
        bias="bias" in layer.params,
    )
    conv.weight.data.copy_(torch.from_numpy(weight.copy()))
    if conv.bias is not None:
        conv.bias.data.copy_(torch.from_numpy(layer.params["bias"].copy()))
    return conv


class ResidualBlock(nn.Module):
    """conv-affine-relu-conv-affine plus the block input (average-pooled when the block downsamples), then relu."""

    def __init__(self, layers: list[DlibLayer]):
        super().__init__()
        self.conv1, self.affine1 = _conv(layers[0]), Affine(**layers[1].params)
        self.conv2, self.affine2 = _conv(layers[3]), Affine(**layers[4].params)
        pool = layers[5].settings if layers[5].kind == "avg_pool" else None
        if pool and pool["padding"] != 0:
            raise DlibFormatError("padded shortcut pooling is not supported")
        self.pool = (pool["window"], pool["stride"]) if pool else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, *self.pool) if self.pool else x
        return F.relu(add_zero_padded(y, shortcut))


_STEM = ["con", "affine", "relu", "max_pool"]
_BLOCK = ["con", "affine", "relu", "con", "affine", "add_prev", "relu"]
_DOWN_BLOCK = ["con", "affine", "relu", "con", "affine", "avg_pool", "add_prev", "relu"]
_HEAD = ["avg_pool", "fc"]


class DlibMetricResNet(nn.Module):
    """dlib's face-descriptor ResNet (``dnn_face_recognition_ex.cpp``) with its input layer.

    Args:
        net: the parsed network (:func:`read_dlib_net`).
    Input: ``[B, 3, H, W]`` RGB in ``[0, 1]`` at the network's input size (150 x 150 for dlib's model).
    Output: ``[B, D]`` raw descriptors (not normalised; dlib compares them by Euclidean distance).
    """

    mean_rgb: Tensor  # a buffer

    def __init__(self, net: DlibNet):
        super().__init__()
        kinds = [layer.kind for layer in net.layers]
        if kinds[:4] != _STEM or kinds[-2:] != _HEAD:
            raise DlibFormatError(f"not a dlib face-descriptor ResNet: starts {kinds[:4]}, ends {kinds[-2:]}")
        self.register_buffer("mean_rgb", torch.tensor(net.mean_rgb).view(1, 3, 1, 1))
        self.input_size = net.input_size
        self.stem_conv, self.stem_affine = _conv(net.layers[0]), Affine(**net.layers[1].params)
        pool = net.layers[3].settings
        if pool["padding"] != 0:
            raise DlibFormatError("padded max-pooling is not supported")
        self.stem_pool = (pool["window"], pool["stride"])
        self.blocks = nn.ModuleList()
        position = 4
        while position < len(kinds) - 2:
            for pattern in (_BLOCK, _DOWN_BLOCK):
                if kinds[position : position + len(pattern)] == pattern:
                    self.blocks.append(ResidualBlock(net.layers[position : position + len(pattern)]))
                    position += len(pattern)
                    break
            else:
                raise DlibFormatError(f"unexpected layers {kinds[position : position + 8]} at layer {position}")
        if net.layers[-2].settings["window"] != 0:  # window 0 = average over the whole feature map
            raise DlibFormatError("the head must average over the whole feature map")
        weight = net.layers[-1].params["weight"]
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in net.layers[-1].params)
        self.fc.weight.data.copy_(torch.from_numpy(weight.copy()))
        if self.fc.bias is not None:
            self.fc.bias.data.copy_(torch.from_numpy(net.layers[-1].params["bias"].copy()))

    def forward(self, images: Tensor) -> Tensor:
        x = (channels_last(images) * 255.0 - self.mean_rgb) / 256.0  # dlib's input_rgb_image layer
        x = F.max_pool2d(F.relu(self.stem_affine(self.stem_conv(x))), *self.stem_pool)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


def load_dlib_metric_net(path: Path) -> DlibMetricResNet:
    """Read a dlib face-descriptor network file (such as ``dlib_face_recognition_resnet_model_v1.dat``)."""
    try:
        net = read_dlib_net(Path(path).read_bytes())
    except DlibFormatError as error:
        raise DlibFormatError(f"{path}: {error}") from None
    return DlibMetricResNet(net)
