"""LQ-VAE purifier: a variational autoencoder with a quantised latent space in front of any target.

Kyatham et al., "Variational Inference with Latent Space Quantization for Adversarial Resilience" (arXiv:1903.09940).
The encoder maps a face to a Gaussian posterior ``N(mu, (t/2 sigma)^2)``; a latent drawn from it is quantised to one
bit per dimension, ``sign(t^2 - z^2)`` (+1 inside the band ``|z| < t``, -1 outside), and a decoder trained on those
binary codes re-synthesises the face. A small input perturbation moves ``mu`` a little (the encoder is trained with
a Lipschitz penalty on ``d mu / d x``) and the quantiser absorbs the move unless it crosses a band edge, so what the
target sees is re-drawn from the learned face manifold.

As in the paper, training uses two decoders: a continuous one on the soft code ``softsign(k (t^2 - z^2))``, through
which the encoder learns (the hard code has no gradient), and the deployed discrete one, trained on the hard codes.
Here the latent is a small feature map (``[C, S/8, S/8]``) rather than a vector, so that faces keep their identity at
a CPU-trainable size; the VAE sees the central crop of the canonical image at ``image_size`` and its output is pasted
back over that crop.

The deployed purifier samples its latent (``randomised``) and quantises it, so its gradient is zero almost
everywhere: it is not ``differentiable`` in the sense adaptive attacks need. Its :meth:`~LQVAE.surrogate` is the
discrete decoder on the *expected* code under the sampling noise, ``2 P(|z| < t) - 1``, a smooth closed form of the
quantiser averaged over its randomness (BPDA with EOT, Athalye et al. 2018).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from redteam.api import DEFENSES, InputTransform, crop_resize
from redteam.assets import cache_dir, save_atomic
from redteam.datasets import FaceDataset
from redteam.errors import MissingWeightsError, RedteamError

TRAIN_HINT = "redteam train lqvae --data path/to/faces-train"


@dataclass
class LQVAEConfig:
    """Architecture and training settings; saved with the weights."""

    image_size: int = 64  # side of the face crop the VAE works on (a multiple of 8)
    crop_fraction: float = 0.62  # central square of the canonical image it purifies (covers FaceNet's 0.56 crop)
    channels: int = 32  # width of the first convolution; doubled at each of the three stages
    latent_channels: int = 16  # the latent is [latent_channels, image_size / 8, image_size / 8] bits
    quant_threshold: float = 0.1  # t: a latent codes +1 when |z| < t, -1 otherwise (the paper's value)
    softsign_scale: float = 500.0  # k of the continuous decoder's soft code, as in the authors' code
    reconstruction_weight: float = 10.0
    lipschitz_weight: float = 10.0
    lipschitz_target: float = 0.1  # per-sample norm of d(sum mu)/dx the penalty pulls towards (the paper's)
    lipschitz_samples: int = 4  # crops per batch the penalty is estimated on
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % 8:
            raise RedteamError(f"lqvae image size must be a multiple of 8, not {self.image_size}.")

    def architecture(self) -> dict:
        """The settings a checkpoint must share to be resumed (everything but the epoch count)."""
        return {k: v for k, v in asdict(self).items() if k != "epochs"}


def default_path() -> Path:
    return cache_dir() / "defenses" / "lqvae.pt"


def _encoder(config: LQVAEConfig) -> nn.Sequential:
    c = config.channels
    return nn.Sequential(
        nn.Conv2d(3, c, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(c, 2 * c, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(2 * c, 4 * c, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(4 * c, 2 * config.latent_channels, 3, 1, 1),  # mu and log-variance
    )


def _decoder(config: LQVAEConfig) -> nn.Sequential:
    c = config.channels
    return nn.Sequential(
        nn.Conv2d(config.latent_channels, 4 * c, 3, 1, 1),
        nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(4 * c, 2 * c, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(2 * c, c, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(c, 3, 4, 2, 1),
        nn.Sigmoid(),
    )


class LQVAENet(nn.Module):
    """The VAE on ``[B, 3, S, S]`` face crops in ``[0, 1]``: encoder, continuous and discrete decoders."""

    def __init__(self, config: LQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = _encoder(config)
        self.continuous_decoder = _decoder(config)
        self.discrete_decoder = _decoder(config)

    def posterior(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, 3, S, S]`` -> mean and standard deviation of the sampled latent, each ``[B, C, S/8, S/8]``."""
        mu, log_variance = self.encoder(2 * crops - 1).chunk(2, dim=1)
        # The authors' sampling noise is scaled by t/2, so a unit posterior stays mostly inside one band.
        return mu, 0.5 * self.config.quant_threshold * torch.exp(0.5 * log_variance.clamp(-20, 10))

    def hard_code(self, z: Tensor) -> Tensor:
        """``sign(t^2 - z^2)``: +1 inside the band ``|z| < t``, -1 outside (zero gradient)."""
        return torch.where(z.abs() < self.config.quant_threshold, 1.0, -1.0).to(z.dtype)

    def soft_code(self, z: Tensor) -> Tensor:
        return F.softsign(self.config.softsign_scale * (self.config.quant_threshold**2 - z**2))

    def expected_code(self, mu: Tensor, sigma: Tensor) -> Tensor:
        """``E[sign(t^2 - z^2)]`` for ``z ~ N(mu, sigma^2)``: ``2 P(|z| < t) - 1``, smooth in ``mu`` and ``sigma``."""
        t = self.config.quant_threshold
        inside = torch.special.ndtr((t - mu) / sigma) - torch.special.ndtr((-t - mu) / sigma)
        return 2 * inside - 1

    def sample(self, mu: Tensor, sigma: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + sigma * noise

    def purify(self, crops: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The deployed filter: sample, quantise, decode. ``[B, 3, S, S]`` -> ``[B, 3, S, S]``."""
        mu, sigma = self.posterior(crops)
        return self.discrete_decoder(self.hard_code(self.sample(mu, sigma, generator)))

    def losses(self, crops: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The paper's objectives on a batch. Summing them trains each part on its own loss: the encoder on KL,
        continuous reconstruction and the Lipschitz penalty; each decoder on its reconstruction (the hard code
        carries no gradient back to the encoder)."""
        config = self.config
        mu, sigma = self.posterior(crops)
        z = self.sample(mu, sigma, generator)
        continuous = self.continuous_decoder(self.soft_code(z))
        discrete = self.discrete_decoder(self.hard_code(z))
        # KL to N(0, 1) of the encoder's own Gaussian (before the t/2 noise scaling), averaged per latent.
        log_variance = 2 * torch.log(sigma / (0.5 * config.quant_threshold))
        kl = -0.5 * (1 + log_variance - mu**2 - log_variance.exp()).mean()
        # Double backpropagation is the costly part on a CPU: the penalty is estimated on a few crops per batch.
        probe = crops[: config.lipschitz_samples].detach().requires_grad_(True)
        (slope,) = torch.autograd.grad(self.posterior(probe)[0].sum(), probe, create_graph=True)
        lipschitz = ((config.lipschitz_target - slope.flatten(1).norm(dim=1)) ** 2).mean()
        continuous_mse = F.mse_loss(continuous, crops)
        discrete_mse = F.mse_loss(discrete, crops)
        total = (
            kl + config.lipschitz_weight * lipschitz + config.reconstruction_weight * (continuous_mse + discrete_mse)
        )
        return {
            "loss": total,
            "kl": kl,
            "lipschitz": lipschitz,
            "continuous_mse": continuous_mse,
            "discrete_mse": discrete_mse,
        }


@DEFENSES.register("lqvae", "LQ-VAE purifier: VAE with a binary-quantised latent (Kyatham et al. 2019), BPDA+EOT")
class LQVAE(InputTransform):
    """Purifies the face crop of ``[B, 3, H, W]`` canonical images through the trained LQ-VAE (sampled each call);
    the rest of the image passes unchanged. Loads ``~/.cache/redteam/defenses/lqvae.pt`` (see ``redteam train``)."""

    name = "lqvae"
    differentiable = False  # the binary quantiser has zero gradient: attacks use the surrogate (BPDA)
    surrogate_name = "expected decoder"
    randomised = True  # the latent is sampled on every call: attacks average over draws (EOT)
    moves_threshold = True  # its redrawn faces score alike: the undefended threshold accepts impostors

    def __init__(self, path: Path | str | None = None):
        super().__init__()
        path = Path(path) if path else default_path()
        if not path.is_file():
            raise MissingWeightsError(f"no trained lqvae purifier at {path}: run `{TRAIN_HINT}` first.")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        self.net = LQVAENet(LQVAEConfig(**checkpoint["config"]))
        self.net.load_state_dict(checkpoint["state"])
        self.net.eval().requires_grad_(False)
        self.epochs_trained: int = checkpoint["epoch"]
        self.trained_on = checkpoint.get("data")  # absent from checkpoints written before it was recorded

    def _through(self, images: Tensor, filter_crops: Callable[[Tensor], Tensor]) -> Tensor:
        """Apply ``filter_crops`` to the VAE-sized face crop and paste the result back at full resolution."""
        config = self.net.config
        height, width = images.shape[-2:]
        side = round(config.crop_fraction * min(height, width))
        top, left = (height - side) // 2, (width - side) // 2
        size = (config.image_size, config.image_size)
        filtered = filter_crops(crop_resize(images, config.crop_fraction, size))
        back = F.interpolate(filtered, size=(side, side), mode="bilinear", align_corners=False)
        out = images.clone()
        out[..., top : top + side, left : left + side] = back.clamp(0, 1)
        return out

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, 3, H, W]``: a fresh latent draw per call, from ``generator``."""
        return self._through(images, lambda crops: self.net.purify(crops, generator))

    def surrogate(self, images: Tensor) -> Tensor:
        """The discrete decoder on the expected code: deterministic, smooth, the purifier averaged over its noise."""

        def expected(crops: Tensor) -> Tensor:
            return self.net.discrete_decoder(self.net.expected_code(*self.net.posterior(crops)))

        return self._through(images, expected)


def face_crops(
    dataset: FaceDataset,
    config: LQVAEConfig,
    count: int,
    batch_size: int = 64,
    advance: Callable[[int], None] = lambda n: None,
) -> Tensor:
    """The first ``count`` images' face crops at the VAE's size, ``[count, 3, S, S]`` uint8 (kept in memory)."""
    size = (config.image_size, config.image_size)
    parts = []
    for start in range(0, count, batch_size):
        indices = list(range(start, min(start + batch_size, count)))
        crops = crop_resize(dataset.load(indices), config.crop_fraction, size)
        parts.append((crops * 255).round().to(torch.uint8))
        advance(len(indices))
    return torch.cat(parts)


def train_lqvae(
    config: LQVAEConfig,
    crops: Tensor,
    path: Path,
    device: torch.device,
    restart: bool = False,
    advance: Callable[[int], None] = lambda n: None,
    trained_on: str | None = None,
) -> dict:
    """Train (or resume) the LQ-VAE on ``crops [N, 3, S, S]`` uint8, checkpointing to ``path`` after every epoch.
    Batches and noise are drawn from generators seeded by (seed, epoch), so a resumed run redraws the same.
    ``trained_on``: the folder the crops come from, recorded (runs recalibrate the defended threshold there).
    Returns the checkpoint."""
    torch.manual_seed(config.seed)
    net = LQVAENet(config).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    checkpoint: dict[str, Any] = {"config": asdict(config), "epoch": 0, "history": [], "data": trained_on}
    if path.is_file() and not restart:
        previous = torch.load(path, map_location="cpu", weights_only=True)
        if LQVAEConfig(**previous["config"]).architecture() != config.architecture():
            raise RedteamError(f"{path} was trained with other settings; pass --restart to train it again.")
        net.load_state_dict(previous["state"])
        optimiser.load_state_dict(previous["optimiser"])
        checkpoint.update(epoch=previous["epoch"], history=previous["history"])
    advance(checkpoint["epoch"] * len(crops))
    for epoch in range(checkpoint["epoch"], config.epochs):
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        noise = torch.Generator(device).manual_seed(config.seed * 1000 + epoch)
        order = torch.randperm(len(crops), generator=generator)
        flips = torch.rand(len(crops), generator=generator) < 0.5  # mirror half the faces
        sums: dict[str, float] = {}
        net.train()
        for start in range(0, len(crops), config.batch_size):
            index = order[start : start + config.batch_size]
            batch = crops[index].to(device).float() / 255
            batch = torch.where(flips[index].to(device).view(-1, 1, 1, 1), batch.flip(-1), batch)
            losses = net.losses(batch, noise)
            optimiser.zero_grad()
            losses["loss"].backward()
            # The double-backpropagated Lipschitz penalty can spike (seen at epoch 6 of the default run): clip.
            nn.utils.clip_grad_norm_(net.parameters(), config.max_grad_norm)
            optimiser.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * len(index)
            advance(len(index))
        checkpoint["history"].append({key: value / len(crops) for key, value in sums.items()})
        checkpoint.update(epoch=epoch + 1, state=net.state_dict(), optimiser=optimiser.state_dict())
        save_atomic(checkpoint, path)
    if "state" not in checkpoint:  # nothing left to train: keep what is there
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint
