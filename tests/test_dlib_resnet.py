"""The converted dlib face descriptor is dlib's: parity with dlib-bin on the same chips, dlib's chip geometry, and
dlib's own detect-align-describe pipeline deciding the same pairs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from kornia.geometry.transform import warp_affine

from redteam.align import CANONICAL_LANDMARKS
from redteam.convert.dlib import DlibFormatError, read_dlib_net
from redteam.targets.dlib_resnet import CHIP_FROM_CANONICAL, DESCRIPTOR, FACE_RECOGNITION_MODELS

SHAPE_PREDICTOR = FACE_RECOGNITION_MODELS.file(
    "face_recognition_models/models/shape_predictor_5_face_landmarks.dat",
    "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
)
IDENTITIES = 12  # evaluation identities whose first two photos go through dlib's pipeline


@dataclass
class DlibFace:
    index: int  # in the evaluation faces
    chip: np.ndarray  # dlib's 150 x 150 x 3 uint8 chip
    chip_map: np.ndarray  # [2, 3] canonical pixel -> chip pixel map that dlib used for this face
    descriptor: np.ndarray  # dlib's 128-d descriptor of the chip


def chip_map(dlib, shape) -> np.ndarray:
    """The affine map dlib's ``get_face_chip(size=150, padding=0.25)`` applies for ``shape``, measured exactly: chip
    two float images holding their own x and y pixel coordinates and fit chip pixel <- sampled coordinate."""
    ys, xs = np.mgrid[0:250, 0:250].astype(np.float32)
    sampled_x = dlib.get_face_chip(xs, shape, size=150, padding=0.25)
    sampled_y = dlib.get_face_chip(ys, shape, size=150, padding=0.25)
    inside = (sampled_x > 0) & (sampled_y > 0)  # dlib fills chip pixels outside the image with 0
    v, u = np.nonzero(inside)
    source = np.stack([sampled_x[inside], sampled_y[inside], np.ones(len(u))], 1)
    solution, *_ = np.linalg.lstsq(source, np.stack([u, v], 1).astype(np.float64), rcond=None)
    return solution.T


def dlib_pipeline(dlib, detector, predictor, recogniser, image: np.ndarray) -> tuple | None:
    """dlib's own steps on one ``[250, 250, 3]`` uint8 image: HOG detection, 5 landmarks, chip, descriptor."""
    found = detector(image, 1)
    if not found:
        return None
    box = min(found, key=lambda r: (r.center().x - 125) ** 2 + (r.center().y - 125) ** 2)
    shape = predictor(image, box)
    chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
    return chip, chip_map(dlib, shape), np.array(recogniser.compute_face_descriptor(chip))


@pytest.fixture(scope="module")
def dlib():
    return pytest.importorskip("dlib", reason="the parity tests need dlib-bin (pip install dlib-bin)")


@pytest.fixture(scope="module")
def target():
    from redteam.engine import load_target

    return load_target("dlib-resnet", torch.device("cpu"))


@pytest.fixture(scope="module")
def dlib_faces(dlib, faces) -> list[DlibFace]:
    detector, predictor = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(SHAPE_PREDICTOR.path()))
    recogniser = dlib.face_recognition_model_v1(str(DESCRIPTOR.path()))
    indices = [i for identity in sorted(faces.by_identity)[:IDENTITIES] for i in faces.by_identity[identity][:2]]
    images = (faces.load(indices).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    results = []
    for index, image in zip(indices, images):
        found = dlib_pipeline(dlib, detector, predictor, recogniser, np.ascontiguousarray(image))
        assert found is not None, f"dlib finds no face in evaluation image {index}"
        results.append(DlibFace(index, *found))
    return results


def test_parses_the_whole_file_as_dlibs_example_network():
    data = DESCRIPTOR.path().read_bytes()
    net = read_dlib_net(data)
    kinds = [layer.kind for layer in net.layers]
    # dnn_face_recognition_ex.cpp's anet_type: 29 conv/affine/relu, 14 residual adds, 4 shortcut pools + 1 global
    expected = {"con": 29, "affine": 29, "relu": 29, "add_prev": 14, "avg_pool": 5, "max_pool": 1, "fc": 1}
    assert {kind: kinds.count(kind) for kind in expected} == expected and len(kinds) == 108
    assert net.input_size == (150, 150)
    assert np.allclose(net.mean_rgb, (122.782, 117.001, 104.298), atol=1e-3)
    assert (
        sum(p.size for layer in net.layers for p in layer.params.values()) == 5_614_592
    )  # from the layer shapes above
    with pytest.raises(DlibFormatError, match="left after"):
        read_dlib_net(data + b"\0")
    with pytest.raises(DlibFormatError, match="ends inside"):
        read_dlib_net(data[:-100])
    with pytest.raises(DlibFormatError):  # another dlib file, not a network
        read_dlib_net(SHAPE_PREDICTOR.path().read_bytes())


def test_matches_dlib_on_the_same_chips(target, dlib_faces):
    chips = torch.from_numpy(np.stack([face.chip for face in dlib_faces])).permute(0, 3, 1, 2) / 255.0
    with torch.no_grad():
        ours = target.net(chips).numpy()
    reference = np.stack([face.descriptor for face in dlib_faces])
    difference = np.abs(ours - reference).max()
    assert difference < 1e-4, difference
    assert 1.0 < np.linalg.norm(reference, axis=1).min()  # raw descriptors: a zeroed or normalised output fails


def test_fixed_chip_warp_is_dlibs_mean_chip(target, faces, dlib_faces):
    # dlib's chip map for each face, re-measured: the stored mean puts the canonical landmarks within 2 px of the
    # mean of these faces' maps (each face alone scatters ~5 px around it).
    maps = np.stack([face.chip_map for face in dlib_faces])
    points = np.c_[CANONICAL_LANDMARKS.numpy(), np.ones(5)]
    measured, stored = points @ maps.mean(0).T, points @ np.array(CHIP_FROM_CANONICAL).T
    assert np.linalg.norm(measured - stored, axis=1).max() < 2.0
    # kornia's warp with dlib's map reproduces dlib's chip (same pixel-centre convention and map direction) ...
    images = faces.load([face.index for face in dlib_faces[:4]])
    own = torch.from_numpy(maps[:4]).float()
    warped = warp_affine(images, own, (150, 150), mode="bilinear", padding_mode="zeros", align_corners=True)
    chips = torch.from_numpy(np.stack([face.chip for face in dlib_faces[:4]])).permute(0, 3, 1, 2) / 255.0
    assert (warped - chips).abs().mean() < 1 / 255  # dlib truncates to uint8: ~0.5 / 255
    # ... and the target's chips are that warp with the stored map.
    fixed = warp_affine(images, torch.tensor(CHIP_FROM_CANONICAL).expand(4, 2, 3), (150, 150), align_corners=True)
    assert torch.allclose(target.preprocess(images), fixed, atol=1e-5)


def test_decisions_agree_with_dlibs_full_pipeline(target, faces, dlib_faces):
    """Genuine and impostor pairs that dlib decides clearly (distance 0.1 or more from its 0.6) get the same
    decision from our descriptor on the canonical images, and distances agree on average."""
    with torch.no_grad():
        ours = target.embed(faces.load([face.index for face in dlib_faces])).numpy()
    reference = np.stack([face.descriptor for face in dlib_faces])
    genuine = [(2 * k, 2 * k + 1) for k in range(IDENTITIES)]
    impostor = [(2 * a, 2 * b + 1) for a in range(IDENTITIES) for b in range(IDENTITIES) if a != b]
    ours_distance = np.array([np.linalg.norm(ours[a] - ours[b]) for a, b in genuine + impostor])
    dlib_distance = np.array([np.linalg.norm(reference[a] - reference[b]) for a, b in genuine + impostor])
    clear = np.abs(dlib_distance - 0.6) >= 0.1
    assert clear[: len(genuine)].sum() >= IDENTITIES // 2 and clear[len(genuine) :].sum() >= 100
    assert ((ours_distance < 0.6) == (dlib_distance < 0.6))[clear].all()
    assert np.abs(ours_distance - dlib_distance).mean() < 0.05
    similarity = target.similarity(torch.from_numpy(ours[:1]), torch.from_numpy(ours[1:2]))
    assert similarity.item() == pytest.approx(-ours_distance[0], abs=1e-5)  # euclidean: similarity = -distance


def test_embedding_is_differentiable_and_batch_independent(target, faces):
    images = faces.load([0, 1, 2]).requires_grad_(True)
    embeddings = target.embed(images)
    assert embeddings.shape == (3, 128)
    embeddings[:, 0].sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():
        alone = target.embed(images[:1].detach())
    assert torch.allclose(alone, embeddings[:1].detach(), atol=1e-5)
