"""``auto``: an AutoAttack-style ensemble for face threats (Croce & Hein 2020), so that no single attack's tuning
decides a robustness number. In turn, each only on the probes the ones before left standing:

1. APGD on the threat's margin (gradients; EOT when the target or its defense is random);
2. APGD again from fresh random starts with twice the steps (what the first run's schedule missed);
3. Square on the scores (no gradients: what gradient masking hides from the first two).

A probe counts as broken by the first part that fooled it; the store keeps which (``broken_by``) and the report
counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from redteam.api import ATTACKS, Attack, AttackResult, Budget, Objective, Oracle
from redteam.attacks.apgd import APGD
from redteam.attacks.square import Square
from redteam.budgets import eight_bit

#: Names of the ensemble's parts, in the order they run.
PARTS = ("apgd", "apgd-long", "square")


@ATTACKS.register("auto", "AutoAttack-style ensemble: APGD, a longer APGD, then Square, each on what still stands")
@dataclass
class Auto(Attack):
    """``steps``: the first APGD's (the second takes twice as many); ``eot``: gradient draws per APGD step;
    ``queries``: Square's per probe."""

    name = "auto"
    supports_eot = True
    supports_early_stop = True
    positive = ("steps", "eot", "queries")
    effort = ("steps", "eot", "queries")
    steps: int = 50
    eot: int = 1
    queries: int = 500
    early_stop: bool = True  # APGD stops each probe once it is fooled (off when another model judges)
    square: bool = True  # the gradient-free part (left out when the attack reruns with another BPDA stand-in)

    def __call__(
        self, objective: Objective, images: Tensor, budget: Budget, generator: torch.Generator | None = None
    ) -> AttackResult:
        images = images.detach()
        adversarial = images.clone()
        steps = torch.zeros(len(images), dtype=torch.long, device=images.device)
        parts: list[str | None] = [None] * len(images)
        standing = torch.arange(len(images), device=images.device)
        for part in PARTS if self.square else PARTS[:-1]:
            if len(standing) == 0:
                break
            goal = objective.select(standing)
            if part == "square":
                found, spent = self._square(goal, images[standing], budget, generator)
            else:
                length = self.steps * (2 if part == "apgd-long" else 1)
                apgd = APGD(steps=length, eot=self.eot, early_stop=self.early_stop)
                result = apgd(goal, images[standing], budget, generator)
                found, spent = result.images, result.steps
            steps[standing] += spent
            with torch.no_grad():
                fooled = goal(found).success
            # The first part's best point stands for probes nobody fooled; a fooling point replaces it.
            if part == PARTS[0]:
                adversarial[standing] = found
            adversarial[standing[fooled]] = found[fooled]
            for position in standing[fooled].tolist():
                parts[position] = part
            standing = standing[~fooled]
        return AttackResult(adversarial, steps, objective, parts)

    def gradient_parts(self) -> Auto:
        return replace(self, square=False)

    def _square(
        self, goal: Objective, images: Tensor, budget: Budget, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Square on the scores of ``goal`` -> (its images, queries spent per probe). The images are the 8-bit ones
        the oracle answered, so that what Square found fooling is what is judged."""
        oracle = Oracle(goal, images, "scores", self.queries, budget.norm)
        drawn = generator if generator is not None else torch.Generator(images.device).manual_seed(0)
        result = Square()(oracle, images, budget, drawn)
        return eight_bit(result.images, images), oracle.spent
