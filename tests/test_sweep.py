"""`redteam sweep`: the grid a sweep file describes, one clear line for every mistake in it, and a real sweep."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from redteam.results import ResultStore
from redteam.sweep import load_sweep

EXAMPLE = Path(__file__).resolve().parents[1] / "reports" / "sweep-example.yaml"


def test_example_file_is_the_full_grid():
    sweep = load_sweep(EXAMPLE)
    cells = [(c.target, c.attack, c.defense_label) for c in sweep.configs]
    assert cells == [
        (target, attack, defense)
        for target in ("facenet", "arcface")
        for attack in ("pgd", "mim")
        for defense in ("none", "halftone (adaptive)")
    ]
    assert len({c.settings_key() for c in sweep.configs}) == 8  # each its own cell in the store
    assert all(c.eps == (0, 1, 2, 4) and c.limit == 8 and c.attack_options == {"steps": 5} for c in sweep.configs)
    assert sweep.out == Path("runs/sweep-example")


def test_adaptive_and_non_adaptive_cells_but_one_undefended(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("targets: [facenet]\nattacks: [pgd]\ndefenses: [none, halftone]\nadaptive: [true, false]\n")
    labels = [c.defense_label for c in load_sweep(path).configs]
    assert labels == ["none", "halftone (adaptive)", "halftone (non-adaptive)"]


MISTAKES = {
    "misspelt key": (
        "targets: [facenet]\nattacks: [pgd]\natacks: [mim]\n",
        "unknown key 'atacks'. Did you mean 'attacks'?",
    ),
    "unknown target": (
        "targets: [facenett]\nattacks: [pgd]\n",
        "targets: unknown target 'facenett'. Did you mean 'facenet'?",
    ),
    "unknown attack": ("targets: [facenet]\nattacks: {pgdd: {steps: 2}}\n", "Did you mean 'pgd'?"),
    "unknown defense": ("targets: [facenet]\nattacks: [pgd]\ndefenses: [halftones]\n", "Did you mean 'halftone'?"),
    "attack setting": ("targets: [facenet]\nattacks: {pgd: {stepz: 2}}\n", "pgd has no setting stepz"),
    "eps not a list": (
        "targets: [facenet]\nattacks: [pgd]\neps: 4\n",
        "eps: expected a list of numbers, got a number 4",
    ),
    "eps negative": ("targets: [facenet]\nattacks: [pgd]\neps: [0, -1]\n", "budget -1 is negative"),
    "eps too large": ("targets: [facenet]\nattacks: [pgd]\neps: [0, 300]\n", "exceeds the whole pixel range"),
    "precision": ("targets: [facenet]\nattacks: [pgd]\nprecision: bf61\n", "Did you mean 'bf16'?"),
    "limit zero": ("targets: [facenet]\nattacks: [pgd]\nlimit: 0\n", "limit: must be at least 1"),
    "boolean as number": ("targets: [facenet]\nattacks: [pgd]\nseed: true\n", "seed: expected a whole number"),
    "adaptive": ("targets: [facenet]\nattacks: [pgd]\nadaptive: maybe\n", "adaptive: expected true, false"),
    "campaign": ("targets: [facenet]\nattacks: [pgd, advhat]\n", "advhat is a campaign; run it with `redteam run"),
    "threat vs task": ("targets: [mtcnn]\nattacks: [pgd]\nthreat: dodging\n", "dodging attacks recognition models"),
    "missing attacks": ("targets: [facenet]\n", "attacks: missing"),
    "not a mapping": ("- facenet\n- pgd\n", "must be a YAML mapping"),
    "bad yaml": ("targets: [facenet\nattacks: [pgd]\n", "is not valid YAML at line"),
    "duplicate": ("targets: [facenet, facenet]\nattacks: [pgd]\n", "listed twice"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_mistakes_give_one_line_naming_key_and_value(cli, capsys, tmp_path, case):
    text, message = MISTAKES[case]
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    code = cli("sweep", path, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert str(path) in err and len(err.strip().splitlines()) <= 3  # one message (rich may wrap it)
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_sweep_runs_every_cell_into_one_store(cli, capsys, faces_root, tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(
        f"data: {faces_root}\ntargets: [facenet]\nattacks: {{pgd: {{steps: 2}}}}\n"
        "defenses: [none, 'halftone:method=ordered']\n"
        "eps: [0, 4]\nlimit: 2\nbatch_size: 2\nchecks: false\n"
    )
    out = tmp_path / "out"
    assert cli("sweep", path, "--out", out) == 0
    computed = int(re.search(r"(\d+) batches computed", capsys.readouterr().out).group(1))
    assert 3 <= computed <= 4  # the clean batch of each cell, ε = 4 for each with a probe still correct
    curve = pd.read_csv(out / "curve.csv")
    assert sorted(set(curve["defense"])) == ["halftone:method=ordered (adaptive)", "none"]
    assert (curve["n"] == 2).all() and len(curve) == 4
    undefended = curve[curve["defense"] == "none"]
    assert undefended["accuracy"].tolist() == [1, 0]  # 4/255 breaks FaceNet; the halftoned cell is measured too
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["command"] == f"redteam sweep {path} --out {out}" and len(summary["cells"]) == 2
    assert len(ResultStore(out / "results.sqlite").cells()) == 2
    assert cli("sweep", path, "--out", out) == 0  # finished: the same command computes nothing
    assert "0 batches computed" in capsys.readouterr().out
