"""`redteam report`: the numbers in the report are the store's, its commands reproduce them, user strings are
escaped, and the HTML renders in headless Chromium with every figure decoded, no console error and no network."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import invoke  # noqa: E402
from helpers.chromium import chromium_binary, render  # noqa: E402

from redteam.intervals import wilson_interval  # noqa: E402

RUN = ("--target", "facenet", "--attack", "pgd", "--limit", 2, "--eps", "0,2,4", "--steps", 2, "--batch-size", 2,
       "--no-checks")  # fmt: skip


def _cli(*args) -> int:
    with pytest.MonkeyPatch.context() as patch:
        return invoke(patch, *args)


@pytest.fixture(scope="module")
def folders(faces_root, tmp_path_factory) -> tuple[Path, Path]:
    """A real run and its report, with two re-created examples and a ε = 4 column."""
    root = tmp_path_factory.mktemp("report")
    run, report = root / "run", root / "report"
    assert _cli("run", *RUN, "--data", faces_root, "--out", run) == 0
    assert _cli("report", run, "--out", report, "--examples", 2, "--at", 4) == 0
    return run, report


def _chromium() -> None:
    if chromium_binary() is None:
        pytest.skip("no chromium on PATH (make install adds Debian's chromium where apt-get can)")


def test_numbers_are_the_stores(folders):
    run, report = folders
    data = json.loads((report / "report.json").read_text())
    curve = pd.read_csv(run / "curve.csv").set_index("eps")["accuracy"]
    (cell,) = data["cells"]
    assert (cell["target"], cell["attack"], cell["defense"], cell["threat"]) == ("facenet", "pgd", "none", "dodging")
    assert cell["clean"] == curve[0] and cell["robust"] == {"4/255 ℓ∞": curve[4]} and data["columns"] == ["4/255 ℓ∞"]
    assert cell["checks"] == [] and cell["status"] == "not run"  # --no-checks (they cost more than the run here)
    assert 0 <= cell["auc"] <= cell["clean"]
    assert "matches the stored scores" in cell["examples"]["note"]
    assert "facenet" in data["cards"] and data["cards"]["facenet"]["threshold"] == 0.4469
    markdown = (report / "report.md").read_text()
    low, high = wilson_interval(curve[4], 2)
    assert cell["intervals"] == {"4/255 ℓ∞": [low, high]}  # Wilson's interval of each accuracy, shown with it
    clean_low, clean_high = wilson_interval(curve[0], 2)
    row = f"| 1 | facenet | none | pgd | dodging | faces | 2 | {curve[0]:.1%} [{clean_low:.0%}–{clean_high:.0%}] |"
    assert f"{row} {curve[4]:.1%} [{low:.0%}–{high:.0%}] |" in markdown
    for figure in re.findall(r"\]\((report_files/[^)]+)\)", markdown):
        assert (report / figure).stat().st_size > 5_000
    html = (report / "report.html").read_text()
    assert not re.search(r'(?:src|href)="(?!data:|#)', html)  # self-contained: nothing to fetch


def test_the_command_reproduces_the_numbers(folders, tmp_path):
    run, report = folders
    (cell,) = json.loads((report / "report.json").read_text())["cells"]
    command = shlex.split(cell["command"])
    assert command[:2] == ["redteam", "run"] and command[-2:] == ["--out", str(run)] and "--seed" in command
    assert _cli(*command[1:-1], tmp_path / "again") == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / "curve.csv"), pd.read_csv(run / "curve.csv"))


def test_html_renders_in_headless_chromium(folders, tmp_path):
    _chromium()
    _, report = folders
    screenshot = tmp_path / "report.png"
    page = render(report / "report.html", screenshot)
    assert page.errors == [] and page.requests == []
    assert len(page.images) == 2  # the curves and the examples
    assert all(image["complete"] and image["naturalWidth"] > 300 for image in page.images)
    assert page.title == "Robustness report: facenet" and page.height > 1500
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 50_000


def test_user_strings_are_escaped(folders, tmp_path):
    from redteam.report import collect, write_report

    run, _ = folders
    report = collect([run])
    hostile = '<img src=x onerror="console.error(1)">'
    report.title = "<script>console.error('title')</script>"
    report.cells[0].dataset = report.cells[0].defense = hostile
    report.cells[0].checks = [{"name": "monotone", "passed": False, "detail": hostile}]
    report.cells[0].status = f"warning: {hostile}"
    write_report(report, {}, tmp_path)
    html, markdown = (tmp_path / "report.html").read_text(), (tmp_path / "report.md").read_text()
    assert "<img src=x" not in html and "<script>console" not in html and html.count("&lt;img src=x") == 6
    assert '<td class="warning">warning: &lt;img' in html and "⚠ monotone" in html
    assert "<img src=x" not in markdown and markdown.count("&lt;img src=x") == 6
    assert "- **warning**: monotone: &lt;img" in markdown
    if chromium_binary() is not None:
        page = render(tmp_path / "report.html", tmp_path / "escaped.png")
        assert page.errors == [] and page.images == [] and page.title == report.title  # the markup stayed text


def test_a_budget_no_run_has(cli, capsys, folders):
    run, _ = folders
    assert cli("report", run, "--out", run / "other", "--at", 3) == 2
    err = capsys.readouterr().err
    assert "--at 3: no run has that budget; they have 2, 4" in err and "Traceback" not in err
