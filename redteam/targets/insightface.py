"""InsightFace recognisers as users have them: ONNX files from InsightFace's model packs (``w600k_r50.onnx``,
``w600k_mbf.onnx``, ``glintr100.onnx``, other ArcFace MobileFaceNets) or ``arcface_torch`` ``backbone.pth`` state
dicts (IResNet-18/34/50/100/200).

Every backbone returned here takes InsightFace's input convention: ``[B, 3, 112, 112]`` RGB faces aligned on
InsightFace's five-point template (``redteam.align.TEMPLATES``), scaled ``(255 x - 127.5) / 127.5``; it returns
``[B, D]`` (unnormalised) embeddings. ONNX models that normalise inside the graph (InsightFace's MXNet exports start
with Sub and Mul nodes; InsightFace's own loader feeds those raw pixels) are given raw pixels automatically.

Measured on 418 LFW evaluation faces (80 identities, 1,117 genuine / 86,036 impostor pairs) with the two real
MobileFaceNet ONNX files of ``../shared/weights``: this convention separates identities best (AUC 0.995 and 0.988;
BGR order 0.992 / 0.983, inputs in [0, 1] 0.994 / 0.981, raw pixels 0.71 / 0.71), so they need no adaptation.

No download table: InsightFace publishes its model packs without checksums, and no authoritative sha256 of the
individual files was found; users bring the file (``--weights``).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import onnx
import torch
from google.protobuf.message import DecodeError
from torch import Tensor, nn

from redteam.convert.onnx_graph import OnnxModule, normalises_its_input
from redteam.errors import RedteamError

INPUT_SIZE = 112


class IBasicBlock(nn.Module):
    """arcface_torch's pre-activation residual block: BN, 3x3 conv, BN, PReLU, 3x3 conv (strided), BN, + shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """arcface_torch's IResNet (``backbones/iresnet.py``), with its parameter names, for ``backbone.pth`` files.

    Args:
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for r18, ``(3, 4, 14, 3)`` for r50, ``(3, 13, 30, 3)`` r100.
        num_features: embedding size.
    Shape:
        ``[B, 3, 112, 112]`` -> ``[B, num_features]``.
    """

    # Set by name in __init__ (arcface_torch's parameter names).
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, layers: tuple[int, int, int, int], num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        channels = 64
        for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            stack = [IBasicBlock(channels, width, stride=2)] + [IBasicBlock(width, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*stack))
            channels = width
        self.bn2 = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512 * 7 * 7, num_features)  # dropout before it is identity at inference
        self.features = nn.BatchNorm1d(num_features)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.bn2(x).flatten(1)))


def iresnet_from_state_dict(state: dict[str, Any]) -> IResNet:
    """Build the IResNet an arcface_torch state dict describes (depth and embedding size read from its keys)."""
    for wrapper in ("state_dict_backbone", "state_dict"):  # arcface_torch training checkpoints nest the backbone
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}  # saved from DistributedDataParallel
    blocks = [
        {int(m.group(1)) for k in state if (m := re.match(rf"layer{s}\.(\d+)\.conv1\.weight$", k))} for s in "1234"
    ]
    if "fc.weight" not in state or not all(blocks):
        found = ", ".join(list(state)[:4]) + (", ..." if len(state) > 4 else "")
        raise RedteamError(
            "this PyTorch file is not an arcface_torch IResNet state dict (expected keys like layer1.0.conv1.weight "
            f"and fc.weight, found {found}); other backbones need exporting to ONNX first."
        )
    depths = [max(b) + 1 for b in blocks]
    layers = (depths[0], depths[1], depths[2], depths[3])
    model = IResNet(layers, num_features=state["fc.weight"].shape[0])
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})  # arcface_torch may store fp16
    except RuntimeError as error:  # missing or extra keys, other shapes (e.g. not for 112 px inputs)
        detail = " ".join(str(error).split())
        raise RedteamError(
            f"this state dict does not fit arcface_torch's IResNet with {layers} blocks: {detail}"
        ) from None
    return model.eval()


class OnnxBackbone(nn.Module):
    """A converted InsightFace ONNX recogniser behind the standard input convention.

    Args:
        graph: the converted model (one input, one output).
        raw_pixels: whether the graph wants RGB pixels in ``[0, 255]`` (it normalises them itself).
    """

    def __init__(self, graph: OnnxModule, raw_pixels: bool):
        super().__init__()
        self.graph, self.raw_pixels = graph, raw_pixels

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, 112, 112]`` ``(255 x - 127.5) / 127.5`` -> ``[B, D]``."""
        if self.raw_pixels:
            x = x * 127.5 + 127.5
        return self.graph(x).flatten(1)


def _is_torch_file(path: Path) -> bool:
    with open(path, "rb") as handle:
        legacy_pickle = handle.read(1) == b"\x80"
    return zipfile.is_zipfile(path) or legacy_pickle


def _read_state_dict(path: Path) -> dict:
    """``torch.load`` without running pickled code; a file it cannot read gives a one-line :class:`RedteamError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or foreign pickles fail in many ways inside the restricted unpickler
        raise RedteamError(
            f"{path} cannot be read as tensors by torch.load(weights_only=True) ({type(error).__name__}): it is "
            "corrupt or pickles Python objects such as a whole model; save the backbone's state_dict() (as "
            "arcface_torch's backbone.pth) or export the model to ONNX."
        ) from None
    if not isinstance(state, dict):
        raise RedteamError(f"{path} holds a {type(state).__name__}, not an arcface_torch state dict.")
    return state


def load_insightface_backbone(path: Path) -> nn.Module:
    """A user's InsightFace recogniser as a module in eval mode: ``[B, 3, 112, 112]`` -> ``[B, D]``.

    Args:
        path: an ONNX model (InsightFace model packs, ``torch.onnx`` exports) or an arcface_torch IResNet
            ``backbone.pth`` / training checkpoint.
    Returns:
        A module taking RGB 112 x 112 crops aligned on InsightFace's five-point template
        (``redteam.align.TEMPLATES``), scaled ``(255 x - 127.5) / 127.5``.
    """
    path = Path(path)
    if _is_torch_file(path):
        return iresnet_from_state_dict(_read_state_dict(path))
    try:
        model = onnx.load(str(path))
    except DecodeError as error:
        raise RedteamError(f"{path} is neither an ONNX model nor a PyTorch state dict ({error}).") from None
    graph = OnnxModule(model)
    if len(graph.input_names) != 1:
        raise RedteamError(f"{path}: a recogniser takes one image input; this graph takes {graph.input_names}.")
    if len(graph.output_names) != 1:
        raise RedteamError(
            f"{path}: a recogniser gives one embedding; this graph has {len(graph.output_names)} outputs (a detector?)."
        )
    shape = graph.input_shapes[0]
    expected = (3, INPUT_SIZE, INPUT_SIZE)
    if len(shape) != 4 or any(isinstance(s, int) and s > 0 and s != e for s, e in zip(shape[1:], expected)):
        raise RedteamError(f"{path}: input {shape} is not InsightFace's [batch, 3, 112, 112] (RGB, NCHW).")
    return OnnxBackbone(graph, raw_pixels=normalises_its_input(model)).eval()
