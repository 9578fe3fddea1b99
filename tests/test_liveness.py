"""The liveness and anti-spoofing networks of human-models: converted graphs equal tfjs on real faces, real faces
score live, the threshold reads in the check's own unit, and the flagging threat (denial of service) runs from the
command line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.tfjs_node import model_folder, run_reference

from redteam.engine import load_target
from redteam.errors import RedteamError
from redteam.targets.liveness import ANTISPOOF, LIVENESS

CHECKS = {"liveness": (LIVENESS, "conv2d_1_input"), "antispoof": (ANTISPOOF, "conv2d_input")}


@pytest.mark.parametrize("name", list(CHECKS))
def test_matches_tfjs_on_real_faces_and_real_faces_score_live(name, faces, tmp_path):
    model, input_name = CHECKS[name]
    check = load_target(name, torch.device("cpu"))
    images = faces.load(range(0, 400, 50))
    x = check.preprocess(images)
    with torch.no_grad():
        ours = check.net(x).numpy()
        scores = check.live_score(images)
    job = {
        "kind": "graph",
        "model": str(model_folder(model, tmp_path / "model")),
        "inputs": {input_name: str(tmp_path / "x.npy")},
    }
    run_reference(
        {**job, "outputs": {"Identity": str(tmp_path / "y.npy")}}, tmp_path, {"x": x.permute(0, 2, 3, 1).numpy()}
    )
    reference = np.load(tmp_path / "y.npy")
    assert reference.shape == ours.shape and np.abs(ours - reference).max() < 1e-5
    assert (scores >= check.threshold).float().mean() >= 0.75  # real captures are mostly accepted as live


def test_thresholds_are_liveness_scores():
    check = load_target("antispoof", torch.device("cpu"), threshold=0.7)
    assert check.threshold == 0.7
    with pytest.raises(RedteamError, match=r"liveness score in \[0, 1\], not 1.5"):
        load_target("antispoof", torch.device("cpu"), threshold=1.5)


def test_flagging_live_faces_as_spoofs_from_the_command_line(cli, capsys, faces_root, tmp_path):
    command = ("run", "--target", "liveness", "--attack", "pgd", "--data", faces_root, "--limit", 4, "--eps", "0,8",
               "--steps", 5, "--out", tmp_path)  # fmt: skip
    assert cli(*command) == 0
    printed = capsys.readouterr().out
    assert "flagging" in printed
    curve = pd.read_csv(tmp_path / "curve.csv").set_index("eps")["accuracy"]
    assert curve.loc[8.0] < curve.loc[0.0]
