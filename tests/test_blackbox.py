"""Black-box access on real models and real faces: the oracle counts every image and never lets a gradient out, a
budget is never exceeded (across resumes too), a decision-only run refuses gradient attacks in one line, and the
query attacks shrink or find perturbations with small query budgets; query curves reach curve.csv."""

from __future__ import annotations

import sqlite3

import pandas as pd
import pytest
import torch

from redteam.api import Budget, Oracle, QueryBudgetExceeded, bisect_boundary
from redteam.budgets import eight_bit
from redteam.engine import EvaluationConfig, prepare
from redteam.engine.execute import Executor


@pytest.fixture(scope="module")
def dodging(faces_root):
    """Two dodging probes on facenet: their images and the verdict objective the oracle answers from."""
    cell = prepare(EvaluationConfig(target="facenet", attack="pgd", data=str(faces_root), limit=2, checks=False))
    executor = Executor(cell)
    images = cell.dataset.load([p.image for p in cell.probes])
    _, verdict = executor.objectives(cell.probes)
    return executor, cell.probes, images, verdict


def test_every_image_is_a_query_and_the_budget_is_hard(dodging):
    _, _, images, verdict = dodging
    oracle = Oracle(verdict, images, "decisions", 5, "l2")
    answer = oracle(images.repeat(2, 1, 1, 1), [0, 1, 0, 1])  # four images: two queries per probe
    assert oracle.spent.tolist() == [2, 2]
    assert answer.margin is None and answer.fooled.dtype == torch.bool
    view = oracle.narrow([1])
    view(images[1:].repeat(3, 1, 1, 1), [0, 0, 0])
    assert oracle.spent.tolist() == [2, 5] and view.remaining().tolist() == [0]
    with pytest.raises(QueryBudgetExceeded):
        oracle(images)  # probe 1 has nothing left: nothing is answered, nothing counted
    assert oracle.spent.tolist() == [2, 5]


def test_scores_carry_no_gradient(dodging):
    _, _, images, verdict = dodging
    probe = images.clone().requires_grad_(True)
    answer = Oracle(verdict, images, "scores", 3, "linf")(probe)
    assert answer.margin is not None and answer.margin.grad_fn is None and not answer.margin.requires_grad
    with pytest.raises(RuntimeError):
        answer.margin.sum().backward()
    assert probe.grad is None


def test_the_oracle_answers_what_an_upload_can_carry(dodging):
    """Every image is answered and recorded as its 8-bit version, as a service decodes it: on the 256 levels, the
    perturbation never larger than the one sent, and equal answers for an image and its 8-bit version (a difference
    under half a grey level fools nothing)."""
    _, _, images, verdict = dodging
    generator = torch.Generator().manual_seed(0)
    sent = (images + 0.03 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    received = eight_bit(sent, images)
    levels = received * 255
    assert torch.equal(levels, levels.round()) and torch.equal(eight_bit(received, images), received)
    assert torch.equal((levels.round().byte().float() / 255), received)  # what a PNG decoder gives back
    assert ((received - images).abs() <= (sent - images).abs() + 1e-5).all()  # within float error of a level
    assert (received != sent).float().mean() > 0.5  # most pixels were moved
    oracle = Oracle(verdict, images, "scores", 4, "l2")
    shifted = images + 0.4 / 255  # under half a level from the photo: no upload can carry it
    assert torch.equal(oracle(shifted).margin, oracle(images).margin)
    assert torch.equal(oracle(sent).margin, oracle(received).margin)
    oracle_l2 = Oracle(verdict, images, "decisions", 2, "l2")
    fooling = torch.stack([images[1], images[0]])  # each probe's image is another's face: both fool a dodging check
    oracle_l2(fooling + 0.001)
    best, size = oracle_l2.best_so_far()
    assert torch.equal(best, eight_bit(fooling + 0.001, images))
    assert torch.allclose(size, (best - images).flatten(1).norm(dim=1))


def test_an_upload_takes_the_nearest_level_unless_it_lies_further_from_the_photo():
    """Each change of a pixel from its photo's level, swept densely over three levels each way (and the floats next
    to each half level and each level's 1e-3 margin), lands on the nearest level where that is no further from the
    photo (within 1e-3 of a level: float error), else on the level next to the photo's side, as written plainly."""
    levels = torch.arange(-3, 4).float()
    edges = torch.cat([levels + 0.5, levels + 1 - 1e-3, levels - 1 + 1e-3])
    steps = torch.cat([torch.linspace(-3, 3, 600_001), edges, edges.nextafter(edges + 1), edges.nextafter(edges - 1)])
    for photo in (0.0, 1.0, 128.0, 254.0, 255.0):
        images, origin = (photo + steps) / 255, torch.full((len(steps),), photo / 255)
        change = images * 255 - photo
        nearest = change.round()
        plainly = torch.where(nearest.abs() <= change.abs() + 1e-3, nearest, change.trunc())
        assert torch.equal(eight_bit(images, origin), (photo + plainly).clamp(0, 255) / 255)


def test_decision_attacks_start_from_another_face_and_shrink(dodging):
    """Dodging starts from another person's photo (counted); a boundary search and evolutionary steps make the
    perturbation smaller, and the oracle's record is what the attack returns."""
    from redteam.attacks.evolutionary import Evolutionary

    executor, probes, images, verdict = dodging
    oracle = Oracle(verdict, images, "decisions", 60, "l2")
    starts = executor.starting_points(probes, oracle, images)
    start_size = (starts - images).flatten(1).norm(dim=1)
    assert (start_size > 0).all() and (oracle.spent >= 1).all()
    assert oracle(starts).fooled.all()
    on_boundary = bisect_boundary(oracle.narrow([0]), images[:1], starts[:1], 2**-6)
    assert (on_boundary - images[:1]).norm() < start_size[0]
    result = Evolutionary()(oracle, images, starts, torch.Generator().manual_seed(0))
    assert (oracle.spent == 60).all()
    assert (result.size < start_size * 0.8).all()
    assert verdict(result.images).success.all()
    trajectory = oracle.trajectory(0)
    assert trajectory[-1][0] == 60 and trajectory[-1][2] == pytest.approx(float(result.size[0]), rel=1e-5)
    assert all(later[2] <= earlier[2] for earlier, later in zip(trajectory, trajectory[1:]))


def test_hsj_linf_searches_boxes_and_shrinks_them(dodging):
    """ℓ∞ HopSkipJump: its path clips the start to growing boxes around the image (ends: the image and the start),
    and from another face it shrinks the ℓ∞ distance within 80 queries, still fooling facenet."""
    from redteam.api import toward
    from redteam.attacks.hsj import HopSkipJump

    executor, probes, images, verdict = dodging
    oracle = Oracle(verdict, images, "decisions", 80, "linf")
    starts = executor.starting_points(probes, oracle, images)
    start_size = (starts - images).flatten(1).abs().amax(1)
    weights = torch.tensor([0.0, 1.0]), torch.tensor([0.25, 0.5])
    assert torch.equal(toward(images, starts, weights[0], "linf")[0], images[0])
    assert torch.allclose(toward(images, starts, weights[0], "linf")[1], starts[1])
    boxed = (toward(images, starts, weights[1], "linf") - images).flatten(1).abs().amax(1)
    assert torch.allclose(boxed, weights[1] * start_size)
    result = HopSkipJump(norm="linf", initial_samples=10)(oracle, images, starts, torch.Generator().manual_seed(0))
    assert (oracle.spent <= 80).all() and verdict(result.images).success.all()
    assert (result.size < 0.8 * start_size).all()


def test_square_fools_within_a_large_budget_and_stops_once_fooled(dodging):
    """At 32/255 a score attack fools facenet within 200 queries; each probe stops once fooled."""
    from redteam.attacks.square import Square

    _, _, images, verdict = dodging
    oracle = Oracle(verdict, images, "scores", 200, "linf")
    result = Square()(oracle, images, Budget("linf", 32 / 255), torch.Generator().manual_seed(0))
    assert torch.isfinite(result.size).all() and (result.size <= 32 / 255 + 1e-6).all()
    assert verdict(result.images).success.all()
    assert (oracle.spent < 200).all()


def test_square_l2_stays_on_the_sphere_and_lowers_the_margin(dodging):
    """ℓ2 Square: its start and every step lie within ε in ℓ2 (the mass moves between windows, never grows), and 40
    queries bring each probe closer to the threshold."""
    from redteam.attacks.square import Square

    _, _, images, verdict = dodging
    generator = torch.Generator().manual_seed(0)
    x = (images + Square._tiles(images, 12.0, generator)).clamp(0, 1)
    for share in (0.1, 0.02, 0.002):
        x = Square._sphere_proposal(images, x, 12.0, share, generator)
        assert ((x - images).flatten(1).norm(dim=1) <= 12.0 + 1e-3).all()
    oracle = Oracle(verdict, images, "scores", 40, "l2")
    result = Square()(oracle, images, Budget("l2", 12.0), torch.Generator().manual_seed(0))
    assert (oracle.spent == 40).all() and ((result.images - images).flatten(1).norm(dim=1) <= 12.0 + 1e-3).all()
    with torch.no_grad():
        assert (verdict(result.images).loss > verdict(images).loss).all()


def test_decision_access_refuses_gradient_attacks_in_one_line(cli, capsys, faces_root, tmp_path):
    code = cli("run", "--target", "facenet", "--attack", "pgd", "--access", "decision", "--data", faces_root,
               "--limit", 2, "--out", tmp_path / "run")  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "pgd needs gradients" in error and "evolutionary" in error and "hsj" in error
    assert not (tmp_path / "run").exists()


def test_query_run_records_queries_and_resumes_within_budget(cli, capsys, faces_root, tmp_path):
    """A decision-based run from the command line: queries per probe stored, never above --queries, a query axis in
    curve.csv, the query checks stored with it; the same command again computes nothing and spends nothing."""
    command = ("run", "--target", "facenet", "--attack", "evolutionary", "--access", "decision", "--queries", 40,
               "--data", faces_root, "--limit", 3, "--eps", "0,20,80", "--out", tmp_path)  # fmt: skip
    assert cli(*command) == 0
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        minimal = pd.read_sql_query("SELECT * FROM minimal", db)
        trajectory = pd.read_sql_query("SELECT * FROM trajectory", db)
        checks = pd.read_sql_query("SELECT * FROM checks", db).set_index("name")
    assert checks.loc["query budget", "passed"] == 1 and "of 40 queries" in checks.loc["query budget", "detail"]
    assert {"beats random search", "white-box at least as strong"} <= set(checks.index)
    assert len(minimal) >= 1 and minimal["queries"].between(1, 40).all()
    assert trajectory.groupby("probe")["queries"].max().le(40).all()
    curve = pd.read_csv(tmp_path / "curve.csv")
    along = curve.dropna(subset=["queries"])
    assert set(along["queries"]) >= {1, 10, 40} and along["accuracy"].between(0, 1).all()
    by_queries = along[along["eps"] == 80].sort_values("queries")["accuracy"].tolist()
    assert by_queries == sorted(by_queries, reverse=True)  # more queries never make the system more accurate
    capsys.readouterr()
    assert cli(*command) == 0
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        again = pd.read_sql_query("SELECT * FROM minimal", db)
    pd.testing.assert_frame_equal(minimal, again)
