"""Two real runs that differ in their defense: `redteam diff` pairs their cells and says what moved beyond the
intervals; every run writes an evidence log whose images fool the system as saved; run.json says when two runs
compare."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import invoke
from PIL import Image

from redteam.api import TARGETS
from redteam.diff import diff_runs
from redteam.engine import EvaluationConfig
from redteam.evidence import EvidenceLog
from redteam.intervals import difference_interval

RUN = ("run", "--target", "facenet", "--attack", "pgd", "--limit", 6, "--eps", "0,4", "--steps", 3, "--no-checks")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, faces_root):
    folder = tmp_path_factory.mktemp("diff")
    with pytest.MonkeyPatch.context() as patch:
        for name, extra in (("none", ()), ("halftone", ("--defense", "halftone", "--adaptivity", "adaptive"))):
            assert invoke(patch, *RUN, *extra, "--data", faces_root, "--out", folder / name) == 0
    return folder / "none", folder / "halftone"


def test_diff_pairs_the_cells_and_judges_each_value_by_its_interval(runs, cli, capsys, tmp_path):
    undefended, halftone = runs
    found = diff_runs(undefended, halftone)
    assert found.differing["defense"] == ("none", "halftone") and not found.only_a and not found.only_b
    assert [c.measure for c in found.changes] == ["accuracy @ 0", "accuracy @ 4", "area 0–4"]
    clean, attacked, _ = found.changes
    assert clean.a == clean.b == 1.0 and not clean.moved
    low, high = difference_interval(attacked.b, 6, attacked.a, 6, 0.95)
    assert attacked.moved == (low > 0 or high < 0)
    assert attacked.a_interval[0] <= attacked.a <= attacked.a_interval[1]
    # a run against itself: nothing moves
    assert not any(change.moved for change in diff_runs(halftone, halftone).changes)

    assert cli("diff", undefended, halftone, "--json", tmp_path / "diff.json") == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "differ in defense weights" in printed and "defense: none → halftone" in printed
    assert "values moved beyond their intervals" in printed
    assert json.loads((tmp_path / "diff.json").read_text())["differing"]["defense"] == ["none", "halftone"]


def test_report_of_two_runs_shows_what_moved(runs, cli, tmp_path):
    assert cli("report", *runs, "--out", tmp_path / "report", "--examples", 0) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Differences between the runs" in markdown and "accuracy @ 4" in markdown


def test_run_json_says_when_two_runs_compare(runs, cli, faces_root, tmp_path):
    undefended, halftone = runs
    other = tmp_path / "other-seed"
    assert cli(*RUN[:6], 4, *RUN[7:], "--seed", 3, "--data", faces_root, "--out", other) == 0
    key = {run: json.loads((run / "run.json").read_text())["comparable"] for run in (undefended, halftone, other)}
    assert key[other] == key[undefended] != key[halftone]  # other probes and fewer: the same measurement


def test_the_evidence_log_holds_every_fooled_probe_as_a_file_that_fools_as_saved(runs, facenet, faces):
    undefended, _ = runs
    lines = [json.loads(line) for line in (undefended / "evidence.jsonl").read_text().splitlines()]
    summary = json.loads((undefended / "run.json").read_text())
    fooled = round((1 - summary["curve"][-1]["accuracy"]) * 6)
    assert len(lines) == fooled > 0  # one line per probe fooled at 4/255, none at the clean point
    for entry in lines:
        data = (undefended / entry["image"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and entry["eps"] == 4
        image = torch.from_numpy(np.array(Image.open(undefended / entry["image"]))).permute(2, 0, 1) / 255
        probe, reference = map(int, entry["probe"].split(":"))
        assert faces.records[reference].identity == entry["reference"] == entry["identity"]
        with torch.no_grad():
            score = facenet.similarity(facenet.embed(image[None]), facenet.embed(faces.load([reference])))
            clean = faces.load([probe])[0]
        assert float(score) == pytest.approx(entry["saved_score"], abs=1e-4)  # the file as saved, judged again
        assert entry["saved_fooled"] == (float(score) < entry["threshold"])
        assert (image - clean).abs().max() <= 4 / 255 + 1 / 510  # within the budget, up to the 8-bit rounding
    # a batch recomputed after an interruption does not log its probes twice
    log = EvidenceLog(undefended)
    log.record([{key: entry[key] for key in ("cell", "probe", "eps")} for entry in lines], [clean] * len(lines))
    assert len((undefended / "evidence.jsonl").read_text().splitlines()) == len(lines)


def test_far_decides_at_the_cards_threshold_and_the_report_shows_the_trade_off(runs, cli, capsys, faces_root, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(runs[0], folder)  # the card's best-accuracy threshold is stored there already
    assert cli(*RUN, "--far", "1e-3", "--data", faces_root, "--out", folder) == 0
    config = json.loads((folder / "run.json").read_text())["config"]
    assert config["far"] == 1e-3 and config["threshold"] == TARGETS.get("facenet").card.threshold_far
    assert cli("report", folder, "--examples", 0) == 0
    markdown = " ".join((folder / "report.md").read_text().split())
    assert "## Accuracy at each operating point" in markdown
    assert (
        "| FAR 0.001: threshold 0.5637 (card calibration, 95% interval 8.2e-04–1.2e-03 on 100,000 impostor" in markdown
    )
    assert "| best accuracy: threshold 0.4469 (card calibration) |" in markdown
    capsys.readouterr()
    assert cli(*RUN, "--far", "1e-5", "--data", faces_root, "--out", tmp_path / "x") == 2
    assert "has a threshold at FAR 0.0001, 0.001 only: for FAR 1e-05 run `redteam calibrate" in capsys.readouterr().err
    stricter = EvaluationConfig(target="facenet", attack="pgd", far=1e-4).resolve()
    assert stricter.threshold == TARGETS.get("facenet").card.thresholds_at_far[1e-4]
    assert cli(*RUN, "--far", "1e-3", "--threshold", 0.3, "--data", faces_root, "--out", tmp_path / "x") == 2
    assert "give --far or --threshold, not both" in capsys.readouterr().err
