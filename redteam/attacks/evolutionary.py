"""The evolutionary attack (Dong et al., CVPR 2019), ℓ2, from decisions alone: the decision-based attack made for
face recognition.

From a starting image the system already decides wrongly on, moved first by a binary search to the decision
boundary on its line to the original, a (1+1) evolution strategy shrinks the perturbation.
Each step draws a random direction in a low-dimensional search space (``side × side × 3``, upsampled bilinearly to
the image: faces vary smoothly, so the space is small and still rich), from a Gaussian whose diagonal covariance
learns which coordinates have paid off, and keeps only ``share`` of its coordinates, chosen in proportion to that
covariance. The candidate is the current image pulled ``mu`` of the way towards the original, plus that direction
scaled to ``sigma`` of the current distance, put back at the pulled distance; one query says whether the system is
still fooled there, and a fooling candidate closer to the original replaces the current image and updates the
evolution path and the covariance. The pull ``mu`` follows the 1/5 success rule. Every probe runs in lockstep: a step
is one oracle call with one image per probe still searching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from redteam.api import ATTACKS, MinimalQueryAttack, Oracle, QueryResult, bisect_boundary
from redteam.budgets import Norm, per_sample, perturbation_size, scaled_to

#: The success rate the 1/5 rule steers towards.
TARGET_SUCCESS = 0.2
#: The first binary search's precision, as a share of the start's distance (ten queries).
START_PRECISION = 2**-10


@ATTACKS.register("evolutionary", "evolutionary attack (Dong et al. 2019): CMA-ES in a small subspace (ℓ2), minimal")
@dataclass
class Evolutionary(MinimalQueryAttack):
    """``side``: the search space's height and width; ``share``: the share of its coordinates a step changes (the
    paper's m/20); ``sigma``: a step's random part relative to the current distance; ``mu``: the initial pull towards
    the original; ``ccov`` and ``decay``: the covariance's learning rate and the evolution path's decay; ``window``:
    steps between updates of ``mu`` by the 1/5 rule."""

    name = "evolutionary"
    norms = ("l2",)
    positive = ("side", "share", "sigma", "mu", "ccov", "decay", "window")
    norm: Norm = "l2"
    side: int = 45
    share: float = 0.05
    sigma: float = 0.01
    mu: float = 0.01
    ccov: float = 0.001
    decay: float = 0.99
    window: int = 30

    def __call__(self, oracle: Oracle, images: Tensor, starts: Tensor, generator: torch.Generator) -> QueryResult:
        count, channels, height, width = images.shape
        device = images.device
        dimensions = channels * self.side * self.side
        chosen = max(1, round(self.share * dimensions))
        current = bisect_boundary(oracle, images, starts, START_PRECISION)
        covariance = torch.ones(count, dimensions, device=device)
        path = torch.zeros(count, dimensions, device=device)
        pull = torch.full((count,), self.mu, device=device)
        successes = torch.zeros(count, device=device)
        trials = torch.zeros(count, device=device)
        started = perturbation_size(starts - images, "l2") > 0
        while True:
            live = torch.nonzero(started & (oracle.remaining() > 0)).squeeze(1)
            if len(live) == 0:
                break
            # A sparse Gaussian step in the search space: ``chosen`` coordinates, drawn by their covariance.
            keep = torch.zeros(len(live), dimensions, device=device)
            keep.scatter_(1, torch.multinomial(covariance[live], chosen, generator=generator), 1.0)
            noise = torch.randn(len(live), dimensions, generator=generator, device=device)
            step = noise * covariance[live].sqrt() * keep
            grid = step.view(-1, channels, self.side, self.side)
            upsampled = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
            originals = images[live]  # gathered once a step: every full-size copy adds to the own time per query
            offset = current[live] - originals
            distance = perturbation_size(offset, "l2")
            pulled = offset * per_sample(1 - pull[live], offset)  # from the original, pulled towards it
            moved = pulled.add_(scaled_to(upsampled, self.sigma * distance, in_place=True))
            # Back to the pulled distance from the original: the random part turns, the pull shrinks.
            radius = (1 - pull[live]).abs() * distance
            candidate = scaled_to(moved, radius, in_place=True).add_(originals).clamp_(0, 1)
            fooled = oracle(candidate, live).fooled
            closer = perturbation_size(candidate - originals, "l2") < distance
            accepted = fooled & closer
            won = live[accepted]
            current[won] = candidate[accepted]
            path[won] = self.decay * path[won] + math.sqrt(1 - self.decay**2) * step[accepted]
            covariance[won] = (1 - self.ccov) * covariance[won] + self.ccov * path[won] ** 2
            successes[live] += accepted.float()
            trials[live] += 1
            due = live[trials[live] >= self.window]
            pull[due] *= torch.exp(successes[due] / trials[due] - TARGET_SUCCESS)
            successes[due], trials[due] = 0, 0
        return QueryResult(*oracle.best_so_far())
