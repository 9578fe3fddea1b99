"""Makeup from facial landmarks: eye shadow on the upper eyelids and colour on the lips, blended like makeup.

The trigger of the ``makeup-backdoor`` campaign, after MakeupAttack's argument that a natural, varied trigger (real
makeup differs from face to face and day to day) passes where a fixed patch would be noticed. Each image gets its
own style: a colour from a palette of common eye shadows and lipsticks (jittered) and an opacity.

Geometry: five landmarks per face (left eye, right eye, nose, left and right mouth corner, as seen in the image:
MTCNN's order, which every zoo detector follows). Eye shadow is an ellipse over each upper eyelid, between the eye
and the brow, tilted with the eye line and sized by the inter-ocular distance; lip colour is an ellipse spanning the
mouth corners, a little deeper below the lip line than above it (the lower lip is the fuller one). Each mask is
feathered: full strength inside half its radius, a smooth fall to exactly zero at its edge, so nothing outside the
ellipses changes.

Blending, as makeup artists' layers do it: eye shadow multiplies (``x c``: the lid darkens and takes the shade),
lip colour is soft light (the "pegtop" formula ``(1 - 2c) x^2 + 2 c x`` of the skin ``x`` and the colour ``c``: it
tints towards the colour, darker and redder, without flattening the lips' highlights). Each is mixed in by its mask
times the style's opacity. Both follow the skin's own shading, so pores, wrinkles and highlights stay, as they do
under real makeup.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from redteam.align import CANONICAL_LANDMARKS, CANONICAL_SIZE
from redteam.api.targets import FaceDetector

#: Common eye shadow shades (sRGB in [0, 1]): brown, bronze, taupe, plum, smoky grey, rose gold, olive, navy.
EYE_SHADOWS = (
    (0.45, 0.30, 0.22),
    (0.60, 0.42, 0.25),
    (0.50, 0.43, 0.40),
    (0.42, 0.24, 0.35),
    (0.30, 0.30, 0.32),
    (0.72, 0.50, 0.45),
    (0.42, 0.40, 0.25),
    (0.22, 0.25, 0.40),
)
#: Common lipstick shades: classic red, berry, rose, nude, coral, plum, pink, brick.
LIPSTICKS = (
    (0.70, 0.10, 0.15),
    (0.55, 0.12, 0.30),
    (0.78, 0.40, 0.45),
    (0.75, 0.52, 0.45),
    (0.90, 0.45, 0.38),
    (0.45, 0.15, 0.25),
    (0.88, 0.45, 0.58),
    (0.60, 0.25, 0.18),
)

#: Eye shadow ellipse, in inter-ocular distances from the eye: its centre above and outwards from the pupil (the lid
#: between eye and brow, drawn a little towards the outer corner) and its half-width and half-height.
SHADOW_CENTRE = (0.04, -0.16)
SHADOW_AXES = (0.28, 0.13)
#: Lip ellipse, in mouth widths (the corners' distance): its centre below the corners' midpoint and half-axes.
LIP_CENTRE = (0.0, 0.05)
LIP_AXES = (0.52, 0.21)
#: Share of each ellipse's radius over which the mask falls from full to zero.
FEATHER = 0.5


@dataclass
class MakeupStyle:
    """One look per image: ``shadow`` and ``lips`` colours ``[B, 3]`` (sRGB in ``[0, 1]``) and their opacities
    ``shadow_strength`` and ``lip_strength`` ``[B]`` (the blend's weight at the mask's core)."""

    shadow: Tensor
    shadow_strength: Tensor
    lips: Tensor
    lip_strength: Tensor

    @classmethod
    def draw(
        cls,
        count: int,
        generator: torch.Generator,
        shadow_strength: tuple[float, float] = (0.4, 0.75),
        lip_strength: tuple[float, float] = (0.6, 0.95),
        jitter: float = 0.04,
    ) -> MakeupStyle:
        """``count`` looks drawn from the palettes (each colour jittered by up to ``jitter`` per channel), opacities
        uniform in the given ranges (worn makeup is visible: lipstick covers most of the lips' colour, eye shadow
        shades the lid; on LFW faces the default looks change a pixel by 0.0009 on average, 0.51 at most, and
        nothing outside the eyelids and lips); on ``generator``'s device."""
        device = generator.device

        def colours(palette: tuple[tuple[float, float, float], ...]) -> Tensor:
            shades = torch.tensor(palette, device=device)
            chosen = shades[torch.randint(len(palette), (count,), generator=generator, device=device)]
            noise = torch.rand(count, 3, generator=generator, device=device) * 2 - 1
            return (chosen + jitter * noise).clamp(0, 1)

        def opacity(low: float, high: float) -> Tensor:
            return low + (high - low) * torch.rand(count, generator=generator, device=device)

        return cls(colours(EYE_SHADOWS), opacity(*shadow_strength), colours(LIPSTICKS), opacity(*lip_strength))

    def __getitem__(self, index: Tensor | slice) -> MakeupStyle:
        return MakeupStyle(self.shadow[index], self.shadow_strength[index], self.lips[index], self.lip_strength[index])


def ellipse_mask(size: tuple[int, int], centre: Tensor, axis: Tensor, half_axes: tuple[Tensor, Tensor]) -> Tensor:
    """Feathered ellipses: 1 inside ``1 - FEATHER`` of the radius, a smoothstep down to exactly 0 at the edge.

    Args:
        size: ``(H, W)`` of the image.
        centre: ``[B, 2]`` pixel centres (x, y).
        axis: ``[B, 2]`` unit vectors along the first half-axis.
        half_axes: two ``[B]`` half-axis lengths in pixels (along ``axis`` and perpendicular to it).
    Returns:
        ``[B, 1, H, W]`` in ``[0, 1]``.
    """
    height, width = size
    ys = torch.arange(height, device=centre.device, dtype=centre.dtype)
    xs = torch.arange(width, device=centre.device, dtype=centre.dtype)
    dx = xs[None, None, :] - centre[:, 0, None, None]  # [B, 1, W]
    dy = ys[None, :, None] - centre[:, 1, None, None]  # [B, H, 1]
    along = axis[:, 0, None, None] * dx + axis[:, 1, None, None] * dy
    across = -axis[:, 1, None, None] * dx + axis[:, 0, None, None] * dy
    radius = ((along / half_axes[0][:, None, None]) ** 2 + (across / half_axes[1][:, None, None]) ** 2).sqrt()
    t = ((1 - radius) / FEATHER).clamp(0, 1)
    return (t * t * (3 - 2 * t))[:, None]


def makeup_masks(landmarks: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Where eye shadow and lip colour go.

    Args:
        landmarks: ``[B, 5, 2]`` pixel positions (left eye, right eye, nose, left and right mouth corner).
        size: ``(H, W)`` of the images.
    Returns:
        eye shadow ``[B, 1, H, W]`` (both eyes) and lips ``[B, 1, H, W]``, feathered masks in ``[0, 1]``.
    """
    eyes, mouth = landmarks[:, :2], landmarks[:, 3:]
    eye_line = eyes[:, 1] - eyes[:, 0]
    eye_distance = eye_line.norm(dim=1, keepdim=True)
    across_eyes = eye_line / eye_distance
    down = torch.stack([-across_eyes[:, 1], across_eyes[:, 0]], dim=1)  # image y points down
    shadow = torch.zeros(len(landmarks), 1, *size, device=landmarks.device, dtype=landmarks.dtype)
    half_axes = (SHADOW_AXES[0] * eye_distance[:, 0], SHADOW_AXES[1] * eye_distance[:, 0])
    for eye, outwards in ((eyes[:, 0], -1.0), (eyes[:, 1], 1.0)):
        centre = eye + eye_distance * (outwards * SHADOW_CENTRE[0] * across_eyes + SHADOW_CENTRE[1] * down)
        shadow = torch.maximum(shadow, ellipse_mask(size, centre, across_eyes, half_axes))
    lip_line = mouth[:, 1] - mouth[:, 0]
    mouth_width = lip_line.norm(dim=1, keepdim=True)
    along_lips = lip_line / mouth_width
    lips_down = torch.stack([-along_lips[:, 1], along_lips[:, 0]], dim=1)
    centre = mouth.mean(1) + mouth_width * (LIP_CENTRE[0] * along_lips + LIP_CENTRE[1] * lips_down)
    lips = ellipse_mask(size, centre, along_lips, (LIP_AXES[0] * mouth_width[:, 0], LIP_AXES[1] * mouth_width[:, 0]))
    return shadow, lips


def soft_light(base: Tensor, colour: Tensor) -> Tensor:
    """The pegtop soft-light blend of ``colour [B, 3]`` over ``base [B, 3, H, W]`` -> ``[B, 3, H, W]``."""
    colour = colour[:, :, None, None]
    return (1 - 2 * colour) * base**2 + 2 * colour * base


def apply_makeup(images: Tensor, landmarks: Tensor, style: MakeupStyle) -> Tensor:
    """Faces wearing eye shadow (multiplied) and lip colour (soft light).

    Args:
        images: ``[B, 3, H, W]`` RGB in ``[0, 1]``.
        landmarks: ``[B, 5, 2]`` pixel positions in ``images`` (left eye, right eye, nose, left and right mouth
            corner, as seen in the image).
        style: ``B`` looks (:class:`MakeupStyle`).
    Returns:
        ``[B, 3, H, W]`` in ``[0, 1]``; identical to ``images`` outside the eye shadow and lip ellipses.
    """
    height, width = images.shape[-2:]
    shadow, lips = makeup_masks(landmarks.to(images), (height, width))

    def layer(mask: Tensor, strength: Tensor) -> Tensor:
        return mask * strength.to(images)[:, None, None, None]

    shaded = images * style.shadow.to(images)[:, :, None, None]
    out = images + layer(shadow, style.shadow_strength) * (shaded - images)
    return (out + layer(lips, style.lip_strength) * (soft_light(out, style.lips.to(images)) - out)).clamp(0, 1)


@torch.no_grad()
def centred_landmarks(detector: FaceDetector, images: Tensor, batch_size: int = 16) -> Tensor:
    """The five landmarks of each image's central face (the detected face whose centre is nearest the image centre;
    the canonical landmarks where none is found), ``images [B, 3, H, W]`` -> ``[B, 5, 2]`` pixels."""
    height, width = images.shape[-2:]
    middle = images.new_tensor([width / 2, height / 2])
    canonical = CANONICAL_LANDMARKS.to(images) * images.new_tensor([width, height]) / CANONICAL_SIZE
    found = []
    for batch in images.split(batch_size):
        for faces in detector.detect(batch):
            if len(faces.boxes) == 0 or faces.landmarks is None:
                found.append(canonical)
                continue
            centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
            found.append(faces.landmarks[(centres.to(images) - middle).norm(dim=1).argmin()].to(images))
    return torch.stack(found)
