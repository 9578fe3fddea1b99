"""BPDA stand-ins tried, not assumed: every transform offers two, adaptive attacks try both (worst case per probe,
recorded), and a float64 check compares each stand-in's derivatives with finite differences of the real transform,
flagging one that moves the wrong way."""

from __future__ import annotations

import torch
from torch import Tensor

from redteam.api import InputTransform
from redteam.engine.assembly import DefendedRecognizer, build_defense
from redteam.engine.checks import MIN_CORRELATION, surrogate_checks, surrogate_correlation
from redteam.results import ResultStore


class Inverted(InputTransform):
    """A photographic negative, deployed without gradient, with a stand-in that claims it changes nothing."""

    name = "inverted"

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return 1 - images.detach()


def test_each_transform_offers_its_own_stand_in_and_a_second_opinion():
    halftone, jpeg = build_defense("halftone+jpeg").transforms
    assert list(halftone.surrogates()) == ["identity", "smoothed"]
    assert list(jpeg.surrogates()) == ["differentiable jpeg", "identity"]
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    gradients = []
    for name in halftone.surrogates():
        (gradient,) = torch.autograd.grad((halftone.bpda(x, surrogate=name) * torch.arange(32.0)).sum(), x)
        gradients.append(gradient)
    assert torch.equal(halftone.bpda(x, surrogate="smoothed"), halftone(x))  # the value is always the real one
    assert not torch.allclose(*gradients)  # the gradient is the stand-in's


def test_the_correlation_check_trusts_a_good_stand_in_and_flags_a_wrong_one(facenet, faces):
    images = faces.load([0, 1])
    (halftone,) = build_defense("halftone").transforms
    assert surrogate_correlation(halftone, "identity", images) > 0.9
    assert surrogate_correlation(Inverted(), "identity", images) < -0.9
    defended = DefendedRecognizer(facenet, [Inverted()], "facenet+inverted", adaptive=True)
    checks = {check.name: check for check in surrogate_checks(defended, images)}
    assert set(checks) == {"BPDA inverted: identity", "BPDA inverted: smoothed"}
    assert not any(check.passed for check in checks.values())
    assert MIN_CORRELATION > 0


def test_an_adaptive_attack_says_which_stand_in_broke_each_probe(cli, faces_root, tmp_path):
    command = ("run", "--target", "arcface", "--attack", "pgd", "--defense", "halftone", "--adaptivity", "adaptive",
               "--data", faces_root, "--limit", 2, "--eps", "0,16", "--steps", 2, "--out", tmp_path)  # fmt: skip
    assert cli(*command) == 0
    store = ResultStore(tmp_path / "results.sqlite")
    attacked = store.frame().query("eps > 0")
    assert (attacked["correct"] == 0).any()
    assert set(attacked["broken_by"].dropna()) <= {"pgd via identity", "pgd via smoothed"}
    assert attacked["broken_by"].notna().tolist() == (attacked["correct"] == 0).tolist()
    names = set(store.checks()["name"])
    assert {"BPDA halftone: identity", "BPDA halftone: smoothed"} <= names
