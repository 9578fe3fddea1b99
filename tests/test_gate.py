"""The regression gate: passes on the committed baseline, fails when the defense is weakened."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from junitparser import JUnitXml

from redteam.api import DEFENSES
from redteam.defenses.halftone import Halftone
from redteam.gate import read_baseline, write_baseline
from redteam.results import ResultStore
from redteam.threats import Dodging

BASELINE = Path(__file__).resolve().parents[1] / "reports" / "baseline.json"
# One of the baseline's 6 probes flipping is 0.17; a different BLAS build may flip a borderline one.
TOLERANCE = 0.2


class SkippedHalftone(Halftone):
    """A real regression: the deployed pipeline stops halftoning (the transform passes images through)."""

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images


def test_gate_passes_on_the_unchanged_defense(robustness_gate, faces_root, tmp_path):
    report = robustness_gate(BASELINE, tolerance=TOLERANCE, data=faces_root)
    assert report.passed and len(report.comparisons) == 6  # 2 evaluations x (2 budgets + area)
    # The re-run folder makes the same baseline again (write_baseline round trip).
    again = write_baseline([tmp_path / "gate"], tmp_path / "again.json")
    stored = read_baseline(BASELINE)
    assert [e["label"] for e in again] == [e["label"] for e in stored]
    for new, old in zip(again, stored):
        assert [p["eps"] for p in new["curve"]] == [p["eps"] for p in old["curve"]]
        assert all(abs(a["accuracy"] - b["accuracy"]) <= TOLERANCE for a, b in zip(new["curve"], old["curve"]))
    assert json.loads((tmp_path / "again.json").read_text())["redteam_baseline"] == 1


def test_gate_fails_on_a_weakened_defense(cli, capsys, monkeypatch, faces_root, tmp_path):
    # The non-adaptive evaluation is where halftoning earns its robustness; gate on it alone (half the time).
    baseline = json.loads(BASELINE.read_text())
    baseline["evaluations"] = [e for e in baseline["evaluations"] if not e["config"]["adaptive"]]
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))
    monkeypatch.setitem(DEFENSES._entries, "halftone", SkippedHalftone)
    args = ("check", "--baseline", tmp_path / "baseline.json", "--data", faces_root, "--tolerance", TOLERANCE)
    files = ("--junit", tmp_path / "gate.xml", "--sarif", tmp_path / "gate.sarif")
    assert cli(*args, "--out", tmp_path / "rerun", *files) == 1
    captured = capsys.readouterr()
    error = " ".join(captured.err.split())
    assert "robustness regressed" in error and "(non-adaptive)" in error and "significantly at level 0.05" in error
    assert "0.833 [0.436, 0.970] ->" in error  # the baseline's value with its interval
    assert "✗ regressed" in captured.out
    # the same verdict in the CI formats
    (suite,) = list(JUnitXml.fromfile(str(tmp_path / "gate.xml")))
    assert suite.failures == 1
    results = json.loads((tmp_path / "gate.sarif").read_text())["runs"][0]["results"]
    assert {r["level"] for r in results if r["ruleId"] == "regression/accuracy"} == {"error", "none"}


def test_another_seed_draws_other_probes_and_the_unchanged_defense_still_passes(
    cli, capsys, faces, faces_root, tmp_path
):
    args = ("check", "--baseline", BASELINE, "--data", faces_root, "--seed", 1, "--out", tmp_path / "rerun")
    assert cli(*args) == 0, capsys.readouterr()
    printed = " ".join(capsys.readouterr().out.split())
    assert "with 6 probes per run the gate tells a fall from chance once it reaches" in printed
    attacked = set(ResultStore(tmp_path / "rerun" / "results.sqlite", writable=False).frame()["probe"])
    assert attacked != {probe.key for probe in Dodging(faces, seed=0).probes(limit=6)}  # not the baseline's probes


def test_gate_errors_are_one_line(cli, capsys, tmp_path):
    assert cli("check", "--baseline", tmp_path / "missing.json") == 2
    assert "is not a file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert cli("check", "--baseline", tmp_path / "bad.json") == 2
    assert "is not a redteam baseline" in capsys.readouterr().err
    assert cli("check", "--baseline", tmp_path / "new.json", "--write", tmp_path) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_a_baseline_checked_from_another_folder_says_to_pass_data(cli, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the baseline names its faces relative to the repository root
    assert cli("check", "--baseline", BASELINE.resolve()) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "The baseline names its faces relative to where it was written" in error and "pass --data PATH" in error
