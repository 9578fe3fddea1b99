"""Printable accessories against face recognition: what ``advhat``, ``glasses`` and ``mask`` share.

An accessory is a flat printed texture (``[1, 3, h, w]`` in ``[0, 1]``) cut to an outline and worn on the face. Its
image formation, differentiable in the texture: the flat print is bent over a parabolic cylinder ``z = bend x^2``
(its arc length is the print's width), its top pitched back, seen in perspective, placed from the face's landmarks
and scaled by the inter-ocular distance, and composited with its coverage onto the face image the target sees. The
whole chain is one inverse map (each face pixel -> the point of the flat print it sees: a ray-surface intersection
in closed form), so the geometry is exact and one ``grid_sample`` carries the gradient; the outline is a function of
the print's coordinates, evaluated at that same point, so its edges are exact at any resolution.

The texture is optimised over random shooting conditions (expectation over transformation): bend, pitch, shifts,
scale and roll of the accessory, the printer's colour range, alignment jitter of the whole face, lighting and
colour, blur, sensor and JPEG-like noise; with total-variation smoothing and an optional non-printability term
(Sharif et al. 2016), in AdvHat's two stages of sign steps on a momentum average (5/255 with momentum 0.9, then
1/255 with 0.995, each stage ending when its loss stops rising). It is judged on photos of the wearer that the
optimisation never saw, beside two baselines of the same outline: a random texture and a plain one.

An accessory campaign (:class:`Accessory`) says only where its print sits on a face (:meth:`Accessory.nominal_pose`),
its outline and size for each value of the area axis (:meth:`Accessory.surface`).
"""

from __future__ import annotations

import math
import random
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import kornia.enhance as colour
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine
from kornia.losses import total_variation
from PIL import Image
from torch import Tensor

from redteam.align import CANONICAL_LANDMARKS, CANONICAL_SIZE
from redteam.api import Campaign, CampaignContext, CampaignReport, FaceDetector, FaceRecognizer
from redteam.errors import DataError, RedteamError, UnknownNameError
from redteam.evidence import as_saved
from redteam.plots import face_grid
from redteam.results import SYSTEM_STAGES, stage_shares, tally
from redteam.threats import Objective, VerificationObjective

#: Inter-ocular distance of the canonical frame, in its pixels: accessory areas are fractions of that frame.
CANONICAL_EYE_DISTANCE = float(CANONICAL_LANDMARKS[1, 0] - CANONICAL_LANDMARKS[0, 0])
#: Darkest and lightest ink a printer reaches (per channel), for the non-printability score's palette.
PRINT_GAMUT = (0.08, 0.92)
#: Width over which an outline's edge fades, in inter-ocular distances (about one canonical face pixel).
OUTLINE_EDGE = 0.025
#: AdvHat's two stages: (sign-step size, momentum of the gradient average).
STAGES = ((5 / 255, 0.9), (1 / 255, 0.995))

#: An outline: print coordinates ``[..., 2]`` (``grid_sample``'s, ``[-1, 1]`` across the print) -> coverage
#: ``[...]`` in ``[0, 1]``.
Outline = Callable[[Tensor], Tensor]


@dataclass
class SurfacePose:
    """Where and how the print is worn, per sample.

    ``bend``: rate ``c`` of the surface ``z = c x^2`` (``x``, ``z`` in print widths), ``[B]``;
    ``pitch``: radians the print's top leans away from the camera, ``[B]``; ``anchor``: pixel position of the
    print's bottom centre in the image, ``[B, 2]``; ``width``: pixels per (flat) print width, ``[B]``;
    ``roll``: radians from the image's x axis to the print's horizontal axis (y points down), ``[B]``.
    """

    bend: Tensor
    pitch: Tensor
    anchor: Tensor
    width: Tensor
    roll: Tensor


@dataclass(frozen=True)
class Surface:
    """The print's shape: height / width of its flat rectangle (``aspect``), the camera's distance in print widths,
    and its outline inside that rectangle (``None``: all of it)."""

    aspect: float
    camera_distance: float
    outline: Outline | None = None


def arc_length(x: Tensor, bend: Tensor) -> Tensor:
    """Arc length of ``z = bend x^2`` from its apex to ``x`` (broadcast): the flat print's coordinate there."""
    k = 2 * bend.clamp_min(1e-6)
    return 0.5 * x * torch.sqrt(1 + (k * x) ** 2) + torch.asinh(k * x) / (2 * k)


def surface_grid(pose: SurfacePose, size: int, surface: Surface, stride: int = 4) -> Tensor:
    """For each pixel of a ``size`` x ``size`` image, the point of the flat print it sees.

    Undoes the placement (translation, roll, scale), then intersects the pixel's ray with the pitched parabolic
    surface seen by a pinhole camera ``surface.camera_distance`` print widths away (a quadratic in the ray's depth;
    the near root), then unrolls the bend (arc length). The map is smooth, so it is solved every ``stride`` pixels
    and interpolated bilinearly in between (at 4: 16x cheaper, within 0.15 print pixels of the exact map).

    Args:
        pose: ``B`` poses.
        size: image side in pixels.
        surface: the print's aspect and the camera distance.
        stride: pixels between exact solutions (1: every pixel).
    Returns:
        ``[B, size, size, 2]`` ``grid_sample`` coordinates in the print: inside it where both are in ``[-1, 1]``.
    """
    samples = -(-(size - 1) // stride) + 1
    line = torch.linspace(0, size - 1, samples, device=pose.width.device, dtype=pose.width.dtype)  # corners included
    pixels = torch.stack(torch.meshgrid(line, line, indexing="xy"), dim=-1)  # [n, n, 2] as (x, y)
    offset = pixels - pose.anchor[:, None, None]
    roll, width = pose.roll[:, None, None], pose.width[:, None, None]
    bend, pitch = pose.bend[:, None, None], pose.pitch[:, None, None]
    cos, sin, depth = pitch.cos(), pitch.sin(), surface.camera_distance
    half = surface.aspect / 2
    # The image plane in print widths, origin at the projection of the print's centre (which is the anchor shifted
    # by the projected half-height).
    bottom = rise(surface, pitch)
    u = (roll.cos() * offset[..., 0] + roll.sin() * offset[..., 1]) / width
    v = (-roll.sin() * offset[..., 0] + roll.cos() * offset[..., 1]) / width + bottom
    # Surface point (x, y, bend x^2) pitched: y' = y cos + bend x^2 sin, z' = bend x^2 cos - y sin; the ray through
    # (u, v) meets it at x = u t, y' = v t, z' + depth = depth t, i.e. bend u^2 t^2 - (v sin + depth cos) t + depth
    # cos = 0, solved in the form that stays finite as bend u^2 -> 0.
    # A ray that misses the surface passes beyond |x| = sqrt(depth cos / bend), far outside the print's |x| < 1/2;
    # clamping its discriminant keeps it there (and the map continuous, so it interpolates safely).
    b, c = v * sin + depth * cos, depth * cos
    t = 2 * c / (b + (b**2 - 4 * bend * u**2 * c).clamp_min(0).sqrt())
    x = u * t
    y = (v * t - bend * x**2 * sin) / cos
    grid = torch.stack([2 * arc_length(x, bend), y / half], dim=1)
    if samples != size:
        grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)
    return grid.permute(0, 2, 3, 1)


def render(texture: Tensor, grid: Tensor, outline: Outline | None = None) -> tuple[Tensor, Tensor]:
    """Sample the texture where each pixel sees it.

    Args:
        texture: ``[1, 3, h, w]`` or ``[B, 3, h, w]`` in ``[0, 1]``.
        grid: ``[B, S, S, 2]`` from :func:`surface_grid`.
        outline: the print's cut-out shape (``None``: the whole rectangle).
    Returns:
        colour ``[B, 3, S, S]`` premultiplied by coverage, and coverage ``[B, 1, S, S]`` in ``[0, 1]`` (soft,
        anti-aliased edges).
    """
    layers = torch.cat([texture, torch.ones_like(texture[:, :1])], dim=1).expand(len(grid), -1, -1, -1)
    seen = F.grid_sample(layers, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if outline is not None:
        seen = seen * outline(grid)[:, None]
    return seen[:, :3], seen[:, 3:]


def wear(faces: Tensor, texture: Tensor, pose: SurfacePose, surface: Surface) -> Tensor:
    """Faces ``[B, 3, S, S]`` wearing ``texture`` (``[1 or B, 3, h, w]``) at ``pose`` -> ``[B, 3, S, S]``."""
    painted, coverage = render(texture, surface_grid(pose, faces.shape[-1], surface), surface.outline)
    return (faces * (1 - coverage) + painted).clamp(0, 1)  # exact in theory; rounding strays by 1e-7


def coverage_of(texture: Tensor, pose: SurfacePose, size: int, surface: Surface) -> Tensor:
    """``[B, 1, size, size]``: how much of each pixel the worn print of ``texture``'s resolution covers."""
    return render(torch.ones_like(texture), surface_grid(pose, size, surface), surface.outline)[1]


def blank_texture(surface: Surface, width: float, size: int, device: torch.device | str = "cpu") -> Tensor:
    """A mid-grey texture ``[1, 3, h, w]`` ``width`` inter-ocular distances wide, with one pixel per face-image pixel
    on a ``size`` x ``size`` canonical face (finer is invisible to the target)."""
    pixels = width * CANONICAL_EYE_DISTANCE * size / CANONICAL_SIZE
    return torch.full((1, 3, max(2, round(pixels * surface.aspect)), max(2, round(pixels))), 0.5, device=device)


def solve_area(covered: Callable[[float], float], area: float, bounds: tuple[float, float], steps: int = 30) -> float:
    """The value in ``bounds`` of a size parameter (a rim's width, a print's width) at which ``covered`` (the share
    of a canonical face image covered, increasing in it) is ``area``, by bisection; a bound where ``area`` is out of
    reach."""
    low, high = bounds
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if covered(middle) < area else (low, middle)
    return (low + high) / 2


def rise(surface: Surface, pitch: Tensor) -> Tensor:
    """How far above its bottom edge the print's centre is seen at ``pitch`` (radians, any shape), in print widths."""
    depth, half = surface.camera_distance, surface.aspect / 2
    return depth * half * pitch.cos() / (depth - half * pitch.sin())


def placed_pose(
    eyes: Tensor, width: Tensor | float, lift: Tensor | float, bend: float, pitch: float, origin: Tensor | None = None
) -> SurfacePose:
    """The nominal pose: the print's bottom centre ``lift`` inter-ocular distances above ``origin`` (below where
    negative; by default the eyes' midpoint), square to the eye line, ``width`` inter-ocular distances wide.

    Args:
        eyes: ``[B, 2, 2]`` pixel positions of the left and right eye (as seen in the image).
        width, lift: in inter-ocular distances (floats or ``[B]``).
        bend, pitch: the surface's parabola rate (per print width) and pitch (radians).
        origin: ``[B, 2]`` pixel positions.
    """
    line = eyes[:, 1] - eyes[:, 0]
    distance = line.norm(dim=1)
    up = torch.stack([line[:, 1], -line[:, 0]], dim=1) / distance[:, None]  # perpendicular, towards the forehead
    return SurfacePose(
        bend=torch.full_like(distance, bend),
        pitch=torch.full_like(distance, pitch),
        anchor=(eyes.mean(1) if origin is None else origin) + (lift * distance)[:, None] * up,
        width=width * distance,
        roll=torch.atan2(line[:, 1], line[:, 0]),
    )


def centred_pose(
    eyes: Tensor, width: float, surface: Surface, below: float, bend: float, pitch: float, origin: Tensor | None = None
) -> SurfacePose:
    """:func:`placed_pose` by the print's centre (at ``pitch``, radians): ``below`` inter-ocular distances under
    ``origin`` (by default the eyes' midpoint)."""
    lift = -(rise(surface, torch.tensor(pitch)).item() * width + below)
    return placed_pose(eyes, width, lift, bend, pitch, origin)


def non_printability(texture: Tensor, levels: int = 3) -> Tensor:
    """Sharif et al.'s non-printability score of ``[1, 3, h, w]``: mean over pixels of the product of distances to
    the printable palette (here the ``levels^3`` colours of a grid spanning :data:`PRINT_GAMUT`)."""
    shades = torch.linspace(*PRINT_GAMUT, levels, device=texture.device, dtype=texture.dtype)
    palette = torch.cartesian_prod(shades, shades, shades)  # [levels^3, 3]
    pixels = texture.flatten(2).transpose(1, 2)  # [1, h w, 3]
    return torch.cdist(pixels, palette[None]).prod(dim=-1).mean()


def jpeg_like_noise(shape: torch.Size, strength: Tensor, generator: torch.Generator) -> Tensor:
    """Noise like JPEG's: every 8 x 8 block's DCT coefficients off by up to half a quantisation step that grows with
    frequency (the uniform quantisation-error model), image-independent so its cost is negligible.

    Args:
        shape: ``[B, C, H, W]``.
        strength: ``[B]`` pixel standard deviation of the noise.
    Returns:
        ``[B, C, H, W]`` noise.
    """
    batch, channels, height, width = shape
    device, dtype = strength.device, strength.dtype
    frequency = torch.arange(8, device=device, dtype=dtype)
    basis = torch.cos(math.pi * (2 * frequency[None] + 1) * frequency[:, None] / 16)  # [k, n], orthonormal below
    basis = basis * torch.where(frequency == 0, math.sqrt(1 / 8), math.sqrt(2 / 8))[:, None]
    step = 1 + frequency[:, None] + frequency[None]  # coarser at higher frequencies, as JPEG's tables are
    step = step / step.square().mean().sqrt()
    blocks = (-(-height // 8), -(-width // 8))
    error = torch.rand(batch, channels, *blocks, 8, 8, generator=generator, device=device, dtype=dtype) - 0.5
    error = error * step * math.sqrt(12) * strength.view(-1, 1, 1, 1, 1, 1)  # unit variance before strength
    pixels = (basis.T @ error @ basis).transpose(3, 4)  # [B, C, rows, 8, columns, 8]
    return pixels.reshape(batch, channels, blocks[0] * 8, blocks[1] * 8)[..., :height, :width]


def photograph(
    faces: Tensor,
    texture: Tensor,
    pose: SurfacePose,
    surface: Surface,
    strength: float,
    generator: torch.Generator,
) -> Tensor:
    """Faces wearing the print under random shooting conditions (one draw per face), differentiable in it.

    ``strength`` scales every range (1: the defaults below; 0: no randomness, the nominal pose).

    Args:
        faces: ``[B, 3, S, S]``; texture: ``[1, 3, h, w]``; pose: the nominal poses.
    Returns:
        ``[B, 3, S, S]`` in ``[0, 1]``.
    """
    batch, size, device, dtype = len(faces), faces.shape[-1], faces.device, faces.dtype

    def amount(most: float, *shape: int) -> Tensor:  # uniform in [0, most * strength]
        return torch.rand(batch, *shape, generator=generator, device=device, dtype=dtype) * most * strength

    def spread(most: float, *shape: int) -> Tensor:  # uniform in [-most * strength, most * strength]
        return 2 * amount(most, *shape) - most * strength

    worn = SurfacePose(
        bend=pose.bend * (1 + spread(0.2)),
        pitch=pose.pitch + spread(math.radians(4)),
        anchor=pose.anchor + spread(0.03, 2) * pose.width[:, None],
        width=pose.width * (1 + spread(0.05)),
        roll=pose.roll + spread(math.radians(3)),
    )
    # The printer's range: its darkest ink is not black, its paper not pure white.
    floor, ceiling = amount(0.08, 3, 1, 1), 1 - amount(0.1, 3, 1, 1)
    photo = wear(faces, floor + (ceiling - floor) * texture, worn, surface)
    # Light: brightness, exposure, saturation and white balance (all linear: cheap to differentiate).
    photo = colour.adjust_brightness(photo, spread(0.08), clip_output=False)
    photo = colour.adjust_contrast(photo, 1 + spread(0.15), clip_output=False).clamp(0, 1)
    photo = colour.adjust_saturation_with_gray_subtraction(photo, 1 + spread(0.2)) * (1 + spread(0.05, 3, 1, 1))
    # Camera: focus blur, sensor noise, compression.
    sigma = amount(1.0, 1).expand(batch, 2).clamp_min(0.05)
    photo = gaussian_blur2d(photo, (5, 5), sigma)
    photo = photo + torch.randn(photo.shape, generator=generator, device=device, dtype=dtype) * amount(0.02, 1, 1, 1)
    photo = photo + jpeg_like_noise(photo.shape, amount(0.02), generator)
    # The recogniser's face alignment is never exact: a small rotation, scale and shift of the whole face.
    centre = faces.new_full((batch, 2), (size - 1) / 2)
    alignment = get_rotation_matrix2d(centre, spread(2.0), (1 + spread(0.04, 1)).expand(batch, 2))
    alignment[:, :, 2] += spread(0.01 * size, 2)
    photo = warp_affine(photo, alignment, (size, size), padding_mode="border", align_corners=True)
    return photo.clamp(0, 1)


def decided_right(similarity: Tensor, threshold: float, impersonate: bool) -> Tensor:
    """``[N]`` bool: the face system decides correctly (a match with one's own enrolment; no match with a victim)."""
    return similarity < threshold if impersonate else similarity >= threshold


@dataclass
class Photos:
    """Face images ``[N, 3, S, S]`` of one person, their five landmarks ``[N, 5, 2]`` (pixels) and file names."""

    images: Tensor
    landmarks: Tensor
    names: list[str]


@dataclass
class Outcome:
    """One accessory size judged on the held-out photos.

    ``width``: the print's flat width in inter-ocular distances; ``worn`` / ``noisy`` / ``plain``: the held-out
    faces ``[N, 3, S, S]`` wearing it, a uniform-noise print and a plain one of the same outline, at the nominal
    pose; ``similarity`` / ``noise_similarity`` / ``plain_similarity``: the target's, ``[N]``; ``covered``: the
    share of the face images the print covers; ``steps``: optimisation steps taken.
    """

    area: float
    width: float
    texture: Tensor
    worn: Tensor
    noisy: Tensor
    plain: Tensor
    similarity: Tensor
    noise_similarity: Tensor
    plain_similarity: Tensor
    covered: float
    steps: int


@dataclass
class Accessory(Campaign):
    """A printable accessory for one wearer (see the module docstring). The settings, for ``--option key=value``:

    ``steps`` caps the two stages together; ``draws``: random shooting conditions per optimisation photo and step;
    ``train_photos`` of the wearer are optimised on (one more is the dodging enrolment, the rest are held out);
    ``victim``: the identity to impersonate (default: one drawn from the seed); ``bend`` (per print width),
    ``pitch`` (degrees) and ``camera_distance`` (print widths) shape the worn print; ``jitter`` scales every
    random shooting condition (0: none); ``tv_weight`` and ``nps_weight`` weigh smoothness and printability;
    ``window``: steps over which a stage's loss must still rise; ``eye_distance_mm`` turns the print into a
    printed size; ``print_width``: the PNG's width in pixels.
    """

    #: What the print is called in tables and metrics (``sticker``: ``sticker_similarity``, ...).
    noun: ClassVar[str]
    #: Colour of the plain print of the same outline (a baseline beside the random texture).
    plain_colour: ClassVar[tuple[float, float, float]]
    threats: ClassVar[tuple[str, ...]] = ("dodging", "impersonation")
    needs_identity = True

    steps: int = 80
    draws: int = 4
    train_photos: int = 4
    victim: str | None = None
    bend: float = 0.0
    pitch: float = 0.0
    camera_distance: float = 5.0
    jitter: float = 1.0
    tv_weight: float = 0.5
    nps_weight: float = 0.0
    window: int = 20
    eye_distance_mm: float = 63.0
    print_width: int = 900

    def __post_init__(self) -> None:
        if min(self.steps, self.draws, self.train_photos, self.window, self.print_width) < 1:
            raise ValueError("steps, draws, train_photos, window and print_width must be at least 1")
        self._solved: dict[float, float] = {}  # area -> size parameter (:meth:`solved_size`)

    def solved_size(self, area: float, covered: Callable[[float], float], bounds: tuple[float, float]) -> float:
        """:func:`solve_area` for ``area``, once per area (solving takes 30 renders): the size parameter (a rim's
        width, a print's width) within ``bounds`` at which ``covered`` reaches ``area``."""
        if area not in self._solved:
            self._solved[area] = solve_area(covered, area, bounds)
        return self._solved[area]

    @abstractmethod
    def surface(self, area: float) -> tuple[Surface, float]:
        """The print covering ``area`` of a canonical face image: its shape and its flat width in inter-ocular
        distances."""

    @abstractmethod
    def nominal_pose(self, landmarks: Tensor, width: float, surface: Surface) -> SurfacePose:
        """Where the print of ``width`` inter-ocular distances sits on faces with five ``landmarks`` ``[B, 5, 2]``
        (pixels; MTCNN's order), before any random shooting condition."""

    def run(self, context: CampaignContext) -> CampaignReport:
        target, impersonate, noun = context.target, context.threat == "impersonation", self.noun
        assert isinstance(target, FaceRecognizer)  # the engine checked the threat's task against the target
        areas = list(context.budgets)
        enrolment, train, held_out = self._split(context)
        victim = self._victim(context) if impersonate else None
        enrolled_photo = victim[1] if victim else enrolment
        assert enrolled_photo is not None  # dodging: _split set the enrolment photo aside
        enrolled = context.load([enrolled_photo])
        trained_on, held = (self._photos(context, indices) for indices in (train, held_out))
        with torch.no_grad():
            reference = target.embed(enrolled)
        clean = self._similarity(target, held.images, reference)
        outcomes = [
            Outcome(
                **context.stage(
                    f"area {area:g}", partial(self._stored_attack, context, trained_on, held, reference, area)
                )
            )
            for area in areas[1:]
        ]
        final = outcomes[-1]  # the largest print is the one reported, printed and transferred

        def right(similarity: Tensor) -> Tensor:
            return decided_right(similarity, target.threshold, impersonate)

        levels = [(0.0, 0.0, clean, clean, clean, 0)] + [
            (o.area, o.covered, o.noise_similarity, o.plain_similarity, o.similarity, o.steps) for o in outcomes
        ]
        areas_table = pd.DataFrame(
            [
                {
                    "area": area,
                    "covered": covered,
                    "clean": clean.mean().item(),
                    "random": noisy.mean().item(),
                    "plain": plain.mean().item(),
                    noun: worn.mean().item(),
                    "random_accuracy": right(noisy).float().mean().item(),
                    "plain_accuracy": right(plain).float().mean().item(),
                    "accuracy": right(worn).float().mean().item(),
                    "steps": steps,
                    **(self.sizes(area) if area else {}),
                }
                for area, covered, noisy, plain, worn, steps in levels
            ]
        )
        per_photo = pd.DataFrame(
            {
                "photo": held.names,
                "clean": clean.tolist(),
                "random": final.noise_similarity.tolist(),
                "plain": final.plain_similarity.tolist(),
                noun: final.similarity.tolist(),
                "fooled": (~right(final.similarity)).tolist(),
            }
        )
        self._record_evidence(context, held, final, reference, victim[0] if victim else context.identity)
        transfer, skipped = self._transfer(context, enrolled, held, final)
        clean_stages = self._verdicts(target, held.images, clean)
        worn_stages = self._verdicts(target, final.worn, final.similarity)
        metrics = {
            "area": final.area,
            "covered": final.covered,
            "threshold": target.threshold,
            "clean_similarity": clean.mean().item(),
            "random_similarity": final.noise_similarity.mean().item(),
            "plain_similarity": final.plain_similarity.mean().item(),
            f"{noun}_similarity": final.similarity.mean().item(),
            f"{noun}_similarity_shooting": self._shooting(context, held, final, reference),
            "clean_accuracy": right(clean).float().mean().item(),
            "random_accuracy": right(final.noise_similarity).float().mean().item(),
            "plain_accuracy": right(final.plain_similarity).float().mean().item(),
            f"{noun}_accuracy": right(final.similarity).float().mean().item(),
            "held_out_photos": len(held.names),
            "train_photos": len(trained_on.names),
        }
        system_lines = []
        if clean_stages is not None and worn_stages is not None:  # a face system: where it stopped each photo
            per_photo["stage"] = worn_stages
            metrics |= stage_shares({"clean": clean_stages, noun: worn_stages})
            system_lines.append(
                f"where {context.target_name} stopped the held-out photos wearing the {noun}: "
                f"{tally(pd.Series(worn_stages), SYSTEM_STAGES)} (without it: "
                f"{tally(pd.Series(clean_stages), SYSTEM_STAGES)})"
            )
        enrolled_as = f"{victim[0]}'s enrolment photo" if victim else "their enrolment photo"
        lines = [
            f"held-out photos of {context.identity} against {enrolled_as}: mean similarity {clean.mean():.3f} with "
            f"no {noun}, {final.noise_similarity.mean():.3f} with a random one, {final.plain_similarity.mean():.3f} "
            f"with a plain one, {final.similarity.mean():.3f} with the adversarial one (threshold "
            f"{target.threshold:.4f}); {int(per_photo['fooled'].sum())} of {len(held.names)} photos now cross it "
            f"({int((~right(clean)).sum())} without the {noun})",
            f"{self.print_line(final.area)}; it covers {final.covered:.1%} of the face image; optimised on "
            f"{len(trained_on.names)} photos x {self.draws} shooting conditions for {final.steps} steps",
            *system_lines,
            *skipped,
        ]
        return CampaignReport(
            metrics=metrics,
            tables={"transfer": transfer, "held_out": per_photo, "areas": areas_table},
            curve=areas_table[["area", "accuracy"]].rename(columns={"area": "eps"}).assign(n=len(held.names)),
            images=[
                self._save_print(context.out, final.texture, final.area),
                self._save_faces(context, held, final, clean),
            ],
            lines=lines,
        )

    def printed_size_mm(self, area: float) -> tuple[float, float]:
        """Width and height of the printed accessory covering ``area``, in mm."""
        surface, width = self.surface(area)
        return width * self.eye_distance_mm, width * self.eye_distance_mm * surface.aspect

    def canonical_coverage(self, surface: Surface, width: float) -> float:
        """Share of a canonical face image that a print of ``surface`` and ``width`` covers at its nominal pose."""
        pose = self.nominal_pose(CANONICAL_LANDMARKS[None], width, surface)
        texture = blank_texture(surface, width, CANONICAL_SIZE)
        return coverage_of(texture, pose, CANONICAL_SIZE, surface).mean().item()

    def print_line(self, area: float) -> str:
        """The printed accessory covering ``area``, in words: its size, the file and its dpi."""
        width_mm, height_mm = self.printed_size_mm(area)
        return (
            f"{self.noun}: {width_mm / 10:.1f} x {height_mm / 10:.1f} cm printed, for a face with "
            f"{self.eye_distance_mm:g} mm between the eye centres ({self.name}-{self.noun}.png, "
            f"{self.print_width * 25.4 / width_mm:.0f} dpi)"
        )

    def sizes(self, area: float) -> dict[str, float]:
        """The printed accessory covering ``area``, in mm, for the areas table (an accessory may add its parts')."""
        width_mm, height_mm = self.printed_size_mm(area)
        return {"width_mm": width_mm, "height_mm": height_mm}

    def photos_needed(self, threat: str) -> int:
        return 3 if threat == "dodging" else 2  # (an enrolment,) one to optimise on, one held out

    def _split(self, context: CampaignContext) -> tuple[int | None, list[int], list[int]]:
        """The wearer's photos, shuffled by the seed: (dodging's enrolment, optimisation photos, held-out photos)."""
        identity, dodging = context.identity, context.threat == "dodging"
        assert identity is not None  # needs_identity: the engine refuses a run without --identity
        photos = context.shuffled(sorted(context.dataset.by_identity[identity]), self.name, context.seed, identity)
        enrolment = photos.pop(0) if dodging and photos else None
        if len(photos) < 2:
            raise DataError(
                f"{self.name} needs {3 if dodging else 2} photos of {identity} ({'an enrolment, ' if dodging else ''}"
                f"one to optimise on, one held out); {context.dataset.name} has {len(photos) + dodging}."
            )
        train = photos[: min(self.train_photos, len(photos) - 1)]
        return enrolment, train, photos[len(train) :]

    def _victim(self, context: CampaignContext) -> tuple[str, int]:
        """Who the wearer impersonates, and which of their photos is enrolled."""
        people = context.dataset.by_identity
        others = sorted(set(people) - {context.identity})
        if not others:
            raise DataError(f"impersonation needs a second identity; {context.dataset.name} has only one.")
        draw = random.Random(f"{self.name}-victim:{context.seed}:{context.identity}")
        victim = self.victim or draw.choice(others)
        if victim == context.identity:
            raise RedteamError("--option victim must name someone other than --identity.")
        if victim not in people:
            raise UnknownNameError(f"victim in {context.dataset.name}", victim, others)
        return victim, draw.choice(sorted(people[victim]))

    def _photos(self, context: CampaignContext, indices: list[int]) -> Photos:
        """Load photos with the landmarks of the face judged in each (:meth:`landmarks_of`)."""
        images = context.load(indices)
        names = [Path(context.dataset.records[i].source).name for i in indices]
        return Photos(images, self.landmarks_of(context, images), names)

    @staticmethod
    def landmarks_of(context: CampaignContext, images: Tensor) -> Tensor:
        """``[N, 3, H, W]`` photos -> ``[N, 5, 2]`` the landmarks of the face the accessory is worn on: the one a face
        system judges (its detector's, over its box if it has one), else the largest face MTCNN finds; the
        canonical ones where there is none."""
        canonical = CANONICAL_LANDMARKS.to(images) * images.shape[-1] / CANONICAL_SIZE
        detector = None
        found, landmarks = [], []
        for batch in images.split(context.batch_size):
            with torch.no_grad():
                located = context.target.locate(batch)
                if located is None:
                    detector = context.load_target("mtcnn") if detector is None else detector
                    assert isinstance(detector, FaceDetector)
                    located = detector.chosen_landmarks(batch)
            found.append(located[0])
            landmarks.append(located[1].to(images))
        return torch.where(torch.cat(found)[:, None, None], torch.cat(landmarks), canonical)

    @staticmethod
    def _verdicts(model: FaceRecognizer, images: Tensor, similarity: Tensor) -> list[str] | None:
        """Where a face system stopped each of ``images`` (``SYSTEM_STAGES``), ``None`` for a single recogniser."""
        with torch.no_grad():
            parts = [
                model.verdicts(batch, s, model.threshold) for batch, s in zip(images.split(16), similarity.split(16))
            ]
        found = [stage for part in parts if part is not None for stage in part]
        return found if len(found) == len(images) else None

    @staticmethod
    def _similarity(model: FaceRecognizer, images: Tensor, reference: Tensor) -> Tensor:
        """``[N]`` similarities of ``images [N, 3, S, S]`` to one enrolment embedding ``reference [1, D]``."""
        with torch.no_grad():
            embeddings = torch.cat([model.embed(batch) for batch in images.split(16)])
            return model.similarity(embeddings, reference.expand_as(embeddings))

    def _optimise(
        self,
        context: CampaignContext,
        photos: Photos,
        goal: Callable[[Tensor], Objective],
        area: float,
        per_step: int | None = None,
    ) -> tuple[Tensor, int]:
        """A texture ``[1, 3, h, w]`` covering ``area``, optimised on ``photos`` over random shooting conditions, with
        the steps it took. ``goal(index)`` is the objective for the photos ``index`` (``[B]``, repeats allowed);
        each step takes ``per_step`` photos drawn afresh (``None``: all of them), each under ``draws`` conditions.
        AdvHat's two stages of sign steps on a momentum average, each ending when its loss stops rising over
        ``window`` steps (the first at half of ``steps`` at the latest)."""
        surface, width = self.surface(area)
        texture = blank_texture(surface, width, photos.images.shape[-1], context.device)
        everyone = torch.arange(len(photos.images), device=context.device)
        generator, sampler = context.generator(self.name, area), context.generator(f"{self.name}-photos", area)
        advance = context.progress(f"{self.name}: {self.noun} covering {area:.0%}", self.steps)
        momentum, stage, stage_start, losses = torch.zeros_like(texture), 0, 0, []
        for step in range(self.steps):
            chosen = everyone
            if per_step is not None and per_step < len(everyone):
                chosen = torch.randperm(len(everyone), generator=sampler, device=context.device)[:per_step]
            index = chosen.repeat(self.draws)
            pose = self.nominal_pose(photos.landmarks[index], width, surface)
            texture.requires_grad_(True)
            photo = photograph(photos.images[index], texture, pose, surface, self.jitter, generator)
            loss = goal(index)(photo).loss.mean()
            penalty = self.tv_weight * total_variation(texture, reduction="mean").mean()
            if self.nps_weight:
                penalty = penalty + self.nps_weight * non_printability(texture)
            (gradient,) = torch.autograd.grad(loss - penalty, texture)
            step_size, decay = STAGES[stage]
            momentum = decay * momentum + (1 - decay) * gradient
            texture = (texture.detach() + step_size * momentum.sign()).clamp(0, 1)
            losses.append(loss.item())
            advance(1)
            recent = losses[max(stage_start, len(losses) - self.window) :]
            stalled = len(recent) == self.window and np.polyfit(range(self.window), recent, 1)[0] <= 0
            if stage == 0 and (stalled or step + 1 >= self.steps // 2):
                stage, stage_start = 1, step + 1
            elif stage == 1 and stalled:
                advance(self.steps - step - 1)
                break
        return texture, len(losses)

    def _stored_attack(
        self, context: CampaignContext, trained_on: Photos, held: Photos, reference: Tensor, area: float
    ) -> dict:
        """:meth:`_attack` as plain data, a stage of the run (one per area)."""
        return asdict(self._attack(context, trained_on, held, reference, area))

    def _attack(
        self, context: CampaignContext, trained_on: Photos, held: Photos, reference: Tensor, area: float
    ) -> Outcome:
        """Optimise a texture covering ``area`` on ``trained_on``; judge it, a random and a plain one on ``held``."""
        target = context.target
        assert isinstance(target, FaceRecognizer)  # the engine checked the threat's task against the target
        surface, width = self.surface(area)
        impersonate = context.threat == "impersonation"
        texture, steps = self._optimise(
            context,
            trained_on,
            lambda index: VerificationObjective(
                target.embed, target.similarity, target.threshold, impersonate, reference.expand(len(index), -1)
            ),
            area,
        )
        noise, plain, _ = self.baselines(context, texture, area)
        pose = self.nominal_pose(held.landmarks, width, surface)
        with torch.no_grad():
            worn, noisy, plain_worn = (wear(held.images, t, pose, surface) for t in (texture, noise, plain))
            coverage = coverage_of(texture, pose, held.images.shape[-1], surface)
        return Outcome(
            area=area,
            width=width,
            texture=texture,
            worn=worn,
            noisy=noisy,
            plain=plain_worn,
            similarity=self._similarity(target, worn, reference),
            noise_similarity=self._similarity(target, noisy, reference),
            plain_similarity=self._similarity(target, plain_worn, reference),
            covered=coverage.mean().item(),
            steps=steps,
        )

    def baselines(self, context: CampaignContext, texture: Tensor, area: float) -> list[Tensor]:
        """A random and a plain texture of ``texture``'s shape (the baselines at ``area``), then ``texture``."""
        noise = torch.rand(
            texture.shape, generator=context.generator(f"{self.name}-noise", area), device=context.device
        )
        plain = torch.tensor(self.plain_colour, device=context.device).view(1, 3, 1, 1).expand_as(texture)
        return [noise, plain, texture]

    def _shooting(self, context: CampaignContext, held: Photos, final: Outcome, reference: Tensor) -> float:
        """Mean similarity of the held-out photos wearing the print under ``draws`` random shooting conditions."""
        surface, width = self.surface(final.area)
        faces, landmarks = held.images.repeat(self.draws, 1, 1, 1), held.landmarks.repeat(self.draws, 1, 1)
        generator = context.generator(f"{self.name}-shooting", final.area)
        with torch.no_grad():
            photos = photograph(
                faces, final.texture, self.nominal_pose(landmarks, width, surface), surface, self.jitter, generator
            )
        assert isinstance(context.target, FaceRecognizer)  # the engine checked the threat's task against the target
        return self._similarity(context.target, photos, reference).mean().item()

    def _record_evidence(
        self, context: CampaignContext, held: Photos, final: Outcome, reference: Tensor, enrolled_as: str | None
    ) -> None:
        """The held-out photos the final print fooled the target with, worn, into the run's evidence log, each with
        the verdict on it as an 8-bit file holds it."""
        target, impersonate = context.target, context.threat == "impersonation"
        assert isinstance(target, FaceRecognizer)  # the engine checked the threat's task against the target
        fooled = torch.nonzero(~decided_right(final.similarity, target.threshold, impersonate)).squeeze(1).tolist()
        if not fooled:
            return
        worn = final.worn[fooled]
        saved = self._similarity(target, as_saved(worn), reference)
        saved_fooled = ~decided_right(saved, target.threshold, impersonate)
        entries = [
            {"probe": held.names[k], "eps": final.area, "identity": context.identity, "reference": enrolled_as,
             "score": float(final.similarity[k]), "threshold": float(target.threshold), "covered": final.covered,
             "saved_fooled": bool(saved_fooled[i]), "saved_score": float(saved[i])}
            for i, k in enumerate(fooled)
        ]  # fmt: skip
        context.record_evidence(entries, list(worn))

    def _transfer(
        self, context: CampaignContext, enrolled: Tensor, held: Photos, final: Outcome
    ) -> tuple[pd.DataFrame, list[str]]:
        """The final print judged by every recogniser in the zoo (those needing a user's file are skipped)."""
        impersonate, rows = context.threat == "impersonation", []
        models, skipped = context.recognizers()
        conditions = (("clean", held.images), ("random", final.noisy), ("plain", final.plain), (self.noun, final.worn))
        for name, model in models:
            threshold = model.threshold
            with torch.no_grad():
                reference = model.embed(enrolled)
            row: dict[str, object] = {"target": name, "threshold": threshold}
            for condition, faces in conditions:
                similarity = self._similarity(model, faces, reference)
                row[condition] = similarity.mean().item()
                row[f"{condition}_accuracy"] = decided_right(similarity, threshold, impersonate).float().mean().item()
            rows.append(row)
        return pd.DataFrame(rows), skipped

    def _save_print(self, out: Path, texture: Tensor, area: float) -> Path:
        """The print of ``texture`` at ``area`` as a PNG at print resolution (transparent outside its outline), its
        dpi set so it prints at :meth:`printed_size_mm`."""
        surface, _ = self.surface(area)
        size = (round(self.print_width * surface.aspect), self.print_width)
        pixels = F.interpolate(texture, size=size, mode="bilinear", align_corners=False)[0]
        if surface.outline is not None:
            rows, columns = (torch.linspace(-1, 1, n, device=pixels.device) for n in size)
            grid = torch.stack(torch.meshgrid(columns, rows, indexing="xy"), dim=-1)  # [h, w, 2] as (x, y)
            pixels = torch.cat([pixels, surface.outline(grid)[None]])  # RGBA
        path = out / f"{self.name}-{self.noun}.png"
        dpi = self.print_width * 25.4 / self.printed_size_mm(area)[0]
        array = (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
        Image.fromarray(array).save(path, dpi=(dpi, dpi))
        return path

    def _save_faces(self, context: CampaignContext, held: Photos, final: Outcome, clean: Tensor) -> Path:
        """A grid of held-out faces: without the accessory, with a random one, with a plain one, with the adversarial
        one (similarities to the enrolment above each, red where the face system now decides wrongly)."""
        threshold, impersonate, noun = context.target.threshold, context.threat == "impersonation", self.noun
        shown = min(len(held.names), 6)
        rows = [
            (label, faces[:shown], similarity[:shown], ~decided_right(similarity[:shown], threshold, impersonate))
            for label, faces, similarity in (
                (f"no {noun}", held.images, clean),
                (f"random {noun}", final.noisy, final.noise_similarity),
                (f"plain {noun}", final.plain, final.plain_similarity),
                (f"adversarial {noun}", final.worn, final.similarity),
            )
        ]
        title = f"{context.identity}, held-out photos: similarity to the enrolled face (threshold {threshold:.3f})"
        return self._faces_figure(context.out / f"{self.name}-faces.png", rows, title)

    @staticmethod
    def _faces_figure(path: Path, rows: list[tuple[str, Tensor, Tensor, Tensor]], title: str) -> Path:
        """Rows of ``(label, faces [N, 3, S, S], similarities [N], wrongly decided [N])`` as a captioned grid."""
        captioned = [
            (label, faces, [f"{s:.3f}" for s in similarity.tolist()], wrong.tolist())
            for label, faces, similarity, wrong in rows
        ]
        return face_grid(captioned, title, path)
