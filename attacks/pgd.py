"""Projected gradient descent (Madry et al. 2018) in ℓ∞ or ℓ2, with random start, restarts and per-sample stop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from redteam.attacks.base import ATTACKS, Attack, AttackResult, Budget
from torch import Tensor

from redteam.threats import Objective


@ATTACKS.register("pgd", "projected gradient ascent on the threat objective (ℓ∞/ℓ2, random start, early stop)")
@dataclass
class PGD(Attack):
    name = "pgd"
    steps: int = 10
    step_size: float = 2.5  # per step, in units of eps / steps (Madry et al.'s 2.5 eps / steps)
    random_start: bool = True
    restarts: int = 1

    def __call__(
        self, objective: Objective, images: Tensor, budget: Budget, generator: torch.Generator | None = None
    ) -> AttackResult:
        images = images.detach()
        adversarial = images.clone()
        success = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        steps_used = torch.zeros(len(images), dtype=torch.long, device=images.device)
        step = self.step_size * budget.eps / self.steps
        for _ in range(self.restarts):
            active = torch.nonzero(~success).squeeze(1)
            if len(active) == 0:
                break
            goal, origin = objective.select(active), images[active]
            delta = budget.sample(origin, generator) if self.random_start else torch.zeros_like(origin)
            x = (origin + delta).clamp(0, 1)
            for _ in range(self.steps):
                x.requires_grad_(True)
                evaluation = goal(x)
                (gradient,) = torch.autograd.grad(evaluation.loss.sum(), x)
                x = x.detach()
                won = evaluation.success.detach()
                adversarial[active] = x  # the latest iterate; samples that won stop here
                success[active] = won
                steps_used[active] += 1
                if won.all():
                    active = active[:0]
                    break
                if won.any():  # drop the samples already won: later steps only pay for the rest
                    keep = torch.nonzero(~won).squeeze(1)
                    active, goal, origin, x, gradient = (
                        active[keep],
                        goal.select(keep),
                        origin[keep],
                        x[keep],
                        gradient[keep],
                    )
                x = (origin + budget.project(x + budget.ascent(gradient, step) - origin)).clamp(0, 1)
            if len(active):
                with torch.no_grad():  # judge the final iterate of the samples still running
                    adversarial[active] = x
                    success[active] = goal(x).success
        return AttackResult(adversarial, success, steps_used)
