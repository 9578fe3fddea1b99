"""Auto-PGD (Croce & Hein 2020): PGD without a step size to tune. Each run starts at twice the budget, halves the
step at checkpoints where the loss stopped rising (and goes back to the best point found), steps with momentum,
and returns the best iterate, not the last; ℓ∞ or ℓ2, with restarts and EOT."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from redteam.api import ATTACKS, Attack, AttackResult, Budget, Objective, objective_gradient


def checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD may halve its step: after 22% of ``steps``, then at gaps shrinking by 3% of
    ``steps`` each time down to 6% (the paper's schedule, in whole iterations)."""
    gap, shrink, least = (max(int(share * steps), 1) for share in (0.22, 0.03, 0.06))
    marks = [gap]
    while True:
        gap = max(gap - shrink, least)
        if marks[-1] + gap > steps:
            return marks
        marks.append(marks[-1] + gap)


@dataclass
class _Run:
    """Per-sample state of one APGD run, narrowed together as samples succeed and stop."""

    index: Tensor  # [n] positions in the attacked batch
    origin: Tensor
    x: Tensor
    previous: Tensor
    gradient: Tensor
    loss: Tensor
    best: Tensor
    best_loss: Tensor
    best_gradient: Tensor
    step: Tensor  # [n] current step size
    rises: Tensor  # [n] iterations since the last checkpoint whose loss rose
    step_at_checkpoint: Tensor
    best_at_checkpoint: Tensor

    def narrowed(self, keep: Tensor) -> _Run:
        return _Run(**{name: value[keep] for name, value in vars(self).items()})


@ATTACKS.register("apgd", "auto-PGD (Croce & Hein 2020): halving step sizes, momentum, best iterate (ℓ∞/ℓ2, EOT)")
@dataclass
class APGD(Attack):
    """``steps`` gradient evaluations per restart (times ``eot`` draws each), ``restarts`` from fresh random starts
    on the samples not yet fooled, ``momentum`` the paper's α, ``rho`` the share of rising steps between checkpoints
    below which the step is halved."""

    name = "apgd"
    supports_eot = True
    supports_early_stop = True
    positive = ("steps", "restarts", "eot")
    effort = ("steps", "restarts", "eot")
    steps: int = 50
    restarts: int = 1
    eot: int = 1
    momentum: float = 0.75
    rho: float = 0.75
    early_stop: bool = True  # stop each sample once it fools the system

    def __post_init__(self) -> None:
        if not (0 <= self.momentum <= 1 and 0 < self.rho <= 1):
            raise ValueError(f"momentum is in [0, 1] and rho in (0, 1], not {self.momentum!r} and {self.rho!r}")

    def __call__(
        self, objective: Objective, images: Tensor, budget: Budget, generator: torch.Generator | None = None
    ) -> AttackResult:
        images = images.detach()
        adversarial = images.clone()
        best_loss = torch.full((len(images),), -math.inf, device=images.device)
        success = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        steps_used = torch.zeros(len(images), dtype=torch.long, device=images.device)
        for _ in range(self.restarts):
            active = torch.nonzero(~success).squeeze(1)
            if len(active) == 0:
                break
            found, loss, won = self._run(
                objective.select(active), images[active], budget, generator, steps_used, active
            )
            better = won | (loss > best_loss[active])  # restarts keep the best point of any of them
            adversarial[active[better]], best_loss[active[better]] = found[better], loss[better]
            success[active[won]] = True
        return AttackResult(adversarial, steps_used, objective)

    def _run(
        self,
        goal: Objective,
        origin: Tensor,
        budget: Budget,
        generator: torch.Generator | None,
        steps_used: Tensor,
        active: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One run from a random start -> (best point, its loss, whether it fooled the system), each per sample."""
        found, found_loss = origin.clone(), torch.full((len(origin),), -math.inf, device=origin.device)
        won = torch.zeros(len(origin), dtype=torch.bool, device=origin.device)
        x = budget.confine(origin)(origin + budget.sample(origin, generator))
        verdict, gradient = objective_gradient(goal, x, self.eot)
        steps_used[active] += 1
        step = torch.full((len(origin),), 2.0, device=origin.device) * budget.eps
        run = _Run(
            torch.arange(len(origin), device=origin.device), origin, x, x, gradient, verdict.loss, x, verdict.loss,
            gradient, step, torch.zeros_like(step), step.clone(), verdict.loss.clone(),
        )  # fmt: skip
        marks, last_mark = checkpoints(self.steps), 0
        for iteration in range(1, self.steps + 1):
            if self.early_stop and verdict.success.any():  # fooled: keep that point, stop attacking the sample
                stop = verdict.success
                found[run.index[stop]], found_loss[run.index[stop]], won[run.index[stop]] = (
                    run.x[stop],
                    run.loss[stop],
                    True,
                )
                run, goal = run.narrowed(~stop), goal.select(torch.nonzero(~stop).squeeze(1))
                if len(run.index) == 0:
                    break
            if iteration == self.steps:
                break
            confine = budget.confine(run.origin)
            target = confine(run.x + budget.ascent(run.gradient, run.step))
            alpha = 1.0 if iteration == 1 else self.momentum
            shape = (-1,) + (1,) * (run.x.dim() - 1)
            moved = confine(run.x + alpha * (target - run.x) + (1 - alpha) * (run.x - run.previous))
            verdict, gradient = objective_gradient(goal, moved, self.eot)
            steps_used[active[run.index]] += 1
            run.rises += (verdict.loss > run.loss).to(run.rises.dtype)
            run.previous, run.x, run.gradient, run.loss = run.x, moved, gradient, verdict.loss
            improved = verdict.loss > run.best_loss
            run.best = torch.where(improved.view(shape), moved, run.best)
            run.best_gradient = torch.where(improved.view(shape), gradient, run.best_gradient)
            run.best_loss = torch.where(improved, verdict.loss, run.best_loss)
            if iteration in marks:  # halve the step where the loss stalled, and go back to the best point
                stalled = run.rises < self.rho * (iteration - last_mark)
                stalled |= (run.step_at_checkpoint == run.step) & (run.best_at_checkpoint == run.best_loss)
                run.step = torch.where(stalled, run.step / 2, run.step)
                run.x = torch.where(stalled.view(shape), run.best, run.x)
                run.gradient = torch.where(stalled.view(shape), run.best_gradient, run.gradient)
                run.rises = torch.zeros_like(run.rises)
                run.step_at_checkpoint, run.best_at_checkpoint = run.step.clone(), run.best_loss.clone()
                last_mark = iteration
        if len(run.index):
            found[run.index], found_loss[run.index] = run.best, run.best_loss
        return found, found_loss, won
