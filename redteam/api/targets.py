"""What a target is: a differentiable face recogniser (``embed``) or face detector (``detect``) plus its model card.

Every target takes canonical face images: float ``[B, 3, H, W]`` RGB in ``[0, 1]``, framed like LFW (square, the
face centred and its box about the middle half of the image; see :mod:`redteam.align`). A recogniser's own
preprocessing (crop, resize, channel order, normalisation) is data on its card (:class:`Preprocessing`) and runs
inside ``embed``, so attacks perturb plain images and gradients flow through the whole pipeline.

A target declares what it offers an attacker (:data:`Access`): gradients (a white-box graph), scores, or decisions
only. The engine checks an attack's needs against it before any work.

Adding a target = one file in ``redteam/targets/`` (or a package's ``redteam.targets`` entry point) with a class
registered in :data:`TARGETS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from kornia.geometry.transform import warp_affine
from torch import Tensor, nn

from redteam.align import CANONICAL_LANDMARKS, CANONICAL_SIZE, TEMPLATES, similarity_transform
from redteam.assets import RegistryFile
from redteam.convert.onnx_forward import OnnxRuntimeForward, export_onnx
from redteam.errors import RedteamError
from redteam.registry import Registry
from redteam.results import QueryLedger
from redteam.runtime import one_thread


def check_target_class(name: str, target_class: Any) -> None:
    if not (
        isinstance(target_class, type) and issubclass(target_class, FaceRecognizer | FaceDetector | LivenessDetector)
    ):
        raise TypeError(f"target {name!r}: register a subclass of FaceRecognizer, FaceDetector or LivenessDetector")


TARGETS: Registry[type[Target]] = Registry(
    "target", package="redteam.targets", group="redteam.targets", check=check_target_class
)

#: What a target shows an attacker, from most to least: gradients (a white-box graph), scores, decisions only.
Access = Literal["gradients", "scores", "decisions"]
ACCESS_LEVELS: tuple[Access, ...] = ("decisions", "scores", "gradients")


def grants(offered: str, needed: str) -> bool:
    """Whether a target offering ``offered`` gives an attack what it ``needed`` (gradients imply scores, scores
    imply decisions)."""
    return ACCESS_LEVELS.index(offered) >= ACCESS_LEVELS.index(needed)


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


def canonical_pixels(height: int, width: int) -> Tensor:
    """``[3, 3]`` homogeneous map from an ``height x width`` canonical image's pixel centres to the 250 px frame."""
    sy, sx = CANONICAL_SIZE / height, CANONICAL_SIZE / width
    return torch.tensor([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class CentralCrop:
    """A central square of side ``fraction`` of the image, moved down by ``shift`` of its height."""

    fraction: float
    shift: float = 0.0

    def __call__(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        return crop_resize(images, self.fraction, size, self.shift)

    def describe(self) -> str:
        moved = f", moved down {self.shift:.3f}" if self.shift else ""
        return f"central {self.fraction:.3f} crop{moved}"


@dataclass(frozen=True)
class TemplateWarp:
    """A similarity warp putting the canonical landmarks onto a five-point template (:data:`redteam.align.TEMPLATES`,
    positions in the output crop with pixel centres at integers); zeros outside the image."""

    template: str

    def __call__(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        height, width = images.shape[-2:]
        # The canonical landmarks are pixel positions in a 250 px frame; move them to this image's pixel grid.
        scale = torch.tensor([width / CANONICAL_SIZE, height / CANONICAL_SIZE])
        landmarks = (CANONICAL_LANDMARKS + 0.5) * scale - 0.5
        matrix = similarity_transform(landmarks[None], TEMPLATES[self.template]).to(images)
        return warp_affine(images, matrix.expand(len(images), 2, 3), size, mode="bilinear", align_corners=True)

    def describe(self) -> str:
        return f"warped onto the {self.template} five-point template"


@dataclass(frozen=True)
class FixedWarp:
    """An affine warp by ``matrix`` (``[2, 3]``, output pixels from the 250 px canonical frame's); zeros outside."""

    matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    what: str

    def __call__(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        matrix = torch.tensor(self.matrix) @ canonical_pixels(*images.shape[-2:])
        matrix = matrix.to(images).expand(len(images), 2, 3)
        return warp_affine(images, matrix, size, mode="bilinear", padding_mode="zeros", align_corners=True)

    def describe(self) -> str:
        return self.what


Crop = CentralCrop | TemplateWarp | FixedWarp


@dataclass(frozen=True)
class Preprocessing:
    """How a model turns images in ``[0, 1]`` into its network's input: an optional ``crop`` resized to ``size``,
    the ``channels`` order, then ``(255 x - mean) / scale`` (``mean`` per channel in that order). ``mean=None``: the
    network normalises its input itself (``notes`` says how)."""

    size: tuple[int, int] | None = None
    crop: Crop | None = None
    channels: Literal["RGB", "BGR"] = "RGB"
    mean: tuple[float, float, float] | None = (127.5, 127.5, 127.5)
    scale: float = 128.0
    notes: str = ""

    def __call__(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, 3, size]`` network input (differentiable)."""
        if self.crop is not None and self.size is not None:
            images = self.crop(images, self.size)
        return self.normalise(images)

    def normalise(self, images: Tensor) -> Tensor:
        """Channel order and scaling only (``[B, 3, H, W]`` in ``[0, 1]``)."""
        if self.channels == "BGR":
            images = images.flip(1)
        if self.mean is None:
            return images
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * 255.0 - mean) / self.scale

    def describe(self) -> str:
        parts = [self.crop.describe() if self.crop else "the whole image"]
        if self.size:
            parts.append(f"resized to {self.size[0]}x{self.size[1]}")
        parts.append(self.channels)
        if self.mean is None:
            parts.append(self.notes or "normalised inside the network")
        else:
            mean = f"{self.mean[0]:g}" if len(set(self.mean)) == 1 else str(tuple(f"{m:g}" for m in self.mean))
            parts.append(f"(255 x - {mean}) / {self.scale:g}")
            if self.notes:
                parts.append(self.notes)
        return ", ".join(parts)


@dataclass(frozen=True)
class ModelCard:
    """Where a model comes from, what it expects and how well it works (shown by ``redteam list --targets``)."""

    name: str
    task: Literal["recognition", "detection", "liveness"]
    architecture: str
    weights: str
    licence: str
    preprocessing: Preprocessing
    embedding_dim: int | None = None
    metric: Literal["cosine", "euclidean"] = "cosine"
    threshold: float | None = None  # operating point: best verification accuracy on the calibration pairs
    threshold_far: float | None = None  # similarity threshold at FAR = 1e-3 on the calibration pairs
    thresholds_at_far: dict[float, float] = field(default_factory=dict)  # other FARs, on the same pairs (`--far`)
    calibration: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    parity: str = ""
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        card = asdict(self)
        card["preprocessing"] = self.preprocessing.describe()
        return card


@dataclass(frozen=True)
class FrozenGraph:
    """A target converted from a frozen TF graph declares it, so a campaign can cut the graph and fine-tune its tail
    (:class:`redteam.identification.SplitRecognizer`): the file and its image input and embedding output."""

    file: RegistryFile
    input: str
    output: str


class Target(nn.Module, ABC):
    #: Its model card (a class attribute; a target loaded with other weights replaces it on the instance).
    card: ModelCard
    #: Registry files the target loads (fetched ahead of time by ``redteam fetch``).
    weights: ClassVar[tuple[RegistryFile, ...]] = ()
    #: What it shows an attacker: zoo targets are white-box graphs.
    offers: ClassVar[Access] = "gradients"
    #: What can compute its passes: torch, and onnxruntime for a recogniser whose whole network is ``self.net``,
    #: taking the card's preprocessed ``[B, 3, H, W]`` input, or a detector converted from an ONNX file
    #: (:meth:`forward_on_onnxruntime`).
    runtimes: ClassVar[tuple[str, ...]] = ("torch",)
    #: A deployed system whose every request costs: the engine gives it its cell's :class:`QueryLedger` as
    #: ``ledger``, which it answers repeated requests from (and an interrupted run resumes from).
    keeps_ledger: ClassVar[bool] = False
    ledger: QueryLedger | None = None
    #: Whether ``__init__`` takes ``weights`` (a user's file, ``--weights``).
    accepts_weights: ClassVar[bool] = False
    #: The user's file this target is (``file:model.onnx``): ``redteam calibrate`` keeps its thresholds for the
    #: file's content, as for ``--weights``.
    user_file: ClassVar[Path | None] = None
    #: A face system: a detector (and a liveness check) before the recogniser, whose :meth:`inspect` says where it
    #: stopped each image.
    pipeline: ClassVar[bool] = False
    #: Set to decide at another operating point than the card's.
    threshold_override: float | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def limit_to(self, access: Access) -> None:
        """Told that attackers get only ``access`` (below what it ``offers``); a target may then answer from another
        path, e.g. a model file from its own runtime. Nothing changes by default."""

    def forward_on_onnxruntime(self) -> None:
        """From now on its passes answer from onnxruntime (no gradients): for targets whose ``runtimes`` include it,
        attacked with scores or decisions only."""
        raise RedteamError(f"{self.card.name} runs on torch only.")

    def decide_at(self, threshold: float) -> None:
        """Decide at ``threshold`` as users write it (:meth:`on_score_scale`) instead of the card's."""
        self.threshold_override = self.on_score_scale(threshold)

    def on_score_scale(self, threshold: float) -> float:
        """A threshold as users write it -> on this target's score scale (one-line error when out of range)."""
        return threshold

    def threshold_text(self, threshold: float | None = None) -> str:
        """A threshold on the score scale (default: the one in force) as users write it, with its unit."""
        return f"{self.threshold if threshold is None else threshold:.4f}"

    def inspect(self, images: Tensor) -> tuple[list[str], Tensor | None] | None:
        """What a face system does with each image before matching, in one pass: where it stops ("no face",
        "spoof", or "" where it reaches the match) and its liveness check's score of the face it found (``[B]``;
        ``None`` without a check). ``None`` for a single model (the default)."""
        return None

    def locate(self, images: Tensor) -> tuple[Tensor, Tensor] | None:
        """Which face a face system judges in each image: ``[B]`` whether it found one and ``[B, 5, 2]`` that face's
        five landmarks in pixels (eyes, nose, mouth corners; arbitrary where none was found). ``None`` for a model
        that is given its face (the default)."""
        return None

    def verdicts(self, images: Tensor, scores: Tensor, threshold: float) -> list[str] | None:
        """Where a face system stopped each image (``SYSTEM_STAGES``): a stage before matching, else whether its
        score (``[B]``) reaches ``threshold``; ``None`` for a single model."""
        inspected = self.inspect(images)
        return None if inspected is None else final_stages(inspected[0], scores, threshold)

    @classmethod
    def weights_fingerprint(cls) -> str:
        """A digest of the weights it loads: its registry files' published sha256s (a target whose weights come from
        elsewhere, e.g. a trained checkpoint in the cache, adds that file's)."""
        return ":".join(file.sha256 for file in cls.weights)

    @property
    @abstractmethod
    def threshold(self) -> float:
        """The decision threshold in force."""


class FaceRecognizer(Target):
    """Maps face images to identity embeddings; two faces match when ``similarity >= threshold``."""

    #: Set when the target is converted from a frozen TF graph (campaigns may split it).
    frozen_graph: ClassVar[FrozenGraph | None] = None
    #: Its network, where it has one: a module taking the preprocessed images (or, for a model file, its runtime).
    net: Any

    @property
    def threshold(self) -> float:
        value = self.threshold_override if self.threshold_override is not None else self.card.threshold
        if value is None:
            raise RedteamError(
                f"{self.card.name} has no calibrated threshold: run `redteam calibrate` or pass --threshold."
            )
        return value

    def on_score_scale(self, threshold: float) -> float:
        """Users write a cosine threshold in [-1, 1] and an L2 threshold as a distance (dlib's 0.6): scores are
        similarities, minus the distance for an L2 target."""
        name = self.card.name
        if self.card.metric == "euclidean":
            if not threshold >= 0:
                raise RedteamError(f"{name} compares faces by L2 distance: --threshold is a distance such as 0.6, "
                                   f"not {threshold:g}.")  # fmt: skip
            return -threshold
        if not -1 <= threshold <= 1:
            raise RedteamError(
                f"{name} compares faces by cosine similarity: --threshold is in [-1, 1], not {threshold:g}."
            )
        return threshold

    def threshold_text(self, threshold: float | None = None) -> str:
        value = self.threshold if threshold is None else threshold
        return f"L2 distance {-value:.4f}" if self.card.metric == "euclidean" else f"cosine {value:.4f}"

    def preprocess(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` canonical images in ``[0, 1]`` -> the network's input (the card's preprocessing)."""
        if isinstance(getattr(self, "net", None), OnnxRuntimeForward):
            # onnxruntime's answers do not depend on the batch or its threads; torch's resizing does depend on its
            # threads, and on one thread it does not depend on the batch either. So a query answered in a batch
            # here and one answered alone by a service (`redteam serve --forward onnxruntime`) agree bit for bit.
            with one_thread():
                return self.card.preprocessing(images)
        return self.card.preprocessing(images)

    @abstractmethod
    def embed(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` canonical face images in ``[0, 1]`` -> ``[B, D]`` embeddings."""

    def forward(self, images: Tensor) -> Tensor:
        return self.embed(images)

    def forward_on_onnxruntime(self) -> None:
        """From now on ``self.net`` answers from onnxruntime on its export."""
        net, preprocessing = getattr(self, "net", None), self.card.preprocessing  # a face system has none
        if not isinstance(net, nn.Module) or preprocessing is None or preprocessing.size is None:
            raise RedteamError(f"{self.card.name} has no whole network to export: it runs on torch only.")
        height, width = preprocessing.size
        self.net = OnnxRuntimeForward(export_onnx(net, torch.zeros(1, 3, height, width, device=self.device)), net)

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

    @property
    def areas(self) -> Tensor:
        """``[N]`` each box's area in pixels."""
        return (self.boxes[:, 2:] - self.boxes[:, :2]).clamp_min(0).prod(1)

    def largest(self) -> int | None:
        """The index of the largest face, ``None`` when none was found."""
        return int(self.areas.argmax()) if len(self.boxes) else None


class ScoringTarget(Target):
    """A model that decides on one score in ``[0, 1]`` per image against ``score_threshold`` (its ``score_name``
    says what the score is, in messages)."""

    score_threshold: float
    score_name: ClassVar[str]

    @property
    def threshold(self) -> float:
        return self.score_threshold if self.threshold_override is None else self.threshold_override

    def on_score_scale(self, threshold: float) -> float:
        if not 0 <= threshold <= 1:
            raise RedteamError(f"{self.card.name}'s --threshold is a {self.score_name} in [0, 1], not {threshold:g}.")
        return threshold


class FaceDetector(ScoringTarget):
    """Finds faces; ``face_score`` is the differentiable quantity a detector-evasion attack drives down."""

    score_name = "face probability"
    #: Whether :meth:`faces` gives landmarks with a gradient (a face system may align through them).
    differentiable_landmarks: ClassVar[bool] = False
    #: The network, where one module computes the detector's raw outputs.
    net: nn.Module
    #: The published ONNX file ``net`` was converted from (its bytes or path), for ``--forward onnxruntime``.
    onnx_source: bytes | str | None = None

    def forward_on_onnxruntime(self) -> None:
        """From now on ``self.net`` answers from onnxruntime on the ONNX file it was converted from."""
        if self.onnx_source is None:
            super().forward_on_onnxruntime()
        else:
            self.net = OnnxRuntimeForward(self.onnx_source, self.net)

    def detected(self, images: Tensor, scores: Tensor | None = None) -> Tensor:
        """``[B]`` bool: is a face found above the threshold? By default the face score decides (single-stage
        detectors); cascades override this with their full pipeline. ``scores`` may pass ``face_score(images)``."""
        scores = self.face_score(images) if scores is None else scores
        return scores.detach() >= self.threshold

    @abstractmethod
    def detect(self, images: Tensor) -> list[Detections]:
        """``[B, 3, H, W]`` images in ``[0, 1]`` -> one :class:`Detections` per image (scores above threshold)."""

    def faces(self, images: Tensor) -> list[Detections]:
        """As :meth:`detect`, with landmarks that keep their gradient where ``differentiable_landmarks``."""
        return self.detect(images)

    def chosen_landmarks(
        self,
        images: Tensor,
        choose: Callable[[Detections], int | None] = Detections.largest,
        keep_gradient: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """``[B, 3, H, W]`` photos -> ``[B]`` whether a face was chosen (``choose``: by default the largest) and
        ``[B, 5, 2]`` its landmarks in pixels (the canonical ones where none was); with ``keep_gradient`` they come
        from :meth:`faces`."""
        if keep_gradient:
            detections = self.faces(images)
        else:
            with torch.no_grad():
                detections = self.detect(images)
        found, points = [], []
        for faces in detections:
            chosen = choose(faces)
            found.append(chosen is not None and faces.landmarks is not None)
            if chosen is None or faces.landmarks is None:
                points.append(CANONICAL_LANDMARKS.to(images))
            else:
                points.append(faces.landmarks[chosen].to(images))
        return torch.tensor(found, device=images.device), torch.stack(points)

    @abstractmethod
    def face_score(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B]`` highest face confidence anywhere in each image (differentiable)."""

    def candidate_scores(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, K]`` differentiable confidences of the candidate faces the detector weighs, whose
        maximum is ``face_score``; evasion pushes all of them under the threshold at once. By default ``K = 1``."""
        return self.face_score(images)[:, None]

    def forward(self, images: Tensor) -> Tensor:
        return self.candidate_scores(images)


class LivenessDetector(ScoringTarget):
    """Tells a live face from a presentation attack (a printed photo, a screen, a mask): ``live_score`` in ``[0, 1]``,
    accepted as live when ``>= threshold``."""

    score_name = "liveness score"

    def preprocess(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` canonical faces in ``[0, 1]`` -> the network's input (the card's preprocessing)."""
        return self.card.preprocessing(images)

    @abstractmethod
    def live_score(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` canonical faces in ``[0, 1]`` -> ``[B]`` liveness scores in ``[0, 1]`` (differentiable)."""

    def forward(self, images: Tensor) -> Tensor:
        return self.live_score(images)


def final_stages(before: list[str], scores: Tensor, threshold: float) -> list[str]:
    """Each image's last stage: the one it stopped at before matching, else whether its score reached
    ``threshold`` ("match" or "no match")."""
    return [stage or ("match" if score >= threshold else "no match") for stage, score in zip(before, scores)]
