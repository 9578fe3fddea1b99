"""A whole face system as a target: ``--target mtcnn+arcface`` takes raw photos as a deployed system does, finds the
largest face with the detector, aligns it from the detector's five landmarks (a differentiable similarity warp into
the canonical frame, as ``--align`` prepares data) and lets the recogniser decide. ``mtcnn+liveness+arcface`` also
asks a liveness check (:class:`redteam.api.LivenessDetector`) of the aligned face: a face it flags is rejected.

Gradients pass the detector one of two ways (``landmarks``):

- ``fixed`` (the default): the landmarks found on the image being judged are constants of the warp; the gradient
  flows through the warp's resampling into the photo, not through where the detector put the points;
- ``detector``: the landmarks keep the detector's gradient (MTCNN's O-Net regression), so an attack also sees how
  moving them moves the crop.

Either way every forward pass detects afresh, so a verdict is always the system's on the image it is shown. A photo
in which no face is found is rejected: its similarity to anything is :data:`REJECTED` below the threshold (dodging
that only hides the face counts as dodging the system; it can never impersonate anyone). With a liveness check the
system's score is ``threshold + min(similarity - threshold, the probe's liveness margin)``, and a reference that does
not look live is rejected like a missing face: it accepts only when the faces match and both look live, and an attack
that must be accepted (impersonation) climbs both at once.

Settings other than the default come from a YAML, ``--target system:face.yaml``::

    detector: mtcnn
    liveness: antispoof     # optional
    recogniser: arcface
    landmarks: detector     # or fixed
    box: [250, 0, 500, 250] # optional: the face over this region (x1, y1, x2, y2 pixels), not the largest

With a ``box``, the system takes the face lying most inside it, as a kiosk takes the person in front of its camera
and ignores faces behind them; a face at least half inside counts, and a photo with none is rejected like a photo
without a face.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, cast

import torch
import yaml
from torch import Tensor

from redteam.align import align_faces
from redteam.api import (
    ACCESS_LEVELS,
    TARGETS,
    Detections,
    FaceDetector,
    FaceRecognizer,
    LivenessDetector,
    ModelCard,
    Preprocessing,
)
from redteam.errors import RedteamError

LandmarkGradients = Literal["fixed", "detector"]
#: A region of the photo, ``(x1, y1, x2, y2)`` in pixels.
Box = tuple[float, float, float, float]
#: The least share of a face's box inside the ``box`` setting for the system to take that face.
INSIDE = 0.5
#: How far below the threshold a photo without a face scores (a constant: nothing to differentiate there).
REJECTED = 1.0


class FaceSystem(FaceRecognizer):
    """Detector, alignment and recogniser as one recogniser of raw photos.

    Its embedding is ``[B, 2 + D]``: whether a face was found (1 or 0), the liveness check's margin over its
    threshold (1 without a check), then the recogniser's embedding of the aligned face.
    """

    pipeline = True
    detector_name: ClassVar[str]
    liveness_name: ClassVar[str | None] = None
    recogniser_name: ClassVar[str]
    landmarks: ClassVar[LandmarkGradients] = "fixed"
    #: The region whose face the system takes (``None``: the largest face anywhere).
    box: ClassVar[Box | None] = None

    def __init__(self) -> None:
        super().__init__()
        self.detector = cast(FaceDetector, TARGETS.get(self.detector_name)())
        self.liveness = cast(LivenessDetector, TARGETS.get(self.liveness_name)()) if self.liveness_name else None
        self.recogniser = cast(FaceRecognizer, TARGETS.get(self.recogniser_name)())

    @classmethod
    def weights_fingerprint(cls) -> str:
        """Its parts' weights, and the settings a ``system:`` YAML edited in place could change (a run folder keeps
        the results of another box or landmark mode apart)."""
        return f"{super().weights_fingerprint()}:landmarks={cls.landmarks}:box={cls.box}"

    def on_score_scale(self, threshold: float) -> float:
        return self.recogniser.on_score_scale(threshold)

    def threshold_text(self, threshold: float | None = None) -> str:
        return self.recogniser.threshold_text(self.threshold if threshold is None else threshold)

    def locate(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, 3, H, W]`` photos -> ``[B]`` whether a face was found and ``[B, 5, 2]`` the landmarks of the face
        each photo is judged on (:meth:`choose`; the canonical ones where none was found)."""
        return self.detector.chosen_landmarks(images, self.choose, keep_gradient=self.landmarks == "detector")

    def choose(self, faces: Detections) -> int | None:
        """Which of the faces found the system judges: the largest, or with a ``box`` the one most inside it (at
        least :data:`INSIDE` of it); ``None`` when none qualifies."""
        if self.box is None or len(faces.boxes) == 0:
            return faces.largest()
        boxes, region = faces.boxes, faces.boxes.new_tensor(self.box)
        overlap = (torch.minimum(boxes[:, 2:], region[2:]) - torch.maximum(boxes[:, :2], region[:2])).clamp_min(0)
        inside = overlap.prod(1) / faces.areas.clamp_min(1e-9)
        best = int(inside.argmax())
        return best if inside[best] >= INSIDE else None

    def align(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, 3, H, W]`` photos -> ``[B]`` whether a face was found and ``[B, 3, 250, 250]`` the face each photo is
        judged on, aligned into the canonical frame (differentiable in the photos)."""
        found, landmarks = self.locate(images)
        return found, align_faces(images, landmarks)

    def _live_margin(self, faces: Tensor) -> Tensor:
        """``[B]`` the liveness check's margin over its threshold on aligned faces (1 without a check)."""
        if self.liveness is None:
            return faces.new_ones(len(faces))
        return self.liveness.live_score(faces).to(faces.dtype) - self.liveness.threshold

    def embed(self, images: Tensor) -> Tensor:
        found, faces = self.align(images)
        embedding = self.recogniser.embed(faces)
        live = self._live_margin(faces).to(embedding.dtype)
        return torch.cat([found[:, None].to(embedding.dtype), live[:, None], embedding], dim=1)

    def inspect(self, images: Tensor) -> tuple[list[str], Tensor | None]:
        """Detection and the liveness check, once: the recogniser is not needed to say where a photo stopped."""
        found, faces = self.align(images)
        live, spoof = None, [False] * len(images)
        if self.liveness is not None:
            live = self.liveness.live_score(faces)
            spoof = (live < self.liveness.threshold).tolist()
        stages = ["no face" if not f else "spoof" if s else "" for f, s in zip(found.tolist(), spoof)]
        return stages, live

    def _decide(self, score: Tensor, found: Tensor, probe_live: Tensor, reference_live: Tensor) -> Tensor:
        """The system's score from the recogniser's: both faces must be found and the reference live (gates: nothing
        a probe can change), and the probe's liveness margin caps the score (so an attack on the probe moves
        whichever of the two decides)."""
        if self.liveness is not None:
            score = self.threshold + torch.minimum(score - self.threshold, probe_live)
            found = found & (reference_live >= 0)
        return torch.where(found, score, torch.full_like(score, self.threshold - REJECTED))

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        """``a``: the probes' embeddings, ``b``: the references' (a system checks the probe it is shown)."""
        score = self.recogniser.similarity(a[:, 2:], b[:, 2:])
        return self._decide(score, (a[:, 0] > 0.5) & (b[:, 0] > 0.5), a[:, 1], b[:, 1])

    def similarity_matrix(self, a: Tensor, b: Tensor) -> Tensor:
        scores = self.recogniser.similarity_matrix(a[:, 2:], b[:, 2:])
        found = (a[:, 0, None] > 0.5) & (b[None, :, 0] > 0.5)
        return self._decide(scores, found, a[:, 1, None].expand_as(scores), b[None, :, 1].expand_as(scores))


def face_system_class(
    detector: str, recogniser: str, landmarks: str = "fixed", liveness: str | None = None, box: Box | None = None
) -> type[FaceSystem]:
    """The target class of ``detector`` (+ ``liveness``) + ``recogniser`` (zoo names), with landmark gradients
    ``landmarks``, judging the face over ``box`` (``None``: the largest)."""
    name = "+".join(filter(None, (detector, liveness, recogniser)))
    detector_class, recogniser_class = TARGETS.get(detector), TARGETS.get(recogniser)
    check_class = TARGETS.get(liveness) if liveness else None
    if check_class is not None and not issubclass(check_class, LivenessDetector):
        raise RedteamError(f"{name}: {liveness} is not a liveness check; between detector and recogniser stands one "
                           "such as liveness or antispoof.")  # fmt: skip
    if not issubclass(detector_class, FaceDetector):
        raise RedteamError(f"{name}: {detector} is a recogniser; a face system starts with a detector such as mtcnn.")
    if not issubclass(recogniser_class, FaceRecognizer):
        raise RedteamError(f"{name}: {recogniser} is a detector; a face system ends with a recogniser such as arcface.")
    if landmarks not in ("fixed", "detector"):
        raise RedteamError(f"{name}: landmarks is fixed or detector, not {landmarks!r}.")
    if landmarks == "detector" and not detector_class.differentiable_landmarks:
        raise RedteamError(f"{name}: {detector} gives no landmark gradients; use landmarks: fixed.")
    parts = [detector_class, recogniser_class] + ([check_class] if check_class else [])
    offers = min((part.offers for part in parts), key=ACCESS_LEVELS.index)
    face, card = recogniser_class.card, detector_class.card
    checked = f"; {liveness} must find the aligned face live" if liveness else ""
    which = "the largest face" if box is None else f"the face over the region {list(box)}"
    system_card = ModelCard(
        name=name,
        task="recognition",
        architecture=f"{detector} finds {which} of a raw photo; its five landmarks align it to the canonical "
        f"frame (a similarity warp){checked}; {recogniser} ({face.architecture}) decides",
        weights=f"{detector}: {card.weights}; {recogniser}: {face.weights}",
        licence=f"{detector}: {card.licence}; {recogniser}: {face.licence}",
        preprocessing=Preprocessing(mean=None, notes=f"whole photos; faces found and aligned by {detector}"),
        embedding_dim=None if face.embedding_dim is None else face.embedding_dim + 2,
        metric=face.metric,
        threshold=face.threshold,
        threshold_far=face.threshold_far,
        calibration=f"{recogniser}'s, on faces aligned the same way (datasets with --align)",
        notes=f"landmark gradients: {landmarks}; a photo without a face is rejected",
    )
    attributes = {
        "card": system_card,
        "offers": offers,
        "weights": tuple(file for part in parts for file in part.weights),
        "detector_name": detector,
        "liveness_name": liveness,
        "recogniser_name": recogniser,
        "landmarks": landmarks,
        "box": box,
    }
    return type(f"System_{name}".replace("-", "_").replace("+", "_"), (FaceSystem,), attributes)


@TARGETS.register_chain("a face system: the detector finds and aligns the face for the recogniser (mtcnn+arcface)")
def face_system(parts: list[str]) -> type[FaceSystem]:
    if len(parts) not in (2, 3) or not all(parts):
        raise RedteamError(
            f"{'+'.join(parts)}: a face system is DETECTOR[+LIVENESS]+RECOGNISER, such as mtcnn+antispoof+arcface."
        )
    return face_system_class(parts[0], parts[-1], liveness=parts[1] if len(parts) == 3 else None)


@TARGETS.register_scheme("system", "a face system with settings from a YAML (detector, recogniser, landmarks)")
def face_system_from_file(argument: str) -> type[FaceSystem]:
    path = Path(argument)
    try:
        settings = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise RedteamError(f"system:{argument}: cannot read it as YAML ({str(error).splitlines()[0]}).") from None
    keys = {"detector", "liveness", "recogniser", "landmarks", "box"}
    if not isinstance(settings, dict) or not {"detector", "recogniser"} <= set(settings) <= keys:
        raise RedteamError(f"{path}: a face system is a mapping of detector, recogniser, and optionally liveness, "
                           "landmarks and box.")  # fmt: skip
    liveness, box = settings.get("liveness"), settings.get("box")
    if box is not None:
        given = box if isinstance(box, list) else []
        numbers = [v for v in given if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(numbers) != 4 or len(given) != 4 or not (numbers[0] < numbers[2] and numbers[1] < numbers[3]):
            raise RedteamError(f"{path}: box is [x1, y1, x2, y2] in pixels with x1 < x2 and y1 < y2, not {box!r}.")
    return face_system_class(
        str(settings["detector"]),
        str(settings["recogniser"]),
        settings.get("landmarks", "fixed"),
        str(liveness) if liveness else None,
        None if box is None else (float(box[0]), float(box[1]), float(box[2]), float(box[3])),
    )
