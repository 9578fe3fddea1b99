"""HopSkipJump (Chen, Jordan & Wainwright, IEEE S&P 2020), ℓ2 and ℓ∞, from decisions alone.

From a starting image the system already decides wrongly on, each iteration: a binary search along the line to the
original image finds the decision boundary; Monte Carlo sampling around that boundary point estimates the direction
in which the decision flips (each sample one query: fooled or not, baseline-subtracted); a geometric search steps
along it until the system is still fooled; and a binary search pulls back to the boundary again. The sample count
grows as √t and the step as the distance / √t, as in the paper. For ℓ∞ (the paper's second variant) the searches
clip to a box around the image instead of moving along a line, the step follows the estimate's sign, and θ and the
sampling radius scale with d instead of √d. Every probe runs in lockstep with the others, so
each phase is one oracle call for all of them; the oracle's record keeps the smallest fooling image ever queried,
which is what the attack returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from redteam.api import ATTACKS, MinimalQueryAttack, Oracle, QueryResult, bisect_boundary
from redteam.budgets import Norm, per_sample, perturbation_size, scaled_to

#: Boundary samples drawn and sent at once (memory: each is a full-size image).
SAMPLES_PER_CALL = 256


@ATTACKS.register("hsj", "HopSkipJump (Chen et al. 2020): boundary walk from decisions only (ℓ2, ℓ∞), minimal")
@dataclass
class HopSkipJump(MinimalQueryAttack):
    """``initial_samples``: boundary samples at the first iteration (then × √t, up to ``most_samples``);
    ``gamma``: sets the binary searches' precision and the sampling radius (the paper's θ = γ / d^1.5 for ℓ2,
    γ / d² for ℓ∞)."""

    name = "hsj"
    norms = ("l2", "linf")
    positive = ("initial_samples", "most_samples", "gamma")
    norm: Norm = "l2"
    initial_samples: int = 100
    most_samples: int = 10_000
    gamma: float = 1.0

    def __call__(self, oracle: Oracle, images: Tensor, starts: Tensor, generator: torch.Generator) -> QueryResult:
        dimensions = images[0].numel()
        # The scale of the problem in the norm: √d for ℓ2, d for ℓ∞ (the paper's θ and sampling radius).
        scale = math.sqrt(dimensions) if self.norm == "l2" else float(dimensions)
        theta = self.gamma / (scale * dimensions)
        boundary = bisect_boundary(oracle, images, starts, theta, self.norm)
        iteration = 1
        while True:
            live = self._live(oracle, boundary, images)
            if len(live) == 0:
                break
            distance = perturbation_size(boundary[live] - images[live], self.norm)
            # The sampling radius: the reference implementation's 0.1 at first (no previous step to scale by), then
            # the scale times θ times the distance.
            radius = scale * theta * distance if iteration > 1 else torch.full_like(distance, 0.1)
            # At least one grey level per pixel (root mean square): the oracle answers 8-bit images, and a smaller
            # sample rounds back onto the boundary point, its vote then saying nothing about the direction.
            radius = radius.clamp_min(math.sqrt(dimensions) / 255)
            samples = int(min(self.initial_samples * math.sqrt(iteration), self.most_samples))
            direction = self._direction(oracle.narrow(live), boundary[live], radius, samples, generator)
            if self.norm == "linf":
                direction = direction.sign()
            moved = self._step(
                oracle.narrow(live), images[live], boundary[live], direction, distance / math.sqrt(iteration)
            )
            boundary[live] = bisect_boundary(oracle.narrow(live), images[live], moved, theta, self.norm)
            iteration += 1
        return QueryResult(*oracle.best_so_far())

    @staticmethod
    def _live(oracle: Oracle, boundary: Tensor, images: Tensor) -> Tensor:
        """Probes still worth an iteration: a fooling start, and queries left for a few samples and searches."""
        started = (boundary - images).flatten(1).abs().amax(1) > 0
        return torch.nonzero(started & (oracle.remaining() > 2)).squeeze(1)

    @staticmethod
    def _direction(oracle: Oracle, points: Tensor, radius: Tensor, samples: int, generator: torch.Generator) -> Tensor:
        """Monte Carlo estimate of each boundary point's normal, towards fooling: ``samples`` random unit
        directions (fewer where the budget is short), weighted by the decision minus its mean over the point's
        samples (the paper's baseline; the decision itself where every sample agrees).

        Thousands of full-size samples do not fit in memory at once, so they are drawn and sent
        :data:`SAMPLES_PER_CALL` at a time, keeping per point three sums: of the votes, of the unit samples sent,
        and of the samples times their votes; with the baseline ``m``, ``sum((v - m) u) = sum(v u) - m sum(u)``."""
        counts = torch.clamp(oracle.remaining() - 2, min=1, max=samples)
        probes = torch.repeat_interleave(torch.arange(len(points), device=points.device), counts)
        votes = torch.zeros(len(points), device=points.device)
        sent, weighted = torch.zeros_like(points), torch.zeros_like(points)
        # In place where it can be, into one buffer: this is the attack's own work per query, over every sample.
        buffer = points.new_empty((min(len(probes), SAMPLES_PER_CALL), *points.shape[1:]))
        for chunk in probes.split(SAMPLES_PER_CALL):
            noise = buffer[: len(chunk)].normal_(generator=generator)  # the draws torch.randn would give
            origins = points[chunk]
            perturbed = scaled_to(noise, radius[chunk], in_place=True).add_(origins).clamp_(0, 1)
            vote = oracle(perturbed, chunk).fooled.float() * 2 - 1
            # The unit sample actually sent (clipping to the image range may have shortened it).
            unit = perturbed.sub_(origins).div_(per_sample(radius[chunk].clamp_min(1e-12), origins))
            votes.index_add_(0, chunk, vote)
            sent.index_add_(0, chunk, unit)
            weighted.index_add_(0, chunk, unit.mul_(per_sample(vote, unit)))
        mean = votes / counts
        agreed = mean.abs() >= 1  # every sample on one side: no baseline to subtract
        baseline = torch.where(agreed, torch.zeros_like(mean), mean)
        return scaled_to(weighted.sub_(per_sample(baseline, sent) * sent))

    @staticmethod
    def _step(oracle: Oracle, images: Tensor, points: Tensor, direction: Tensor, step: Tensor) -> Tensor:
        """From each boundary point along its direction, halving the step until the system is still fooled there
        (the point itself where no step does, within the queries left)."""
        moved = points.clone()
        pending = torch.ones(len(points), dtype=torch.bool, device=points.device)
        for _ in range(25):
            trying = torch.nonzero(pending & (oracle.remaining() > 1)).squeeze(1)
            if len(trying) == 0:
                break
            candidate = (points[trying] + step[trying].view(-1, 1, 1, 1) * direction[trying]).clamp(0, 1)
            fooled = oracle(candidate, trying).fooled
            moved[trying[fooled]] = candidate[fooled]
            pending[trying[fooled]] = False
            step[trying[~fooled]] /= 2
        return moved
