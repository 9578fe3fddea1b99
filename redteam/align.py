"""Canonical face images: every dataset hands targets faces framed the same way, so each target needs one fixed crop.

The canonical frame is LFW's deep-funneled framing: a square image whose five landmarks sit at
``CANONICAL_LANDMARKS`` (for side 250). The template is the left/right-symmetrised mean of MTCNN landmarks on
400 LFW deep-funneled images (per-point std 2-6 px); ``tests/test_align.py`` re-measures it.
"""

from __future__ import annotations

import torch
from kornia.geometry.transform import warp_affine
from torch import Tensor

CANONICAL_SIZE = 250
# left eye, right eye, nose tip, left and right mouth corner (as seen in the image), pixels in a 250 x 250 frame
CANONICAL_LANDMARKS = torch.tensor(
    [[104.4, 112.5], [145.6, 112.5], [125.0, 136.2], [106.6, 157.4], [143.4, 157.4]], dtype=torch.float32
)
#: Five-point templates of recognisers' aligned crops (same landmark order; pixel centres at integers), by name.
TEMPLATES = {
    # Where InsightFace's alignment puts the five landmarks in its 112 x 112 training crops (ArcFace and kin).
    "insightface-112": torch.tensor(
        [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
    ),
}


def similarity_transform(source: Tensor, destination: Tensor) -> Tensor:
    """Least-squares rotation + uniform scale + translation mapping ``source`` points onto ``destination`` (Umeyama).

    Args:
        source: ``[B, K, 2]`` points.
        destination: ``[K, 2]`` or ``[B, K, 2]`` points.
    Returns:
        ``[B, 2, 3]`` affine matrices (differentiable in both arguments).
    """
    destination = destination.to(source).expand_as(source)
    src_mean, dst_mean = source.mean(1, keepdim=True), destination.mean(1, keepdim=True)
    src, dst = source - src_mean, destination - dst_mean
    # As complex numbers z_dst = a z_src with a = scale * exp(i angle); least squares: a = <src, dst> / |src|^2
    z_src = torch.complex(src[..., 0], src[..., 1])
    z_dst = torch.complex(dst[..., 0], dst[..., 1])
    a = (z_src.conj() * z_dst).sum(1) / (z_src.abs() ** 2).sum(1)
    rotation = torch.stack([torch.stack([a.real, -a.imag], -1), torch.stack([a.imag, a.real], -1)], -2)
    translation = dst_mean.squeeze(1) - (rotation @ src_mean.transpose(1, 2)).squeeze(-1)
    return torch.cat([rotation, translation[..., None]], dim=-1)


def align_faces(images: Tensor, landmarks: Tensor, size: int = CANONICAL_SIZE) -> Tensor:
    """Warp faces into the canonical frame.

    Args:
        images: ``[B, 3, H, W]`` in ``[0, 1]``.
        landmarks: ``[B, 5, 2]`` pixel coordinates in ``images`` (MTCNN order).
    Returns:
        ``[B, 3, size, size]`` canonical face images (borders replicate the image edge).
    """
    template = CANONICAL_LANDMARKS * (size / CANONICAL_SIZE)
    matrix = similarity_transform(landmarks.float(), template)
    return warp_affine(images, matrix, (size, size), mode="bilinear", padding_mode="border", align_corners=True)
