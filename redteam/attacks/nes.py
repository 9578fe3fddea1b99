"""NES (Ilyas et al., ICML 2018): gradients estimated from scores alone, then projected gradient steps; ℓ∞ and ℓ2.

Each round estimates the gradient of the threat's margin at the current image from ``samples`` antithetic pairs of
Gaussian probes ``x ± σu`` (two queries each: a natural-evolution-strategies estimate, so no gradient is ever asked
of the target), takes one steepest-ascent step of ``step × ε`` for the budget's norm, projects back into the budget
and asks once more whether the system is now fooled. A probe stops once fooled; near the end of its budget the
estimate uses the pairs it can still afford.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from redteam.api import ATTACKS, Budget, Oracle, QueryAttack, QueryResult, perturbation_size
from redteam.budgets import per_sample


@ATTACKS.register("nes", "NES (Ilyas et al. 2018): gradients estimated from scores, then PGD steps (ℓ∞, ℓ2)")
@dataclass
class NES(QueryAttack):
    """``samples``: antithetic pairs per estimate (two queries each); ``sigma``: the probes' standard deviation
    (image units): one grey level, not the paper's 0.001, which the 8-bit images the system receives round away
    (faces-train, 4 facenet dodging probes at 8/255, 300 queries: one level brought each probe 0.03-0.05 closer to
    the threshold); ``step``: a step's length as a share of ε (chosen on faces-train: 4 facenet
    dodging probes, 8/255, 300 queries: 0.5 with 25 pairs came closest to fooling, against 0.25 or 10 pairs)."""

    name = "nes"
    norms = ("linf", "l2")
    positive = ("samples", "sigma", "step")
    samples: int = 25
    sigma: float = 1 / 255
    step: float = 0.5

    def __call__(
        self, oracle: Oracle, images: Tensor, budget: Budget, generator: torch.Generator, start: Tensor | None = None
    ) -> QueryResult:
        current = images.clone() if start is None else budget.confine(images)(start)
        fooled = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        while True:
            pairs = torch.clamp((oracle.remaining() - 1) // 2, min=0, max=self.samples)
            pairs[fooled] = 0
            live = torch.nonzero(pairs > 0).squeeze(1)
            if len(live) == 0:
                break
            probes = torch.repeat_interleave(live, pairs[live])
            noise = torch.randn((len(probes), *images.shape[1:]), generator=generator, device=images.device)
            sent = torch.cat([current[probes] + self.sigma * noise, current[probes] - self.sigma * noise])
            margins = oracle(sent, torch.cat([probes, probes])).margin
            assert margins is not None, "nes needs scores"
            plus, minus = margins.chunk(2)
            weighted = per_sample((plus - minus) / (2 * self.sigma), noise) * noise
            estimate = torch.zeros_like(images).index_add_(0, probes, weighted)[live]
            stepped = current[live] + budget.ascent(estimate, self.step * float(budget.eps))
            current[live] = budget.confine(images[live])(stepped)
            fooled[live] = oracle(current[live], live).fooled
        size = perturbation_size(current - images, budget.norm)
        return QueryResult(current, torch.where(fooled, size, torch.full_like(size, float("inf"))))
