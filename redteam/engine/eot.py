"""How many draws of a randomised defense an adaptive attack averages per gradient (EOT), chosen by measurement.

A fixed count is a guess: too few draws and each step follows the defense's noise, not its expectation, and the
defense looks robust because the attack is lost. Before attacking, two independent estimates of the expected
gradient are drawn at the cell's first probes with as many draws each as a candidate count. The smallest count at
which they agree (cosine :data:`AGREEMENT`, median over the probes; each estimate is then about 0.9 in cosine from
the expectation itself) is the attack's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from redteam.api import Objective, objective_gradient

#: Draw counts tried, in order: the first is the least an attack on a randomised defense gets.
CHOICES = (8, 16, 32)
#: The cosine two independent estimates must reach (median over the probes).
AGREEMENT = 0.8
#: Probes the counts are measured on.
PROBES = 4


@dataclass(frozen=True)
class EotChoice:
    """``draws`` per gradient, and how well two independent estimates with that many draws agreed."""

    draws: int
    agreement: float

    @property
    def enough(self) -> bool:
        """Whether even the largest count reached the agreement sought."""
        return self.agreement >= AGREEMENT

    def describe(self) -> str:
        outcome = "" if self.enough else f", below {AGREEMENT:g} even at the most draws tried: the gradient is noise"
        return (
            f"{self.draws} draws per gradient: two independent {self.draws}-draw estimates agree to cosine "
            f"{self.agreement:.2f} (median of the first probes){outcome}"
        )


def choose_eot(objective: Objective, images: Tensor, choices: tuple[int, ...] = CHOICES) -> EotChoice:
    """The smallest of ``choices`` whose two independent estimates of ``objective``'s expected gradient at
    ``images [B, 3, H, W]`` agree to :data:`AGREEMENT`; else the largest. Draws are reused from count to count."""
    draws: list[Tensor] = []
    for count in choices:
        while len(draws) < 2 * count:
            draws.append(objective_gradient(objective, images)[1].flatten(1))
        first, second = torch.stack(draws[:count]).mean(0), torch.stack(draws[count : 2 * count]).mean(0)
        choice = EotChoice(count, float(F.cosine_similarity(first, second, dim=1).median()))
        if choice.enough:
            break
    return choice
