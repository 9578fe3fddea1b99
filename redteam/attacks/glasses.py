"""Adversarial eyeglass frames (Sharif et al., CCS 2016, "Accessorize to a Crime"): a printed texture on frames that
follow the eyes, for dodging and impersonation.

The frames are a cut-out in the print's coordinates (inter-ocular distances, origin between the lens centres, y
down): two rounded-rectangle lenses (superellipses) centred on the eyes, a rim of width ``t`` around each, a bridge
and the hinges' stubs towards the temples, all with anti-aliased edges. The lenses stay clear whatever ``t`` is,
so a larger area means wider rims, as with the paper's frames. The print is slightly bent around the face and
placed from the eyes (centred on them, ``drop`` below, square to the eye line, scaled by their distance); image
formation, shooting conditions, optimisation and judgement are the printable accessories' own
(:mod:`redteam.attacks.accessory`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from redteam.api import ATTACKS, Axis
from redteam.attacks.accessory import OUTLINE_EDGE, Accessory, Surface, SurfacePose, centred_pose

#: Height / width of the print: room for the lenses and the widest rims.
ASPECT = 0.45
#: Half-width and half-height of each lens, and the superellipse's exponent (2: an ellipse; larger: squarer).
LENS = (0.40, 0.28, 3.0)
#: Rim width limits, in inter-ocular distances (the widest still fits the print).
RIMS = (0.01, 0.18)


def superellipse_inside(x: Tensor, y: Tensor, a: float, b: float, power: float) -> Tensor:
    """Soft inside-ness (1 inside, 0 outside, over :data:`OUTLINE_EDGE`) of ``|x / a|^p + |y / b|^p <= 1``."""
    radius = ((x / a).abs() ** power + (y / b).abs() ** power + 1e-12) ** (1 / power)
    return ((1 - radius) * min(a, b) / OUTLINE_EDGE + 0.5).clamp(0, 1)  # signed distance, to first order at the edge


def box_inside(x: Tensor, y: Tensor, centre: tuple[float, float], half: tuple[float, float]) -> Tensor:
    """Soft inside-ness of an axis-aligned box."""
    distance = torch.maximum((x - centre[0]).abs() - half[0], (y - centre[1]).abs() - half[1])
    return (0.5 - distance / OUTLINE_EDGE).clamp(0, 1)


def frame_outline(grid: Tensor, rim: float, width: float) -> Tensor:
    """Coverage of eyeglass frames with rims ``rim`` wide on a print ``width`` inter-ocular distances wide.

    Args:
        grid: ``[..., 2]`` print coordinates in ``[-1, 1]`` (``grid_sample``'s).
    Returns:
        ``[...]`` in ``[0, 1]``.
    """
    x, y = grid[..., 0] * width / 2, grid[..., 1] * width * ASPECT / 2
    a, b, power = LENS
    lenses = superellipse_inside(x.abs() - 0.5, y, a, b, power)
    rims = superellipse_inside(x.abs() - 0.5, y, a + rim, b + rim, power) * (1 - lenses)
    bar = (0.0, -0.45 * b)  # the bridge and hinges run along the lenses' upper part
    bridge = box_inside(x, y, bar, (0.5, rim / 2)) * (1 - lenses)
    hinge = 0.5 + a + rim / 2
    hinges = box_inside(x.abs(), y, ((hinge + width / 2) / 2, bar[1]), ((width / 2 - hinge) / 2, rim / 2))
    return torch.stack([rims, bridge, hinges]).amax(0)


@ATTACKS.register("glasses", "adversarial eyeglass frames (Sharif et al. 2016), printable, EOT; needs --identity")
@dataclass
class Glasses(Accessory):
    """:class:`~redteam.attacks.accessory.Accessory`'s settings, and ``frame_width`` (the frames' width across the
    face) and ``drop`` (how far the lens centres sit below the eyes), in inter-ocular distances. ``--eps`` are the
    frames' areas; the areas table gives the rim width that covers each (``rim_mm``)."""

    name = "glasses"
    noun = "frames"
    plain_colour = (0.1, 0.1, 0.1)  # black frames
    #: Frame areas, fractions of the canonical face image. Sharif et al.'s frames cover 6.5% of a tight 224 px face
    #: crop: about 1% of this wider frame. The widest rims (:data:`RIMS`) cover just over 2.5%.
    axes = {"area": Axis("area", "fraction of the face image", "frame area", (0.0, 0.01, 0.02), high=0.025)}

    bend: float = 0.5
    frame_width: float = 2.2
    drop: float = 0.05

    def surface(self, area: float) -> tuple[Surface, float]:
        return self._frames(self._rim(area)), self.frame_width

    def nominal_pose(self, landmarks: Tensor, width: float, surface: Surface) -> SurfacePose:
        # The lenses are centred on the print.
        return centred_pose(landmarks[:, :2], width, surface, self.drop, self.bend, math.radians(self.pitch))

    def sizes(self, area: float) -> dict[str, float]:
        return {**super().sizes(area), "rim_mm": self._rim(area) * self.eye_distance_mm}

    def _rim(self, area: float) -> float:
        """The rim width whose frames cover ``area`` of a canonical face image."""
        return self.solved_size(area, lambda rim: self.canonical_coverage(self._frames(rim), self.frame_width), RIMS)

    def _frames(self, rim: float) -> Surface:
        return Surface(ASPECT, self.camera_distance, partial(frame_outline, rim=rim, width=self.frame_width))
