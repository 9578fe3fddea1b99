"""Square Attack (Andriushchenko et al., ECCV 2020), ℓ∞, on the threat's margin from scores alone.

Random search with a structure that suits images: the perturbation starts as vertical stripes of ±ε (or at a given
start, such as a transfer example), and each step proposes a new random ±ε value per channel on one random square
window, kept only if the margin the API's score gives improves. The window's share of the image shrinks as the
queries are spent (the paper's schedule: halved at fixed fractions of the budget). Each step is one query per probe
still standing; a probe stops once fooled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from redteam.api import ATTACKS, Budget, Oracle, QueryAttack, QueryResult, perturbation_size

#: Fractions of the budget (in the paper's 10,000-query scale) after which the window's share halves again.
HALVINGS = (10, 50, 200, 500, 1_000, 2_000, 4_000, 6_000, 8_000)


def window_share(initial: float, step: int, budget: int) -> float:
    """The share of the image a window covers at ``step`` of ``budget`` queries."""
    scaled = step / budget * 10_000
    return initial / 2 ** sum(scaled > mark for mark in HALVINGS)


@ATTACKS.register("square", "Square Attack (Andriushchenko et al. 2020): random square windows, scores only (ℓ∞)")
@dataclass
class Square(QueryAttack):
    """``p_init``: the share of the image the first windows cover. The paper's 0.05 was for 299-pixel ImageNet
    images; faces respond to larger, smoother changes: on faces-train (4 facenet dodging probes, 8/255, 300
    queries) 0.8 fooled 2, 0.05 none (torchattacks' default is 0.8 too)."""

    name = "square"
    norms = ("linf",)
    positive = ("p_init",)
    p_init: float = 0.8

    def __call__(
        self, oracle: Oracle, images: Tensor, budget: Budget, generator: torch.Generator, start: Tensor | None = None
    ) -> QueryResult:
        count, channels, height, width = images.shape
        eps, device = float(budget.eps), images.device
        confine = budget.confine(images)
        if start is None:
            start = images + _signs((count, channels, 1, width), generator, device) * eps  # vertical stripes
        x = confine(start)
        answer = oracle(x)
        assert answer.margin is not None, "square needs scores"
        margin, fooled = answer.margin.clone(), answer.fooled.clone()
        total = oracle.budget
        while True:
            active = torch.nonzero(~fooled & (oracle.remaining() > 0)).squeeze(1)
            if len(active) == 0:
                break
            step = int(oracle.spent[active].min())
            side = max(1, min(height, width, round(math.sqrt(window_share(self.p_init, step, total) * height * width))))
            proposal = x[active].clone()
            for row, probe in enumerate(active.tolist()):
                top = int(torch.randint(0, height - side + 1, (1,), generator=generator, device=generator.device))
                left = int(torch.randint(0, width - side + 1, (1,), generator=generator, device=generator.device))
                window = proposal[row, :, top : top + side, left : left + side]
                origin = images[probe, :, top : top + side, left : left + side]
                for _ in range(10):  # a new value: redraw while the window would not change
                    value = _signs((channels, 1, 1), generator, device) * eps
                    candidate = (origin + value).clamp(0, 1)
                    if not torch.allclose(candidate, window):
                        break
                proposal[row, :, top : top + side, left : left + side] = candidate
            answer = oracle(proposal, active)
            assert answer.margin is not None
            better = answer.margin > margin[active]
            improved = active[better]
            x[improved], margin[improved] = proposal[better], answer.margin[better]
            fooled[active] |= answer.fooled
        size = perturbation_size(x - images, "linf")
        return QueryResult(x, torch.where(fooled, size, torch.full_like(size, float("inf"))))


def _signs(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=device).float() * 2 - 1
