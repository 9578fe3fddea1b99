"""Detector evasion on real faces: every detector finds the clean faces, PGD makes them vanish as the detector's own
detect() sees it, MTCNN's differentiable score decides exactly as its cascade does, and the objective is a margin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import shared_path

from redteam.api import Budget, FaceDetector
from redteam.attacks.minnorm import MinimumNorm
from redteam.attacks.pgd import PGD
from redteam.engine import load_target
from redteam.threats import DetectionObjective, Evasion

DETECTORS = ["mtcnn", "retinaface", "blazeface", "scrfd"]


@pytest.fixture(scope="module")
def detectors() -> dict[str, FaceDetector]:
    """Loaded on first use, once per module."""
    loaded: dict[str, FaceDetector] = {}

    def get(name: str) -> FaceDetector:
        if name not in loaded:
            weights = shared_path("weights", "scrfd_500m.onnx") if name == "scrfd" else None
            loaded[name] = load_target(name, torch.device("cpu"), weights=weights)
        return loaded[name]

    return get


@pytest.fixture(scope="module")
def lfw(faces) -> torch.Tensor:
    """8 faces of 8 people, as `redteam run --threat evasion` picks them."""
    return faces.load([p.image for p in Evasion(faces).probes(8)])


def found(detector: FaceDetector, images: torch.Tensor) -> torch.Tensor:
    """What a user of the detector sees: does detect() return a face (all of its faces are above threshold)?"""
    return torch.tensor([len(d.scores) > 0 for d in detector.detect(images)])


@pytest.mark.parametrize("name", DETECTORS)
def test_every_clean_face_is_detected(detectors, name, lfw):
    detector = detectors(name)
    assert found(detector, lfw).all()
    with torch.no_grad():
        assert detector.detected(lfw).all()


@pytest.mark.parametrize("name", DETECTORS)
def test_face_score_gradients_are_finite_and_non_zero(detectors, name, lfw):
    detector = detectors(name)
    images = lfw[:2].clone().requires_grad_(True)
    evaluation = DetectionObjective(detector)(images)
    (gradient,) = torch.autograd.grad(evaluation.loss.sum(), images)
    norms = gradient.flatten(1).norm(dim=1)
    assert torch.isfinite(gradient).all() and (norms > 0).all()
    with torch.no_grad():
        assert torch.equal(evaluation.score.detach(), detector.face_score(lfw[:2]))


@pytest.mark.parametrize("name, count, most_found", [("retinaface", 8, 0), ("mtcnn", 4, 1)])
def test_pgd_hides_faces_from_detect(detectors, name, count, most_found, lfw):
    """ℓ∞ 16/255, 10 steps: at most ``most_found`` of ``count`` faces still found by detect() (measured: none)."""
    detector = detectors(name)
    images = lfw[:count]
    result = PGD(steps=10)(
        DetectionObjective(detector), images, Budget("linf", 16 / 255), torch.Generator().manual_seed(0)
    )
    assert (result.images - images).abs().amax() <= 16 / 255 + 1e-6
    seen = found(detector, result.images)
    assert int(seen.sum()) <= most_found
    assert torch.equal(~seen, result.success)  # the attack's verdict is the detector's
    assert result.steps.min() < 10  # per-sample early stop: a face gone is no longer attacked


def test_mtcnn_score_decides_like_the_cascade(detectors, lfw):
    """face_score >= threshold exactly when the full cascade (detect) returns a face: on faces, on faces too small
    for its pyramid, on blank and noise images, and with faces and non-faces in one batch."""
    mtcnn = detectors("mtcnn")
    small = F.pad(F.interpolate(lfw[:2], size=(16, 16), mode="area"), (117, 117, 117, 117), value=0.5)  # 8 px faces
    blank = torch.full((1, 3, 250, 250), 0.5)
    noise = torch.rand(1, 3, 250, 250, generator=torch.Generator().manual_seed(0))
    images = torch.cat([lfw[:3], small, blank, noise])
    with torch.no_grad():
        scores = mtcnn.face_score(images)
        candidates = mtcnn.candidate_scores(images)
    assert torch.isfinite(scores).all()
    assert torch.equal(scores, candidates.amax(dim=1))
    assert torch.equal(scores >= mtcnn.threshold, found(mtcnn, images))
    assert found(mtcnn, images).tolist() == [True] * 3 + [False] * 4
    assert (scores[3:] < mtcnn.threshold).all() and (scores[3:] > mtcnn.threshold - 1).all()


def test_mtcnn_score_has_a_gradient_without_a_face(detectors):
    mtcnn = detectors("mtcnn")
    blank = torch.full((1, 3, 250, 250), 0.5, requires_grad=True)
    (gradient,) = torch.autograd.grad(mtcnn.face_score(blank).sum(), blank)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_objective_loss_is_the_margin_of_every_candidate_above_threshold():
    class Fixed(FaceDetector):
        score_threshold = 0.5

        def candidate_scores(self, images):
            return images

        def face_score(self, images):
            return images.amax(dim=1)

        def detect(self, images):
            raise NotImplementedError

    scores = torch.tensor([[0.9, 0.7, 0.1], [0.4, 0.3, 0.2], [0.5, 0.5, 0.0]])
    evaluation = DetectionObjective(Fixed())(scores)
    assert evaluation.success.tolist() == [False, True, False]
    assert torch.allclose(evaluation.loss, torch.tensor([-(0.4 + 0.2), 0.1, 0.0]))
    assert torch.allclose(evaluation.score, torch.tensor([0.9, 0.4, 0.5]))


def test_minnorm_finds_evasions_that_detect_confirms(detectors, lfw):
    """A short run (its default is 50 steps, which reach 3-9/255 on these faces) must fool every face."""
    retinaface = detectors("retinaface")
    images = lfw[:3]
    result = MinimumNorm(steps=20)(DetectionObjective(retinaface), images)
    assert torch.isfinite(result.size).all() and (result.size <= 64 / 255).all()
    assert not found(retinaface, result.images).any()
    assert torch.allclose((result.images - images).flatten(1).abs().amax(dim=1), result.size)


def test_cli_reports_a_detection_rate(cli, capsys, faces_root, tmp_path):
    import pandas as pd

    out = tmp_path / "run"
    args = ("--target", "retinaface", "--attack", "pgd", "--data", faces_root, "--eps", "0,16", "--steps", "5")
    assert cli("run", *args, "--limit", "4", "--out", out) == 0
    assert "detection rate of retinaface" in capsys.readouterr().out
    curve = pd.read_csv(out / "curve.csv")
    assert curve["threat"].unique().tolist() == ["evasion"]
    assert curve["accuracy"].tolist() == [1.0, 0.0]
