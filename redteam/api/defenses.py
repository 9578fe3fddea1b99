"""What a defense is. Two kinds, both registered in :data:`DEFENSES`:

- an input transform (:class:`InputTransform`): images -> images in front of any target (halftoning, a purifier).
  ``forward`` is the real defense, as deployed; ``surrogate`` is a differentiable stand-in that adaptive attacks
  use in the backward pass where ``forward`` has no useful gradient (BPDA, Athalye et al. 2018); adaptive attacks
  try it and a second opinion (:meth:`InputTransform.surrogates`), worst case per probe. A transform that
  is itself differentiable says so (``differentiable = True``) and is attacked through directly. A transform that
  draws randomness per call says so (``randomised = True``), draws it from the generator it is given (so runs
  redraw the same), and is attacked with EOT.
- a model wrapper (:class:`ModelWrapper`): target -> another target (adversarial fine-tuning).

Settings are ``__init__`` arguments (``--defense name:key=value,...``).
Adding a defense = one file in ``redteam/defenses/`` (or a package's ``redteam.defenses`` entry point).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from kornia.filters import gaussian_blur2d
from torch import Tensor, nn

from redteam.api.targets import Target
from redteam.registry import Registry


def check_defense_class(name: str, defense_class: Any) -> None:
    if not (isinstance(defense_class, type) and issubclass(defense_class, InputTransform | ModelWrapper)):
        raise TypeError(f"defense {name!r}: register a subclass of InputTransform or ModelWrapper")


DEFENSES: Registry[type[InputTransform] | type[ModelWrapper]] = Registry(
    "defense", package="redteam.defenses", group="redteam.defenses", check=check_defense_class
)


class InputTransform(nn.Module, ABC):
    """``[B, 3, H, W]`` images in ``[0, 1]`` -> defended images of the same shape, in ``[0, 1]``."""

    name: ClassVar[str]
    #: Gradients of ``forward`` are meaningful: adaptive attacks differentiate it (no BPDA).
    differentiable: ClassVar[bool] = False
    #: ``forward`` draws randomness on every call (from ``generator``): adaptive attacks average over draws (EOT).
    randomised: ClassVar[bool] = False
    #: What :meth:`surrogate` is, in reports ("identity" unless a transform overrides it).
    surrogate_name: ClassVar[str] = "identity"
    #: It changes what a recogniser's scores mean (a purifier redraws the face), so the undefended threshold says
    #: nothing of the defended system: runs recalibrate it (``--recalibrate``, by default on :attr:`trained_on`).
    moves_threshold: ClassVar[bool] = False
    #: The identity folders a trained transform learnt from (recorded by its training), if known.
    trained_on: str | None = None

    @abstractmethod
    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The defense as deployed; a randomised one draws from ``generator``."""

    def surrogate(self, images: Tensor) -> Tensor:
        """A differentiable approximation of :meth:`forward` for the backward pass (identity by default)."""
        return images

    def fingerprint(self) -> str:
        """A digest of what this transform computes beyond its settings: its weights (a trained purifier's), so a
        retrained defense gives new results rather than old ones."""
        digest = hashlib.sha256(type(self).__qualname__.encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def surrogates(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """The differentiable stand-ins adaptive attacks try in turn, by name: :meth:`surrogate`, and a second
        opinion (the identity; where :meth:`surrogate` is the identity, the identity seen through a slight blur),
        since no single assumed surrogate can be trusted to carry the gradient (Tramèr et al. 2020)."""
        if self.surrogate_name == "identity":
            return {"identity": self.surrogate, "smoothed": smoothed}
        return {self.surrogate_name: self.surrogate, "identity": lambda images: images}

    def bpda(self, images: Tensor, generator: torch.Generator | None = None, surrogate: str | None = None) -> Tensor:
        """``forward``'s value with the gradient of ``surrogate`` (a name of :meth:`surrogates`; default
        :meth:`surrogate`), or ``forward`` itself when it is differentiable."""
        if self.differentiable:
            return self(images, generator)
        smooth = (self.surrogates()[surrogate] if surrogate else self.surrogate)(images)
        return smooth + (self(images, generator) - smooth).detach()


#: The blur, in pixels, of the "smoothed" stand-in: the image as it looks a couple of pixels away.
SMOOTHED_SIGMA = 1.0


def smoothed(images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` -> the same, blurred by a Gaussian of :data:`SMOOTHED_SIGMA` pixels (differentiable)."""
    side = 2 * math.ceil(3 * SMOOTHED_SIGMA) + 1
    return gaussian_blur2d(images, (side, side), (SMOOTHED_SIGMA, SMOOTHED_SIGMA), border_type="reflect")


class ModelWrapper(ABC):
    """A defense that replaces the model itself (e.g. adversarially fine-tuned weights)."""

    name: ClassVar[str]

    def fingerprint(self, target_name: str) -> str:
        """A digest of the weights this wrapper would give ``target_name`` (empty when it has none yet)."""
        return ""

    @abstractmethod
    def wrap(self, target: Target, fresh: Callable[[], Target]) -> Target:
        """The defended target, of the same kind. ``fresh()`` loads another copy of ``target`` to change, so the
        one given stays untouched (an undefended cell may still use it)."""
