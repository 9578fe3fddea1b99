"""redteam's PReLU gives PyTorch's values and input gradients bit for bit for slopes under 0.5 (within float32
rounding above), and its gradients pass a float64 gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from redteam.convert.prelu import prelu


@pytest.mark.parametrize(
    ("shape", "channels_last", "slopes", "steep"),
    [
        ((4, 8, 5, 5), False, 8, False),
        ((4, 8, 5, 5), True, 8, False),
        ((4, 8, 5, 5), False, 1, False),
        ((6, 8), False, 8, False),
        ((4, 8, 5, 5), True, 8, True),
    ],
)
def test_values_and_gradients_are_pytorchs(shape, channels_last, slopes, steep):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    x[0, :3] = 0.0  # the kink: both sides must pick the same branch there
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    slope = torch.rand(slopes, generator=generator) * 0.8 - 0.3  # negative slopes too; all under 0.5 ...
    if steep:
        slope = slope * 20  # ... or up to 10 (arcface's reach 9.4), where lerp's other formula rounds differently
    upstream = torch.randn(shape, generator=generator)
    results = []
    for function in (F.prelu, prelu):
        leaf, leaf_slope = x.clone().requires_grad_(True), slope.clone().requires_grad_(True)
        y = function(leaf, leaf_slope)
        results.append((y, *torch.autograd.grad(y, (leaf, leaf_slope), upstream)))
    (y, grad_x, grad_slope), (ours, ours_grad_x, ours_grad_slope) = results
    assert torch.equal(y, ours)
    if steep:
        assert torch.allclose(grad_x, ours_grad_x, rtol=1e-6, atol=0)  # a few float32 roundings
    else:
        assert torch.equal(grad_x, ours_grad_x)
    # The slope's gradient is a sum over the batch: the order of additions may differ from PyTorch's.
    assert torch.allclose(grad_slope, ours_grad_slope, rtol=1e-5, atol=1e-5)


def test_input_gradient_alone_when_the_slope_is_frozen():
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    slope = torch.rand(4)  # a frozen target's parameter
    (gradient,) = torch.autograd.grad(prelu(x, slope).sum(), x)
    assert torch.equal(gradient, torch.where(x > 0, 1.0, slope.view(-1, 1, 1)).expand_as(x))


@pytest.mark.parametrize("slopes", [4, 1])
def test_gradcheck_in_float64(slopes):
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    slope = torch.rand(slopes, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(prelu, (x, slope))


def test_bfloat16_autocast_takes_the_float32_slope():
    """Under bf16 autocast a convolution hands PReLU a bf16 map while the slope stays float32; the gradient must come
    back (in the input's dtype) and agree with float32's to bf16 precision."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    weight, slope = torch.randn(4, 3, 3, 3, generator=generator), torch.rand(4, generator=generator) * 2
    gradients = []
    for precision in (None, torch.bfloat16):
        leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision is not None):
            y = prelu(F.conv2d(leaf, weight, padding=1), slope)
        gradients.append(torch.autograd.grad(y.float().square().sum(), leaf)[0])
    full, mixed = gradients
    assert mixed.dtype == torch.float32
    assert (mixed - full).norm() < 2e-2 * full.norm()
