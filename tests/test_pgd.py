"""PGD on a real recogniser: budgets hold, it beats noise, it stops early, and it is reproducible."""

from __future__ import annotations

import pytest
import torch

from redteam.api import Budget, perturbation_size
from redteam.attacks.pgd import PGD
from redteam.threats import Dodging


@pytest.fixture(scope="module")
def dodging_batch(facenet, faces):
    threat = Dodging(faces, seed=0)
    probes = threat.probes(limit=3)
    enrolment = threat.enrol(lambda idx: facenet.embed(faces.load(idx)).detach(), probes)
    images = faces.load([p.image for p in probes])
    return threat.objective(facenet, enrolment, probes), images


@pytest.mark.parametrize("norm,eps", [("linf", 2 / 255), ("l2", 0.5)])
def test_budget_and_pixel_range_hold(dodging_batch, norm, eps):
    objective, images = dodging_batch
    budget = Budget(norm, eps)
    result = PGD(steps=3)(objective, images, budget, torch.Generator().manual_seed(0))
    size = perturbation_size(result.images - images, norm)
    assert (size <= eps * (1 + 1e-5) + 1e-7).all(), size
    assert result.images.min() >= 0 and result.images.max() <= 1
    with torch.no_grad():
        assert torch.equal(objective(result.images).success, result.success)


def test_pgd_lowers_similarity_more_than_noise(dodging_batch):
    objective, images = dodging_batch
    budget = Budget("linf", 2 / 255)
    generator = torch.Generator().manual_seed(0)
    # Keep attacking past success so the similarities compare the same number of steps.
    noise = (images + budget.sample(images, generator)).clamp(0, 1)
    attacked = PGD(steps=5, random_start=False)(objective, images, budget).images
    with torch.no_grad():
        clean, noisy, adversarial = (objective(x).score for x in (images, noise, attacked))
    assert (adversarial < noisy - 0.1).all(), (clean, noisy, adversarial)
    assert (noisy - clean).abs().max() < 0.05  # noise of this size barely moves a face


def test_large_budget_wins_and_stops_early(dodging_batch):
    objective, images = dodging_batch
    result = PGD(steps=20)(objective, images, Budget("linf", 16 / 255), torch.Generator().manual_seed(0))
    assert result.success.all()
    assert (result.steps < 20).all()  # each sample stopped as soon as it won


def test_same_generator_seed_same_result(dodging_batch):
    objective, images = dodging_batch
    runs = [
        PGD(steps=2)(objective, images, Budget("linf", 1 / 255), torch.Generator().manual_seed(7)).images
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_budget_projection_and_sampling():
    delta = torch.randn(4, 3, 8, 8)
    l2 = Budget("l2", 0.5)
    assert torch.allclose(perturbation_size(l2.project(delta), "l2"), torch.full((4,), 0.5), atol=1e-5)
    small = delta * 1e-3
    assert torch.equal(l2.project(small), small)
    assert (perturbation_size(l2.sample(delta, None), "l2") <= 0.5 + 1e-6).all()
    linf = Budget("linf", 0.1)
    assert perturbation_size(linf.project(delta), "linf").max() <= 0.1
    assert perturbation_size(linf.sample(delta, None), "linf").max() <= 0.1
