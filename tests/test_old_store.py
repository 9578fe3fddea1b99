"""Run folders written by an earlier redteam (``tests/fixtures``, see its README) resume and report identically: the
same commands find every cell's results under the same keys and compute nothing, and a store stopped after its
clean budget carries on to exactly the rows the full run stored."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from helpers import shared_path

REPOSITORY = Path(__file__).resolve().parents[1]
FIXTURES = REPOSITORY / "tests" / "fixtures"
COMMON = ("--target", "facenet", "--data", "../shared/data/faces", "--limit", "4")
#: The commands that wrote ``store-v1`` (its README), in order.
COMMANDS = [
    (*COMMON, "--attack", "pgd", "--eps", "0,2", "--steps", "2"),
    (*COMMON, "--attack", "pgd", "--eps", "0,2", "--steps", "2", "--defense", "halftone"),
    (*COMMON, "--attack", "minnorm", "--eps", "0,1,2", "--steps", "3"),
    (*COMMON, "--attack", "pgd", "--threat", "impersonation", "--norm", "l2", "--eps", "0,0.5", "--steps", "2"),
]


def tables(store: Path) -> dict[str, pd.DataFrame]:
    with sqlite3.connect(store) as db:
        return {
            table: pd.read_sql_query(f"SELECT * FROM {table}", db).sort_values(list(keys)).reset_index(drop=True)
            for table, keys in (
                ("results", ("cell", "eps", "probe")),
                ("minimal", ("cell", "probe")),
                ("checks", ("cell", "name")),
                ("cells", ("cell",)),
            )  # fmt: skip
        }


@pytest.fixture
def at_repository(monkeypatch):
    """The stores name their data as the commands did, relative to the repository root."""
    shared_path("data", "faces")
    monkeypatch.chdir(REPOSITORY)


def test_old_store_resumes_with_nothing_to_compute(at_repository, cli, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(FIXTURES / "store-v1", out)
    before = tables(out / "results.sqlite")
    for command in COMMANDS:
        assert cli("run", *command, "--out", out) == 0
    after = tables(out / "results.sqlite")
    for name in ("results", "minimal", "checks"):  # same keys, same rows, nothing added
        pd.testing.assert_frame_equal(after[name][before[name].columns], before[name], obj=name)
        added = sorted(set(after[name].columns) - set(before[name].columns))  # columns newer stores have
        newer = {
            "results": ["broken_by", "liveness", "queries", "stage"], "minimal": ["queries", "stage"], "checks": []
        }[name]  # fmt: skip
        assert added == newer and after[name][added].isna().all().all()
    # The cells are taken over as they are, and their inputs' fingerprints recorded from now on.
    assert after["cells"]["cell"].tolist() == before["cells"]["cell"].tolist()
    for old, new in zip(before["cells"]["config"], after["cells"]["config"]):
        adopted = json.loads(new)
        assert set(adopted.pop("fingerprint")) >= {"images", "weights"} and adopted.pop("settings_key")
        assert adopted == json.loads(old)
    expected = pd.read_csv(FIXTURES / "store-v1" / "curve.csv")
    written = pd.read_csv(out / "curve.csv")
    pd.testing.assert_frame_equal(written[expected.columns], expected)
    assert (written["low"] <= written["accuracy"]).all() and (written["accuracy"] <= written["high"]).all()


def test_old_store_stopped_early_resumes_to_the_full_runs_rows(at_repository, cli, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(FIXTURES / "store-v1-partial", out)
    assert cli("run", *COMMANDS[0], "--no-checks", "--out", out) == 0
    resumed = tables(out / "results.sqlite")["results"]
    full = tables(FIXTURES / "store-v1" / "results.sqlite")["results"]
    full = full[full["cell"].isin(resumed["cell"])].reset_index(drop=True)
    assert len(resumed) == len(full) == 8
    columns = [column for column in full.columns if column != "score"]  # the old store's, without scores
    pd.testing.assert_frame_equal(resumed[columns], full[columns])
    assert (resumed["score"] - full["score"]).abs().max() < 1e-5


def test_old_store_reports_and_recreates_its_examples(at_repository, tmp_path):
    from redteam.console import PlainProgress, errors
    from redteam.report import make_report

    out = tmp_path / "store"
    shutil.copytree(FIXTURES / "store-v1", out)
    make_report([out], tmp_path / "report", PlainProgress(errors), examples=1, device="cpu")

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    expected = pd.read_csv(FIXTURES / "store-v1" / "curve.csv")
    assert len(report["cells"]) == expected.groupby(["defense", "attack", "threat", "norm"]).ngroups == 5
    for cell in report["cells"]:
        rows = expected[(expected["defense"] == cell["defense"]) & (expected["attack"] == cell["attack"])
                        & (expected["threat"] == cell["threat"])]  # fmt: skip
        assert [point["accuracy"] for point in cell["curve"]] == rows["accuracy"].tolist()
        # Re-created with the stored seeds by today's engine: the stored scores. (Not through error-diffusion
        # halftoning: float noise of another thread count can move one dot, and a dot moves a score by ~0.005.)
        if cell["attack"] == "pgd" and cell["defense"] == "none":
            assert "matches the stored scores" in cell["examples"]["note"], cell["examples"]
