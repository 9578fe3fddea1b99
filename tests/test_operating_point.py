"""A defended system judged at its own operating point: a defense that makes the recogniser accept impostors is
flagged by the checks, and `--recalibrate` (on calibration faces) moves its threshold back to the undefended false
accept rate."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import shared_path

from redteam.assets import save_atomic
from redteam.metrics import threshold_at_far
from redteam.results import ResultStore


def test_threshold_at_far_accepts_at_most_that_share_of_impostors():
    impostor = np.linspace(0, 1, 101)
    for far in (0.0, 0.05, 0.5):
        threshold = threshold_at_far(impostor, far)
        assert (impostor >= threshold).mean() <= far
        assert (impostor >= np.nextafter(threshold, -np.inf) - 0.01).mean() > far  # and no higher than it must be


@pytest.fixture(scope="module")
def calibration_faces(tmp_path_factory):
    """12 identities of faces-train, the calibration faces (disjoint from the evaluated ones)."""
    train, root = shared_path("data", "faces-train"), tmp_path_factory.mktemp("calibration")
    for identity in sorted(p for p in train.iterdir() if p.is_dir())[:12]:
        (root / identity.name).symlink_to(identity, target_is_directory=True)
    return root


def _operating_check(run):
    checks = ResultStore(run / "results.sqlite").checks().set_index("name")
    return checks.loc["defended operating point"]


def test_a_defense_that_accepts_everyone_is_flagged_and_recalibration_moves_its_threshold(
    cli, faces_root, calibration_faces, tmp_path
):
    # Shrinking every face to 10 px makes all faces alike: the recogniser then matches anyone with anyone.
    command = ("run", "--target", "arcface", "--attack", "pgd", "--defense", "resize:0.04", "--adaptivity",
               "adaptive", "--data", faces_root, "--limit", 4, "--eps", "0,2", "--steps", 1)  # fmt: skip
    assert cli(*command, "--out", tmp_path / "as-is") == 0
    flagged = _operating_check(tmp_path / "as-is")
    assert not flagged["passed"] and "accepts impostors it should not" in flagged["detail"]
    assert cli(*command, "--recalibrate", calibration_faces, "--out", tmp_path / "recalibrated") == 0
    moved = _operating_check(tmp_path / "recalibrated")
    assert f"recalibrated on {calibration_faces}" in moved["detail"]
    # At its own threshold it accepts impostors no more often, and it no longer recognises anyone: flagged too.
    assert "accepts impostors it should not" not in moved["detail"] and not moved["passed"]
    assert "rejects genuine pairs it should accept" in moved["detail"]
    clean = ResultStore(tmp_path / "recalibrated" / "results.sqlite").checks().set_index("name").loc["operating point"]
    assert not clean["passed"] and "see its defended operating point" in clean["detail"]  # not the threshold's unit
    assert "at cosine 0.3646" not in moved["detail"].split(";")[0].split("accepts")[0]  # a new threshold


def test_lqvae_is_recalibrated_by_default_on_the_faces_it_was_trained_on(
    cli, faces_root, calibration_faces, tmp_path, monkeypatch, capsys
):
    from redteam.defenses.lqvae import default_path

    monkeypatch.setenv("REDTEAM_CACHE", str(tmp_path / "cache"))
    tiny = ("--epochs", 1, "--limit", 8, "--image-size", 32, "--channels", 8, "--latent-channels", 4)
    assert cli("train", "lqvae", "--data", calibration_faces, *tiny) == 0
    command = ("run", "--target", "arcface", "--attack", "pgd", "--defense", "lqvae", "--adaptivity", "adaptive",
               "--data", faces_root, "--limit", 2, "--eps", "0", "--no-checks")  # fmt: skip
    assert cli(*command, "--out", tmp_path / "default") == 0
    run = json.loads((tmp_path / "default" / "run.json").read_text())
    assert run["config"]["recalibrate"] == str(calibration_faces.resolve())
    assert f"(recalibrated on {calibration_faces.resolve()})" in " ".join(capsys.readouterr().out.split())
    # The same system as giving those faces: the two runs' numbers compare.
    assert cli(*command, "--recalibrate", calibration_faces, "--out", tmp_path / "explicit") == 0
    explicit = json.loads((tmp_path / "explicit" / "run.json").read_text())
    assert explicit["cell"] == run["cell"] and explicit["comparable"] == run["comparable"]
    capsys.readouterr()
    assert cli(*command, "--recalibrate", "none", "--out", tmp_path / "as-deployed") == 0
    header = " ".join(capsys.readouterr().out.split())  # as one line, whatever the terminal's width
    assert "threshold cosine 0.3646" in header and "(recalibrated on" not in header  # arcface's own
    # A purifier whose training faces are unknown (trained before they were recorded): one line, before any work.
    checkpoint = torch.load(default_path(), weights_only=True)
    save_atomic({**checkpoint, "data": None}, default_path())
    assert cli(*command, "--out", tmp_path / "unknown") == 2
    error = capsys.readouterr().err
    assert "--recalibrate FACES" in error and "--recalibrate none" in error
    assert not (tmp_path / "unknown" / "results.sqlite").exists()
    save_atomic({**checkpoint, "data": str(tmp_path / "elsewhere")}, default_path())  # trained on another machine
    assert cli(*command, "--out", tmp_path / "moved") == 2
    assert f"the faces it was trained on ({tmp_path / 'elsewhere'}) are not here" in " ".join(
        capsys.readouterr().err.split()
    )


def test_recalibrate_none_on_a_defense_that_keeps_the_threshold_is_the_same_cell_as_no_setting():
    from redteam.engine.assembly import build_defense, with_recalibration
    from redteam.engine.config import EvaluationConfig

    config = EvaluationConfig(target="facenet", attack="pgd", defense="halftone", recalibrate="none").resolve()
    plain = replace(config, recalibrate=None)
    assert with_recalibration(config, build_defense("halftone")).settings_key() == plain.settings_key()
