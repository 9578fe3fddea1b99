"""What a defense is. Two kinds, both registered in ``DEFENSES``:

- an input transform (:class:`InputTransform`): images -> images in front of any target (halftoning, a purifier).
  ``forward`` is the real defense, as deployed; ``surrogate`` is a differentiable stand-in that adaptive attacks
  use in the backward pass where ``forward`` has no useful gradient (BPDA, Athalye et al. 2018). A transform that
  is itself differentiable says so (``differentiable = True``) and is attacked through directly. A transform that
  draws randomness per call says so (``randomised = True``) and is attacked with EOT.
- a model wrapper (:class:`ModelWrapper`): target -> another target (adversarial fine-tuning).

Adding a defense = one file in ``defenses/`` with a class registered in ``DEFENSES``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor, nn

from redteam.registry import Registry

DEFENSES: Registry[type] = Registry("defense")


class InputTransform(nn.Module, ABC):
    """``[B, 3, H, W]`` images in ``[0, 1]`` -> defended images of the same shape, in ``[0, 1]``."""

    name: ClassVar[str]
    #: Gradients of ``forward`` are meaningful: adaptive attacks differentiate it (no BPDA).
    differentiable: ClassVar[bool] = False
    #: ``forward`` draws randomness on every call: adaptive attacks average gradients over draws (EOT).
    randomised: ClassVar[bool] = False

    @abstractmethod
    def forward(self, images: Tensor) -> Tensor:
        """The defense as deployed."""

    def surrogate(self, images: Tensor) -> Tensor:
        """A differentiable approximation of :meth:`forward` for the backward pass (identity by default)."""
        return images

    def bpda(self, images: Tensor) -> Tensor:
        """``forward``'s value with ``surrogate``'s gradient (or ``forward`` itself when it is differentiable)."""
        if self.differentiable:
            return self(images)
        smooth = self.surrogate(images)
        return smooth + (self(images) - smooth).detach()


class ModelWrapper(ABC):
    """A defense that replaces the model itself (e.g. adversarially fine-tuned weights)."""

    name: ClassVar[str]

    @abstractmethod
    def wrap(self, target: nn.Module, target_name: str) -> nn.Module:
        """The defended target (same kind: a recogniser stays a recogniser)."""
