"""A defended face system judged at its own operating point.

A defense that changes what the recogniser sees can change how often it says "same person": a purifier that maps
every face towards one looks robust to dodging only because it accepts almost anyone. So every defended cell
measures its genuine and false accept rates on real pairs next to the undefended system's, and ``--recalibrate
DATA`` moves the defended system's threshold to where it accepts impostors as often as the undefended one does at
its own threshold, on DATA's pairs (calibration faces, never the evaluated ones).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from redteam.api import FaceRecognizer, Target
from redteam.datasets import FaceDataset
from redteam.engine.assembly import drawing_from
from redteam.errors import DataError
from redteam.metrics import calibration_pairs, pair_scores, threshold_at_far

#: Genuine and impostor pairs an operating point is measured on (each).
PAIRS = 40
#: Impostor pairs a recalibration sets the threshold on.
CALIBRATION_IMPOSTORS = 2_000


@dataclass(frozen=True)
class AcceptRates:
    """Shares of ``genuine`` and ``impostor`` pairs a system accepted at ``threshold``."""

    threshold: float
    genuine: float
    impostor: float
    pairs: int


def sampled_pairs(dataset: FaceDataset, count: int, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Up to ``count`` genuine and ``count`` impostor pairs of ``dataset``, drawn from ``seed``."""
    genuine, impostor = calibration_pairs(dataset, count, seed)
    if not genuine or not impostor:
        raise DataError(f"{dataset.name} gives no genuine or no impostor pairs to measure an operating point on.")
    return random.Random(f"pairs:{seed}").sample(genuine, min(count, len(genuine))), impostor


def scores(
    model: Target, dataset: FaceDataset, pairs: list[list[tuple[int, int]]], generator: torch.Generator, batch: int
) -> list[np.ndarray]:
    """``model``'s similarities on each list of pairs; a randomised defense draws from ``generator``."""
    with drawing_from(generator, model):
        return pair_scores(model, dataset, pairs, batch)


def accept_rates(
    model: Target, dataset: FaceDataset, seed: int, generator: torch.Generator, batch: int, count: int = PAIRS
) -> AcceptRates:
    """How often ``model`` (a recogniser, defended or not) accepts genuine and impostor pairs of ``dataset``."""
    assert isinstance(model, FaceRecognizer)
    genuine, impostor = sampled_pairs(dataset, count, seed)
    genuine_scores, impostor_scores = scores(model, dataset, [genuine, impostor], generator, batch)
    threshold = model.threshold
    return AcceptRates(
        threshold, float((genuine_scores >= threshold).mean()), float((impostor_scores >= threshold).mean()), count
    )


def recalibrated_threshold(
    defended: Target, undefended: Target, dataset: FaceDataset, generator: torch.Generator, batch: int
) -> tuple[float, float]:
    """The threshold at which ``defended`` accepts ``dataset``'s impostor pairs as often as ``undefended`` does at
    its own threshold -> (that threshold, that false accept rate)."""
    assert isinstance(undefended, FaceRecognizer)
    _, impostor = calibration_pairs(dataset, CALIBRATION_IMPOSTORS, seed=0)
    if not impostor:
        raise DataError(f"--recalibrate {dataset.name}: it gives no impostor pairs (it needs two identities or more).")
    (plain,) = scores(undefended, dataset, [impostor], generator, batch)
    (defended_scores,) = scores(defended, dataset, [impostor], generator, batch)
    far = float((plain >= undefended.threshold).mean())
    return threshold_at_far(defended_scores, far), far
