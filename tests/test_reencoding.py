"""What a deployed system does to images (JPEG, resizing, blur, framing and colour jitter) as transforms in front
of the target: JPEG is the real codec with a differentiable stand-in close to it, the random ones draw from the
generator, settings may be given by position, bad ones are one line, and `--intruder` attacks through them both
ways from the command line."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from redteam.engine.assembly import build_defense
from redteam.errors import RedteamError


def test_jpeg_is_the_real_codec_and_its_stand_in_is_close_and_differentiable(faces):
    images = faces.load([0, 1])
    (jpeg,) = build_defense("jpeg:q=75").transforms
    decoded = jpeg(images)
    pixels = (images[0] * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=75)
    expected = torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1) / 255
    assert torch.equal(decoded[0], expected)
    assert 0 < (decoded - images).abs().mean() < 0.05  # it changes the image, a little
    x = images.clone().requires_grad_(True)
    smooth = jpeg.bpda(x)
    # Forward: the real codec; backward: the stand-in's gradient.
    assert torch.allclose(smooth.detach(), decoded, atol=1e-6)
    smooth.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert (jpeg.surrogate(images) - decoded).abs().mean() < 0.01


def test_resize_and_blur_keep_the_shape_and_their_gradients():
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    resize, blur = build_defense("resize:0.5+blur:sigma=1").transforms
    assert resize.scale == 0.5 and blur.sigma == 1.0
    out = blur(resize(images))
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert torch.allclose(build_defense("resize:1").transforms[0](images), images, atol=1e-6)


def test_framing_and_colour_jitter_draw_from_the_generator_and_pass_gradients():
    images = torch.rand(3, 3, 48, 48, requires_grad=True)
    for transform in build_defense("jitter:shift=0.05,zoom=0.1+colour:0.2").transforms:
        assert transform.randomised and transform.differentiable
        first, again = (transform(images, torch.Generator().manual_seed(7)) for _ in range(2))
        other = transform(images, torch.Generator().manual_seed(8))
        assert torch.equal(first, again) and not torch.allclose(first, other)  # the seed decides the draw
        assert first.shape == images.shape and 0 <= first.min() and first.max() <= 1
        assert (first - images).abs().mean() > 1e-3  # it does change the images
        (gradient,) = torch.autograd.grad(first.sum(), images)
        assert gradient.abs().sum() > 0
    (still,) = build_defense("jitter:shift=0,zoom=0").transforms
    assert torch.allclose(still(images), images, atol=1e-4)  # no jitter: the same framing


@pytest.mark.parametrize(
    "spec, message",
    [("jpeg:q=0", "jpeg quality q is a whole number"), ("resize:2", "resize scale is a fraction"),
     ("blur:0", "blur sigma is a width"), ("jitter:shift=0.7", "jitter shift is a fraction in"),
     ("colour:-1", "colour shift is a fraction"), ("jpeg:quality=75", "jpeg has no setting quality; it takes q")],
)  # fmt: skip
def test_bad_settings_are_one_line(spec, message):
    with pytest.raises(RedteamError, match=message) as raised:
        build_defense(spec)
    assert "\n" not in str(raised.value)


def test_intruder_is_attacked_both_ways_from_the_command_line(cli, capsys, faces_root, tmp_path):
    command = ("run", "--target", "arcface", "--attack", "pgd", "--intruder", "jpeg:q=75", "--data", faces_root,
               "--limit", 2, "--eps", "0,8", "--steps", 3, "--no-checks", "--out", tmp_path)  # fmt: skip
    assert cli(*command) == 0
    capsys.readouterr()
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert set(curve["defense"]) == {"jpeg:q=75 (adaptive)", "jpeg:q=75 (non-adaptive)"}
    assert (curve[curve["eps"] == 0]["accuracy"] == 1.0).all()
