"""What an attack is. Three kinds, all registered in ``ATTACKS``:

- fixed-budget: ``attack(objective, images, budget) -> AttackResult`` (PGD, MIM);
- minimal-perturbation: ``attack(objective, images) -> MinimalResult``, each sample's smallest successful
  perturbation found (C&W, minnorm); one run gives the whole accuracy-perturbation curve;
- campaign: ``attack.run(context) -> CampaignReport``, a whole experiment rather than a per-probe perturbation
  (a printable sticker, a universal perturbation, model inversion, a poisoning backdoor) with its own metrics,
  images and curve.

An attack knows nothing about faces: it maximises a differentiable per-sample objective (``redteam.threats``),
whose ``success`` says when the face system is fooled, and may stop early on samples already won.
Adding an attack = one file in ``attacks/`` with a dataclass registered in ``ATTACKS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import pandas as pd
import torch
from torch import Tensor

from redteam.registry import Registry
from redteam.threats import Evaluation, Objective

if TYPE_CHECKING:
    from redteam.datasets import FaceDataset
    from redteam.targets.base import Target

ATTACKS: Registry[type[Attack] | type[MinimalAttack] | type[Campaign]] = Registry("attack")

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

    def confine(self, origin: Tensor) -> Callable[[Tensor], Tensor]:
        """``x -> `` the nearest image to ``x`` within the budget around ``origin [B, ...]`` and inside ``[0, 1]``
        (for ℓ2: projected onto the ball, then clipped). The ℓ∞ box is computed once, for attacks' inner loops."""
        if self.norm == "linf":
            eps = per_sample(self.eps, origin)
            low, high = (origin - eps).clamp(min=0), (origin + eps).clamp(max=1)
            return lambda x: torch.clamp(x, low, high)
        return lambda x: (origin + self.project(x - origin)).clamp(0, 1)

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
            return gradient.sign().mul_(step)
        return gradient * (step / per_sample(perturbation_size(gradient, "l2").clamp_min(1e-12), gradient))


@dataclass
class AttackResult:
    """``images``: adversarial batch; ``steps``: gradient steps used; ``success``: ``judge``'s verdict on ``images``,
    computed on first access (the engine judges the final images itself, so an attack spends no forward pass on
    them unless someone asks)."""

    images: Tensor
    steps: Tensor
    judge: Objective = field(repr=False)

    @cached_property
    def success(self) -> Tensor:
        with torch.no_grad():
            return self.judge(self.images).success


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
    evaluations, gradient = [], None
    for _ in range(eot):
        x = x.detach().requires_grad_(True)
        evaluation = objective(x)
        (draw,) = torch.autograd.grad(evaluation.loss.sum(), x)
        gradient = draw if gradient is None else gradient.add_(draw)
        evaluations.append(Evaluation(evaluation.loss.detach(), evaluation.success.detach(), evaluation.score.detach()))
    if eot == 1:  # the common case: no averaging passes over the image-sized gradient
        return evaluations[0], gradient
    loss = torch.stack([e.loss for e in evaluations]).mean(0)
    success = torch.stack([e.success for e in evaluations]).all(0)
    score = torch.stack([e.score for e in evaluations]).mean(0)
    return Evaluation(loss, success, score), gradient.div_(eot)


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


@dataclass
class CampaignContext:
    """What ``redteam run`` hands a campaign.

    ``target`` is loaded (eval mode, frozen); ``budgets`` are the ``--eps`` values as the user typed them (the
    campaign says what they mean: /255, area fractions, poison rates) and ``norm`` is ``--norm`` (one of the
    campaign's ``norms``); ``limit`` is ``--limit`` (the campaign says what it caps); ``identity`` is ``--identity``
    (the person the campaign is about, when it is about one); ``load_target(name)`` loads another zoo target on the
    same device (transfer tables). Files the campaign writes go under ``out``. ``progress(total)`` starts a progress
    bar and returns its ``advance(n)``.
    """

    target: Target
    target_name: str
    dataset: FaceDataset
    device: torch.device
    out: Path
    seed: int = 0
    threat: str = "dodging"
    budgets: tuple[float, ...] = ()
    norm: str = "linf"
    limit: int | None = None
    identity: str | None = None
    load_target: Callable[[str], Target] = field(repr=False, default=None)  # type: ignore[assignment]
    progress: Callable[[str, int], Callable[[int], None]] = field(
        repr=False, default=lambda what, total: lambda n: None
    )

    def generator(self, *parts: object) -> torch.Generator:
        """A generator seeded from the run seed and ``parts`` (same seed, same draws)."""
        from redteam.engine import seeded_generator

        return seeded_generator(self.device, self.seed, *parts)


@dataclass
class CampaignReport:
    """What a campaign found.

    ``metrics``: headline numbers (printed, stored in ``run.json``, checked by the regression gate). ``tables``:
    named tables, printed and written as ``<name>.csv`` (e.g. ``transfer``). ``curve``: the campaign's
    accuracy-perturbation view, one row per budget with columns ``eps, accuracy, n`` (and optionally ``norm``
    naming the axis, e.g. ``area``); it joins ``curve.csv`` and ``curve.png``. ``images``: files written under
    the run folder. ``lines``: short findings printed after the metrics.
    """

    metrics: dict[str, float]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    curve: pd.DataFrame | None = None
    images: list[Path] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


class Campaign(ABC):
    """An attack that is a whole experiment against one target over a dataset (advhat, uap, inversion, backdoors).

    A dataclass whose fields are its settings (``--option key=value``, ``--steps``), registered in ``ATTACKS``.
    ``norms`` names its perturbation axis (the first is the default ``--norm``); ``threats`` the threat models it
    supports (the first is the default ``--threat``).
    """

    name: ClassVar[str]
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    threats: ClassVar[tuple[str, ...]] = ("dodging",)
    #: Whether it needs ``--identity``.
    needs_identity: ClassVar[bool] = False

    @abstractmethod
    def run(self, context: CampaignContext) -> CampaignReport:
        """Run the whole experiment and report it."""
