"""InsightFace SCRFD face detectors (Guo et al. 2021) from the ONNX files of InsightFace's model packs
(``det_500m.onnx``, ``det_2.5g.onnx``, ``det_10g.onnx``), converted with :mod:`redteam.convert.onnx_graph`.

No registry package ships SCRFD, so the target needs the user's file (``--weights``). As InsightFace runs it, the
image is resized (aspect kept, bilinear) into a 640 x 640 canvas at the top left, zero-padded, and scaled
``(255 x - 127.5) / 128`` in RGB order. The graph gives, per stride (8, 16, 32 with 2 anchor points per cell; or
8 to 128, as InsightFace's loader also accepts), face probabilities, box distances (left, top, right, bottom) and five
keypoint offsets from the anchor point, in units of the stride.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from redteam.api import TARGETS, Detections, FaceDetector, ModelCard, Preprocessing
from redteam.convert.onnx_graph import load_onnx
from redteam.errors import MissingWeightsError
from redteam.targets.retinaface import keep_faces

#: Pixels of network input per pass: four 640 x 640 canvases.
CHUNK_PIXELS = 4 * 640 * 640
WHERE_TO_GET = (
    "scrfd needs InsightFace's SCRFD ONNX file: pass --weights det_10g.onnx (or det_2.5g.onnx / det_500m.onnx). "
    "They come in InsightFace's model packs (buffalo_l / buffalo_m / buffalo_s .zip on the GitHub releases of "
    "deepinsight/insightface; `pip install insightface` puts them in ~/.insightface/models/<pack>/ on first use). "
    "InsightFace's pretrained models are for non-commercial research use only."
)


@TARGETS.register("scrfd", "InsightFace SCRFD detector with 5 keypoints; needs --weights det_10g.onnx / det_500m.onnx")
class SCRFD(FaceDetector):
    card = ModelCard(
        name="scrfd",
        task="detection",
        architecture="SCRFD (Guo et al. 2021, 'Sample and Computation Redistribution for Efficient Face Detection'): "
        "searched ResNet/MobileNet backbone, PAFPN, shared heads over strides 8/16/32 with 2 anchor points per cell, "
        "box distances and 5 keypoints",
        weights="the user's ONNX file from an InsightFace model pack (--weights); none ships with redteam",
        licence="InsightFace pretrained models: non-commercial research only",
        preprocessing=Preprocessing(
            size=(640, 640),
            notes="after a bilinear resize into the 640 x 640 canvas (aspect kept, black padding right and below)",
        ),  # fmt: skip
        threshold=0.5,
        metrics={"recall": 1.0},
        parity="max |difference| vs onnxruntime 1.31 (CPU) on 4 LFW faces at 640 x 640 (tests/test_scrfd.py): "
        "scores 2e-6, box distances 3e-5, keypoint offsets 3e-5 (scrfd_500m; distances reach 8 strides); scrfd_2.5g: "
        "5e-7, 1.2e-5, 1.2e-5",
        notes="metrics measured with ../shared/weights/scrfd_500m.onnx (very likely InsightFace's det_500m.onnx) on "
        "all 3,407 evaluation faces (a face above 0.5 whose box contains the image centre); face_score is the "
        "highest anchor probability; detect() keeps faces above 0.5 after NMS at IoU 0.4, as InsightFace does",
    )

    accepts_weights = True
    runtimes = ("torch", "onnxruntime")  # the user's ONNX file itself

    def __init__(
        self,
        weights: Path | None = None,
        input_size: int = 640,
        score_threshold: float = 0.5,
        iou_threshold: float = 0.4,
    ) -> None:
        """``weights``: the SCRFD ``.onnx`` file (required)."""
        super().__init__()
        if weights is None:
            raise MissingWeightsError(WHERE_TO_GET)
        self.onnx_source = str(weights)
        net = load_onnx(weights)
        self.net, count = net, len(net.output_names)
        if count not in (6, 9, 10, 15):
            raise MissingWeightsError(f"{weights} has {count} outputs; an SCRFD detector has 6, 9, 10 or 15.")
        # Outputs: scores of every stride, then box distances, then keypoints (when the model has them).
        self.strides = (8, 16, 32) if count in (6, 9) else (8, 16, 32, 64, 128)
        self.has_keypoints = count in (9, 15)
        self.input_size, self.score_threshold, self.iou_threshold = input_size, score_threshold, iou_threshold

    def _canvas(self, images: Tensor) -> tuple[Tensor, float]:
        """Resize into the square input (aspect kept) and pad with black -> network input and the resize factor."""
        height, width = images.shape[-2:]
        if height > width:
            size = (self.input_size, int(self.input_size * width / height))
        else:
            size = (int(self.input_size * height / width), self.input_size)
        normalise = self.card.preprocessing.normalise
        x = normalise(F.interpolate(images, size=size, mode="bilinear", align_corners=False))
        black = float(normalise(torch.zeros(1, 3, 1, 1))[0, 0])
        x = F.pad(x, (0, self.input_size - size[1], 0, self.input_size - size[0]), value=black)
        return x, size[0] / height

    def raw(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor | None], float]:
        """Per stride: scores ``[B, N]``, box distances ``[B, N, 4]`` and keypoint offsets ``[B, N, 10]`` (in
        strides), plus the factor from image to network pixels."""
        x, scale = self._canvas(images)
        # A few canvases at a time: sixteen 640 px canvases in one pass spill the CPU's caches and take twice as long
        # as four passes of four (bench/targets.py).
        chunks = [self._outputs(part) for part in x.split(self.images_per_pass)]
        per_image = [torch.cat(parts) for parts in zip(*chunks)]
        levels = len(self.strides)
        scores = [s.squeeze(-1) for s in per_image[:levels]]
        boxes = per_image[levels : 2 * levels]
        keypoints: list[Tensor | None] = [*per_image[2 * levels :]] if self.has_keypoints else [None] * levels
        return scores, boxes, keypoints, scale

    @property
    def images_per_pass(self) -> int:
        """Canvases the network is given at a time."""
        return max(1, CHUNK_PIXELS // self.input_size**2)

    def _outputs(self, x: Tensor) -> list[Tensor]:
        """The network's outputs for canvases ``x``, each ``[B, N, k]``."""
        batch, per_image = len(x), []
        for output, stride in zip(self.net(x), self.strides * (3 if self.has_keypoints else 2)):
            # InsightFace's batch-1 exports flatten [B, C, H, W] as permute(2, 3, 0, 1): rows run over (cell, image,
            # anchor); put the images first again. Batched exports give [B, N, k] already.
            if output.dim() == 2:
                cells = math.ceil(self.input_size / stride) ** 2
                output = output.reshape(cells, batch, -1).transpose(0, 1).reshape(batch, -1, output.shape[-1])
            per_image.append(output)
        return per_image

    def face_score(self, images: Tensor) -> Tensor:
        scores, _, _, _ = self.raw(images)
        return torch.cat(scores, 1).amax(dim=1)

    @torch.no_grad()
    def detect(self, images: Tensor) -> list[Detections]:
        scores, distances, offsets, scale = self.raw(images)
        all_boxes, all_points = [], []
        for stride, level_scores, level_distances, level_offsets in zip(self.strides, scores, distances, offsets):
            side = math.ceil(self.input_size / stride)
            ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            anchors_per_cell = level_scores.shape[1] // side**2
            centres = torch.stack([xs, ys], -1).reshape(-1, 1, 2).expand(-1, anchors_per_cell, -1).reshape(-1, 2)
            centres = (centres * stride).to(images)
            all_boxes.append(
                torch.cat(
                    [centres - level_distances[..., :2] * stride, centres + level_distances[..., 2:] * stride], -1
                )
            )
            if level_offsets is not None:
                all_points.append(centres[:, None] + level_offsets.unflatten(-1, (5, 2)) * stride)
        boxes = torch.cat(all_boxes, 1) / scale
        points = torch.cat(all_points, 1) / scale if all_points else None
        return keep_faces(boxes, torch.cat(scores, 1), points, self.threshold, self.iou_threshold)
