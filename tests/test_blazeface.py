"""blazeface: the converted graph equals tfjs on real faces; it finds LFW faces and its face score can be attacked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.tfjs_node import model_folder, run_reference

from redteam.engine import load_target
from redteam.targets.blazeface import BLAZEFACE_BACK, INPUT_SIZE, OUTPUTS, blazeface_anchors


@pytest.fixture(scope="module")
def blazeface():
    return load_target("blazeface", torch.device("cpu"))


def test_matches_tfjs_on_real_faces(blazeface, faces, tmp_path):
    images = faces.load(range(0, 60, 10))
    x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        ours = [o.numpy() for o in blazeface.net(x)]
    json_path = model_folder(BLAZEFACE_BACK, tmp_path / "model")
    outputs = {name: str(tmp_path / f"{k}.npy") for k, name in enumerate(OUTPUTS)}
    job = {"kind": "graph", "model": str(json_path), "per_sample": True, "inputs": {"input": str(tmp_path / "x.npy")}}
    run_reference({**job, "outputs": outputs}, tmp_path, {"x": x.permute(0, 2, 3, 1).numpy()})
    for k, (name, mine) in enumerate(zip(OUTPUTS, ours)):
        reference = np.load(tmp_path / f"{k}.npy")
        assert reference.shape == mine.shape, name
        # Logits reach |6000| on background anchors: compare relative to each output's range.
        assert np.abs(mine - reference).max() / np.abs(reference).max() < 1e-5, name
    probability = [torch.sigmoid(torch.from_numpy(o)) for o in (ours[0], np.load(tmp_path / "0.npy"))]
    assert (probability[0] - probability[1]).abs().max() < 1e-5


def test_anchor_layout():
    anchors = blazeface_anchors()
    assert anchors.shape == (896, 2)
    # stride 16, two anchors per cell, row-major; then stride 32, six per cell.
    assert anchors[:3].tolist() == [[8, 8], [8, 8], [24, 8]]
    assert anchors[32].tolist() == [8, 24] and anchors[511].tolist() == [248, 248]
    assert (
        anchors[512].tolist() == [16, 16] and anchors[518].tolist() == [48, 16] and anchors[-1].tolist() == [240, 240]
    )


def test_finds_lfw_faces_at_the_centre(blazeface, faces):
    images = faces.load(range(0, 3400, 100))  # 34 faces of different people
    detections = blazeface.detect(images)
    found = [bool(((d.boxes[:, :2] <= 125) & (d.boxes[:, 2:] >= 125)).all(1).any()) for d in detections]
    assert np.mean(found) >= 0.95
    with torch.no_grad():
        scores = blazeface.face_score(images)
    assert torch.equal(scores >= blazeface.threshold, torch.tensor([len(d.scores) > 0 for d in detections]))
    for d in detections:
        assert (d.scores >= blazeface.threshold).all()


def test_face_score_is_differentiable_and_low_without_a_face(blazeface, faces):
    images = faces.load([0, 1]).requires_grad_(True)
    blazeface.face_score(images).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    blank = torch.full((1, 3, 250, 250), 0.5)
    with torch.no_grad():
        assert blazeface.face_score(blank).item() < blazeface.threshold
        assert not blazeface.detected(blank).item()
