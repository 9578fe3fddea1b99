"""Projected gradient ascent (Madry et al. 2018) and its momentum variant MIM (Dong et al. 2018), ℓ∞ or ℓ2."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from redteam.api import ATTACKS, Attack, AttackResult, Budget, Objective, objective_gradient


@ATTACKS.register("pgd", "projected gradient ascent on the threat objective (ℓ∞/ℓ2, random start, early stop)")
@dataclass
class PGD(Attack):
    name = "pgd"
    supports_eot = True
    supports_early_stop = True
    positive = ("steps", "step_size", "restarts", "eot")
    steps: int = 10
    step_size: float = 2.5  # per step, in units of eps / steps (Madry et al.'s 2.5 eps / steps)
    random_start: bool = True
    restarts: int = 1
    momentum: float = 0.0  # MIM's decay factor; 0 is plain PGD
    eot: int = 1  # gradient samples per step, for randomised targets and defenses
    early_stop: bool = True  # stop each sample once it fools the system (off for transfer attacks)

    def __call__(
        self, objective: Objective, images: Tensor, budget: Budget, generator: torch.Generator | None = None
    ) -> AttackResult:
        images = images.detach()
        adversarial = images.clone()
        success = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        steps_used = torch.zeros(len(images), dtype=torch.long, device=images.device)
        step = self.step_size * budget.eps / self.steps
        for restart in range(self.restarts):
            active = torch.nonzero(~success).squeeze(1)
            if len(active) == 0:
                break
            goal, origin = objective.select(active), images[active]
            delta = budget.sample(origin, generator) if self.random_start else torch.zeros_like(origin)
            x = (origin + delta).clamp(0, 1)
            confine = budget.confine(origin)
            velocity = torch.zeros_like(x)
            for _ in range(self.steps):
                evaluation, gradient = objective_gradient(goal, x, self.eot)
                steps_used[active] += 1
                won = evaluation.success
                if self.early_stop and won.any():  # samples that won stop at this iterate; later steps skip them
                    adversarial[active[won]], success[active[won]] = x[won], True
                    keep = torch.nonzero(~won).squeeze(1)
                    active, goal = active[keep], goal.select(keep)
                    origin, x, gradient, velocity = origin[keep], x[keep], gradient[keep], velocity[keep]
                    if len(active) == 0:
                        break
                    confine = budget.confine(origin)
                if self.momentum:
                    l1 = gradient.flatten(1).abs().sum(1).clamp_min(1e-12)
                    velocity = self.momentum * velocity + gradient / l1.view(-1, *([1] * (gradient.dim() - 1)))
                    gradient = velocity
                x = confine(budget.ascent(gradient, step).add_(x))
            if len(active):
                adversarial[active] = x  # the final iterate of the samples still running
                if restart + 1 < self.restarts:  # the next restart attacks only those it did not fool
                    with torch.no_grad():
                        success[active] = goal(x).success
        return AttackResult(adversarial, steps_used, objective)


@ATTACKS.register("mim", "momentum iterative method: PGD whose steps follow an accumulated, L1-normalised gradient")
@dataclass
class MIM(PGD):
    name = "mim"
    momentum: float = 1.0
    random_start: bool = False
    step_size: float = 1.0  # eps / steps per step, as in Dong et al.
