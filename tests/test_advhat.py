"""AdvHat: the sticker's image formation is differentiable and puts it where a hat would, and a sticker optimised for a
few steps on real faces lowers a real recogniser's similarity on held-out photos more than random noise does."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from redteam.align import CANONICAL_LANDMARKS
from redteam.attacks.accessory import Surface, photograph, placed_pose, render, surface_grid, wear
from redteam.attacks.advhat import ASPECT, AdvHat, footprint

WEARER = "Bill_Gates"  # 10 photos: 1 enrolment, 2 optimised on, 7 held out
QUICK = ("--steps", "16", "--option", "draws=2", "--option", "train_photos=2")


@pytest.fixture(scope="module")
def people(faces_root, tmp_path_factory):
    """The wearer and two other people (impersonation victims), symlinked: the dataset loads in no time."""
    root = tmp_path_factory.mktemp("advhat_faces")
    for name in (WEARER, "Abdullah", "Aaron_Peirsol"):
        (root / name).symlink_to(faces_root / name, target_is_directory=True)
    return root


def test_image_formation_is_differentiable():
    """kornia's style: float64 gradcheck on small inputs, through the bend, pitch, perspective and placement, and
    through the random shooting conditions (a fixed draw)."""
    faces = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 0.6 + 0.2
    sticker = torch.rand(1, 3, 4, 9, dtype=torch.float64, requires_grad=True)
    eyes = torch.tensor([[[5.0, 11.0], [11.0, 10.0]], [[5.5, 11.5], [10.5, 11.5]]], dtype=torch.float64)
    pose, surface = placed_pose(eyes, 1.5, 0.6, bend=1.17, pitch=math.radians(17)), Surface(ASPECT, 5.0)
    assert torch.autograd.gradcheck(lambda s: wear(faces, s, pose, surface), (sticker,))
    assert torch.autograd.gradcheck(
        lambda s: photograph(faces, s, pose, surface, 1.0, torch.Generator().manual_seed(0)), (sticker,)
    )


def test_the_sticker_sits_on_the_forehead_with_the_asked_area():
    flat = footprint(bend=0.0, pitch=0.0, camera_distance=5.0)
    assert flat == pytest.approx(ASPECT, rel=0.02)  # nothing bent or tilted: the flat sticker
    assert footprint(bend=1.17, pitch=math.radians(17), camera_distance=5.0) < 0.9 * flat  # bent and tilted away
    campaign = AdvHat()
    eyes = CANONICAL_LANDMARKS[None, :2]
    for area in (0.02, 0.06):
        surface, width = campaign.surface(area)
        pose = campaign.nominal_pose(CANONICAL_LANDMARKS[None], width, surface)
        size = 250
        _, coverage = render(torch.ones(1, 3, 40, 90), surface_grid(pose, size, surface))
        assert coverage.mean().item() == pytest.approx(area, rel=0.03)
        rows, columns = torch.nonzero(coverage[0, 0] > 0.5, as_tuple=True)
        assert rows.max() < eyes[0, :, 1].min() - 0.4 * 41.2  # above the eyebrows
        assert columns.float().mean().item() == pytest.approx(eyes[0, :, 0].mean().item(), abs=1.0)  # centred


def test_grid_interpolation_stays_close_to_the_exact_map():
    eyes = CANONICAL_LANDMARKS[None, :2] + torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(0)) * 3
    pose, surface = placed_pose(eyes, 2.5, 0.6, bend=1.17, pitch=math.radians(17)), Surface(ASPECT, 5.0)
    exact, interpolated = surface_grid(pose, 250, surface, stride=1), surface_grid(pose, 250, surface)
    inside = (exact.abs() <= 1).all(-1)
    assert inside.any()
    assert (exact - interpolated)[inside].abs().max() < 0.01  # in [-1, 1] units: < 0.5 sticker pixel at 100 px


def test_short_run_beats_random_noise_and_writes_sticker_faces_curve_and_transfer(people, cli, tmp_path):
    from redteam.api import TARGETS

    command = ("run", "--target", "arcface", "--attack", "advhat", "--data", people, "--identity", WEARER)
    assert cli(*command, "--eps", "0,0.06", *QUICK, "--out", tmp_path) == 0
    metrics = json.loads((tmp_path / "run.json").read_text())["metrics"]
    assert metrics["held_out_photos"] == 7 and metrics["train_photos"] == 2
    assert metrics["covered"] == pytest.approx(0.06, rel=0.1)
    # Both stickers cover the same pixels of the same held-out photos; only the optimised one was aimed.
    assert metrics["sticker_similarity"] < metrics["random_similarity"] - 0.03, metrics
    photos = pd.read_csv(tmp_path / "held_out.csv")
    assert len(photos) == 7 and (photos["sticker"] < photos["random"]).mean() >= 5 / 7
    assert photos["fooled"].mean() == pytest.approx(1 - metrics["sticker_accuracy"])

    sticker = Image.open(tmp_path / "advhat-sticker.png")
    assert sticker.size == (900, 400)
    width_mm = AdvHat().printed_size_mm(0.06)[0]
    assert sticker.info["dpi"][0] == pytest.approx(900 * 25.4 / width_mm, rel=0.01)
    assert (tmp_path / "advhat-faces.png").stat().st_size > 50_000
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert curve["norm"].unique().tolist() == ["area"] and curve["eps"].tolist() == [0, 0.06]
    assert (curve["n"] == 7).all()
    transfer = pd.read_csv(tmp_path / "transfer.csv")
    recognisers = {name for name in TARGETS if TARGETS.get(name).card.task == "recognition"}
    assert {"arcface", "facenet"} <= set(transfer["target"]) <= recognisers
    assert {"threshold", "clean", "random", "sticker", "sticker_accuracy"} <= set(transfer.columns)


def test_impersonation_chooses_a_victim(people, cli, tmp_path, capsys):
    command = ("run", "--target", "arcface", "--attack", "advhat", "--data", people, "--identity", "Abdullah")
    quick = ("--threat", "impersonation", "--eps", "0.02", "--steps", "2", "--option", "train_photos=1")
    assert cli(*command, *quick, "--option", f"victim={WEARER}", "--out", tmp_path) == 0
    assert f"against {WEARER}'s enrolment photo" in capsys.readouterr().out
    assert json.loads((tmp_path / "run.json").read_text())["metrics"]["held_out_photos"] == 3  # no enrolment of his


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--identity", WEARER, "--eps", "0,0.9"), "sticker areas"),
        (("--identity", WEARER, "--threat", "impersonation", "--option", "victim=Abdulah"), "Did you mean 'Abdullah'"),
        (("--identity", WEARER, "--threat", "impersonation", "--option", f"victim={WEARER}"), "someone other"),
        (("--identity", WEARER, "--threat", "identification"), "supports --threat dodging or impersonation"),
    ],
)
def test_bad_input_is_one_clear_line(people, cli, tmp_path, capsys, extra, message):
    assert cli("run", "--target", "arcface", "--attack", "advhat", "--data", people, *extra, "--out", tmp_path) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_without_identity_the_person_with_most_photos_is_chosen_and_said(people, cli, tmp_path, capsys):
    command = ("run", "--target", "arcface", "--attack", "advhat", "--data", people, "--eps", "0,0.02")
    assert cli(*command, "--steps", 1, "--option", "draws=1", "--option", "train_photos=1", "--out", tmp_path) == 0
    said = " ".join(capsys.readouterr().out.split())  # as one line, whatever the terminal's width
    assert f"--identity not given: {WEARER}, the person with the most photos in {people.name} (10)" in said
    assert json.loads((tmp_path / "run.json").read_text())["config"]["identity"] == WEARER


def test_too_few_photos_of_anyone_is_one_line_that_says_what_to_change(faces_root, cli, tmp_path, capsys):
    pairs = tmp_path / "pairs"
    for identity in sorted(p for p in faces_root.iterdir() if p.is_dir())[:3]:
        (pairs / identity.name).mkdir(parents=True)
        for photo in sorted(identity.iterdir())[:2]:
            (pairs / identity.name / photo.name).symlink_to(photo)
    assert cli("run", "--target", "arcface", "--attack", "advhat", "--data", pairs, "--out", tmp_path / "x") == 2
    error = capsys.readouterr().err
    assert "advhat (dodging) needs 3 photos of one person; nobody in pairs has more than 2: pass --data" in error


def test_interrupted_then_resumed_equals_uninterrupted(people, tmp_path):
    """Ctrl-C once the first sticker area is stored (16 steps make an area last seconds, so the signal lands while
    later areas are still to do; one may be stored before it does); the same command carries on from there, and
    every number and table equals an uninterrupted run's."""
    redteam = str(Path(sys.executable).parent / "redteam")
    command = [redteam, "run", "--target", "arcface", "--attack", "advhat", "--data", str(people)]
    command += ["--identity", WEARER, "--eps", "0,0.02,0.04,0.05", "--steps", "16"]
    command += ["--option", "draws=1", "--option", "train_photos=1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    subprocess.run([*command, "--out", str(whole)], check=True, capture_output=True, env=environment, timeout=600)

    # SIGINT as a terminal sends it, even where this suite was started in the background (which ignores SIGINT,
    # and children inherit that).
    running = subprocess.Popen([*command, "--out", str(parts)], stderr=subprocess.PIPE, text=True, env=environment,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and running.poll() is None:
        if _stages(parts / "results.sqlite") >= 1:
            running.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    stderr = running.communicate(timeout=120)[1]
    assert running.returncode == 130, stderr
    assert "every finished stage (an area, a budget, a poison rate, ...) is stored" in stderr
    assert 1 <= _stages(parts / "results.sqlite") < 3 and not (parts / "run.json").exists()

    subprocess.run([*command, "--out", str(parts)], check=True, capture_output=True, env=environment, timeout=600)
    assert _stages(parts / "results.sqlite") == 3
    finished, resumed = (json.loads((folder / "run.json").read_text()) for folder in (whole, parts))
    assert resumed["metrics"] == finished["metrics"] and resumed["tables"] == finished["tables"]
    for table in ("held_out.csv", "areas.csv", "curve.csv"):
        assert (parts / table).read_text() == (whole / table).read_text()


def _stages(store: Path) -> int:
    if not store.is_file():
        return 0
    try:
        with sqlite3.connect(store, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM stages").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not there yet
        return 0
