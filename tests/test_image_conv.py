"""A convolution over an image computes its input gradient as a forward convolution: the same values as PyTorch's
kernel to float32 rounding, a float64 gradcheck, and a converted target's first layer takes the path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from redteam.convert import image_conv
from redteam.convert.image_conv import image_conv2d
from redteam.engine import load_target


@pytest.mark.parametrize(
    ("stride", "padding", "dilation"),
    [((1, 1), (0, 0), (1, 1)), ((2, 2), (1, 1), (1, 1)), ((2, 2), (0, 0), (1, 1)), ((2, 1), (2, 0), (2, 1))],
)  # the third leaves the last column unread, as facenet's first layer leaves its last row and column
def test_gradients_pass_a_float64_gradcheck(stride, padding, dilation):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 11, 12, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: image_conv2d(*a, stride, padding, dilation), (x, weight, bias))


@pytest.mark.parametrize("channels_last", [False, True])
def test_values_and_input_gradient_are_pytorchs_to_float32_rounding(channels_last):
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 40, 36, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(16, 3, 3, 3, generator=generator), torch.randn(16, generator=generator)
    results = []
    for conv in (F.conv2d, image_conv2d):
        leaf = x.clone().requires_grad_(True)
        y = conv(leaf, weight, bias, (1, 1), (1, 1), (1, 1))
        results.append((y, *torch.autograd.grad(y.square().sum(), leaf)))
    (y, gradient), (ours, our_gradient) = results
    assert torch.equal(y, ours)  # the forward is F.conv2d itself
    assert not torch.equal(gradient, our_gradient)  # summed in another order: this is the other path ...
    assert (our_gradient - gradient).abs().max() <= 1e-5 * gradient.abs().max()  # ... with PyTorch's values


def _has_step(output: torch.Tensor, name: str) -> bool:
    """Whether the autograd graph behind ``output`` holds a step of type ``name``."""
    seen, frontier = set(), [output.grad_fn]
    while frontier:
        node = frontier.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == name:
            return True
        frontier.extend(parent for parent, _ in node.next_functions)
    return False


def _takes_the_path(output: torch.Tensor) -> bool:
    return _has_step(output, "_ImageConvBackward")


@pytest.mark.parametrize(("groups", "copies"), [(6, False), (1, True)])
@pytest.mark.parametrize("padding", [(0, 1, 0, 1), (1, 0, 2, 0), (0, 2, 1, 1)])
@pytest.mark.parametrize("stride", [(2, 2), (1, 2)])
def test_uneven_padding_is_a_grown_kernel_for_a_depthwise_convolution_and_a_padded_copy_otherwise(
    groups, copies, padding, stride
):
    """TF's SAME at stride 2 pads one more row and column after: a depthwise convolution reads them through zero taps
    added to its kernel (no padded copy of its input), any other through a padded copy; both compute what the
    convolution of the padded input computes (float64: exactly, but for the order of a sum)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 13, 14, dtype=torch.float64, generator=generator)
    weight = torch.randn(6, 6 // groups, 3, 3, dtype=torch.float64, generator=generator)
    top, bottom, left, right = padding
    results = []
    for ours in (False, True):
        leaf = x.clone().requires_grad_(True)
        if ours:
            y = image_conv.conv2d(leaf, weight, None, stride, padding, (1, 1), groups)
            assert _has_step(y, "ConstantPadNdBackward0") == copies
        else:
            y = F.conv2d(F.pad(leaf, (left, right, top, bottom)), weight, None, stride, 0, 1, groups)
        results.append((y, *torch.autograd.grad((y * y.detach().sin()).sum(), leaf)))
    (y, gradient), (ours, our_gradient) = results
    assert y.shape == ours.shape
    assert torch.allclose(y, ours, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gradient, our_gradient, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["antispoof", "mobileface"])  # stride 1 and 64 maps; stride 2 and 32 maps
def test_a_converted_targets_first_layer_takes_the_path_with_pytorchs_gradient(name, faces, monkeypatch):
    target = load_target(name, torch.device("cpu"))
    x = target.preprocess(faces.load(range(4)))
    gradients = []
    for channels in (image_conv.IMAGE_CHANNELS, 0):  # ours, then PyTorch's kernel for every layer
        monkeypatch.setattr(image_conv, "IMAGE_CHANNELS", channels)
        leaf = x.clone().requires_grad_(True)
        output = target.net(leaf)
        assert _takes_the_path(output) == (channels > 0)
        gradients.append(torch.autograd.grad(output.square().sum(), leaf)[0])
    ours, theirs = gradients
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


@pytest.mark.parametrize(("maps", "path"), [(image_conv.MANY_MAPS, True), (image_conv.MANY_MAPS - 1, False)])
def test_a_layer_with_few_maps_keeps_pytorchs_kernel(maps, path):
    """With few output maps the shifted adds, not the matrix product, carry the path's work, and it loses."""
    x = torch.rand(1, 3, 20, 20, requires_grad=True)
    y = image_conv.conv2d(x, torch.randn(maps, 3, 3, 3), None, (2, 2), (1, 1, 1, 1), (1, 1), 1)
    assert _takes_the_path(y) == path


def test_bfloat16_autocast_hands_the_backward_float32_arguments():
    """Under bf16 autocast the forward runs in bf16 but keeps its float32 input and weight for the backward: the
    gradients (input, and weight and bias for a layer being trained) must come back and match float32's to bf16
    precision."""
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 20, 20, generator=generator)
    weight, bias = torch.randn(8, 3, 3, 3, generator=generator), torch.randn(8, generator=generator)
    gradients = []
    for mixed in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            y = image_conv2d(*leaves, (1, 1), (1, 1), (1, 1))
        gradients.append(torch.autograd.grad(y.float().square().sum(), leaves))
    for full, half in zip(*gradients):
        assert half.dtype == torch.float32
        assert (half - full).norm() < 3e-2 * full.norm()
