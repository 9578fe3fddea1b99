"""What a target is: a differentiable face recogniser (``embed``) or face detector (``detect``) plus its model card.

Every target takes canonical face images: float ``[B, 3, H, W]`` RGB in ``[0, 1]``, framed like LFW
(square, the face centred and its box about the middle half of the image; see ``redteam.align``). The
target's own preprocessing (crop, resize, channel order, normalisation) happens inside ``embed``/``detect``,
so attacks perturb plain images and gradients flow through the whole pipeline.

Adding a target = one file in ``targets/`` with a class registered in ``TARGETS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from redteam.assets import RegistryFile
from redteam.errors import RedteamError
from redteam.registry import Registry

TARGETS: Registry[type[nn.Module]] = Registry("target")


@dataclass(frozen=True)
class ModelCard:
    """Where a model comes from, what it expects and how well it works (shown by ``redteam list``)."""

    name: str
    task: Literal["recognition", "detection"]
    architecture: str
    weights: str
    licence: str
    input_size: tuple[int, int]
    channel_order: str
    normalisation: str
    embedding_dim: int | None = None
    metric: Literal["cosine", "euclidean"] = "cosine"
    threshold: float | None = None  # operating point: best verification accuracy on the calibration pairs
    threshold_far: float | None = None  # similarity threshold at FAR = 1e-3 on the calibration pairs
    calibration: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    parity: str = ""
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def crop_resize(images: Tensor, fraction: float, size: tuple[int, int], shift: float = 0.0) -> Tensor:
    """Central square crop of side ``fraction * H`` (moved down by ``shift * H``), resized to ``size``.

    Args:
        images: ``[B, C, H, W]``.
    Returns:
        ``[B, C, size[0], size[1]]``; differentiable in ``images`` (bilinear, antialiased when shrinking).
    """
    height, width = images.shape[-2:]
    side = round(fraction * min(height, width))
    top = (height - side) // 2 + round(shift * height)
    left = (width - side) // 2
    crop = images[..., top : top + side, left : left + side]
    if crop.shape[-2:] == size:
        return crop
    return F.interpolate(crop, size=size, mode="bilinear", align_corners=False, antialias=side > min(size))


class Target(nn.Module, ABC):
    card: ClassVar[ModelCard]
    #: Registry files the target loads (fetched ahead of time by ``redteam fetch``).
    weights: ClassVar[tuple[RegistryFile, ...]] = ()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class FaceRecognizer(Target):
    """Maps face images to identity embeddings; two faces match when ``similarity >= threshold``."""

    #: Set to decide at another operating point than the card's calibrated threshold.
    threshold_override: float | None = None

    @property
    def threshold(self) -> float:
        value = self.threshold_override if self.threshold_override is not None else self.card.threshold
        if value is None:
            raise RedteamError(
                f"{self.card.name} has no calibrated threshold: run `redteam calibrate` or pass --threshold."
            )
        return value

    @abstractmethod
    def embed(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` canonical face images in ``[0, 1]`` -> ``[B, D]`` embeddings."""

    def forward(self, images: Tensor) -> Tensor:
        return self.embed(images)

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        """Row-wise similarity of ``[B, D]`` embeddings -> ``[B]``; larger means more alike."""
        if self.card.metric == "cosine":
            return F.cosine_similarity(a, b, dim=-1)
        return -(a - b).norm(dim=-1)

    def similarity_matrix(self, a: Tensor, b: Tensor) -> Tensor:
        """``[B, D]`` x ``[N, D]`` -> ``[B, N]`` similarities."""
        if self.card.metric == "cosine":
            return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
        return -torch.cdist(a, b)


@dataclass
class Detections:
    """Faces found in one image: ``boxes [N, 4]`` (x1, y1, x2, y2 pixels), ``scores [N]``, ``landmarks [N, 5, 2]``
    (left eye, right eye, nose, left and right mouth corner, as seen in the image)."""

    boxes: Tensor
    scores: Tensor
    landmarks: Tensor | None = None


class FaceDetector(Target):
    """Finds faces; ``face_score`` is the differentiable quantity a detector-evasion attack drives down."""

    score_threshold: float
    #: Set to decide at another confidence than ``score_threshold``.
    threshold_override: float | None = None

    @property
    def threshold(self) -> float:
        return self.score_threshold if self.threshold_override is None else self.threshold_override

    def detected(self, images: Tensor, scores: Tensor | None = None) -> Tensor:
        """``[B]`` bool: is a face found above the threshold? By default the face score decides (single-stage
        detectors); cascades override this with their full pipeline. ``scores`` may pass ``face_score(images)``."""
        scores = self.face_score(images) if scores is None else scores
        return scores.detach() >= self.threshold

    @abstractmethod
    def detect(self, images: Tensor) -> list[Detections]:
        """``[B, 3, H, W]`` images in ``[0, 1]`` -> one :class:`Detections` per image (scores above threshold)."""

    @abstractmethod
    def face_score(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B]`` highest face confidence anywhere in each image (differentiable)."""

    def candidate_scores(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, K]`` differentiable confidences of the candidate faces the detector weighs, whose
        maximum is ``face_score``; evasion pushes all of them under the threshold at once. By default ``K = 1``."""
        return self.face_score(images)[:, None]
