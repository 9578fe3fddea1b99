"""Sign-OPT (Cheng et al., ICLR 2020), ℓ2, from decisions alone.

The attack searches over directions θ: ``g(θ)`` is the distance from the original image along θ to the decision
boundary (a binary search, one query per halving). The sign of g's directional derivative along a random direction
``u`` costs one query: is the image at distance ``g(θ)`` along ``θ + βu`` still fooling the system? (yes: g falls
along u). The average of ``samples`` such signed directions estimates g's gradient; a step of ``alpha`` along it,
halved until the step finds a shorter distance, gives the next direction. Probes are attacked one after another
(each estimate is one oracle call of ``samples`` images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from redteam.api import ATTACKS, MinimalQueryAttack, Oracle, QueryResult, bisect_boundary
from redteam.budgets import Norm, perturbation_size, scaled_to

#: Binary searches stop within this share of the distance they search.
PRECISION = 1e-3
#: Step halvings tried before an iteration gives up on its estimate.
HALVINGS = 6


@ATTACKS.register("sign-opt", "Sign-OPT (Cheng et al. 2020): sign-estimated descent over directions (ℓ2), minimal")
@dataclass
class SignOPT(MinimalQueryAttack):
    """``samples``: random directions per gradient estimate (one query each; the paper's 200); ``beta``: how far
    along each the direction is nudged; ``alpha``: the first step along the estimate (halved until it helps)."""

    name = "sign-opt"
    norms = ("l2",)
    positive = ("samples", "beta", "alpha")
    norm: Norm = "l2"
    samples: int = 200
    beta: float = 0.001
    alpha: float = 0.2

    def __call__(self, oracle: Oracle, images: Tensor, starts: Tensor, generator: torch.Generator) -> QueryResult:
        boundary = bisect_boundary(oracle, images, starts, PRECISION)
        for k in range(len(images)):
            if float(perturbation_size(boundary[k : k + 1] - images[k : k + 1], "l2")) > 0:
                self._descend(oracle.narrow([k]), images[k : k + 1], boundary[k : k + 1] - images[k : k + 1], generator)
        return QueryResult(*oracle.best_so_far())

    def _descend(self, oracle: Oracle, image: Tensor, offset: Tensor, generator: torch.Generator) -> None:
        """Shrink one probe's distance to the boundary over directions while its queries last (the oracle keeps the
        best fooling image)."""
        distance = float(offset.norm())
        theta, beta = offset / distance, self.beta
        while int(oracle.remaining()) > 2:
            count = min(self.samples, int(oracle.remaining()) - 2)
            noise = torch.randn((count, *image.shape[1:]), generator=generator, device=image.device)
            nudged = scaled_to(noise.mul(beta).add_(theta), distance, in_place=True).add_(image).clamp_(0, 1)
            fooled = oracle(nudged, [0] * count).fooled
            signs = torch.where(fooled, -1.0, 1.0) / count
            gradient = (signs @ noise.flatten(1)).view_as(image)  # the mean of the signed samples
            step, improved = self.alpha, False
            for _ in range(HALVINGS):
                if int(oracle.remaining()) < 1:
                    return
                candidate = scaled_to(theta - step * gradient)
                if bool(oracle((image + distance * candidate).clamp(0, 1)).fooled[0]):
                    # Fooled at the old distance: the boundary along ``candidate`` is nearer; find it.
                    far = (image + distance * candidate).clamp(0, 1)
                    offset = bisect_boundary(oracle, image, far, PRECISION) - image
                    distance = float(offset.norm())
                    theta, improved = offset / distance, True
                    break
                step /= 2
            if not improved:
                beta /= 2  # a finer estimate next time: the paper shrinks β too as the search stalls
