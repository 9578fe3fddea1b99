"""What a deployed face system does to an image before its models see it: JPEG re-encoding, resizing, blur, a
camera's framing and colour.

They are transforms in front of the target like a defense's (``--intruder jpeg:q=75+resize:0.5`` puts them first
in the chain), and are attacked the two ways a defense is: non-adaptive (the attack ignores them; they are applied
to its result) and adaptive (the attack differentiates through them), so the report says how much of an attack
survives the system's own re-encoding. A setting without a name is the transform's first one (``resize:0.5``).

- ``jpeg``: the real codec (Pillow's libjpeg, 4:2:0 chroma subsampling, on 8-bit pixels) as deployed; its BPDA
  surrogate is kornia's differentiable JPEG (Shin & Song 2017; Reich et al. 2024) at the same quality.
- ``resize``: shrunk by ``scale`` (bilinear, antialiased) and enlarged back, as a system that stores small images
  does; differentiable.
- ``blur``: a Gaussian blur of ``sigma`` pixels (a soft camera or a denoiser); differentiable.
- ``jitter``: the face framed a little differently on every capture: shifted by up to ``shift`` of the image's side
  and scaled by up to ``zoom``; differentiable and random (adaptive attacks average over draws: EOT).
- ``colour``: the light and white balance of every capture: brightness, contrast and saturation each off by up to
  ``shift``; differentiable and random (EOT).
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from kornia.enhance import adjust_brightness, adjust_contrast, adjust_saturation, jpeg_codec_differentiable
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine
from PIL import Image
from torch import Tensor

from redteam.api import DEFENSES, InputTransform
from redteam.errors import RedteamError


@DEFENSES.register("jpeg", "JPEG re-encoding at a quality (the real codec; BPDA through a differentiable JPEG)")
class Jpeg(InputTransform):
    """JPEG compression and decompression at quality ``q`` (1-100), as a system re-encodes uploads."""

    name = "jpeg"
    surrogate_name = "differentiable jpeg"

    def __init__(self, q: int = 75):
        super().__init__()
        if not (isinstance(q, int) and 1 <= q <= 100):
            raise RedteamError(f"jpeg quality q is a whole number from 1 to 100, not {q!r}.")
        self.q = q

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> the decoded JPEGs, ``[B, 3, H, W]`` (no gradient)."""
        pixels = (images.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        decoded = []
        for image in pixels:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=self.q)
            decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
        out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
        return out.to(device=images.device, dtype=images.dtype) / 255

    def surrogate(self, images: Tensor) -> Tensor:
        quality = torch.tensor([float(self.q)], device=images.device)
        return jpeg_codec_differentiable(images.clamp(0, 1), quality)


@DEFENSES.register("resize", "shrinking by a scale and enlarging back (bilinear), as a system storing small images")
class Resize(InputTransform):
    """Down to ``scale`` of the size (0 < scale <= 1) and back up; differentiable."""

    name = "resize"
    differentiable = True

    def __init__(self, scale: float = 0.5):
        super().__init__()
        if not (isinstance(scale, int | float) and 0 < scale <= 1):
            raise RedteamError(f"resize scale is a fraction of the size in (0, 1], not {scale!r}.")
        self.scale = float(scale)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        height, width = images.shape[-2:]
        small = (max(1, round(height * self.scale)), max(1, round(width * self.scale)))
        shrunk = F.interpolate(images, size=small, mode="bilinear", align_corners=False, antialias=True)
        return F.interpolate(shrunk, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)


@DEFENSES.register("blur", "a Gaussian blur of sigma pixels (a soft camera or a denoiser)")
class Blur(InputTransform):
    """A Gaussian blur, ``sigma`` pixels (> 0); differentiable."""

    name = "blur"
    differentiable = True

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        if not (isinstance(sigma, int | float) and sigma > 0):
            raise RedteamError(f"blur sigma is a width in pixels (> 0), not {sigma!r}.")
        self.sigma = float(sigma)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        side = 2 * int(np.ceil(3 * self.sigma)) + 1
        return gaussian_blur2d(images, (side, side), (self.sigma, self.sigma))


def _fraction(name: str, value: object, most: float = 1.0) -> float:
    """``value`` as a float in ``[0, most)``, or a one-line error naming the setting."""
    if not (isinstance(value, int | float) and 0 <= value < most):
        raise RedteamError(f"{name} is a fraction in [0, {most:g}), not {value!r}.")
    return float(value)


def _uniform(images: Tensor, generator: torch.Generator | None, most: float, *shape: int) -> Tensor:
    """``[B, *shape]`` uniform in ``[-most, most]``, drawn from ``generator`` on the images' device."""
    draw = torch.rand(len(images), *shape, generator=generator, device=images.device, dtype=images.dtype)
    return (2 * draw - 1) * most


@DEFENSES.register("jitter", "the face framed differently on every capture: a random shift and zoom (EOT)")
class Jitter(InputTransform):
    """Each image shifted by up to ``shift`` of its side (each axis) and scaled by ``1 ± zoom``, borders repeated;
    differentiable, a fresh draw per call."""

    name = "jitter"
    differentiable = True
    randomised = True

    def __init__(self, shift: float = 0.03, zoom: float = 0.05):
        super().__init__()
        self.shift, self.zoom = _fraction("jitter shift", shift, 0.5), _fraction("jitter zoom", zoom)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        height, width = images.shape[-2:]
        centre = images.new_tensor([(width - 1) / 2, (height - 1) / 2]).expand(len(images), 2)
        scale = (1 + _uniform(images, generator, self.zoom, 1)).expand(-1, 2)
        matrix = get_rotation_matrix2d(centre, images.new_zeros(len(images)), scale)
        matrix[:, :, 2] += _uniform(images, generator, self.shift, 2) * images.new_tensor([width, height])
        return warp_affine(images, matrix, (height, width), padding_mode="border", align_corners=True)


@DEFENSES.register("colour", "the light of every capture: random brightness, contrast and saturation shifts (EOT)")
class Colour(InputTransform):
    """Brightness ``± shift``, contrast and saturation ``× (1 ± shift)``, drawn per image and call; differentiable."""

    name = "colour"
    differentiable = True
    randomised = True

    def __init__(self, shift: float = 0.1):
        super().__init__()
        self.shift = _fraction("colour shift", shift)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        brighter = adjust_brightness(images, _uniform(images, generator, self.shift), clip_output=True)
        contrasted = adjust_contrast(brighter, 1 + _uniform(images, generator, self.shift), clip_output=True)
        return adjust_saturation(contrasted, 1 + _uniform(images, generator, self.shift)).clamp(0, 1)
