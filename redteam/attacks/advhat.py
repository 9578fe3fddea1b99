"""AdvHat (Komkov & Petiushko 2019): a printable adversarial sticker worn on a hat, against face recognition.

The flat sticker (4:9 like the paper's 400 x 900 px one) is bent over the hat (a parabolic cylinder whose arc
length is the sticker's width), its top pitched back, seen in perspective, and placed on the forehead above the
eyes, scaled by the inter-ocular distance. Its image formation, shooting conditions, optimisation (the paper's two
stages of sign steps on a momentum average) and judgement on held-out photos are the printable accessories' own
(:mod:`redteam.attacks.accessory`); this file says only where and how big the sticker is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from redteam.align import CANONICAL_SIZE
from redteam.api import ATTACKS, Axis
from redteam.attacks.accessory import (
    CANONICAL_EYE_DISTANCE,
    Accessory,
    Surface,
    SurfacePose,
    placed_pose,
    render,
    surface_grid,
)

#: Height / width of the sticker (the paper's is 400 x 900 px).
ASPECT = 4 / 9


def footprint(bend: float, pitch: float, camera_distance: float, size: int = 256) -> float:
    """Image area the worn sticker covers at its nominal pitch and bend, in units of its flat width squared."""
    width = size / 2
    pose = SurfacePose(
        torch.tensor([bend]), torch.tensor([pitch]), torch.tensor([[size / 2, size * 0.75]]), torch.tensor([width]),
        torch.zeros(1),
    )  # fmt: skip
    _, coverage = render(
        torch.ones(1, 3, round(width * ASPECT), round(width)),
        surface_grid(pose, size, Surface(ASPECT, camera_distance)),
    )
    return float(coverage.sum()) / width**2


@ATTACKS.register("advhat", "printable adversarial sticker on a hat (Komkov & Petiushko 2019), EOT; needs --identity")
@dataclass
class AdvHat(Accessory):
    """:class:`~redteam.attacks.accessory.Accessory`'s settings, and ``gap``: inter-ocular distances from the
    eyes' midpoint up to the sticker's bottom edge. ``bend`` defaults to the paper's 0.0013 per pixel of its 900 px
    sticker, ``pitch`` to 17 degrees."""

    name = "advhat"
    noun = "sticker"
    plain_colour = (1.0, 1.0, 1.0)  # blank paper
    #: Sticker areas, fractions of the canonical face image; the paper's sticker covers about 5% of it.
    axes = {"area": Axis("area", "fraction of the face image", "sticker area", (0.0, 0.02, 0.04, 0.06), high=0.5)}

    bend: float = 1.17
    pitch: float = 17.0
    gap: float = 0.6

    def surface(self, area: float) -> tuple[Surface, float]:
        return Surface(ASPECT, self.camera_distance), self.width_for(area)

    def nominal_pose(self, landmarks: Tensor, width: float, surface: Surface) -> SurfacePose:
        return placed_pose(landmarks[:, :2], width, self.gap, self.bend, math.radians(self.pitch))

    def width_for(self, area: float) -> float:
        """Flat sticker width, in inter-ocular distances, whose nominal footprint is ``area`` of a canonical face."""
        unit = footprint(self.bend, math.radians(self.pitch), self.camera_distance)
        return CANONICAL_SIZE / CANONICAL_EYE_DISTANCE * math.sqrt(area / unit)
