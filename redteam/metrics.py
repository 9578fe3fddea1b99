"""Verification metrics and threshold calibration from genuine / impostor similarity scores."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

from redteam.datasets import FaceDataset


@dataclass(frozen=True)
class VerificationReport:
    genuine_pairs: int
    impostor_pairs: int
    threshold: float  # best balanced accuracy (LFW-style operating point)
    accuracy: float  # balanced accuracy (mean of genuine and impostor accuracy) at ``threshold``
    far: float
    threshold_far: float  # smallest threshold whose false accept rate is at most ``far``
    tar_at_far: float
    auc: float

    def to_dict(self) -> dict:
        return asdict(self)


def verification_report(genuine: np.ndarray, impostor: np.ndarray, far: float = 1e-3) -> VerificationReport:
    """Scores are similarities (larger = more alike); a pair matches when ``score >= threshold``."""
    genuine, impostor = np.sort(np.asarray(genuine, float)), np.sort(np.asarray(impostor, float))
    candidates = np.unique(np.concatenate([genuine, impostor, [np.inf]]))
    accept_genuine = 1 - np.searchsorted(genuine, candidates, side="left") / len(genuine)
    reject_impostor = np.searchsorted(impostor, candidates, side="left") / len(impostor)
    balanced = (accept_genuine + reject_impostor) / 2
    best = int(balanced.argmax())
    allowed = int(np.floor(far * len(impostor)))  # impostors that may be accepted
    threshold_far = float(np.nextafter(impostor[len(impostor) - allowed - 1], np.inf))
    # AUC = P(genuine > impostor) + P(tie) / 2, from ranks
    below = np.searchsorted(impostor, genuine, side="left")
    ties = np.searchsorted(impostor, genuine, side="right") - below
    auc = float((below + ties / 2).sum() / (len(genuine) * len(impostor)))
    return VerificationReport(
        genuine_pairs=len(genuine),
        impostor_pairs=len(impostor),
        threshold=float(candidates[best]),
        accuracy=float(balanced[best]),
        far=far,
        threshold_far=threshold_far,
        tar_at_far=float((genuine >= threshold_far).mean()),
        auc=auc,
    )


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


def pair_scores(embeddings: torch.Tensor, pairs: list[tuple[int, int]], similarity) -> np.ndarray:
    if not pairs:
        return np.zeros(0)
    first, second = zip(*pairs)
    return similarity(embeddings[list(first)], embeddings[list(second)]).cpu().numpy()
