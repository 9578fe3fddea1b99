"""Model inversion: the eigenface prior draws and projects real faces, and a few white-box steps against FaceNet's
identifier reconstruct faces an independent recogniser (dlib) identifies more often than the prior's mean face or
chance; the score-only variant raises the identifier's confidence; same seed, same reconstructions."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest
import torch

from redteam.api import crop_resize
from redteam.attacks.priors import EigenfaceConfig, load_eigenfaces
from redteam.datasets import ImageFolderDataset

PERSON = "Bill_Gates"  # 10 photos
#: A small prior (cached after its first fit, shared by every test here): 300 faces-train faces, 32 eigenfaces.
PRIOR = EigenfaceConfig(components=32, images=300)
QUICK = (
    "--option", "identities=8", "--option", "attacked=4", "--option", "restarts=2",
    "--option", f"components={PRIOR.components}", "--option", f"prior_images={PRIOR.images}",
)  # fmt: skip


@pytest.fixture(scope="module")
def data(faces_root, tmp_path_factory):
    """``faces/``: Bill Gates, 7 more people with 5+ photos and one with 3 (too few to enrol); ``faces-train/``
    beside it (the prior's default source), all symlinked."""
    root = tmp_path_factory.mktemp("inversion")
    (root / "faces").mkdir()
    people = sorted(p for p in faces_root.iterdir() if p.is_dir())
    enough = [p for p in people if len(list(p.iterdir())) >= 5 and p.name != PERSON][:7]
    few = next(p for p in people if len(list(p.iterdir())) == 3)
    for person in [faces_root / PERSON, *enough, few]:
        (root / "faces" / person.name).symlink_to(person, target_is_directory=True)
    (root / "faces-train").symlink_to(faces_root.parent / "faces-train", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def prior(data):
    return load_eigenfaces(ImageFolderDataset(data / "faces-train"), PRIOR)


def test_the_prior_draws_faces_and_projects_unseen_ones(prior, data):
    assert torch.allclose(prior.components @ prior.components.T, torch.eye(PRIOR.components), atol=1e-4)
    assert (prior.scales[:-1] >= prior.scales[1:]).all()
    assert torch.equal(prior.decode(torch.zeros(1, PRIOR.components))[0], prior.mean.clamp(0, 1))
    z = 0.3 * torch.randn(4, PRIOR.components, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(prior.encode(prior.decode(z)), z, atol=0.02)  # decode is linear where nothing clips
    # Evaluation faces (people the prior never saw): their projection is closer to them than the mean face is.
    faces = ImageFolderDataset(data / "faces")
    photos = faces.load(faces.by_identity[PERSON][:4])
    frames = crop_resize(photos, 1.0, (PRIOR.size, PRIOR.size))

    def error(images: torch.Tensor) -> float:  # over the square the prior draws (outside it, both are the mean's)
        return (crop_resize(images - frames, PRIOR.crop, (PRIOR.crop_pixels,) * 2)).square().mean().item()

    assert error(prior.decode(prior.encode(photos))) < 0.6 * error(prior.mean.expand_as(frames))
    again = load_eigenfaces(ImageFolderDataset(data / "faces-train"), PRIOR)  # from the cache
    assert torch.equal(again.components, prior.components) and torch.equal(again.mean, prior.mean)


def test_white_box_reconstructions_are_recognised_by_an_independent_model(data, prior, cli, tmp_path, capsys):
    command = ("run", "--target", "facenet", "--attack", "inversion", "--data", data / "faces", "--identity", PERSON)
    black_box = ("--option", "black_box=true", "--option", "black_box_steps=4", "--option", "black_box_samples=5")
    # 16 steps: at 8, one of the four reconstructions sat on dlib's boundary, and the packages of a fresh install
    # (2026-11-30) moved it across; the commits before fail the same way on them.
    assert cli(*command, *QUICK, *black_box, "--steps", 16, "--out", tmp_path) == 0
    out = capsys.readouterr().out
    assert "identified top-1" in out and "dlib-resnet" in out
    metrics = json.loads((tmp_path / "run.json").read_text())["metrics"]
    assert metrics["identities"] == 8 and metrics["attacked"] == 4 and metrics["chance"] == 1 / 8
    assert metrics["head_test_accuracy"] >= 0.8 and metrics["real_accuracy"] >= 0.75
    # FaceNet's identifier is sure of the reconstructions, and dlib, which never took part, recognises them.
    assert metrics["target_confidence"] > 0.8 > metrics["start_confidence"] + 0.3, metrics
    assert metrics["attack_accuracy"] >= 0.75, metrics
    assert metrics["attack_accuracy"] > max(metrics["mean_face_accuracy"], metrics["random_accuracy"], 1 / 8)
    table = pd.read_csv(tmp_path / "inversion.csv").set_index("reconstruction")
    assert {"white-box", "black-box", "mean face", "random prior draw", "held-out photos"} <= set(table.index)
    # Scores alone (NES from the mean face) already raise the identifier's confidence above the mean face's.
    assert table.loc["black-box", "target_confidence"] > table.loc["mean face", "target_confidence"] + 0.05, table
    assert metrics["black_box_queries"] == 4 * 2 * 5
    identities = pd.read_csv(tmp_path / "identities.csv")
    assert identities["identity"].iloc[0] == PERSON and len(identities) == 4
    # Each reconstruction dlib identifies as its person is in the evidence log, with the verdict on its saved file.
    entries = [json.loads(line) for line in (tmp_path / "evidence.jsonl").read_text().splitlines()]
    recognised = identities[identities["evaluator_top1"] == identities["identity"]].set_index("identity")
    assert [e["probe"] for e in entries] == recognised.index.tolist() != []
    for entry in entries:
        assert (entry["attack"], entry["evaluator"], entry["eps"]) == ("inversion", "dlib-resnet", 16)
        assert entry["score"] == pytest.approx(recognised.loc[entry["probe"], "similarity"])
        assert isinstance(entry["saved_fooled"], bool) and abs(entry["saved_score"] - entry["score"]) < 0.02
        assert hashlib.sha256((tmp_path / entry["image"]).read_bytes()).hexdigest() == entry["sha256"]
    assert (tmp_path / "inversion-faces.png").stat().st_size > 50_000
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert curve["norm"].unique().tolist() == ["steps"] and curve["eps"].tolist() == [0, 4, 8, 16]
    assert curve["accuracy"].iloc[-1] == pytest.approx(1 - metrics["attack_accuracy"])


def test_same_seed_same_reconstructions(data, prior, cli, tmp_path):
    command = ("run", "--target", "facenet", "--attack", "inversion", "--data", data / "faces", "--identity", PERSON)
    tiny = (*QUICK, "--steps", 2, "--option", "identities=4", "--option", "attacked=2", "--option", "fit_epochs=5")
    for run in ("a", "b"):
        assert cli(*command, *tiny, "--out", tmp_path / run) == 0
    first, second = (pd.read_csv(tmp_path / run / "identities.csv") for run in ("a", "b"))
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    assert (tmp_path / "a" / "inversion-faces.png").read_bytes() == (
        tmp_path / "b" / "inversion-faces.png"
    ).read_bytes()


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--identity", "Bill_Gatess"), "Did you mean 'Bill_Gates'"),
        (("--identity", PERSON, "--option", "evaluator=facenet"), "independent"),
        (("--identity", PERSON, "--option", "evaluator=mtcnn"), "is a detector"),
        (("--identity", PERSON, "--option", "prior_data=/nowhere"), "/nowhere is not a folder"),
        (("--identity", PERSON, "--steps", 8, "--eps", "0,9"), "optimisation steps"),
        (("--identity", PERSON, "--option", "attacked=40"), "cannot exceed"),
        (("--identity", PERSON, "--threat", "dodging"), "supports --threat identification"),
    ],
)
def test_bad_input_is_one_clear_line(data, cli, tmp_path, capsys, extra, message):
    command = ("run", "--target", "facenet", "--attack", "inversion", "--data", data / "faces")
    assert cli(*command, *QUICK, *extra, "--out", tmp_path) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_too_few_photos_to_enrol(data, cli, tmp_path, capsys):
    few = next(p.name for p in (data / "faces").iterdir() if len(list(p.iterdir())) == 3)
    command = ("run", "--target", "facenet", "--attack", "inversion", "--data", data / "faces", "--identity", few)
    assert cli(*command, "--out", tmp_path) == 2
    assert "enrolment needs 5" in capsys.readouterr().err
