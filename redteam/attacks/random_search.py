"""Random search, the baseline every query attack must beat: random points on the budget's boundary (corners of the
ℓ∞ box, directions on the ℓ2 sphere; after a given start), one query each, kept as soon as one fools the system."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from redteam.api import ATTACKS, Budget, Oracle, QueryAttack, QueryResult, perturbation_size


@ATTACKS.register("random-search", "random points of the budget's boundary until one fools the system (a baseline)")
@dataclass
class RandomSearch(QueryAttack):
    """``batch``: points tried per probe per round (one oracle call for every probe still standing)."""

    name = "random-search"
    needs = "decisions"
    positive = ("batch",)
    batch: int = 8

    def __call__(
        self, oracle: Oracle, images: Tensor, budget: Budget, generator: torch.Generator, start: Tensor | None = None
    ) -> QueryResult:
        found = images.clone()
        fooled = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        if start is not None:  # the given start is the first point tried
            start = budget.confine(images)(start)
            fooled = oracle(start).fooled.clone()
            found[fooled] = start[fooled]
        while True:
            tries = torch.minimum(oracle.remaining(), torch.full_like(oracle.remaining(), self.batch))
            tries[fooled] = 0
            if int(tries.sum()) == 0:
                break
            probes = torch.repeat_interleave(torch.arange(len(images), device=images.device), tries)
            origins = images[probes]
            candidates = budget.confine(origins)(origins + boundary(budget, origins, generator))
            answer = oracle(candidates, probes)
            for k, probe in enumerate(probes.tolist()):
                if bool(answer.fooled[k]) and not bool(fooled[probe]):
                    found[probe], fooled[probe] = candidates[k], True
        size = perturbation_size(found - images, budget.norm)
        return QueryResult(found, torch.where(fooled, size, torch.full_like(size, float("inf"))))


def boundary(budget: Budget, like: Tensor, generator: torch.Generator) -> Tensor:
    """Random perturbations on the budget's boundary, shaped like ``like [N, ...]``: ±ε corners (ℓ∞) or directions
    scaled to ε (ℓ2)."""
    if budget.norm == "linf":
        signs = torch.randint(0, 2, like.shape, generator=generator, device=like.device, dtype=like.dtype) * 2 - 1
        return signs * budget.eps
    direction = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return Budget("l2", budget.eps).ascent(direction, budget.eps)
