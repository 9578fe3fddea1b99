"""APGD and the `auto` ensemble: the paper's step-size schedule, the best iterate kept (by PGD too), budgets held on a
real recogniser, and the ensemble's record of which part broke each probe."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from redteam.api import Budget, Objective, Verdict, perturbation_size
from redteam.attacks.apgd import APGD, checkpoints
from redteam.attacks.auto import PARTS, Auto
from redteam.attacks.pgd import PGD
from redteam.results import ResultStore
from redteam.threats import Dodging


class Bumpy(Objective):
    """A loss with many local maxima and no success: it records every point it is asked about, with its loss."""

    def __init__(self, count: int):
        super().__init__(lambda x: x, centre=torch.full((count, 3, 8, 8), 0.6))
        self.seen: list[tuple[Tensor, Tensor]] = []

    def loss(self, images: Tensor) -> Tensor:
        centre = self.per_sample["centre"]
        return -((images - centre) ** 2).flatten(1).sum(1) + 0.05 * torch.sin(60 * images).flatten(1).sum(1)

    def judge(self, images: Tensor) -> Verdict:
        loss = self.loss(images)
        self.seen.append((images.detach().clone(), loss.detach().clone()))
        return Verdict(loss=loss, success=torch.zeros(len(images), dtype=torch.bool), score=loss)


def test_checkpoints_follow_the_papers_schedule():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == list(range(2, 11))  # short runs: a checkpoint at every step after the first gap


@pytest.mark.parametrize("attack", [PGD(steps=6, step_size=6.0), APGD(steps=12)], ids=["pgd", "apgd"])
def test_the_best_point_seen_is_returned_not_the_last(attack):
    images = torch.full((4, 3, 8, 8), 0.5)
    objective = Bumpy(len(images))
    result = attack(objective, images, Budget("linf", 0.2), torch.Generator().manual_seed(0))
    best = torch.stack([loss for _, loss in objective.seen]).max(0).values
    assert torch.allclose(objective.loss(result.images), best, atol=1e-5)
    last = objective.seen[-1][1]
    assert (best > last + 1e-4).any()  # the landscape is bumpy enough that the last point is not always the best


@pytest.fixture(scope="module")
def dodging_batch(facenet, faces):
    threat = Dodging(faces, seed=0)
    probes = threat.probes(limit=3)
    enrolment = threat.enrol(lambda idx: facenet.embed(faces.load(idx)).detach(), probes)
    return threat.objective(facenet, enrolment, probes), faces.load([p.image for p in probes])


@pytest.mark.parametrize("norm,eps", [("linf", 2 / 255), ("l2", 0.5)])
def test_apgd_holds_the_budget_and_lowers_similarity_more_than_noise(dodging_batch, norm, eps):
    objective, images = dodging_batch
    budget = Budget(norm, eps)
    result = APGD(steps=4, early_stop=False)(objective, images, budget, torch.Generator().manual_seed(0))
    assert (perturbation_size(result.images - images, norm) <= eps * (1 + 1e-5) + 1e-7).all()
    assert 0 <= result.images.min() and result.images.max() <= 1
    noise = (images + budget.sample(images, torch.Generator().manual_seed(1))).clamp(0, 1)
    with torch.no_grad():
        noisy, attacked = objective(noise).score, objective(result.images).score
    assert (attacked < noisy - 0.05).all(), (noisy, attacked)
    assert (result.steps == 4).all()


def test_auto_says_which_part_broke_each_probe(dodging_batch):
    objective, images = dodging_batch
    auto = Auto(steps=3, queries=6)
    easy = auto(objective, images, Budget("linf", 16 / 255), torch.Generator().manual_seed(0))
    assert easy.success.all() and easy.parts == ["apgd"] * len(images)
    hard = auto(objective, images, Budget("linf", 0.01 / 255), torch.Generator().manual_seed(0))
    assert not hard.success.any() and hard.parts == [None] * len(images)
    # Every part ran on every probe left standing: 3 + 6 gradient steps, then 6 queries.
    assert (hard.steps == 3 + 6 + 6).all()


def test_auto_is_the_default_against_a_defense_and_its_parts_are_counted(cli, capsys, faces_root, tmp_path):
    run, report = tmp_path / "run", tmp_path / "report"
    command = ("run", "--target", "arcface", "--defense", "blur:1", "--data", faces_root, "--limit", 2, "--eps",
               "0,16", "--steps", 2, "--option", "queries=4", "--out", run)  # fmt: skip
    assert cli(*command) == 0
    assert "probes auto's parts broke: at ε 16:" in " ".join(capsys.readouterr().out.split())
    store = ResultStore(run / "results.sqlite")
    attacked = store.frame().query("eps > 0")
    assert set(attacked["attack"]) == {"auto"}
    # Each probe the verdict counts as fooled says which part fooled it, and only those do.
    assert attacked["broken_by"].notna().tolist() == (attacked["correct"] == 0).tolist()
    assert set(attacked["broken_by"].dropna()) <= set(PARTS) and attacked["broken_by"].notna().any()
    # The adaptive/non-adaptive comparison is judged once both exist, and recorded on the adaptive cell.
    adaptive = [key for key, config in store.cells().items() if config["adaptive"]]
    checks = store.checks()
    assert checks.query("name == 'adaptive beats non-adaptive'")["cell"].tolist() == adaptive
    assert cli("report", run, "--out", report, "--examples", 0) == 0
    markdown = (report / "report.md").read_text()
    assert "Probes each part of auto broke" in markdown
    # The defense's verdict table: the claim, the default adaptive attack, the strongest found, and the verdict.
    verdict = markdown.split("### arcface + blur:1, dodging")[1].split("##")[0]
    for row in ("claimed (non-adaptive)", "default adaptive (auto)", "strongest adaptive found", "verdict"):
        assert f"| {row} |" in verdict


def test_an_attack_that_does_nothing_is_flagged_by_beats_noise(cli, capsys, faces_root, tmp_path):
    options = ("--steps", 1, "--option", "random_start=false", "--option", "step_size=0.01")  # one tiny step
    command = ("run", "--target", "arcface", "--attack", "pgd", "--data", faces_root, "--limit", 3, "--eps", "0,0.5",
               *options, "--out", tmp_path)  # fmt: skip
    assert cli(*command) == 0
    checks = ResultStore(tmp_path / "results.sqlite").checks().set_index("name")
    assert not checks.loc["beats noise", "passed"]
    assert "no better than noise" in checks.loc["beats noise", "detail"]


def test_an_attack_stopped_too_soon_is_flagged_by_the_convergence_check(cli, faces_root, tmp_path):
    """APGD with one step only looks at its random start: twice that effort takes a real step and fools more. The
    check re-attacks survivors drawn from all 10 probes, not only from the other checks' sample of 8."""
    command = ("run", "--target", "arcface", "--attack", "apgd", "--data", faces_root, "--limit", 10, "--eps", "0,2",
               "--steps", 1, "--out", tmp_path)  # fmt: skip
    assert cli(*command) == 0
    store = ResultStore(tmp_path / "results.sqlite")
    converged = store.checks().set_index("name").loc["converged"]
    standing = int(store.frame().query("eps > 0")["correct"].sum())
    assert not converged["passed"] and "with steps 2, restarts 2" in converged["detail"]
    assert f": {standing} of 10 probes stand; {min(standing, 8)} of them attacked again" in converged["detail"]
