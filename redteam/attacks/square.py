"""Square Attack (Andriushchenko et al., ECCV 2020), ℓ∞ and ℓ2, on the threat's margin from scores alone.

Random search with a structure that suits images: the perturbation starts as vertical stripes of ±ε (or at a given
start, such as a transfer example), and each step proposes a new random ±ε value per channel on one random square
window, kept only if the margin the API's score gives improves. The window's share of the image shrinks as the
queries are spent (the paper's schedule: halved at fixed fractions of the budget). For ℓ2 the start tiles the image
with two-lobed bumps, and a step moves the perturbation's mass from one random window into another, towards a new
bump, keeping ‖δ‖₂ = ε (the paper's Algorithm 3). Each step is one query per probe still standing; a probe stops
once fooled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from redteam.api import ATTACKS, Budget, Oracle, QueryAttack, QueryResult, perturbation_size
from redteam.budgets import scaled_to

#: Fractions of the budget (in the paper's 10,000-query scale) after which the window's share halves again.
HALVINGS = (10, 50, 200, 500, 1_000, 2_000, 4_000, 6_000, 8_000)


def window_share(initial: float, step: int, budget: int) -> float:
    """The share of the image a window covers at ``step`` of ``budget`` queries."""
    scaled = step / budget * 10_000
    return initial / 2 ** sum(scaled > mark for mark in HALVINGS)


@ATTACKS.register("square", "Square Attack (Andriushchenko et al. 2020): random square windows, scores only (ℓ∞, ℓ2)")
@dataclass
class Square(QueryAttack):
    """``p_init``: the share of the image the first windows cover (None: 0.8 for ℓ∞, the paper's 0.1 for ℓ2). The
    paper's ℓ∞ 0.05 was for 299-pixel ImageNet images; faces respond to larger, smoother changes: on faces-train
    (4 facenet dodging probes, 8/255, 300 queries) 0.8 fooled 2, 0.05 none (torchattacks' default is 0.8 too)."""

    name = "square"
    norms = ("linf", "l2")
    p_init: float | None = None

    def __post_init__(self) -> None:
        if self.p_init is not None and not 0 < self.p_init <= 1:
            raise ValueError(f"p_init is a share of the image in (0, 1], not {self.p_init!r}")

    def __call__(
        self, oracle: Oracle, images: Tensor, budget: Budget, generator: torch.Generator, start: Tensor | None = None
    ) -> QueryResult:
        eps, confine = float(budget.eps), budget.confine(images)
        if start is None:
            start = images + (self._stripes if budget.norm == "linf" else self._tiles)(images, eps, generator)
        x = confine(start)
        answer = oracle(x)
        assert answer.margin is not None, "square needs scores"
        margin, fooled = answer.margin.clone(), answer.fooled.clone()
        total, p_init = oracle.budget, self.p_init or (0.8 if budget.norm == "linf" else 0.1)
        propose = self._box_proposal if budget.norm == "linf" else self._sphere_proposal
        while True:
            active = torch.nonzero(~fooled & (oracle.remaining() > 0)).squeeze(1)
            if len(active) == 0:
                break
            share = window_share(p_init, int(oracle.spent[active].min()), total)
            proposal = propose(images[active], x[active], eps, share, generator)
            answer = oracle(proposal, active)
            assert answer.margin is not None
            better = answer.margin > margin[active]
            improved = active[better]
            x[improved], margin[improved] = proposal[better], answer.margin[better]
            fooled[active] |= answer.fooled
        size = perturbation_size(x - images, budget.norm)
        return QueryResult(x, torch.where(fooled, size, torch.full_like(size, float("inf"))))

    @staticmethod
    def _stripes(images: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        """ℓ∞ start: vertical stripes of ±ε, one sign per column and channel."""
        count, channels, _, width = images.shape
        return _signs((count, channels, 1, width), generator, images.device) * eps

    @staticmethod
    def _box_proposal(images: Tensor, x: Tensor, eps: float, share: float, generator: torch.Generator) -> Tensor:
        """ℓ∞ step: one random window per image set to a new random ±ε per channel."""
        _, channels, height, width = images.shape
        side = max(1, min(height, width, round(math.sqrt(share * height * width))))
        proposal = x.clone()
        for row in range(len(images)):
            top, left = _corner(height, width, side, generator)
            window = proposal[row, :, top : top + side, left : left + side]
            origin = images[row, :, top : top + side, left : left + side]
            for _ in range(10):  # a new value: redraw while the window would not change
                candidate = (origin + _signs((channels, 1, 1), generator, images.device) * eps).clamp(0, 1)
                if not torch.allclose(candidate, window):
                    break
            proposal[row, :, top : top + side, left : left + side] = candidate
        return proposal

    @staticmethod
    def _tiles(images: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        """ℓ2 start: the image tiled by squares a fifth of its side, each a two-lobed bump with a random sign per
        channel, scaled to ‖δ‖₂ = ε."""
        count, channels, height, width = images.shape
        side = max(1, min(height, width) // 5)
        delta = torch.zeros_like(images)
        top0, left0 = (height - side * (height // side)) // 2, (width - side * (width // side)) // 2
        for top in range(top0, height - side + 1, side):
            for left in range(left0, width - side + 1, side):
                signs = _signs((count, channels, 1, 1), generator, images.device)
                delta[..., top : top + side, left : left + side] = signs * _bump(side, generator, images.device)
        return scaled_to(delta, eps)

    @staticmethod
    def _sphere_proposal(images: Tensor, x: Tensor, eps: float, share: float, generator: torch.Generator) -> Tensor:
        """ℓ2 step (the paper's Algorithm 3): per image, the perturbation's mass in a second random window moves into
        a first one, whose content is turned towards a new random bump; then the whole is rescaled to ‖δ‖₂ = ε."""
        _, channels, height, width = images.shape
        side = max(3, round(math.sqrt(share * height * width)))
        side = min(side + (side % 2 == 0), height, width)  # odd, so the bump has a centre
        delta = x - images
        proposal = torch.empty_like(x)
        for row in range(len(images)):
            current = delta[row].clone()
            top, left = _corner(height, width, side, generator)
            top2, left2 = _corner(height, width, side, generator)
            first = current[:, top : top + side, left : left + side]
            both = torch.zeros_like(current[0], dtype=torch.bool)
            both[top : top + side, left : left + side] = both[top2 : top2 + side, left2 : left2 + side] = True
            # The first window gets its old content (direction only) plus a new bump, with the mass the two windows
            # held per channel plus an equal share of what the budget has left.
            spare = max(eps**2 - float(current.square().sum()), 0.0) / channels
            mass = (current[:, both].square().sum(1) + spare).sqrt().view(-1, 1, 1)
            signs = _signs((channels, 1, 1), generator, images.device)
            new = signs * _bump(side, generator, images.device) + first / first.flatten(1).norm(dim=1).view(
                -1, 1, 1
            ).add(1e-10)
            new = new / new.flatten(1).norm(dim=1).view(-1, 1, 1).clamp_min(1e-12) * mass
            current[:, top2 : top2 + side, left2 : left2 + side] = 0
            current[:, top : top + side, left : left + side] = new
            current = current * (eps / current.norm().clamp_min(1e-12))
            proposal[row] = (images[row] + current).clamp(0, 1)
        return proposal


def _corner(height: int, width: int, side: int, generator: torch.Generator) -> tuple[int, int]:
    """A random window's top-left corner."""
    top = int(torch.randint(0, height - side + 1, (1,), generator=generator, device=generator.device))
    left = int(torch.randint(0, width - side + 1, (1,), generator=generator, device=generator.device))
    return top, left


def _bump(side: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``[side, side]``, unit ℓ2: two halves of opposite sign, each nested rectangles around its centre whose
    weight falls as 1 / (ring + 1)² (the paper's pseudo-Gaussian square), split across or along at random."""
    halves = [_rings(side // 2, side, device), -_rings(side - side // 2, side, device)]
    bump = torch.cat([h for h in halves if h.numel()])
    if int(torch.randint(0, 2, (), generator=generator, device=generator.device)):
        bump = bump.T
    return bump / bump.norm().clamp_min(1e-12)


def _rings(height: int, width: int, device: torch.device) -> Tensor:
    """``[height, width]``: each pixel weighs Σ 1/(k+1)² over the rings k, counted out from the centre, that
    contain it (the centre pixel is in all of them)."""
    if height == 0:
        return torch.zeros(0, width, device=device)
    rows = (torch.arange(height, device=device) - height // 2).abs()
    columns = (torch.arange(width, device=device) - width // 2).abs()
    ring = torch.maximum(rows[:, None], columns[None, :])
    rings = max(height // 2, width // 2) + 1
    tail = (1 / torch.arange(1, rings + 1, device=device, dtype=torch.float32) ** 2).flip(0).cumsum(0).flip(0)
    return tail[ring]


def _signs(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=device).float() * 2 - 1
