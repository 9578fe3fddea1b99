"""Halftoning (against a plain reference loop), BPDA, defended targets, and defended runs end to end."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from redteam.api import DEFENSES, FaceRecognizer, InputTransform
from redteam.defenses.halftone import Halftone, floyd_steinberg, ordered_dither
from redteam.engine import EvaluationConfig
from redteam.engine.assembly import DefendedRecognizer, behind_transforms, build_defense, drawing_from, fixed_draws
from redteam.errors import RedteamError, UnknownNameError


def reference_floyd_steinberg(image: torch.Tensor) -> torch.Tensor:
    """The textbook raster-order loop on one ``[H, W]`` channel, in float64."""
    work, out = image.double().clone(), torch.zeros_like(image, dtype=torch.float64)
    height, width = work.shape
    for y in range(height):
        for x in range(width):
            out[y, x] = 1.0 if work[y, x] >= 0.5 else 0.0
            error = work[y, x] - out[y, x]
            for dy, dx, weight in ((0, 1, 7 / 16), (1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16)):
                if 0 <= y + dy < height and 0 <= x + dx < width:
                    work[y + dy, x + dx] += error * weight
    return out.float()


def test_floyd_steinberg_equals_the_reference_loop():
    images = torch.rand(2, 3, 9, 13, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([torch.stack([reference_floyd_steinberg(channel) for channel in image]) for image in images])
    assert torch.equal(floyd_steinberg(images), expected)


@pytest.mark.parametrize("halftone", [floyd_steinberg, ordered_dither])
def test_halftones_are_binary_per_channel_and_keep_local_means(halftone, faces):
    images = faces.load([0, 1])
    dots = halftone(images)
    assert dots.shape == images.shape and set(dots.unique().tolist()) == {0.0, 1.0}
    block_means = torch.nn.functional.avg_pool2d
    assert (block_means(dots, 10) - block_means(images, 10)).abs().mean() < 0.02  # ~0.01 measured; 0.5 for noise
    grey = torch.full((1, 3, 64, 64), 0.3)
    assert halftone(grey).mean().item() == pytest.approx(0.3, abs=0.01)


def test_ordered_dither_puts_the_right_number_of_dots_in_each_tile():
    for level in range(65):
        dots = ordered_dither(torch.full((1, 1, 16, 16), level / 64))
        tiles = dots.unfold(2, 8, 8).unfold(3, 8, 8).sum((-1, -2))
        assert (tiles == level).all()


def test_bpda_gives_the_deployed_value_with_the_identity_gradient():
    transform = Halftone()
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1), requires_grad=True)
    weights = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    value = transform.bpda(images)
    (value * weights).sum().backward()
    assert torch.equal(value.detach(), transform(images))
    assert torch.equal(images.grad, weights)  # the surrogate (identity)'s gradient
    assert not transform(images).requires_grad  # the deployed halftone has no gradient of its own


def test_defense_chains_parse_and_reject_bad_names(facenet, faces):
    chain = build_defense("halftone:method=ordered,sigma=1")
    assert [type(t) for t in chain.transforms] == [Halftone] and chain.wrappers == []
    assert (chain.transforms[0].method, chain.transforms[0].sigma) == ("ordered", 1.0)
    assert build_defense("none").transforms == []
    with pytest.raises(UnknownNameError, match="halftone"):
        build_defense("halftones")
    with pytest.raises(RedteamError, match="no setting colour"):
        build_defense("halftone:colour=1")
    with pytest.raises(RedteamError, match="error-diffusion or ordered"):
        build_defense("halftone:method=random")
    assert "halftone" in DEFENSES

    config = EvaluationConfig(target="facenet", attack="pgd", defense="halftone")
    defended = behind_transforms(facenet, config, build_defense("halftone"), adaptive=False)
    assert isinstance(defended, FaceRecognizer) and defended.card.name == "facenet+halftone"
    assert defended.threshold == facenet.threshold and defended.card.embedding_dim == facenet.card.embedding_dim
    images = faces.load([0])
    with torch.no_grad():
        assert torch.equal(defended.embed(images), facenet.embed(floyd_steinberg(images)))


def test_a_defended_run_stores_adaptive_and_non_adaptive_curves(cli, capsys, faces_root, tmp_path):
    out = tmp_path / "halftone"
    args = ("run", "--attack", "pgd", "--defense", "halftone", "--limit", 3, "--eps", "0,4", "--steps", 3,
            "--batch-size", 3)  # fmt: skip
    assert cli(*args, "--data", faces_root, "--out", out) == 0
    curve = pd.read_csv(out / "curve.csv").set_index(["defense", "eps"])["accuracy"]
    assert set(curve.index.get_level_values(0)) == {"halftone (adaptive)", "halftone (non-adaptive)"}
    assert curve["halftone (adaptive)", 0] == curve["halftone (non-adaptive)", 0] >= 2 / 3
    # BPDA through the halftone breaks at least as many probes as crafting on the undefended FaceNet
    assert curve["halftone (adaptive)", 4] <= curve["halftone (non-adaptive)", 4]
    summary = json.loads((out / "run.json").read_text())
    adaptive, non_adaptive = summary["evaluations"]
    assert adaptive["config"]["adaptive"] and not non_adaptive["config"]["adaptive"]
    assert adaptive["attack_settings"]["early_stop"] and not non_adaptive["attack_settings"]["early_stop"]
    checks = {c["name"]: c for c in adaptive["checks"] + non_adaptive["checks"]}
    assert checks["unbounded"]["passed"] and checks["gradients"]["passed"]  # through BPDA: no masked gradients
    assert checks["adaptive beats non-adaptive"]["passed"]
    printed = capsys.readouterr().out
    assert "defense halftone (adaptive)" in printed and "defense halftone (non-adaptive)" in printed


def test_defense_options_that_cannot_work_are_one_line_errors(cli, capsys, faces_root, tmp_path):
    base = ("run", "--data", faces_root, "--limit", 2, "--eps", "0,1", "--out", tmp_path / "x")
    assert cli(*base, "--defense", "halftone", "--adaptivity", "sometimes") == 2
    assert "--adaptivity is both, adaptive or non-adaptive" in capsys.readouterr().err
    assert cli(*base, "--defense", "halftone", "--attack", "minnorm", "--adaptivity", "non-adaptive") == 2
    assert "run it with --adaptivity adaptive" in capsys.readouterr().err
    assert cli(*base, "--defense", "nope") == 2
    assert "unknown defense 'nope'" in capsys.readouterr().err


class Speckle(InputTransform):
    """A randomised transform (test-only): uniform noise drawn from the generator it is given."""

    name = "speckle"
    randomised = True

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return (images + (noise - 0.5) / 64).clamp(0, 1)


def test_a_randomised_defense_needs_an_attack_with_eot_before_any_work(cli, capsys, faces_root, tmp_path, monkeypatch):
    monkeypatch.setitem(DEFENSES._entries, "speckle", Speckle)  # registered for this test only
    out = tmp_path / "x"
    args = ("run", "--data", faces_root, "--limit", 2, "--eps", "0,1", "--defense", "speckle", "--out", out)
    assert cli(*args, "--attack", "torchattacks-pgd", "--adaptivity", "adaptive") == 2
    error = capsys.readouterr().err
    assert (
        "torchattacks-pgd has no EOT; a randomised defense needs it (attacks with EOT: apgd, auto, cw, mim, minnorm"
        in error
    )
    assert not out.exists()  # nothing was written: the declarations were checked first
    assert cli(*args, "--attack", "pgd", "--steps", 1, "--adaptivity", "adaptive", "--no-checks") == 0
    settings = json.loads((out / "run.json").read_text())["attack_settings"]
    assert settings["eot"] == 8  # EOT implied by the randomised defense


def test_fixed_draws_give_a_randomised_defense_one_draw(facenet, faces):
    defended = DefendedRecognizer(facenet, [Speckle()], "facenet+speckle", adaptive=False)
    images = faces.load([0, 1])
    with torch.no_grad(), drawing_from(torch.Generator().manual_seed(0), defended):
        assert not torch.equal(defended.embed(images), defended.embed(images))  # fresh draws, as deployed
        with fixed_draws(3, defended):
            assert torch.equal(defended.embed(images), defended.embed(images))
        assert defended.fixed_seed is None


def test_a_randomised_defense_gets_the_fixed_randomness_diagnostic(cli, faces_root, tmp_path, monkeypatch):
    monkeypatch.setitem(DEFENSES._entries, "speckle", Speckle)  # registered for this test only
    args = ("run", "--data", faces_root, "--limit", 3, "--eps", "0,2", "--defense", "speckle", "--attack", "pgd")
    assert cli(*args, "--steps", 2, "--option", "eot=2", "--adaptivity", "adaptive", "--out", tmp_path / "x") == 0
    checks = {c["name"]: c for c in json.loads((tmp_path / "x" / "run.json").read_text())["checks"]}
    detail = checks["fixed randomness"]["detail"]
    assert "at ε 2: with the defense's randomness fixed to one draw, pgd leaves" in detail and "fresh draws" in detail


@pytest.mark.parametrize(
    ("defense", "standing", "passed"),
    [
        ("halftone", 1, False),  # deterministic: one probe the adaptive attack left standing is its failure
        ("jitter", 1, True),  # randomised: one probe can flip with the draws alone
        ("jitter", 6, False),  # six of six disagreeing probes are not the draws (p 1/64)
    ],
)
def test_adaptive_short_of_non_adaptive_is_judged_against_the_defenses_draws(defense, standing, passed):
    from dataclasses import replace

    from redteam.engine.checks import _adaptive_consistency
    from redteam.engine.config import EvaluationConfig
    from redteam.engine.plan import prepare

    config = EvaluationConfig(target="facenet", attack="pgd", defense=defense, adaptive=True, limit=8, eps=(0.0, 8.0))
    cell = prepare(config)
    other = {"non-adaptive": {"settings_key": replace(cell.config, adaptive=False).settings_key()}}
    rows = []
    for index, probe in enumerate(cell.probes):  # at ε 8 the non-adaptive attack broke every probe
        for key in (cell.key, "non-adaptive"):
            left = key == cell.key and index < standing
            rows += [
                {"cell": key, "probe": probe.key, "eps": eps, "correct": eps == 0 or left} for eps in config.budgets()
            ]
    results = pd.DataFrame(rows)
    (check,) = _adaptive_consistency(cell, results, other)
    assert check.passed == passed and check.cell == cell.key
    assert _adaptive_consistency(cell, results[results["cell"] == cell.key], other) == []  # nothing to compare yet
    if defense == "jitter" and passed:
        explained = "within what the defense's draws explain at ε 8.0 (1 against 0 probes, p 0.50)"
        assert check.detail == f"adaptive above non-adaptive only {explained}"
