"""Fast minimum-norm attack (after Pintor et al., NeurIPS 2021), ℓ∞ or ℓ2.

Each sample carries its own budget ε: it shrinks while the iterate fools the system and, until a first adversarial
example is found, jumps to a linear estimate of the distance to the decision boundary (then grows slowly). Steps
ascend the threat objective and are projected onto the current ε-ball, so one run yields every sample's smallest
successful perturbation — the whole accuracy-perturbation curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from redteam.api import (
    ATTACKS,
    Budget,
    MinimalAttack,
    MinimalResult,
    Norm,
    Objective,
    objective_gradient,
    perturbation_size,
)


@ATTACKS.register("minnorm", "fast minimum-norm attack: each probe's smallest fooling perturbation in one run")
@dataclass
class MinimumNorm(MinimalAttack):
    name = "minnorm"
    supports_eot = True
    positive = ("steps", "step_size", "eot")
    norm: Norm = "linf"
    steps: int = 50
    step_size: float = 0.5  # ascent step as a fraction of the sample's current ε (cosine-annealed)
    gamma: float = 0.1  # relative change of ε per step (cosine-annealed)
    eot: int = 1

    def __call__(self, objective: Objective, images: Tensor, generator: torch.Generator | None = None) -> MinimalResult:
        images = images.detach()
        count = len(images)
        best, best_size = images.clone(), torch.full((count,), math.inf, device=images.device)
        eps = torch.full((count,), math.inf, device=images.device)
        x = images.clone()
        dual = "l2" if self.norm == "l2" else "l1"  # the dual norm measures the gradient for the boundary estimate
        for step in range(self.steps + 1):
            last = step == self.steps
            if last:  # the final iterate is only judged (the engine judges it again): no gradient needed
                with torch.no_grad():
                    success = objective(x).success
            else:
                evaluation, gradient = objective_gradient(objective, x, self.eot)
                success = evaluation.success
            size = perturbation_size(x - images, self.norm)
            better = success & (size < best_size)
            best[better], best_size[better] = x[better], size[better]
            if last:
                break
            anneal = 0.5 * (1 + math.cos(math.pi * step / self.steps))
            gamma = self.gamma * anneal
            gradient_size = (
                gradient.flatten(1).abs().sum(1) if dual == "l1" else perturbation_size(gradient, "l2")
            ).clamp_min(1e-12)
            boundary = size + (-evaluation.loss).clamp(min=0) / gradient_size
            found = torch.isfinite(best_size)
            eps = torch.where(
                evaluation.success,
                torch.minimum(eps, size) * (1 - gamma),
                torch.where(found, eps * (1 + gamma), boundary),
            )
            eps = torch.where(found, torch.minimum(eps, best_size), eps)
            budget = Budget(self.norm, eps)
            ascent = budget.ascent(gradient, self.step_size * max(anneal, 0.05) * eps)
            x = (images + budget.project(x + ascent - images)).clamp(0, 1)
        steps = torch.full((count,), self.steps, dtype=torch.long, device=images.device)
        return MinimalResult(best, best_size, steps)
