"""faceapi-resnet: our module equals face-api's own network (run by face-api in node) and works as a recogniser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.tfjs_node import model_folder, run_reference

from redteam.engine import load_target
from redteam.metrics import verification_report
from redteam.targets.faceapi import RECOGNITION_MODEL


@pytest.fixture(scope="module")
def faceapi():
    return load_target("faceapi-resnet", torch.device("cpu"))


def test_matches_faceapi_on_real_faces(faceapi, faces, tmp_path):
    crops = faceapi.preprocess(faces.load(range(0, 80, 10)))  # 8 real faces, face-api's 150 px crops
    with torch.no_grad():
        ours = faceapi.net(crops).numpy()
    manifest = model_folder(RECOGNITION_MODEL, tmp_path / "model")
    job = {"kind": "faceapi", "net": "FaceRecognitionNet", "manifest": str(manifest)}
    job |= {"input": str(tmp_path / "x.npy"), "output": str(tmp_path / "y.npy")}
    run_reference(job, tmp_path, {"x": (crops * 255).permute(0, 2, 3, 1).numpy()})  # face-api takes 0-255 pixels
    reference = np.load(tmp_path / "y.npy")
    assert reference.shape == ours.shape == (8, 128)
    assert np.abs(ours - reference).max() < 1e-4


def test_descriptor_is_differentiable(faceapi, faces):
    images = faces.load([0, 1]).requires_grad_(True)
    faceapi.embed(images)[:, 0].sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_calibrated_threshold_holds_on_evaluation_faces(faceapi, faces):
    """Threshold (negative L2) from faces-train on 60 identities of the evaluation faces; face-api's rule is 0.6."""
    identities = sorted(faces.by_identity)[:60]
    indices = [i for name in identities for i in faces.by_identity[name][:2]]
    with torch.no_grad():
        embeddings = torch.cat([faceapi.embed(faces.load(indices[i : i + 30])) for i in range(0, len(indices), 30)])
    similarity = faceapi.similarity_matrix(embeddings[0::2], embeddings[1::2]).numpy()
    genuine, impostor = np.diag(similarity), similarity[~np.eye(len(similarity), dtype=bool)]
    assert (genuine >= faceapi.threshold).mean() >= 0.9
    assert (impostor >= faceapi.threshold).mean() <= 0.05
    assert verification_report(genuine, impostor).auc > 0.98
    assert -0.75 < faceapi.threshold < -0.45  # near face-api's documented 0.6 distance
