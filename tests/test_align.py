"""Canonical framing: the template really is LFW's, and alignment puts landmarks where the template says."""

from __future__ import annotations

import random

import torch

from redteam.align import CANONICAL_LANDMARKS, align_faces, similarity_transform
from redteam.targets.mtcnn import MTCNN


def test_similarity_transform_recovers_a_known_one():
    angle, scale, shift = 0.3, 1.7, torch.tensor([5.0, -3.0])
    rotation = scale * torch.tensor([[torch.cos(torch.tensor(angle)), -torch.sin(torch.tensor(angle))],
                                     [torch.sin(torch.tensor(angle)), torch.cos(torch.tensor(angle))]])  # fmt: skip
    points = torch.rand(2, 5, 2) * 100
    moved = points @ rotation.T + shift
    matrix = similarity_transform(points, moved)
    assert torch.allclose(matrix[:, :, :2], rotation.expand(2, 2, 2), atol=1e-4)
    assert torch.allclose(matrix[:, :, 2], shift.expand(2, 2), atol=1e-3)


def test_template_matches_mtcnn_landmarks_on_lfw(faces):
    detector = MTCNN().eval()
    rng = random.Random(0)
    points = []
    for index in rng.sample(range(len(faces)), 40):
        found = detector.detect(faces.load([index]))[0]
        centre = (found.boxes[:, :2] + found.boxes[:, 2:]) / 2
        points.append(found.landmarks[(centre - 125).norm(dim=1).argmin()])
    mean = torch.stack(points).mean(0)
    assert (mean - CANONICAL_LANDMARKS).norm(dim=1).max() < 3.0


def test_aligned_faces_have_landmarks_on_the_template(faces):
    detector = MTCNN().eval()
    image = faces.load([3])
    # Rotate and shrink the face, then align it back.
    matrix = similarity_transform(CANONICAL_LANDMARKS[None], CANONICAL_LANDMARKS[None] * 0.6 + 40)
    from kornia.geometry.transform import warp_affine

    moved = warp_affine(image, matrix, (250, 250), padding_mode="border", align_corners=True)
    found = detector.detect(moved)[0]
    aligned = align_faces(moved, found.landmarks[:1])
    again = detector.detect(aligned)[0]
    assert (again.landmarks[0] - CANONICAL_LANDMARKS).norm(dim=1).max() < 8.0
