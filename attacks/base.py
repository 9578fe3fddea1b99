"""What an attack is: ``attack(objective, images, budget) -> AttackResult``.

An attack knows nothing about faces: it maximises a differentiable per-sample objective (``redteam.threats``)
within a perturbation budget, and may stop early on the samples the objective reports as successful.
Adding an attack = one file in ``attacks/`` with a dataclass registered in ``ATTACKS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from redteam.registry import Registry
from redteam.threats import Objective

ATTACKS: Registry[type[Attack]] = Registry("attack")

Norm = Literal["linf", "l2"]


def perturbation_size(delta: Tensor, norm: Norm) -> Tensor:
    """Per-sample size of ``delta [B, ...]`` -> ``[B]``."""
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


@dataclass(frozen=True)
class Budget:
    """A perturbation budget in image units (pixels in ``[0, 1]``): ``eps = 8/255`` is 8 grey levels in ℓ∞."""

    norm: Norm
    eps: float

    def project(self, delta: Tensor) -> Tensor:
        """Nearest perturbation within the budget (per sample)."""
        if self.norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        size = perturbation_size(delta, "l2").clamp_min(1e-12)
        factor = (self.eps / size).clamp(max=1.0)
        return delta * factor.view(-1, *([1] * (delta.dim() - 1)))

    def sample(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        """A random perturbation inside the budget, shaped like ``like``."""
        if self.norm == "linf":
            uniform = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
            return (2 * uniform - 1) * self.eps
        direction = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        radius = torch.rand(like.shape[0], generator=generator, device=like.device, dtype=like.dtype) * self.eps
        unit = direction / perturbation_size(direction, "l2").clamp_min(1e-12).view(-1, *([1] * (like.dim() - 1)))
        return unit * radius.view(-1, *([1] * (like.dim() - 1)))

    def ascent(self, gradient: Tensor, step: float) -> Tensor:
        """The steepest-ascent step of length ``step`` for this norm."""
        if self.norm == "linf":
            return step * gradient.sign()
        size = perturbation_size(gradient, "l2").clamp_min(1e-12)
        return step * gradient / size.view(-1, *([1] * (gradient.dim() - 1)))


@dataclass
class AttackResult:
    """``images``: adversarial batch; ``success``: the objective's verdict on them; ``steps``: gradient steps used."""

    images: Tensor
    success: Tensor
    steps: Tensor


class Attack(ABC):
    name: ClassVar[str]

    @abstractmethod
    def __call__(
        self, objective: Objective, images: Tensor, budget: Budget, generator: torch.Generator | None = None
    ) -> AttackResult:
        """Maximise ``objective`` around ``images [B, 3, H, W]`` (in ``[0, 1]``) within ``budget``."""
