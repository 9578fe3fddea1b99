"""Projected gradient ascent (Madry et al. 2018), its momentum variant MIM (Dong et al. 2018), and TI-DIM, MIM with
input diversity (Xie et al. 2019) and translation-invariant gradients (Dong et al. 2019) for transfer; ℓ∞ or ℓ2."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from redteam.api import ATTACKS, Attack, AttackResult, Budget, Objective, objective_gradient


@ATTACKS.register("pgd", "projected gradient ascent on the threat objective (ℓ∞/ℓ2, random start, early stop)")
@dataclass
class PGD(Attack):
    name = "pgd"
    supports_eot = True
    supports_early_stop = True
    positive = ("steps", "step_size", "restarts", "eot")
    effort = ("steps", "restarts", "eot")
    steps: int = 10
    step_size: float = 2.5  # per step, in units of eps / steps (Madry et al.'s 2.5 eps / steps)
    random_start: bool = True
    restarts: int = 1
    momentum: float = 0.0  # MIM's decay factor; 0 is plain PGD
    eot: int = 1  # gradient samples per step, for randomised targets and defenses
    early_stop: bool = True  # stop each sample once it fools the system (off for transfer attacks)
    diversity: float = 0.0  # input diversity: the chance that a step sees the images shrunk and shifted at random
    smoothing: float = 0.0  # translation invariance: σ in pixels of the Gaussian each step's gradient is blurred with

    def __post_init__(self) -> None:
        if not 0 <= self.diversity <= 1:
            raise ValueError(f"diversity is a probability in [0, 1], not {self.diversity!r}")
        if not self.smoothing >= 0:
            raise ValueError(f"smoothing is a blur width in pixels (0: none), not {self.smoothing!r}")

    def __call__(
        self, objective: Objective, images: Tensor, budget: Budget, generator: torch.Generator | None = None
    ) -> AttackResult:
        images = images.detach()
        adversarial = images.clone()
        success = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        best_loss = torch.full((len(images),), -math.inf, device=images.device)  # over every restart's iterates
        steps_used = torch.zeros(len(images), dtype=torch.long, device=images.device)
        step = self.step_size * budget.eps / self.steps
        for _ in range(self.restarts):
            active = torch.nonzero(~success).squeeze(1)
            if len(active) == 0:
                break
            goal, origin = objective.select(active), images[active]
            delta = budget.sample(origin, generator) if self.random_start else torch.zeros_like(origin)
            x = (origin + delta).clamp(0, 1)
            confine = budget.confine(origin)
            velocity = torch.zeros_like(x)
            for _ in range(self.steps):
                view = diverse_view(self.diversity, generator) if self.diversity else None
                evaluation, gradient = objective_gradient(goal, x, self.eot, view)
                steps_used[active] += 1
                keep_best(adversarial, best_loss, active, x, evaluation.loss)
                won = evaluation.success
                if self.early_stop and won.any():  # samples that won stop at this iterate; later steps skip them
                    adversarial[active[won]], success[active[won]] = x[won], True
                    keep = torch.nonzero(~won).squeeze(1)
                    active, goal = active[keep], goal.select(keep)
                    origin, x, gradient, velocity = origin[keep], x[keep], gradient[keep], velocity[keep]
                    if len(active) == 0:
                        break
                    confine = budget.confine(origin)
                if self.smoothing:
                    gradient = translation_invariant(gradient, self.smoothing)
                if self.momentum:
                    l1 = gradient.flatten(1).abs().sum(1).clamp_min(1e-12)
                    velocity = self.momentum * velocity + gradient / l1.view(-1, *([1] * (gradient.dim() - 1)))
                    gradient = velocity
                x = confine(budget.ascent(gradient, step).add_(x))
            if len(active):  # the last step's point competes too: the best iterate is kept, not the last
                with torch.no_grad():
                    last = [goal(x) for _ in range(self.eot)]
                keep_best(adversarial, best_loss, active, x, torch.stack([v.loss for v in last]).mean(0))
                success[active] = torch.stack([v.success for v in last]).all(0)
        return AttackResult(adversarial, steps_used, objective)


def keep_best(best: Tensor, best_loss: Tensor, index: Tensor, x: Tensor, loss: Tensor) -> None:
    """Where ``loss`` (``[n]``, of points ``x`` of samples ``index``) beats ``best_loss``, make ``x`` the best
    point (in place)."""
    better = loss > best_loss[index]
    best[index[better]], best_loss[index[better]] = x[better].detach(), loss[better]


@ATTACKS.register("mim", "momentum iterative method: PGD whose steps follow an accumulated, L1-normalised gradient")
@dataclass
class MIM(PGD):
    name = "mim"
    momentum: float = 1.0
    random_start: bool = False
    step_size: float = 1.0  # eps / steps per step, as in Dong et al.


@ATTACKS.register("ti-dim", "MIM with input diversity and translation-invariant gradients, for transfer (Dong 2019)")
@dataclass
class TIDIM(MIM):
    name = "ti-dim"
    diversity: float = 0.5  # Xie et al.'s p
    smoothing: float = 2.0  # Dong et al.'s 15-tap kernel at 3σ, about 2.3 px


#: Input diversity shrinks the images to between this share of their size and all of it, then pads them back.
SMALLEST_SHARE = 0.9


def diverse_view(probability: float, generator: torch.Generator | None) -> Callable[[Tensor], Tensor]:
    """What one step of input diversity shows the model: with ``probability``, ``[B, 3, H, W] -> [B, 3, H, W]``
    images shrunk by a random share in ``[0.9, 1)`` and placed at a random offset on black (one draw per step for
    the whole batch, as Xie et al. do); otherwise the images as they are. Linear and differentiable in the images."""
    device = generator.device if generator is not None else None
    if float(torch.rand((), generator=generator, device=device)) >= probability:
        return lambda images: images
    share, top, left = torch.rand(3, generator=generator, device=device).tolist()
    share = SMALLEST_SHARE + (1 - SMALLEST_SHARE) * share

    def view(images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        new_height, new_width = max(1, int(share * height)), max(1, int(share * width))
        small = F.interpolate(images, (new_height, new_width), mode="bilinear", align_corners=False, antialias=True)
        down, right = int(top * (height - new_height + 1)), int(left * (width - new_width + 1))
        return F.pad(small, (right, width - new_width - right, down, height - new_height - down))

    return view


def translation_invariant(gradient: Tensor, sigma: float) -> Tensor:
    """``[B, C, H, W]`` gradient blurred per channel by a Gaussian of ``sigma`` pixels (kernel out to 3σ): the
    gradient of the loss averaged over small translations of the image (Dong et al. 2019)."""
    side = 2 * math.ceil(3 * sigma) + 1
    return kornia.filters.gaussian_blur2d(gradient, (side, side), (sigma, sigma), border_type="constant")
