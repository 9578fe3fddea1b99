"""Perturbation and query budgets: norms, sizes, projections, the units users write them in, and the query counts
at which a query attack's progress is recorded.

Images are float ``[B, 3, H, W]`` in ``[0, 1]`` ("image units"). Users write ℓ∞ budgets in grey levels (/255) and
ℓ2 budgets in image units; :func:`image_units` and :func:`display_eps` convert between the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Norm = Literal["linf", "l2"]
#: Budgets of a per-probe evaluation when none are given, as users write them (/255 for ℓ∞, image units for ℓ2).
DEFAULT_BUDGETS: dict[str, tuple[float, ...]] = {"linf": (0.0, 1.0, 2.0, 4.0, 8.0), "l2": (0.0, 0.25, 0.5, 1.0, 2.0)}
#: Query counts at which a query attack's progress is recorded (log-spaced, as query curves are read).
QUERY_CHECKPOINTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)


def image_units(eps: float, norm: str) -> float:
    """A budget as users write it -> image units (ℓ∞ budgets are written in /255)."""
    return float(eps) / 255 if norm == "linf" else float(eps)


def display_eps(eps: float, norm: str) -> float:
    """A budget in image units -> as users write it (ℓ∞ in grey levels, /255)."""
    return round(eps * 255, 6) if norm == "linf" else eps


def perturbation_size(delta: Tensor, norm: Norm) -> Tensor:
    """Per-sample size of ``delta [B, ...]`` -> ``[B]``."""
    return torch.linalg.vector_norm(delta.flatten(1), math.inf if norm == "linf" else 2, dim=1)


def eight_bit(images: Tensor, origins: Tensor) -> Tensor:
    """``images [B, 3, H, W]`` as a deployed system receives them, 8 bits per channel: each pixel on the nearest of
    the 256 grey levels, except where rounding would move it further from its origin (``origins``, broadcast
    against ``images``) than it already was; there it moves to the level next to the origin's side. So a
    perturbation never grows in any norm (for origins on the levels, as decoded photos are), and an image already on
    the levels is returned as it is (levels are ``k / 255``, computed as a decoder computes them)."""
    return onto_levels(images, grey_levels(origins))


def grey_levels(images: Tensor) -> Tensor:
    """The grey level ``k`` (0-255, as floats) nearest each value of ``images`` in ``[0, 1]``."""
    return images.mul(255).round_()


def onto_levels(images: Tensor, origin_levels: Tensor) -> Tensor:
    """:func:`eight_bit` with the origins' :func:`grey_levels` computed once (an oracle sends many images of a few
    origins)."""
    change = images.mul(255).sub_(origin_levels)
    # The nearest level unless it lies further from the origin, then the one next to the origin's side: truncation
    # towards the origin after a nudge of 1e-3 of a level away from it (an image on the levels, read back as floats,
    # is a hair off them). One pass each, in place: every query an attack sends goes through here. Truncation is
    # spelt floor(|c|) with c's sign, because torch's CPU trunc is not vectorised (9x slower than floor).
    level = change.abs().add_(1e-3).floor_().copysign_(change)
    return level.add_(origin_levels).clamp_(0, 255).div_(255)


def per_sample(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A scalar, or a ``[B]`` tensor reshaped to broadcast against ``like [B, ...]``."""
    return value.view(-1, *([1] * (like.dim() - 1))) if isinstance(value, Tensor) else value


def scaled_to(directions: Tensor, length: float | Tensor = 1.0, in_place: bool = False) -> Tensor:
    """Each sample of ``directions [B, ...]`` scaled to ℓ2 length ``length`` (a scalar or ``[B]``); ``in_place``
    overwrites ``directions`` (a query attack's samples, where a copy per query costs)."""
    factor = per_sample(length / perturbation_size(directions, "l2").clamp_min(1e-12), directions)
    return directions.mul_(factor) if in_place else directions * factor


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
        return scaled_to(direction, radius)

    def ascent(self, gradient: Tensor, step: float | Tensor) -> Tensor:
        """The steepest-ascent step of length ``step`` (scalar or ``[B]``) for this norm."""
        if self.norm == "linf":
            return gradient.sign().mul_(per_sample(step, gradient))
        return scaled_to(gradient, step)
