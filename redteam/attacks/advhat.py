"""AdvHat (Komkov & Petiushko 2019): a printable adversarial sticker worn on a hat, against face recognition.

Image formation, differentiable in the sticker: the flat sticker (``[3, h, w]`` in ``[0, 1]``, 4:9 like the paper's
400 x 900 px one) is bent over the hat (a parabolic cylinder ``z = bend x^2`` whose arc length is the sticker's
width), its top pitched back, seen in perspective, and placed on the forehead above the eyes, scaled by the
inter-ocular distance; it is composited with its own coverage onto the canonical face image the target sees. The
whole chain is one inverse map (each face pixel -> the point of the flat sticker it sees: a ray-surface
intersection in closed form), so the geometry is exact and a single ``grid_sample`` carries the gradient.

The sticker is optimised over random shooting conditions (expectation over transformation): bend, pitch, shifts,
scale and roll of the sticker, the printer's colour range, alignment jitter of the whole face, lighting and colour,
blur, sensor and JPEG-like noise; with total-variation smoothing and an optional non-printability term, in the
paper's two stages of sign steps on a momentum average (5/255 with momentum 0.9, then 1/255 with 0.995, each stage
ending when its loss stops rising). It is judged on photos of the wearer that the optimisation never saw.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

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
from redteam.api import ATTACKS, Axis, Campaign, CampaignContext, CampaignReport, FaceDetector, FaceRecognizer
from redteam.errors import DataError, RedteamError, UnknownNameError
from redteam.plots import face_grid
from redteam.results import SYSTEM_STAGES
from redteam.threats import VerificationObjective

#: Height / width of the sticker (the paper's is 400 x 900 px).
ASPECT = 4 / 9
#: Inter-ocular distance of the canonical frame, in its pixels: sticker areas are fractions of that frame.
CANONICAL_EYE_DISTANCE = float(CANONICAL_LANDMARKS[1, 0] - CANONICAL_LANDMARKS[0, 0])
#: Darkest and lightest ink a printer reaches (per channel), for the non-printability score's palette.
PRINT_GAMUT = (0.08, 0.92)
#: The paper's two stages: (sign-step size, momentum of the gradient average).
STAGES = ((5 / 255, 0.9), (1 / 255, 0.995))


@dataclass
class HatPose:
    """Where and how the sticker is worn, per sample.

    ``bend``: rate ``c`` of the hat's surface ``z = c x^2`` (``x``, ``z`` in sticker widths), ``[B]``;
    ``pitch``: radians the sticker's top leans away from the camera, ``[B]``; ``anchor``: pixel position of the
    sticker's bottom centre in the image, ``[B, 2]``; ``width``: pixels per (flat) sticker width, ``[B]``;
    ``roll``: radians from the image's x axis to the sticker's horizontal axis (y points down), ``[B]``.
    """

    bend: Tensor
    pitch: Tensor
    anchor: Tensor
    width: Tensor
    roll: Tensor


def arc_length(x: Tensor, bend: Tensor) -> Tensor:
    """Arc length of ``z = bend x^2`` from its apex to ``x`` (broadcast): the flat sticker's coordinate there."""
    k = 2 * bend.clamp_min(1e-6)
    return 0.5 * x * torch.sqrt(1 + (k * x) ** 2) + torch.asinh(k * x) / (2 * k)


def sticker_grid(pose: HatPose, size: int, camera_distance: float, stride: int = 4) -> Tensor:
    """For each pixel of a ``size`` x ``size`` image, the point of the flat sticker it sees.

    Undoes the placement (translation, roll, scale), then intersects the pixel's ray with the pitched parabolic
    surface seen by a pinhole camera ``camera_distance`` sticker widths away (a quadratic in the ray's depth; the
    near root), then unrolls the bend (arc length). The map is smooth, so it is solved every ``stride`` pixels and
    interpolated bilinearly in between (at 4: 16x cheaper, within 0.15 sticker pixels of the exact map).

    Args:
        pose: ``B`` poses.
        size: image side in pixels.
        camera_distance: in sticker widths.
        stride: pixels between exact solutions (1: every pixel).
    Returns:
        ``[B, size, size, 2]`` ``grid_sample`` coordinates in the sticker: inside it where both are in ``[-1, 1]``.
    """
    samples = -(-(size - 1) // stride) + 1
    line = torch.linspace(0, size - 1, samples, device=pose.width.device, dtype=pose.width.dtype)  # corners included
    pixels = torch.stack(torch.meshgrid(line, line, indexing="xy"), dim=-1)  # [n, n, 2] as (x, y)
    offset = pixels - pose.anchor[:, None, None]
    roll, width = pose.roll[:, None, None], pose.width[:, None, None]
    bend, pitch = pose.bend[:, None, None], pose.pitch[:, None, None]
    cos, sin, depth = pitch.cos(), pitch.sin(), camera_distance
    half = ASPECT / 2
    # The image plane in sticker widths, origin at the projection of the sticker's centre (which is the anchor
    # shifted by the projected half-height).
    bottom = depth * half * cos / (depth - half * sin)
    u = (roll.cos() * offset[..., 0] + roll.sin() * offset[..., 1]) / width
    v = (-roll.sin() * offset[..., 0] + roll.cos() * offset[..., 1]) / width + bottom
    # Surface point (x, y, bend x^2) pitched: y' = y cos + bend x^2 sin, z' = bend x^2 cos - y sin; the ray through
    # (u, v) meets it at x = u t, y' = v t, z' + depth = depth t, i.e. bend u^2 t^2 - (v sin + depth cos) t + depth
    # cos = 0, solved in the form that stays finite as bend u^2 -> 0.
    # A ray that misses the surface passes beyond |x| = sqrt(depth cos / bend), far outside the sticker's |x| < 1/2;
    # clamping its discriminant keeps it there (and the map continuous, so it interpolates safely).
    b, c = v * sin + depth * cos, depth * cos
    t = 2 * c / (b + (b**2 - 4 * bend * u**2 * c).clamp_min(0).sqrt())
    x = u * t
    y = (v * t - bend * x**2 * sin) / cos
    grid = torch.stack([2 * arc_length(x, bend), y / half], dim=1)
    if samples != size:
        grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)
    return grid.permute(0, 2, 3, 1)


def render(sticker: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
    """Sample the sticker where each pixel sees it.

    Args:
        sticker: ``[1, 3, h, w]`` or ``[B, 3, h, w]`` in ``[0, 1]``.
        grid: ``[B, S, S, 2]`` from :func:`sticker_grid`.
    Returns:
        colour ``[B, 3, S, S]`` premultiplied by coverage, and coverage ``[B, 1, S, S]`` in ``[0, 1]`` (soft,
        anti-aliased edges).
    """
    layers = torch.cat([sticker, torch.ones_like(sticker[:, :1])], dim=1).expand(len(grid), -1, -1, -1)
    seen = F.grid_sample(layers, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return seen[:, :3], seen[:, 3:]


def wear(faces: Tensor, sticker: Tensor, pose: HatPose, camera_distance: float) -> Tensor:
    """Faces ``[B, 3, S, S]`` wearing ``sticker`` (``[1 or B, 3, h, w]``) at ``pose`` -> ``[B, 3, S, S]``."""
    painted, coverage = render(sticker, sticker_grid(pose, faces.shape[-1], camera_distance))
    return (faces * (1 - coverage) + painted).clamp(0, 1)  # exact in theory; rounding strays by 1e-7


def forehead_pose(eyes: Tensor, width: Tensor | float, bend: float, pitch: float, gap: float) -> HatPose:
    """The nominal pose: the sticker's bottom centre ``gap`` inter-ocular distances above the eyes' midpoint,
    square to the eye line, ``width`` inter-ocular distances wide.

    Args:
        eyes: ``[B, 2, 2]`` pixel positions of the left and right eye (as seen in the image).
        width: in inter-ocular distances (a float or ``[B]``).
        bend, pitch: the hat's parabola rate (per sticker width) and pitch (radians).
    """
    line = eyes[:, 1] - eyes[:, 0]
    distance = line.norm(dim=1)
    up = torch.stack([line[:, 1], -line[:, 0]], dim=1) / distance[:, None]  # perpendicular, towards the forehead
    anchor = eyes.mean(1) + gap * distance[:, None] * up
    return HatPose(
        bend=torch.full_like(distance, bend),
        pitch=torch.full_like(distance, pitch),
        anchor=anchor,
        width=width * distance,
        roll=torch.atan2(line[:, 1], line[:, 0]),
    )


def footprint(bend: float, pitch: float, camera_distance: float, size: int = 256) -> float:
    """Image area the worn sticker covers at its nominal pitch and bend, in units of its flat width squared."""
    width = size / 2
    pose = HatPose(
        torch.tensor([bend]), torch.tensor([pitch]), torch.tensor([[size / 2, size * 0.75]]), torch.tensor([width]),
        torch.zeros(1),
    )  # fmt: skip
    _, coverage = render(
        torch.ones(1, 3, round(width * ASPECT), round(width)), sticker_grid(pose, size, camera_distance)
    )
    return float(coverage.sum()) / width**2


def non_printability(sticker: Tensor, levels: int = 3) -> Tensor:
    """Sharif et al.'s non-printability score of ``[1, 3, h, w]``: mean over pixels of the product of distances to
    the printable palette (here the ``levels^3`` colours of a grid spanning :data:`PRINT_GAMUT`)."""
    shades = torch.linspace(*PRINT_GAMUT, levels, device=sticker.device, dtype=sticker.dtype)
    palette = torch.cartesian_prod(shades, shades, shades)  # [levels^3, 3]
    pixels = sticker.flatten(2).transpose(1, 2)  # [1, h w, 3]
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
    faces: Tensor, sticker: Tensor, pose: HatPose, camera_distance: float, strength: float, generator: torch.Generator
) -> Tensor:
    """Faces wearing the sticker under random shooting conditions (one draw per face), differentiable in it.

    ``strength`` scales every range (1: the defaults below; 0: no randomness, the nominal pose).

    Args:
        faces: ``[B, 3, S, S]``; sticker: ``[1, 3, h, w]``; pose: the nominal poses.
    Returns:
        ``[B, 3, S, S]`` in ``[0, 1]``.
    """
    batch, size, device, dtype = len(faces), faces.shape[-1], faces.device, faces.dtype

    def amount(most: float, *shape: int) -> Tensor:  # uniform in [0, most * strength]
        return torch.rand(batch, *shape, generator=generator, device=device, dtype=dtype) * most * strength

    def spread(most: float, *shape: int) -> Tensor:  # uniform in [-most * strength, most * strength]
        return 2 * amount(most, *shape) - most * strength

    worn = HatPose(
        bend=pose.bend * (1 + spread(0.2)),
        pitch=pose.pitch + spread(math.radians(4)),
        anchor=pose.anchor + spread(0.03, 2) * pose.width[:, None],
        width=pose.width * (1 + spread(0.05)),
        roll=pose.roll + spread(math.radians(3)),
    )
    # The printer's range: its darkest ink is not black, its paper not pure white.
    floor, ceiling = amount(0.08, 3, 1, 1), 1 - amount(0.1, 3, 1, 1)
    photo = wear(faces, floor + (ceiling - floor) * sticker, worn, camera_distance)
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
    """Canonical face images ``[N, 3, S, S]`` of one person, their eyes ``[N, 2, 2]`` (pixels) and file names."""

    images: Tensor
    eyes: Tensor
    names: list[str]


@dataclass
class Outcome:
    """One sticker size judged on the held-out photos.

    ``width``: the sticker's flat width in inter-ocular distances; ``worn`` / ``noisy``: the held-out faces
    ``[N, 3, S, S]`` wearing it and a uniform-noise sticker of the same size, at the nominal pose;
    ``similarity`` / ``noise_similarity``: the target's, ``[N]``; ``covered``: the share of the face images the
    sticker covers; ``steps``: optimisation steps taken.
    """

    area: float
    width: float
    sticker: Tensor
    worn: Tensor
    noisy: Tensor
    similarity: Tensor
    noise_similarity: Tensor
    covered: float
    steps: int


@ATTACKS.register("advhat", "printable adversarial sticker on a hat (Komkov & Petiushko 2019), EOT; needs --identity")
@dataclass
class AdvHat(Campaign):
    """The settings, for ``--option key=value``:

    ``steps`` caps the two stages together; ``draws``: random shooting conditions per optimisation photo and step;
    ``train_photos`` of the wearer are optimised on (one more is the dodging enrolment, the rest are held out);
    ``victim``: the identity to impersonate (default: one drawn from the seed); ``bend`` (per sticker width),
    ``pitch`` (degrees), ``gap`` (inter-ocular distances from the eyes' midpoint up to the sticker's bottom edge)
    and ``camera_distance`` (sticker widths) set the nominal pose; ``jitter`` scales every random shooting
    condition (0: none); ``tv_weight`` and ``nps_weight`` weigh smoothness and printability; ``window``: steps over
    which a stage's loss must still rise; ``eye_distance_mm`` turns the sticker into a printed size;
    ``print_width``: the PNG's width in pixels.
    """

    name = "advhat"
    #: Sticker areas, fractions of the canonical face image; the paper's sticker covers about 5% of it.
    axes = {"area": Axis("area", "fraction of the face image", "sticker area", (0.0, 0.02, 0.04, 0.06), high=0.5)}
    threats = ("dodging", "impersonation")
    needs_identity = True

    steps: int = 80
    draws: int = 4
    train_photos: int = 4
    victim: str | None = None
    bend: float = 1.17  # the paper's 0.0013 per pixel of its 900 px sticker
    pitch: float = 17.0
    gap: float = 0.6
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

    def run(self, context: CampaignContext) -> CampaignReport:
        target, impersonate = context.target, context.threat == "impersonation"
        assert isinstance(target, FaceRecognizer)  # the engine checked the threat's task against the target
        areas = list(context.budgets)
        enrolment, train, held_out = self._split(context)
        victim = self._victim(context) if impersonate else None
        enrolled_photo = victim[1] if victim else enrolment
        assert enrolled_photo is not None  # dodging: _split set the enrolment photo aside
        enrolled = context.load([enrolled_photo])
        detector = context.load_target("mtcnn")
        assert isinstance(detector, FaceDetector)
        trained_on, held = (self._photos(context, detector, indices) for indices in (train, held_out))
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
        final = outcomes[-1]  # the largest sticker is the one reported, printed and transferred

        def right(similarity: Tensor) -> Tensor:
            return decided_right(similarity, target.threshold, impersonate)

        levels = [(0.0, 0.0, clean, clean, 0)] + [
            (o.area, o.covered, o.noise_similarity, o.similarity, o.steps) for o in outcomes
        ]
        areas_table = pd.DataFrame(
            [
                {
                    "area": area,
                    "covered": covered,
                    "clean": clean.mean().item(),
                    "random": noisy.mean().item(),
                    "sticker": worn.mean().item(),
                    "random_accuracy": right(noisy).float().mean().item(),
                    "accuracy": right(worn).float().mean().item(),
                    "steps": steps,
                }
                for area, covered, noisy, worn, steps in levels
            ]
        )
        per_photo = pd.DataFrame(
            {
                "photo": held.names,
                "clean": clean.tolist(),
                "random": final.noise_similarity.tolist(),
                "sticker": final.similarity.tolist(),
                "fooled": (~right(final.similarity)).tolist(),
            }
        )
        transfer, skipped = self._transfer(context, enrolled, held, final)
        clean_stages = self._verdicts(target, held.images, clean)
        sticker_stages = self._verdicts(target, final.worn, final.similarity)
        metrics = {
            "area": final.area,
            "covered": final.covered,
            "threshold": target.threshold,
            "clean_similarity": clean.mean().item(),
            "random_similarity": final.noise_similarity.mean().item(),
            "sticker_similarity": final.similarity.mean().item(),
            "sticker_similarity_shooting": self._shooting(context, held, final, reference),
            "clean_accuracy": right(clean).float().mean().item(),
            "random_accuracy": right(final.noise_similarity).float().mean().item(),
            "sticker_accuracy": right(final.similarity).float().mean().item(),
            "held_out_photos": len(held.names),
            "train_photos": len(trained_on.names),
        }
        system_lines = []
        if clean_stages is not None and sticker_stages is not None:  # a face system: where it stopped each photo
            per_photo["stage"] = sticker_stages
            tally = {}
            for condition, found in (("clean", clean_stages), ("sticker", sticker_stages)):
                metrics[f"{condition}_face_found"] = 1 - found.count("no face") / len(found)
                metrics[f"{condition}_matched"] = found.count("match") / len(found)
                tally[condition] = ", ".join(f"{stage} {found.count(stage)}" for stage in SYSTEM_STAGES)
            system_lines.append(
                f"where {context.target_name} stopped the held-out photos wearing the sticker: {tally['sticker']} "
                f"(without it: {tally['clean']})"
            )
        width_mm, height_mm = self.printed_size_mm(final.width)
        enrolled_as = f"{victim[0]}'s enrolment photo" if victim else "their enrolment photo"
        lines = [
            f"held-out photos of {context.identity} against {enrolled_as}: mean similarity {clean.mean():.3f} with "
            f"no sticker, {final.noise_similarity.mean():.3f} with a random one, {final.similarity.mean():.3f} with "
            f"the adversarial one (threshold {target.threshold:.4f}); {int(per_photo['fooled'].sum())} of "
            f"{len(held.names)} photos now cross it ({int((~right(clean)).sum())} without a sticker)",
            f"sticker: {width_mm / 10:.1f} x {height_mm / 10:.1f} cm printed, for a face with {self.eye_distance_mm:g} "
            f"mm between the eye centres (advhat-sticker.png, {self.print_width * 25.4 / width_mm:.0f} dpi); it "
            f"covers {final.covered:.1%} of the face image; optimised on {len(trained_on.names)} photos x "
            f"{self.draws} shooting conditions for {final.steps} steps",
            *system_lines,
            *skipped,
        ]
        return CampaignReport(
            metrics=metrics,
            tables={"transfer": transfer, "held_out": per_photo, "areas": areas_table},
            curve=areas_table[["area", "accuracy"]].rename(columns={"area": "eps"}).assign(n=len(held.names)),
            images=[self._save_sticker(context.out, final), self._save_faces(context, held, final, clean)],
            lines=lines,
        )

    def printed_size_mm(self, width: float) -> tuple[float, float]:
        """Width and height of the printed sticker, in mm, for a sticker ``width`` inter-ocular distances wide."""
        return width * self.eye_distance_mm, width * self.eye_distance_mm * ASPECT

    def width_for(self, area: float) -> float:
        """Flat sticker width, in inter-ocular distances, whose nominal footprint is ``area`` of a canonical face."""
        unit = footprint(self.bend, math.radians(self.pitch), self.camera_distance)
        return CANONICAL_SIZE / CANONICAL_EYE_DISTANCE * math.sqrt(area / unit)

    def photos_needed(self, threat: str) -> int:
        return 3 if threat == "dodging" else 2  # (an enrolment,) one to optimise on, one held out

    def _split(self, context: CampaignContext) -> tuple[int | None, list[int], list[int]]:
        """The wearer's photos, shuffled by the seed: (dodging's enrolment, optimisation photos, held-out photos)."""
        identity, dodging = context.identity, context.threat == "dodging"
        assert identity is not None  # needs_identity: the engine refuses a run without --identity
        photos = context.shuffled(sorted(context.dataset.by_identity[identity]), "advhat", context.seed, identity)
        enrolment = photos.pop(0) if dodging and photos else None
        if len(photos) < 2:
            raise DataError(
                f"advhat needs {3 if dodging else 2} photos of {identity} ({'an enrolment, ' if dodging else ''}one to "
                f"optimise on, one held out); {context.dataset.name} has {len(photos) + dodging}."
            )
        train = photos[: min(self.train_photos, len(photos) - 1)]
        return enrolment, train, photos[len(train) :]

    def _victim(self, context: CampaignContext) -> tuple[str, int]:
        """Who the wearer impersonates, and which of their photos is enrolled."""
        people = context.dataset.by_identity
        others = sorted(set(people) - {context.identity})
        if not others:
            raise DataError(f"impersonation needs a second identity; {context.dataset.name} has only one.")
        draw = random.Random(f"advhat-victim:{context.seed}:{context.identity}")
        victim = self.victim or draw.choice(others)
        if victim == context.identity:
            raise RedteamError("--option victim must name someone other than --identity.")
        if victim not in people:
            raise UnknownNameError(f"victim in {context.dataset.name}", victim, others)
        return victim, draw.choice(sorted(people[victim]))

    def _photos(self, context: CampaignContext, detector: FaceDetector, indices: list[int]) -> Photos:
        """Load photos and find their eyes with MTCNN (the canonical eye positions where it finds no face)."""
        images = context.load(indices)
        canonical = CANONICAL_LANDMARKS[:2] * images.shape[-1] / CANONICAL_SIZE
        eyes = []
        for found in detector.detect(images):
            largest = int((found.boxes[:, 2:] - found.boxes[:, :2]).prod(1).argmax()) if len(found.boxes) else None
            if largest is None:
                eyes.append(canonical)
            else:
                assert found.landmarks is not None  # MTCNN finds five landmarks per face
                eyes.append(found.landmarks[largest, :2])
        names = [Path(context.dataset.records[i].source).name for i in indices]
        return Photos(images, torch.stack(eyes).to(images), names)

    def _pose(self, eyes: Tensor, width: float) -> HatPose:
        return forehead_pose(eyes, width, self.bend, math.radians(self.pitch), self.gap)

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
        self, context: CampaignContext, photos: Photos, reference: Tensor, area: float, width: float
    ) -> tuple[Tensor, int]:
        """A sticker ``[1, 3, h, w]`` of flat ``width`` optimised on ``photos`` over random shooting conditions, with
        the steps it took. It has one pixel per face-image pixel at the nominal pose (finer is invisible to the
        target); the paper's two stages of sign steps on a momentum average, each ending when its loss stops rising
        over ``window`` steps (the first at half of ``steps`` at the latest)."""
        target, device = context.target, context.device
        assert isinstance(target, FaceRecognizer)  # the engine checked the threat's task against the target
        pixels = width * CANONICAL_EYE_DISTANCE * photos.images.shape[-1] / CANONICAL_SIZE
        sticker = torch.full((1, 3, max(2, round(pixels * ASPECT)), max(2, round(pixels))), 0.5, device=device)
        faces, pose = photos.images.repeat(self.draws, 1, 1, 1), self._pose(photos.eyes.repeat(self.draws, 1, 1), width)
        goal = VerificationObjective(
            target.embed, target.similarity, target.threshold, context.threat == "impersonation",
            reference.expand(len(faces), -1),
        )  # fmt: skip
        generator = context.generator("advhat", area)
        advance = context.progress(f"advhat: sticker covering {area:.0%}", self.steps)
        momentum, stage, stage_start, losses = torch.zeros_like(sticker), 0, 0, []
        for step in range(self.steps):
            sticker.requires_grad_(True)
            loss = goal(photograph(faces, sticker, pose, self.camera_distance, self.jitter, generator)).loss.mean()
            penalty = self.tv_weight * total_variation(sticker, reduction="mean").mean()
            if self.nps_weight:
                penalty = penalty + self.nps_weight * non_printability(sticker)
            (gradient,) = torch.autograd.grad(loss - penalty, sticker)
            step_size, decay = STAGES[stage]
            momentum = decay * momentum + (1 - decay) * gradient
            sticker = (sticker.detach() + step_size * momentum.sign()).clamp(0, 1)
            losses.append(loss.item())
            advance(1)
            recent = losses[max(stage_start, len(losses) - self.window) :]
            stalled = len(recent) == self.window and np.polyfit(range(self.window), recent, 1)[0] <= 0
            if stage == 0 and (stalled or step + 1 >= self.steps // 2):
                stage, stage_start = 1, step + 1
            elif stage == 1 and stalled:
                advance(self.steps - step - 1)
                break
        return sticker, len(losses)

    def _stored_attack(
        self, context: CampaignContext, trained_on: Photos, held: Photos, reference: Tensor, area: float
    ) -> dict:
        """:meth:`_attack` as plain data, a stage of the run (one per sticker area)."""
        return asdict(self._attack(context, trained_on, held, reference, area))

    def _attack(
        self, context: CampaignContext, trained_on: Photos, held: Photos, reference: Tensor, area: float
    ) -> Outcome:
        """Optimise a sticker covering ``area`` on ``trained_on``; judge it, and a random one, on ``held``."""
        target = context.target
        assert isinstance(target, FaceRecognizer)  # the engine checked the threat's task against the target
        width = self.width_for(area)
        sticker, steps = self._optimise(context, trained_on, reference, area, width)
        noise = torch.rand(sticker.shape, generator=context.generator("advhat-noise", area), device=context.device)
        pose = self._pose(held.eyes, width)
        with torch.no_grad():
            worn, noisy = (wear(held.images, s, pose, self.camera_distance) for s in (sticker, noise))
            _, coverage = render(
                torch.ones_like(sticker), sticker_grid(pose, held.images.shape[-1], self.camera_distance)
            )
        return Outcome(
            area=area,
            width=width,
            sticker=sticker,
            worn=worn,
            noisy=noisy,
            similarity=self._similarity(target, worn, reference),
            noise_similarity=self._similarity(target, noisy, reference),
            covered=coverage.mean().item(),
            steps=steps,
        )

    def _shooting(self, context: CampaignContext, held: Photos, final: Outcome, reference: Tensor) -> float:
        """Mean similarity of the held-out photos wearing the sticker under ``draws`` random shooting conditions."""
        faces, eyes = held.images.repeat(self.draws, 1, 1, 1), held.eyes.repeat(self.draws, 1, 1)
        generator = context.generator("advhat-shooting", final.area)
        with torch.no_grad():
            photos = photograph(
                faces, final.sticker, self._pose(eyes, final.width), self.camera_distance, self.jitter, generator
            )
        assert isinstance(context.target, FaceRecognizer)  # the engine checked the threat's task against the target
        return self._similarity(context.target, photos, reference).mean().item()

    def _transfer(
        self, context: CampaignContext, enrolled: Tensor, held: Photos, final: Outcome
    ) -> tuple[pd.DataFrame, list[str]]:
        """The final sticker judged by every recogniser in the zoo (those needing a user's file are skipped)."""
        impersonate, rows = context.threat == "impersonation", []
        models, skipped = context.recognizers()
        for name, model in models:
            threshold = model.threshold
            with torch.no_grad():
                reference = model.embed(enrolled)
            row: dict[str, object] = {"target": name, "threshold": threshold}
            for condition, faces in (("clean", held.images), ("random", final.noisy), ("sticker", final.worn)):
                similarity = self._similarity(model, faces, reference)
                row[condition] = similarity.mean().item()
                row[f"{condition}_accuracy"] = decided_right(similarity, threshold, impersonate).float().mean().item()
            rows.append(row)
        return pd.DataFrame(rows), skipped

    def _save_sticker(self, out: Path, final: Outcome) -> Path:
        """The sticker as a PNG at print resolution, its dpi set so it prints at :meth:`printed_size_mm`."""
        size = (round(self.print_width * ASPECT), self.print_width)
        pixels = F.interpolate(final.sticker, size=size, mode="bilinear", align_corners=False)[0]
        path = out / "advhat-sticker.png"
        dpi = self.print_width * 25.4 / self.printed_size_mm(final.width)[0]
        array = (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
        Image.fromarray(array).save(path, dpi=(dpi, dpi))
        return path

    def _save_faces(self, context: CampaignContext, held: Photos, final: Outcome, clean: Tensor) -> Path:
        """A grid of held-out faces: without a sticker, with a random one, with the adversarial one (similarities
        to the enrolment above each, red where the face system now decides wrongly)."""
        threshold, impersonate = context.target.threshold, context.threat == "impersonation"
        shown = min(len(held.names), 6)
        rows = [
            (
                label,
                faces[:shown],
                [f"{s:.3f}" for s in similarity[:shown].tolist()],
                (~decided_right(similarity[:shown], threshold, impersonate)).tolist(),
            )
            for label, faces, similarity in (
                ("no sticker", held.images, clean),
                ("random sticker", final.noisy, final.noise_similarity),
                ("adversarial sticker", final.worn, final.similarity),
            )
        ]
        title = f"{context.identity}, held-out photos: similarity to the enrolled face (threshold {threshold:.3f})"
        return face_grid(rows, title, context.out / "advhat-faces.png")
