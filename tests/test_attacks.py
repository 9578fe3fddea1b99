"""Minimal-perturbation attacks agree with fixed-budget PGD, external libraries agree with ours; checks see masking."""

from __future__ import annotations

import pytest
import torch

from redteam.api import Budget, perturbation_size
from redteam.attacks.cw import CarliniWagner
from redteam.attacks.external import ArtPGD, FaceClassifier, TorchattacksPGD
from redteam.attacks.minnorm import MinimumNorm
from redteam.attacks.pgd import MIM, PGD
from redteam.engine.checks import gradient_check, unbounded_check
from redteam.threats import Dodging, Identification


def _batch(facenet, faces, threat_class, count: int):
    threat = threat_class(faces, seed=1)
    probes = threat.probes(limit=count)
    enrolment = threat.enrol(lambda idx: facenet.embed(faces.load(idx)).detach(), probes)
    return threat.objective(facenet, enrolment, probes), faces.load([p.image for p in probes])


@pytest.fixture(scope="module")
def dodging(facenet, faces):
    return _batch(facenet, faces, Dodging, 6)


def test_minnorm_curve_agrees_with_fixed_budget_pgd(dodging):
    objective, images = dodging
    minimal = MinimumNorm(steps=30)(objective, images, torch.Generator().manual_seed(0))
    assert torch.isfinite(minimal.size).all()  # FaceNet falls to every probe
    with torch.no_grad():
        assert objective(minimal.images).success.all()
    assert torch.allclose(minimal.size, perturbation_size(minimal.images - images, "linf"), atol=1e-6)
    for eps in (0.5 / 255, 2 / 255):
        one_pass = (minimal.size > eps).float().mean()
        fixed = (
            1
            - PGD(steps=20)(objective, images, Budget("linf", eps), torch.Generator().manual_seed(0))
            .success.float()
            .mean()
        )
        assert abs(one_pass - fixed) <= 2 / 6, (eps, one_pass, fixed)


def test_cw_finds_small_l2_examples_that_pgd_confirms(dodging):
    objective, images = dodging
    images, objective = images[:3], objective.select(torch.arange(3))
    found = CarliniWagner(steps=20, search_steps=3)(objective, images)
    assert torch.isfinite(found.size).all()
    with torch.no_grad():
        assert objective(found.images).success.all()
    # a PGD-ℓ2 of the largest size found also fools every probe: C&W's sizes are real
    at_size = PGD(steps=20)(objective, images, Budget("l2", float(found.size.max()) * 1.05))
    assert at_size.success.all()


def test_external_libraries_agree_with_ours(dodging):
    objective, images = dodging
    budget = Budget("linf", 1 / 255)
    rates = {
        name: attack(objective, images, budget, torch.Generator().manual_seed(0)).success.float().mean().item()
        for name, attack in {"ours": PGD(), "torchattacks": TorchattacksPGD(), "art": ArtPGD()}.items()
    }
    assert max(rates.values()) - min(rates.values()) <= 2 / 6, rates


def test_face_classifier_decides_like_the_objective(facenet, small_faces):
    objective, images = _batch(facenet, small_faces, Identification, 4)
    classifier = FaceClassifier(objective)
    noisy = (images + Budget("linf", 4 / 255).sample(images, torch.Generator().manual_seed(0))).clamp(0, 1)
    for x in (images, noisy):
        with torch.no_grad():
            wrong = classifier(x).argmax(1) != classifier.labels()
            assert torch.equal(wrong, objective(x).success)


def test_mim_respects_its_budget(dodging):
    objective, images = dodging
    result = MIM(steps=5)(objective, images, Budget("linf", 2 / 255))
    assert perturbation_size(result.images - images, "linf").max() <= 2 / 255 + 1e-6


def test_eot_on_a_deterministic_model_changes_nothing(dodging):
    objective, images = dodging
    runs = [
        PGD(steps=2, random_start=False, eot=eot)(objective, images, Budget("linf", 1 / 255)).images for eot in (1, 2)
    ]
    assert torch.allclose(runs[0], runs[1], atol=1e-6)


def test_checks_flag_a_masked_model(facenet, dodging):
    objective, images = dodging
    healthy = (gradient_check(objective, images), unbounded_check(objective, images, "linf"))
    assert all(check.passed for check in healthy), healthy

    def quantised(x):  # rounding to grey levels: zero gradient almost everywhere, a classic masked defense
        return facenet.embed(torch.round(x * 255) / 255)

    masked = type(objective).__new__(type(objective))
    masked.__dict__.update(objective.__dict__)
    masked.embed = quantised
    flagged = (gradient_check(masked, images), unbounded_check(masked, images, "linf"))
    assert not any(check.passed for check in flagged), flagged
