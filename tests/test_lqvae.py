"""LQ-VAE purifier: trains on real faces, reloads exactly, resumes exactly, samples reproducibly, and gives adaptive
attacks a useful gradient through its surrogate where the deployed quantiser has none."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import shared_path

from redteam.api import DEFENSES
from redteam.defenses import lqvae as lqvae_module
from redteam.defenses.lqvae import LQVAE, LQVAEConfig, LQVAENet, face_crops, train_lqvae
from redteam.errors import MissingWeightsError

TINY = dict(image_size=32, channels=8, latent_channels=4, batch_size=4, learning_rate=3e-3)


@pytest.fixture(scope="module")
def train_faces(tmp_path_factory):
    """Faces of 16 training identities (disjoint from the evaluation faces)."""
    from redteam.datasets import ImageFolderDataset

    root, data = tmp_path_factory.mktemp("train_faces"), shared_path("data", "faces-train")
    for identity in sorted(p for p in data.iterdir() if p.is_dir())[:16]:
        (root / identity.name).symlink_to(identity, target_is_directory=True)
    return ImageFolderDataset(root)


@pytest.fixture(scope="module")
def crops(train_faces):
    return face_crops(train_faces, LQVAEConfig(**TINY), 16)


@pytest.fixture(scope="module")
def trained(crops, tmp_path_factory):
    """A tiny purifier trained for four epochs: (checkpoint, path)."""
    path = tmp_path_factory.mktemp("cache") / "lqvae.pt"
    return train_lqvae(LQVAEConfig(**TINY, epochs=4), crops, path, torch.device("cpu")), path


def test_crops_are_real_faces(crops):
    assert crops.shape == (16, 3, 32, 32) and crops.dtype == torch.uint8
    assert 40 < crops.float().mean() < 200 and crops.float().std() > 20


def test_training_lowers_reconstruction_error(trained, crops):
    checkpoint = trained[0]
    assert len(checkpoint["history"]) == 4 and checkpoint["epoch"] == 4
    config = LQVAEConfig(**checkpoint["config"])
    torch.manual_seed(config.seed)
    untrained, learned = LQVAENet(config), LQVAENet(config)  # the same initialisation training started from
    learned.load_state_dict(checkpoint["state"])
    faces = crops.float() / 255
    with torch.no_grad():
        errors = [F.mse_loss(n.purify(faces, torch.Generator().manual_seed(0)), faces) for n in (untrained, learned)]
    assert errors[1] < 0.85 * errors[0], errors


def test_weights_reload_to_identical_outputs(trained):
    checkpoint, path = trained
    net = LQVAENet(LQVAEConfig(**checkpoint["config"]))
    net.load_state_dict(checkpoint["state"])
    purifier = LQVAE(path)
    assert purifier.epochs_trained == 4
    crops = torch.rand(2, 3, 32, 32)
    torch.manual_seed(3)
    expected = net.purify(crops)
    torch.manual_seed(3)
    assert torch.equal(purifier.net.purify(crops), expected)


def test_resuming_equals_training_straight_through(crops, trained, tmp_path):
    path = tmp_path / "lqvae.pt"
    train_lqvae(LQVAEConfig(**TINY, epochs=2), crops, path, torch.device("cpu"))
    resumed = train_lqvae(LQVAEConfig(**TINY, epochs=4), crops, path, torch.device("cpu"))
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in trained[0]["history"]])
    for name, value in trained[0]["state"].items():
        assert torch.allclose(resumed["state"][name], value, atol=1e-6), name


def test_purifier_keeps_shape_range_and_the_image_outside_the_face(trained, faces):
    purifier = LQVAE(trained[1])
    images = faces.load([0, 1])
    purified = purifier(images)
    assert purified.shape == images.shape and purified.min() >= 0 and purified.max() <= 1
    side = round(purifier.net.config.crop_fraction * 250)
    top = (250 - side) // 2
    assert torch.equal(purified[..., :top, :], images[..., :top, :])  # only the face crop is purified
    face = (..., slice(top, top + side), slice(top, top + side))
    assert (purified[face] - images[face]).abs().mean() > 0.01


def test_sampling_is_random_but_seeded(trained, faces):
    purifier = LQVAE(trained[1])
    images = faces.load([0])
    torch.manual_seed(0)
    first, second = purifier(images), purifier(images)
    torch.manual_seed(0)
    assert not torch.equal(first, second)
    assert torch.equal(purifier(images), first)


def test_quantiser_masks_gradients_and_the_surrogate_does_not(trained, faces):
    purifier = LQVAE(trained[1])
    assert purifier.randomised and not purifier.differentiable
    images = faces.load([0, 1]).requires_grad_(True)
    deployed = torch.autograd.grad(purifier(images).sum(), images)[0]
    face = slice(70, 180)
    assert deployed[..., face, face].abs().max() == 0  # what a naive white-box attack would see: nothing
    weights = torch.rand(2, 3, 250, 250, generator=torch.Generator().manual_seed(0))
    surrogate = torch.autograd.grad((purifier.surrogate(images) * weights).sum(), images)[0]
    assert torch.isfinite(surrogate).all() and surrogate[..., face, face].abs().amax(dim=(1, 2, 3)).min() > 0
    # BPDA: the deployed value with the surrogate's gradient
    torch.manual_seed(1)
    value = purifier.bpda(images)
    torch.manual_seed(1)
    assert torch.allclose(value, purifier(images).detach(), atol=1e-6)
    assert torch.allclose(torch.autograd.grad((value * weights).sum(), images)[0], surrogate, atol=1e-5)


def test_expected_code_is_the_mean_of_sampled_codes():
    net = LQVAENet(LQVAEConfig(**TINY))
    mu, sigma = torch.linspace(-0.3, 0.3, 7), torch.full((7,), 0.05)
    draws = torch.stack([net.hard_code(net.sample(mu, sigma)) for _ in range(4000)])
    assert torch.allclose(draws.mean(0), net.expected_code(mu, sigma), atol=0.05)


def test_missing_weights_name_the_training_command(monkeypatch, tmp_path):
    monkeypatch.setenv("REDTEAM_CACHE", str(tmp_path))
    assert DEFENSES.get("lqvae") is LQVAE
    with pytest.raises(MissingWeightsError, match="redteam train lqvae --data"):
        LQVAE()


def test_train_command_writes_the_cache(cli, monkeypatch, tmp_path, train_faces, capsys):
    monkeypatch.setenv("REDTEAM_CACHE", str(tmp_path))
    args = ("train", "lqvae", "--data", train_faces.root, "--epochs", 1, "--limit", 8, "--image-size", 32)
    assert cli(*args, "--channels", 8, "--latent-channels", 4) == 0
    assert lqvae_module.default_path().is_file() and "epoch 1:" in capsys.readouterr().out
    assert LQVAE().epochs_trained == 1
    assert cli(*args, "--channels", 16) == 2  # other settings: refuses to resume silently
    assert "--restart" in capsys.readouterr().err
