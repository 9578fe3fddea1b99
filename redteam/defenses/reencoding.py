"""What a deployed face system does to an image before its models see it: JPEG re-encoding, resizing, blur.

They are transforms in front of the target like a defense's (``--intruder jpeg:q=75+resize:0.5`` puts them first
in the chain), and are attacked the two ways a defense is: non-adaptive (the attack ignores them; they are applied
to its result) and adaptive (the attack differentiates through them), so the report says how much of an attack
survives the system's own re-encoding. A setting without a name is the transform's first one (``resize:0.5``).

- ``jpeg``: the real codec (Pillow's libjpeg, 4:2:0 chroma subsampling, on 8-bit pixels) as deployed; its BPDA
  surrogate is kornia's differentiable JPEG (Shin & Song 2017; Reich et al. 2024) at the same quality.
- ``resize``: shrunk by ``scale`` (bilinear, antialiased) and enlarged back, as a system that stores small images
  does; differentiable.
- ``blur``: a Gaussian blur of ``sigma`` pixels (a soft camera or a denoiser); differentiable.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from kornia.enhance import jpeg_codec_differentiable
from kornia.filters import gaussian_blur2d
from PIL import Image
from torch import Tensor

from redteam.api import DEFENSES, InputTransform
from redteam.errors import RedteamError


@DEFENSES.register("jpeg", "JPEG re-encoding at a quality (the real codec; BPDA through a differentiable JPEG)")
class Jpeg(InputTransform):
    """JPEG compression and decompression at quality ``q`` (1-100), as a system re-encodes uploads."""

    name = "jpeg"

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
