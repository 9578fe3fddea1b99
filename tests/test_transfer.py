"""Zero-query transfer on real models and real faces: input diversity and translation invariance are sound
differentiable ops, an ensemble of surrogates is the mean of its members' objectives, a sweep over surrogate sets
gives the transfer matrix (white-box on its diagonal), and a query attack starts from a transfer example."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from redteam.api import Budget, Oracle
from redteam.attacks.pgd import TIDIM, diverse_view, translation_invariant
from redteam.engine import EvaluationConfig, load_target, prepare
from redteam.engine.assembly import DECISION_START_EPS, SurrogateEnsemble
from redteam.engine.execute import Executor
from redteam.threats import VerificationObjective


def test_input_diversity_and_translation_invariance_are_linear_and_differentiable():
    """Both are linear maps of the image (a shrink-and-shift, a blur): float64 gradcheck, shapes kept; the blur of a
    point keeps its mass, and input diversity that never fires is the identity."""
    images = torch.rand(1, 2, 12, 12, dtype=torch.float64, requires_grad=True)
    shifted = diverse_view(1.0, torch.Generator().manual_seed(3))
    assert shifted(images).shape == images.shape and not torch.equal(shifted(images), images)
    assert torch.autograd.gradcheck(shifted, (images,))
    assert torch.autograd.gradcheck(lambda x: translation_invariant(x, 1.0), (images,))
    assert diverse_view(0.0, torch.Generator().manual_seed(3))(images) is images
    point = torch.zeros(1, 1, 21, 21)
    point[..., 10, 10] = 1
    blurred = translation_invariant(point, 2.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-3) and blurred[..., 10, 10] < 0.1


@pytest.fixture(scope="module")
def two_models_one_cell(faces_root):
    cell = prepare(EvaluationConfig(target="arcface", attack="ti-dim", surrogate="facenet,dlib-resnet",
                                    data=str(faces_root), limit=3, checks=False))  # fmt: skip
    return cell, Executor(cell)


def test_an_ensemble_objective_is_the_mean_of_its_members(two_models_one_cell):
    """The ensemble's loss on real faces is the mean of facenet's and dlib's margins over their own thresholds."""
    cell, executor = two_models_one_cell
    assert isinstance(executor.crafting, SurrogateEnsemble)
    images = cell.dataset.load([p.image for p in cell.probes])
    crafting, _ = executor.objectives(cell.probes)
    noisy = (images + 0.03 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    losses = []
    for name in ("facenet", "dlib-resnet"):
        model = load_target(name, torch.device("cpu"))
        with torch.no_grad():
            reference = model.embed(cell.dataset.load([p.reference for p in cell.probes]))
        member = VerificationObjective(model.embed, model.similarity, model.threshold, False, reference)
        losses.append(member(noisy).loss)
    with torch.no_grad():
        assert torch.allclose(crafting(noisy).loss, torch.stack(losses).mean(0), atol=1e-4)


def test_a_query_attack_starts_from_a_transfer_example(two_models_one_cell):
    """A decision attack's first candidate is the ensemble's transfer example at 16/255, far closer than another
    face; a score attack handed a start that already fools stops after the one query that sees it."""
    from redteam.attacks.square import Square

    cell, executor = two_models_one_cell
    images = cell.dataset.load([p.image for p in cell.probes])
    _, verdict = executor.objectives(cell.probes)
    oracle = Oracle(verdict, images, "decisions", 10, "l2")
    starts = executor.starting_points(cell.probes, oracle, images)
    transferred = (starts - images).flatten(1).abs().amax(1) <= DECISION_START_EPS + 1e-6
    assert transferred.any(), "no transfer example fooled arcface at 16/255"
    assert oracle(starts).fooled.all()
    assert (oracle.spent[transferred] == 2).all()  # the transfer try and the check above
    fooling = TIDIM(steps=5, early_stop=False)(verdict, images, Budget("linf", 16 / 255)).images  # white-box
    scores = Oracle(verdict, images, "scores", 50, "linf")
    found = Square()(scores, images, Budget("linf", 16 / 255), torch.Generator().manual_seed(0), start=fooling)
    assert torch.isfinite(found.size).all() and (scores.spent == 1).all()


def test_a_sweep_over_surrogate_sets_gives_the_transfer_matrix(cli, capsys, faces_root, tmp_path):
    """Rows: surrogate sets (one model, an ensemble); columns: targets; the diagonal is the white-box cell, stored
    once. The matrix reaches transfer.csv, the sweep's summary and the report."""
    sweep = tmp_path / "transfer.yaml"
    sweep.write_text(
        f"data: {faces_root}\ntargets: [facenet, arcface]\nattacks: {{ti-dim: {{steps: 2}}}}\n"
        "surrogates: [facenet, [facenet, dlib-resnet]]\neps: [8]\nlimit: 2\nchecks: false\n"
    )
    assert cli("sweep", sweep, "--out", tmp_path / "run") == 0
    printed = capsys.readouterr().out
    assert "accuracy under transfer" in printed and "crafted on" in printed
    matrix = pd.read_csv(tmp_path / "run" / "transfer.csv")
    pairs = set(zip(matrix["surrogate"], matrix["target"]))
    assert pairs == {("facenet", "facenet"), ("facenet", "arcface"), ("facenet,dlib-resnet", "facenet"),
                     ("facenet,dlib-resnet", "arcface")}  # fmt: skip
    assert matrix["accuracy"].between(0, 1).all() and (matrix["n"] == 2).all()
    assert cli("report", tmp_path / "run", "--examples", 0) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Transfer matrices" in report and "| facenet,dlib-resnet |" in report


@pytest.mark.parametrize(
    "args,message",
    [
        (("--surrogate", "facenet,facenet"), "lists ['facenet'] twice"),
        (("--surrogate", "facenet,mtcnn"), "mtcnn is a detection model"),
        (("--surrogate", "facenet,dlib-resnt"), "Did you mean 'dlib-resnet'"),
        (("--attack", "cw", "--surrogate", "facenet"), "transfer needs a fixed-budget attack"),
        (("--attack", "square", "--surrogate", "facenet", "--access", "decision"), "square needs scores"),
    ],
)
def test_bad_surrogates_fail_in_one_line(cli, capsys, tmp_path, args, message):
    code = cli("run", "--target", "arcface", *args, "--out", tmp_path / "out")
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and "Traceback" not in error, error
    assert not (tmp_path / "out").exists()
