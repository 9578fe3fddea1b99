"""Carlini & Wagner's ℓ2 attack (2017) on a face threat objective, with a per-sample binary search over c.

Minimises ``||δ||² + c · max(κ - loss, 0)`` in tanh space with Adam, where ``loss > 0`` means the face system is
fooled (``redteam.threats``). Each sample's constant ``c`` is bisected: lowered after a success, raised after a
failure. The smallest fooling perturbation seen is kept, so one run gives the ℓ2 accuracy-perturbation curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from redteam.api import ATTACKS, MinimalAttack, MinimalResult, Norm, Objective, perturbation_size


@ATTACKS.register("cw", "Carlini-Wagner ℓ2: smallest fooling perturbation per probe, binary search over c")
@dataclass
class CarliniWagner(MinimalAttack):
    name = "cw"
    norms = ("l2",)
    supports_eot = True
    positive = ("steps", "search_steps", "learning_rate", "eot")
    norm: Norm = "l2"
    steps: int = 30  # Adam steps per value of c
    search_steps: int = 5
    initial_const: float = 10.0  # the objective is a similarity margin (~0.1-1), ||δ||² is in image units
    learning_rate: float = 0.01
    confidence: float = 0.0  # κ: how far past the decision boundary to push
    eot: int = 1

    def __post_init__(self) -> None:
        if self.norm not in self.norms:
            raise ValueError("cw is an ℓ2 attack; use --norm l2")

    def __call__(self, objective: Objective, images: Tensor, generator: torch.Generator | None = None) -> MinimalResult:
        images = images.detach()
        count, device = len(images), images.device
        best, best_size = images.clone(), torch.full((count,), math.inf, device=device)
        const = torch.full((count,), self.initial_const, device=device)
        lower, upper = torch.zeros(count, device=device), torch.full((count,), math.inf, device=device)
        # tanh space keeps pixels in [0, 1] without clipping; atanh needs the open interval
        anchor = torch.atanh((images * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        for _ in range(self.search_steps):
            offset = torch.zeros_like(images, requires_grad=True)
            optimiser = torch.optim.Adam([offset], lr=self.learning_rate)
            fooled = torch.zeros(count, dtype=torch.bool, device=device)
            for _ in range(self.steps):
                x = (torch.tanh(anchor + offset) + 1) / 2
                evaluations = [objective(x) for _ in range(self.eot)]
                loss = torch.stack([e.loss for e in evaluations]).mean(0)
                success = torch.stack([e.success for e in evaluations]).all(0) & (loss >= self.confidence)
                distance = (x - images).flatten(1).pow(2).sum(1)
                total = distance + const * (self.confidence - loss).clamp(min=0)
                optimiser.zero_grad()
                total.sum().backward()
                optimiser.step()
                with torch.no_grad():
                    size = distance.sqrt()
                    better = success & (size < best_size)
                    best[better], best_size[better] = x[better].detach(), size[better]
                    fooled |= success
            upper = torch.where(fooled, torch.minimum(upper, const), upper)
            lower = torch.where(fooled, lower, torch.maximum(lower, const))
            const = torch.where(torch.isfinite(upper), (lower + upper) / 2, const * 10)
        steps = torch.full((count,), self.steps * self.search_steps, dtype=torch.long, device=device)
        return MinimalResult(
            best, perturbation_size(best - images, "l2").where(torch.isfinite(best_size), best_size), steps
        )
