"""A convolution over an image (a few input channels) whose input gradient is a matrix product and shifted adds.

oneDNN's backward-data kernel writes one output channel per input channel of the layer: for a network's first
convolution that is 3 (RGB), a shape it runs at a fraction of its forward's speed (antispoof at batch 16: 28 ms for the
first layer's input gradient against 6 ms for its forward, a fifth of the whole forward+backward). The same gradient
is ``kernel taps x channels`` maps, each the output gradient times one tap's weights (one matrix product for all of
them), added into the input at that tap's offset and stride. Values agree with PyTorch's to float32 rounding (summed
in another order; ``tests/test_image_conv.py``); the forward is ``F.conv2d`` itself.

:func:`conv2d` is the converters' one convolution: it takes padding as a graph gives it and picks this path, a grown
kernel for uneven padding, or ``F.conv2d``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: Convolutions with at most this many input channels (grey, RGB, RGBA) take this path ...
IMAGE_CHANNELS = 4
#: ... when they have at least this many output channels: then the matrix product carries the work, and it beats
#: oneDNN's kernel at any batch and stride (first layers of 32 and 64 maps: 1.4-2.8x). With fewer, the shifted adds
#: carry it and lose (retinaface's 8 maps and scrfd's 16 at stride 2: 1.4-2.2x slower; blazeface's 24: level).
MANY_MAPS = 32

Pair = tuple[int, int]
#: Padding on each side of a map: (top, bottom, left, right).
Pads = tuple[int, int, int, int]


class _ImageConv(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, _, ctx.stride, ctx.padding, ctx.dilation = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        # Under bf16 autocast the forward ran in bf16 but saved its float32 arguments: take the gradient's dtype.
        weight = weight.to(grad.dtype)
        wants_x, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        grad_x = _input_gradient(grad, weight, x.shape, ctx.stride, ctx.padding, ctx.dilation) if wants_x else None
        grad_weight = grad_bias = None
        if wants_weight or wants_bias:  # training a first layer: PyTorch's own kernels
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, x.to(grad.dtype), weight, [weight.shape[0]], ctx.stride, ctx.padding, ctx.dilation, False,
                [0, 0], 1, [False, wants_weight, wants_bias],
            )  # fmt: skip
        return grad_x, grad_weight, grad_bias, None, None, None


def _input_gradient(
    grad: Tensor, weight: Tensor, shape: torch.Size, stride: Pair, padding: Pair, dilation: Pair
) -> Tensor:
    """The gradient w.r.t. the input ``[B, C, H, W]`` of a convolution with ``weight [O, C, kh, kw]``, from the
    gradient of its output ``grad [B, O, Ho, Wo]``."""
    batch, channels, height, width = shape
    out_channels, _, kh, kw = weight.shape
    rows, cols = grad.shape[-2:]
    # One map per (tap, channel), each a contiguous plane, so that every shifted add below reads only its own maps:
    # taps[i, j, b, c, y, x] = sum_o w[o, c, i, j] grad[b, o, y, x], one matrix product over the channels-last gradient
    per_tap = weight.permute(2, 3, 1, 0).reshape(kh * kw * channels, out_channels)
    pixels = grad.permute(0, 2, 3, 1).reshape(-1, out_channels)
    taps = torch.mm(per_tap, pixels.t()).view(kh, kw, channels, batch, rows, cols).transpose(2, 3)
    padded = grad.new_zeros(batch, channels, height + 2 * padding[0], width + 2 * padding[1])
    span = (stride[0] * (rows - 1) + 1, stride[1] * (cols - 1) + 1)  # the input rows and columns one tap reads
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilation[0], j * dilation[1]
            padded[:, :, top : top + span[0] : stride[0], left : left + span[1] : stride[1]] += taps[i, j]
    return padded[:, :, padding[0] : padding[0] + height, padding[1] : padding[1] + width]


def image_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair, padding: Pair, dilation: Pair) -> Tensor:
    """``F.conv2d`` (no groups; ``padding`` as rows and columns on each side) with a fast input gradient for a
    convolution over a few channels. ``x [B, C, H, W]``, ``weight [O, C, kh, kw]`` -> ``[B, O, Ho, Wo]``."""
    return _ImageConv.apply(x, weight, bias, stride, padding, dilation)


def conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair, padding: Pads, dilation: Pair, groups: int
) -> Tensor:
    """``F.conv2d`` with ``padding`` as a graph gives it, ``(top, bottom, left, right)``; through
    :func:`image_conv2d` when the layer reads an image (at most :data:`IMAGE_CHANNELS` channels, no groups) into at
    least :data:`MANY_MAPS` maps, on the CPU, and something wants its input's gradient.

    Padding that differs between two sides (TF's SAME at stride 2 puts one more row and column after) is a padded
    copy of the input, forward and backward, except for a depthwise convolution: there it is even padding with the
    kernel grown by zero taps on the short side, which reads the same pixels with the same weights and costs less
    than the copy (arcface's stride-2 depthwise layers: 1.5-1.6x faster forward and backward, the same values)."""
    top, bottom, left, right = padding
    if (top, left) != (bottom, right):
        depthwise = groups > 1 and groups == x.shape[1] and tuple(dilation) == (1, 1)
        if depthwise and not torch.onnx.is_in_onnx_export():  # an export keeps the kernel's shape known
            grown = (max(right - left, 0), max(left - right, 0), max(bottom - top, 0), max(top - bottom, 0))
            weight, top, left = F.pad(weight, grown), max(top, bottom), max(left, right)
        else:
            x, top, left = F.pad(x, (left, right, top, bottom)), 0, 0
    image = groups == 1 and weight.shape[1] <= IMAGE_CHANNELS and weight.shape[0] >= MANY_MAPS
    # oneDNN's slow kernel is the reason for the path: on CUDA, cuDNN's own backward stays one call
    if x.requires_grad and image and x.device.type == "cpu":
        return image_conv2d(x, weight, bias, stride, (top, left), dilation)
    return F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
