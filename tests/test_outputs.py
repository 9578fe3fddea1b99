"""What a user reads besides the numbers: progress on a log (not a terminal), report AUCs over one range, and how to
bring an npm package to a machine without the network."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from redteam.results import curve_area


def test_progress_is_plain_lines_when_the_output_is_not_a_terminal(cli, capsys, faces_root, tmp_path):
    assert cli("run", "--data", faces_root, "--limit", 2, "--eps", "0,1", "--steps", 1, "--out", tmp_path) == 0
    progress = capsys.readouterr().err.splitlines()
    assert "attacking: 0/4 · 0 s started" in progress
    assert any(line.startswith("attacking: 4/4 · ") and line.endswith(" done") for line in progress)


def test_curve_areas_compare_over_one_range():
    short = pd.DataFrame({"eps": [0, 2, 4], "accuracy": [1.0, 0.5, 0.0]})
    long = pd.DataFrame({"eps": [0, 2, 4, 8], "accuracy": [1.0, 0.5, 0.0, 0.0]})
    assert curve_area(short) == pytest.approx(0.5) and curve_area(long) == pytest.approx(0.25)  # the same attack
    assert curve_area(long, upto=4) == curve_area(short)
    assert curve_area(long, upto=3) == pytest.approx((1.5 + (0.5 + 0.25) / 2) / 3)  # interpolated at 3


def test_report_aucs_of_one_measure_share_their_range(tmp_path):
    from pathlib import Path

    from redteam.console import PlainProgress, errors
    from redteam.report import make_report

    store = Path(__file__).parent / "fixtures" / "store-v1"  # ℓ∞ cells up to 2/255, one ℓ2 cell up to 0.5
    kept = (store / "results.sqlite").read_bytes()
    make_report([store], tmp_path, PlainProgress(errors), examples=0)
    assert (store / "results.sqlite").read_bytes() == kept  # a report reads a kept store and never changes it
    cells = json.loads((tmp_path / "report.json").read_text())["cells"]
    ranges = {cell["norm"]: set() for cell in cells}
    for cell in cells:
        ranges[cell["norm"]].add(cell["auc_range"])
    assert ranges == {"linf": {"0–2/255 ℓ∞"}, "l2": {"0–0.5 ℓ2"}}


def test_an_npm_package_without_the_network_says_where_to_put_it(monkeypatch, tmp_path):
    from redteam import assets
    from redteam.datasets import FACE_API
    from redteam.errors import MissingWeightsError

    monkeypatch.setattr(assets, "cache_dir", lambda: tmp_path)
    monkeypatch.setenv("REDTEAM_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as raised:
        FACE_API.archive()
    message = str(raised.value)
    assert f"npm pack {FACE_API.name}@{FACE_API.version}` and copy the .tgz it writes to `{tmp_path}" in message
    assert str(FACE_API.archive_path()) in message
