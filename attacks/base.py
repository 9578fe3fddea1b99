"""What an attack is. Two kinds, both registered in ``ATTACKS``:

- fixed-budget: ``attack(objective, images, budget) -> AttackResult`` (PGD, MIM);
- minimal-perturbation: ``attack(objective, images) -> MinimalResult``, each sample's smallest successful
  perturbation found (C&W, minnorm); one run gives the whole accuracy-perturbation curve.

An attack knows nothing about faces: it maximises a differentiable per-sample objective (``redteam.threats``),
whose ``success`` says when the face system is fooled, and may stop early on samples already won.
Adding an attack = one file in ``attacks/`` with a dataclass registered in ``ATTACKS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from redteam.registry import Registry
from redteam.threats import Evaluation, Objective

ATTACKS: Registry[type[Attack] | type[MinimalAttack]] = Registry("attack")

Norm = Literal["linf", "l2"]


def perturbation_size(delta: Tensor, norm: Norm) -> Tensor:
    """Per-sample size of ``delta [B, ...]`` -> ``[B]``."""
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def per_sample(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A scalar, or a ``[B]`` tensor reshaped to broadcast against ``like [B, ...]``."""
    return value.view(-1, *([1] * (like.dim() - 1))) if isinstance(value, Tensor) else value


@dataclass(frozen=True)
class Budget:
    """A perturbation budget in image units (pixels in ``[0, 1]``): ``eps = 8/255`` is 8 grey levels in ℓ∞.
    ``eps`` may also be a ``[B]`` tensor, one budget per sample (minimal-perturbation attacks)."""

    norm: Norm
    eps: float | Tensor

    def project(self, delta: Tensor) -> Tensor:
        """Nearest perturbation within the budget (per sample)."""
        if self.norm == "linf":
            eps = per_sample(self.eps, delta)
            return torch.clamp(delta, -eps, eps) if isinstance(eps, Tensor) else delta.clamp(-eps, eps)
        size = perturbation_size(delta, "l2").clamp_min(1e-12)
        return delta * per_sample((self.eps / size).clamp(max=1.0), delta)

    def sample(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        """A random perturbation inside the budget, shaped like ``like``."""
        if self.norm == "linf":
            uniform = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
            return (2 * uniform - 1) * per_sample(self.eps, like)
        direction = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        radius = torch.rand(like.shape[0], generator=generator, device=like.device, dtype=like.dtype) * self.eps
        return (
            direction / per_sample(perturbation_size(direction, "l2").clamp_min(1e-12), like) * per_sample(radius, like)
        )

    def ascent(self, gradient: Tensor, step: float | Tensor) -> Tensor:
        """The steepest-ascent step of length ``step`` (scalar or ``[B]``) for this norm."""
        step = per_sample(step, gradient)
        if self.norm == "linf":
            return step * gradient.sign()
        return step * gradient / per_sample(perturbation_size(gradient, "l2").clamp_min(1e-12), gradient)


@dataclass
class AttackResult:
    """``images``: adversarial batch; ``success``: the objective's verdict on them; ``steps``: gradient steps used."""

    images: Tensor
    success: Tensor
    steps: Tensor


@dataclass
class MinimalResult:
    """``images``: the smallest adversarial example found per sample (the input where none was found);
    ``size``: its perturbation size in the attack's norm (``inf`` where none was found); ``steps``: gradient steps."""

    images: Tensor
    size: Tensor
    steps: Tensor


def objective_gradient(objective: Objective, x: Tensor, eot: int = 1) -> tuple[Evaluation, Tensor]:
    """Loss gradient w.r.t. ``x`` averaged over ``eot`` evaluations (expectation over transformation, for
    randomised targets and defenses). The returned evaluation averages the losses; a sample counts as a success
    only if every draw fooled the system."""
    evaluations, gradient = [], torch.zeros_like(x)
    for _ in range(eot):
        x = x.detach().requires_grad_(True)
        evaluation = objective(x)
        gradient += torch.autograd.grad(evaluation.loss.sum(), x)[0]
        evaluations.append(evaluation)
    loss = torch.stack([e.loss.detach() for e in evaluations]).mean(0)
    success = torch.stack([e.success.detach() for e in evaluations]).all(0)
    score = torch.stack([e.score.detach() for e in evaluations]).mean(0)
    return Evaluation(loss, success, score), gradient / eot


class Attack(ABC):
    """A fixed-budget attack."""

    name: ClassVar[str]
    #: Norms it can work in; the first is the default of `redteam run`.
    norms: ClassVar[tuple[Norm, ...]] = ("linf", "l2")

    @abstractmethod
    def __call__(
        self, objective: Objective, images: Tensor, budget: Budget, generator: torch.Generator | None = None
    ) -> AttackResult:
        """Maximise ``objective`` around ``images [B, 3, H, W]`` (in ``[0, 1]``) within ``budget``."""


class MinimalAttack(ABC):
    """A minimal-perturbation attack: accuracy at any budget ε is the fraction of samples whose ``size > ε``."""

    name: ClassVar[str]
    norms: ClassVar[tuple[Norm, ...]] = ("linf", "l2")
    norm: Norm

    @abstractmethod
    def __call__(self, objective: Objective, images: Tensor, generator: torch.Generator | None = None) -> MinimalResult:
        """Find, per sample, the smallest perturbation of ``images [B, 3, H, W]`` that makes ``objective`` succeed."""
