"""Every BPDA surrogate is a sound differentiable stand-in: its backward matches finite differences in float64
(``gradcheck``), and ``bpda`` gives the deployed transform's value with the surrogate's gradient."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from redteam.api import InputTransform
from redteam.defenses.halftone import Halftone
from redteam.defenses.lqvae import LQVAE, LQVAEConfig, LQVAENet


def small_lqvae(folder) -> LQVAE:
    """The purifier with small random weights (its surrogate's maths, not a trained model's quality, is tested)."""
    torch.manual_seed(0)
    config = LQVAEConfig(image_size=8, channels=4, latent_channels=2)
    path = folder / "lqvae.pt"
    torch.save({"config": asdict(config), "state": LQVAENet(config).state_dict(), "epoch": 0}, path)
    return LQVAE(path)


TRANSFORMS = {
    "halftone": lambda folder: Halftone(),
    "halftone-ordered-blurred": lambda folder: Halftone(method="ordered", sigma=1.0),
    "lqvae": small_lqvae,
}


@pytest.fixture(params=sorted(TRANSFORMS))
def transform(request, tmp_path) -> InputTransform:
    return TRANSFORMS[request.param](tmp_path).double().eval()


def test_surrogate_backward_matches_finite_differences(transform):
    images = torch.rand(1, 3, 24, 24, dtype=torch.float64, requires_grad=True)
    assert not transform.differentiable  # these defenses are attacked through their surrogate
    assert torch.autograd.gradcheck(transform.surrogate, (images,), eps=1e-6, atol=1e-5)


def test_bpda_is_the_deployed_value_with_the_surrogates_gradient(transform):
    images = torch.rand(2, 3, 24, 24, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    deployed = transform(images, torch.Generator().manual_seed(1))
    through = transform.bpda(images, torch.Generator().manual_seed(1))
    # smooth + (deployed - smooth): the deployed value up to rounding; randomised ones draw the same from one generator
    assert torch.allclose(through, deployed, rtol=0, atol=1e-12)
    (bpda_gradient,) = torch.autograd.grad((through * weights).sum(), images)
    (surrogate_gradient,) = torch.autograd.grad((transform.surrogate(images) * weights).sum(), images)
    assert torch.allclose(bpda_gradient, surrogate_gradient)
    assert bpda_gradient.abs().sum() > 0
