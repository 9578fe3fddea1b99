"""The converted FaceNet is the original model: parity with cv2.dnn on the same frozen graph, and real accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from redteam.metrics import verification_report
from redteam.targets.facenet import GRAPH


def test_matches_cv2_dnn_on_real_faces(facenet, faces):
    cv2 = pytest.importorskip("cv2")
    net = cv2.dnn.readNetFromTensorflow(str(GRAPH.path()))
    images = faces.load(range(0, 40, 5))  # 8 real faces from different people
    network_input = facenet.preprocess(images)
    with torch.no_grad():
        ours = facenet.net(network_input).numpy()
    reference = []
    for x in network_input.permute(0, 2, 3, 1).numpy():  # the graph bakes in batch 1
        net.setInput(cv2.dnn.blobFromImage(x, swapRB=False))
        reference.append(net.forward()[0])
    difference = np.abs(ours - np.stack(reference)).max()
    assert difference < 1e-5, difference
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_embedding_is_differentiable_and_batch_independent(facenet, faces):
    images = faces.load([0, 1, 2]).requires_grad_(True)
    embeddings = facenet.embed(images)
    embeddings[:, 0].sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():
        alone = facenet.embed(images[:1].detach())
    assert torch.allclose(alone, embeddings[:1].detach(), atol=1e-5)


def test_calibrated_threshold_holds_on_evaluation_faces(facenet, faces):
    """Threshold from faces-train applied to 60 identities of the (disjoint) evaluation faces."""
    identities = sorted(faces.by_identity)[:60]
    genuine_pairs, indices = [], []
    for identity in identities:
        first, second = faces.by_identity[identity][:2]
        genuine_pairs.append((len(indices), len(indices) + 1))
        indices += [first, second]
    with torch.no_grad():
        embeddings = torch.cat([facenet.embed(faces.load(indices[i : i + 20])) for i in range(0, len(indices), 20)])
    genuine = np.array([float(embeddings[a] @ embeddings[b]) for a, b in genuine_pairs])
    impostor = np.array(
        [
            float(embeddings[a] @ embeddings[b])
            for a in range(0, len(indices), 2)
            for b in range(1, len(indices), 2)
            if b != a + 1
        ]
    )
    report = verification_report(genuine, impostor)
    assert (genuine >= facenet.threshold).mean() >= 0.9
    assert (impostor >= facenet.threshold).mean() <= 0.05
    assert report.auc > 0.98
