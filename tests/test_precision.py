"""Mixed precision and automatic batch sizes: they change how an attack computes, never how a verdict is judged."""

from __future__ import annotations

import pytest
import torch
from helpers import shared_path

from redteam.api import TARGETS
from redteam.engine import Evaluation, EvaluationConfig, load_target
from redteam.results import ResultStore
from redteam.runtime import autocast

#: Each task's differentiable score of an image, the quantity its attacks climb.
SCORES = {"recognition": "embed", "detection": "face_score", "liveness": "live_score"}
#: Zoo targets whose weights no registry package ships: the file each is tested with.
WEIGHTS = {"scrfd": ("weights", "scrfd_500m.onnx")}


def _curve(faces_root, tmp_path, **settings) -> tuple[str, list[float]]:
    config = EvaluationConfig(
        target="facenet", attack="pgd", data=str(faces_root), eps=(1,), limit=6, attack_options={"steps": 3},
        checks=False, **settings,
    )  # fmt: skip
    evaluation = Evaluation(config, ResultStore(tmp_path / f"{config.precision}.sqlite"))
    evaluation.run()
    return evaluation.cell.key, evaluation.curve()["accuracy"].tolist()


def test_bf16_attack_reaches_the_float32_answer(faces_root, tmp_path):
    cell, exact = _curve(faces_root, tmp_path)
    mixed_cell, mixed = _curve(faces_root, tmp_path, precision="bf16", batch_size="auto")
    assert mixed_cell != cell  # a different computation is stored apart
    assert exact[0] == mixed[0] == 1.0  # the clean point is never attacked
    assert exact[-1] < 1.0  # the attack works at all: the comparison can fail
    assert all(abs(a - b) <= 1 / 6 for a, b in zip(exact, mixed)), (exact, mixed)  # one probe at most


def test_autocast_runs_in_the_asked_precision(facenet, faces):
    images = faces.load([0, 1])
    exact = facenet.embed(images)
    with autocast(images.device, "fp32"):
        assert torch.equal(facenet.embed(images), exact)
    with autocast(images.device, "bf16"):
        mixed = facenet.embed(images).float()
    # bfloat16 keeps 8 significant bits: the convolutions ran in it, and the embedding still points the same way
    assert (mixed - exact).abs().max() > 1e-3
    assert torch.nn.functional.cosine_similarity(mixed, exact).min() > 0.99


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_zoo_target_gives_gradients_under_bf16_autocast(name, faces):
    """``--precision bf16`` runs an attack's passes under autocast: a custom backward then meets bf16 gradients and
    the float32 tensors its forward saved. Four faces: enough pixels for the image-convolution path."""
    weights = shared_path(*WEIGHTS[name]) if name in WEIGHTS else None
    target = load_target(name, torch.device("cpu"), weights=weights)
    score = getattr(target, SCORES[target.card.task])
    images = faces.load([0, 1, 2, 3])
    gradients = []
    for precision in ("fp32", "bf16"):
        leaf = images.clone().requires_grad_(True)
        with autocast(images.device, precision):
            output = score(leaf).float().reshape(len(leaf), -1)  # [B] scores or [B, D] embeddings
        # a fixed direction through the output (the sum of a unit embedding's squares would be a constant)
        direction = torch.randn(output.shape[1], generator=torch.Generator().manual_seed(0))
        (gradient,) = torch.autograd.grad((output @ direction).sum(), leaf)
        gradients.append(gradient)
    exact, mixed = gradients
    assert mixed.dtype == torch.float32 and mixed.isfinite().all() and mixed.abs().sum() > 0
    if target.card.task == "recognition":  # a detector's best window may change when bf16 rounds its score to 1
        assert torch.nn.functional.cosine_similarity(mixed.flatten(), exact.flatten(), dim=0) > 0.5


@pytest.mark.parametrize(
    "target,threat", [("blazeface", "evasion"), ("liveness", "auto"), ("arcface", "identification")]
)
def test_bf16_runs_every_kind_of_threat(cli, faces_root, tmp_path, target, threat):
    """A detector's score, a liveness score and identification's logits come out of autocast in bf16: the attack's
    bookkeeping (its best loss so far, in float32) must take them."""
    args = ("--target", target, "--threat", threat, "--limit", 2, "--eps", "0,4", "--steps", 2, "--no-checks")
    assert cli("run", *args, "--precision", "bf16", "--data", faces_root, "--out", tmp_path) == 0


@pytest.mark.parametrize(
    "args,message", [(("--precision", "bf61"), "Did you mean 'bf16'"), (("--batch-size", "many"), "number or auto")]
)
def test_bad_precision_or_batch_size_is_one_line(cli, capsys, tmp_path, args, message):
    assert cli("run", "--limit", "2", "--out", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
