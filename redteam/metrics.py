"""Verification metrics and threshold calibration from genuine / impostor similarity scores."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from redteam.datasets import FaceDataset
from redteam.errors import RedteamError

#: False accepts a measured false accept rate must allow: fewer impostor pairs than this / FAR cannot measure it.
MIN_FALSE_ACCEPTS = 10


def impostors_needed(far: float) -> int:
    return int(np.ceil(MIN_FALSE_ACCEPTS / far))


@dataclass(frozen=True)
class VerificationReport:
    genuine_pairs: int
    impostor_pairs: int
    threshold: float  # best balanced accuracy (LFW-style operating point)
    accuracy: float  # balanced accuracy (mean of genuine and impostor accuracy) at ``threshold``
    far: float
    threshold_far: float | None  # smallest threshold whose false accept rate is at most ``far`` (None: unmeasurable)
    tar_at_far: float | None
    auc: float
    operating_threshold: float | None = None  # a given threshold (e.g. the card's) and how it fares here
    operating_accuracy: float | None = None
    operating_tar: float | None = None
    operating_far: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def verification_report(
    genuine: np.ndarray, impostor: np.ndarray, far: float = 1e-3, operating_threshold: float | None = None
) -> VerificationReport:
    """Scores are similarities (larger = more alike); a pair matches when ``score >= threshold``."""
    genuine, impostor = np.sort(np.asarray(genuine, float)), np.sort(np.asarray(impostor, float))
    candidates = np.unique(np.concatenate([genuine, impostor, [np.inf]]))
    accept_genuine = 1 - np.searchsorted(genuine, candidates, side="left") / len(genuine)
    reject_impostor = np.searchsorted(impostor, candidates, side="left") / len(impostor)
    balanced = (accept_genuine + reject_impostor) / 2
    best = int(balanced.argmax())
    # A rate is measured only where it means several false accepts: at FAR 1e-3, 200 impostor pairs allow none.
    threshold_far = threshold_at_far(impostor, far) if far * len(impostor) >= MIN_FALSE_ACCEPTS else None
    # AUC = P(genuine > impostor) + P(tie) / 2, from ranks
    below = np.searchsorted(impostor, genuine, side="left")
    ties = np.searchsorted(impostor, genuine, side="right") - below
    auc = float((below + ties / 2).sum() / (len(genuine) * len(impostor)))
    operating = {}
    if operating_threshold is not None:
        tar, false_accepts = (genuine >= operating_threshold).mean(), (impostor >= operating_threshold).mean()
        operating = {
            "operating_threshold": float(operating_threshold),
            "operating_accuracy": float((tar + 1 - false_accepts) / 2),
            "operating_tar": float(tar),
            "operating_far": float(false_accepts),
        }
    return VerificationReport(
        **operating,
        genuine_pairs=len(genuine),
        impostor_pairs=len(impostor),
        threshold=float(candidates[best]),
        accuracy=float(balanced[best]),
        far=far,
        threshold_far=threshold_far,
        tar_at_far=None if threshold_far is None else float((genuine >= threshold_far).mean()),
        auc=auc,
    )


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """The smallest threshold at which at most ``far`` of the ``impostor`` scores are accepted (``score >= t``)."""
    impostor = np.sort(np.asarray(impostor, float))
    allowed = int(np.floor(far * len(impostor)))  # impostors that may be accepted
    return float(np.nextafter(impostor[len(impostor) - allowed - 1], np.inf))


def calibration_pairs(
    dataset: FaceDataset, impostors: int, seed: int = 0
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Genuine and impostor index pairs: the dataset's protocol pairs, else every same-identity pair and
    ``impostors`` seeded random pairs of different identities."""
    if dataset.pairs is not None:
        return [(p.first, p.second) for p in dataset.pairs if p.same], [
            (p.first, p.second) for p in dataset.pairs if not p.same
        ]
    genuine = [
        (a, b) for indices in dataset.by_identity.values() for k, a in enumerate(indices) for b in indices[k + 1 :]
    ]
    rng = random.Random(seed)
    identity = [r.identity for r in dataset.records]
    impostor: set[tuple[int, int]] = set()
    attempts = 0
    while len(impostor) < impostors and attempts < 20 * impostors:
        a, b = rng.randrange(len(identity)), rng.randrange(len(identity))
        attempts += 1
        if identity[a] != identity[b]:
            impostor.add((min(a, b), max(a, b)))
    return genuine, sorted(impostor)


def calibrate(
    model,
    dataset: FaceDataset,
    impostors: int = 100_000,
    far: float = 1e-3,
    seed: int = 0,
    batch_size: int = 32,
    advance: Callable[[int], None] = lambda n: None,
) -> VerificationReport:
    """Embed every image in the calibration pairs once and report thresholds and accuracy; the model's current
    threshold (if it has one) is evaluated as the operating point."""
    genuine, impostor = calibration_pairs(dataset, impostors, seed)
    if not genuine or not impostor:
        raise RedteamError(f"{dataset.name} gives no genuine or no impostor pairs to calibrate on.")
    genuine_scores, impostor_scores = pair_scores(model, dataset, [genuine, impostor], batch_size, advance)
    current = model.card.threshold if model.threshold_override is None else model.threshold_override
    return verification_report(genuine_scores, impostor_scores, far, current)


def pair_scores(
    model,
    dataset: FaceDataset,
    pair_lists: list[list[tuple[int, int]]],
    batch_size: int = 32,
    advance: Callable[[int], None] = lambda n: None,
) -> list[np.ndarray]:
    """``model``'s similarity of every pair of dataset indices in each list, each image embedded once."""
    needed = sorted({i for pairs in pair_lists for pair in pairs for i in pair})
    parts = []
    with torch.no_grad():
        for start in range(0, len(needed), batch_size):
            chunk = needed[start : start + batch_size]
            parts.append(model.embed(dataset.load(chunk).to(model.device)).cpu())
            advance(len(chunk))
    embeddings, position = torch.cat(parts), {index: k for k, index in enumerate(needed)}

    def scores(pairs: list[tuple[int, int]]) -> np.ndarray:
        first = [position[a] for a, _ in pairs]
        second = [position[b] for _, b in pairs]
        return model.similarity(embeddings[first], embeddings[second]).numpy()

    return [scores(pairs) for pairs in pair_lists]


@dataclass(frozen=True)
class DetectionReport:
    images: int
    found: int  # images where the detector returns a face whose box contains the image centre
    recall: float
    median_score: float  # of that face, over the images where it was found

    def to_dict(self) -> dict:
        return asdict(self)


def detection_recall(
    detector, dataset: FaceDataset, batch_size: int = 32, advance: Callable[[int], None] = lambda n: None
) -> DetectionReport:
    """Recall of a face detector on face images framed like LFW (one face each, centred): an image counts as found
    when ``detect`` returns a face above the detector's threshold whose box contains the image centre."""
    found, scores = 0, []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            images = dataset.load(range(start, min(start + batch_size, len(dataset)))).to(detector.device)
            centre = images.new_tensor([images.shape[-1] / 2, images.shape[-2] / 2]).cpu()
            for detections in detector.detect(images):
                boxes = detections.boxes.cpu()
                inside = ((boxes[:, :2] <= centre) & (boxes[:, 2:] >= centre)).all(dim=1)
                inside &= detections.scores.cpu() >= detector.threshold
                if inside.any():
                    found += 1
                    scores.append(float(detections.scores.cpu()[inside].max()))
            advance(len(images))
    return DetectionReport(len(dataset), found, found / len(dataset), float(np.median(scores)) if scores else 0.0)


@dataclass(frozen=True)
class LivenessReport:
    """A liveness check on real (live) faces: how many it accepts at its threshold, and its score distribution."""

    images: int
    live: int
    live_share: float
    p05: float
    p25: float
    median: float
    p75: float
    p95: float

    def to_dict(self) -> dict:
        return asdict(self)


def liveness_scores(
    check, dataset: FaceDataset, batch_size: int = 32, advance: Callable[[int], None] = lambda n: None
) -> LivenessReport:
    """A liveness check's scores on every image of ``dataset`` (real captures: each should be accepted as live)."""
    scores = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            images = dataset.load(range(start, min(start + batch_size, len(dataset)))).to(check.device)
            scores.append(check.live_score(images).float().cpu().numpy())
            advance(len(images))
    values = np.concatenate(scores)
    live = int((values >= check.threshold).sum())
    quantiles = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist()
    return LivenessReport(len(values), live, live / len(values), *quantiles)
