"""Face priors: generators fitted on public faces, whose latent space a model-inversion attack searches.

:class:`EigenfacePrior` is the linear generator of eigenfaces (Turk & Pentland 1991): principal components of
canonical face images at a low resolution. A latent ``z`` draws ``mean + sum_i z_i s_i v_i`` over the central crop of
the frame (``v_i`` the components, ``s_i`` the standard deviation of the faces along them), the rest of the frame
keeping the mean face. The latent is whitened, so under the prior ``z ~ N(0, I)`` and the prior's negative
log-density is ``|z|^2 / 2``: searching ``z`` with that penalty is GMI's "search in a generator's latent space"
(Zhang et al. 2020) with a generator that costs seconds to fit on a CPU. It is fitted on identities disjoint from
the ones attacked (``faces-train``) and cached under the cache dir, keyed by its data and settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from redteam.api.targets import crop_resize
from redteam.assets import cache_dir, save_atomic
from redteam.datasets import FaceDataset, ImageFolderDataset
from redteam.errors import RedteamError


@dataclass(frozen=True)
class EigenfaceConfig:
    """``size``: side of the (downscaled 250 px) canonical frame the prior draws; ``crop``: the central square of it
    that the components span (0.64 covers every zoo recogniser's own crop); ``components``: latent size;
    ``images``: faces fitted on, evenly spaced over the dataset (0: all)."""

    size: int = 112
    crop: float = 0.64
    components: int = 200
    images: int = 0

    def __post_init__(self) -> None:
        if self.size < 16 or not 0 < self.crop <= 1 or self.components < 1 or self.images < 0:
            raise RedteamError(
                f"eigenface prior: size >= 16, 0 < crop <= 1, components >= 1, images >= 0; got {asdict(self)}."
            )

    @property
    def crop_pixels(self) -> int:
        return round(self.crop * self.size)


class EigenfacePrior(nn.Module):
    """Eigenfaces as a generator: ``z [B, k] -> faces [B, 3, S, S]``.

    Args:
        mean: ``[3, S, S]`` mean canonical face.
        components: ``[k, 3 * c * c]`` orthonormal principal directions of the central ``c x c`` crop.
        scales: ``[k]`` standard deviation of the faces along each component (largest first).
    """

    # Buffers (they follow the module's device).
    mean: Tensor
    components: Tensor
    scales: Tensor

    def __init__(self, mean: Tensor, components: Tensor, scales: Tensor, config: EigenfaceConfig):
        super().__init__()
        self.config = config
        self.register_buffer("mean", mean)
        self.register_buffer("components", components)
        self.register_buffer("scales", scales)

    @property
    def latent_dim(self) -> int:
        return len(self.scales)

    def decode(self, z: Tensor) -> Tensor:
        """Latents ``[B, k]`` -> faces ``[B, 3, S, S]`` in ``[0, 1]`` (differentiable; ``z = 0`` is the mean face)."""
        size, crop = self.config.size, self.config.crop_pixels
        start = (size - crop) // 2
        change = ((z * self.scales) @ self.components).view(-1, 3, crop, crop)
        change = F.pad(change, (start, size - crop - start, start, size - crop - start))
        return (self.mean + change).clamp(0, 1)

    def encode(self, images: Tensor) -> Tensor:
        """Canonical faces ``[B, 3, H, W]`` -> the latents ``[B, k]`` of their projection onto the prior."""
        frames = crop_resize(images, 1.0, (self.config.size, self.config.size))
        centred = crop_resize(frames - self.mean, self.config.crop, (self.config.crop_pixels,) * 2)
        return centred.flatten(1) @ self.components.T / self.scales

    def sample(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        """``count`` latents ``[count, k]`` drawn from the prior, ``N(0, I)``."""
        return torch.randn(count, self.latent_dim, generator=generator, device=self.mean.device)


def fitted_images(dataset: FaceDataset, config: EigenfaceConfig) -> int:
    """How many of ``dataset``'s faces the prior is fitted on."""
    return len(dataset) if config.images == 0 else min(config.images, len(dataset))


def fit_eigenfaces(
    dataset: FaceDataset, config: EigenfaceConfig, advance: Callable[[int], None] = lambda n: None
) -> EigenfacePrior:
    """Principal components of ``dataset``'s faces (randomised SVD with a fixed seed: the same faces give the same
    prior). ``advance`` counts the images loaded (progress bars)."""
    count = fitted_images(dataset, config)
    if count <= config.components:
        raise RedteamError(f"an eigenface prior with {config.components} components needs more than {count} faces.")
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().tolist()
    frames = []
    for batch in torch.tensor(indices).split(64):
        frames.append(crop_resize(dataset.load(batch.tolist()), 1.0, (config.size, config.size)))
        advance(len(batch))
    faces = torch.cat(frames)
    mean = faces.mean(0)
    crops = crop_resize(faces - mean, config.crop, (config.crop_pixels,) * 2).flatten(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _, singular, directions = torch.svd_lowrank(crops, q=config.components + 10, niter=4)
    scales = singular[: config.components] / (count - 1) ** 0.5
    return EigenfacePrior(mean, directions[:, : config.components].T.contiguous(), scales, config)


def load_eigenfaces(
    dataset: ImageFolderDataset,
    config: EigenfaceConfig,
    progress: Callable[[int], Callable[[int], None]] = lambda total: lambda n: None,
) -> EigenfacePrior:
    """The eigenface prior of ``dataset`` from the cache dir (keyed by its real folder, image count and ``config``),
    fitted and cached on first use; ``progress(total)`` starts a progress bar over the images then loaded."""
    key = json.dumps({"data": str(dataset.root.resolve()), "count": len(dataset), **asdict(config)}, sort_keys=True)
    path = cache_dir() / "priors" / f"eigenfaces-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return EigenfacePrior(saved["mean"], saved["components"], saved["scales"], config)
    prior = fit_eigenfaces(dataset, config, progress(fitted_images(dataset, config)))
    save_atomic({"mean": prior.mean, "components": prior.components, "scales": prior.scales, "key": key}, path)
    return prior
