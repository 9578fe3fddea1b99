"""Kill -9 a real `redteam sweep` process mid-run, run the same command again: it carries on where it stopped,
recomputes nothing finished, loses nothing, and ends with exactly the results of an uninterrupted run. And the same
seed gives identical per-probe results in two fresh runs."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from redteam.results import ResultStore

#: Two cells of single-probe batches (4 each: clean, then ε = 2): moments to die in within a cell and between cells.
SWEEP = """data: {data}
targets: [facenet]
attacks: {{pgd: {{steps: 1}}, mim: {{steps: 1}}}}
eps: [0, 2]
limit: 2
batch_size: 1
checks: false
"""
COLUMNS = ["cell", "eps", "probe", "correct", "score", "linf", "l2", "steps", "inherited"]


def _sweep(config: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-c", "from redteam.cli import main; main()", "sweep", str(config), "--out", str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(config: Path, out: Path) -> int:
    """Run the sweep to the end; the number of batches it computed."""
    process = _sweep(config, out)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return int(re.search(r"(\d+) batches computed", output).group(1))


def _rows(out: Path) -> int:
    try:
        with sqlite3.connect(out / "results.sqlite", timeout=60) as db:
            return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _results(out: Path) -> pd.DataFrame:
    frame = ResultStore(out / "results.sqlite").frame()
    return frame.sort_values(["cell", "eps", "probe"])[COLUMNS].reset_index(drop=True)


@pytest.fixture(scope="module")
def config(faces_root, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep") / "resume.yaml"
    path.write_text(SWEEP.format(data=faces_root))
    return path


@pytest.fixture(scope="module")
def uninterrupted(config) -> tuple[Path, int]:
    out = config.parent / "uninterrupted"
    return out, _finish(config, out)


def test_kill_9_then_resume_equals_uninterrupted(config, uninterrupted):
    whole, whole_batches = uninterrupted
    expected = _results(whole)
    out = config.parent / "killed"
    process = _sweep(config, out)
    deadline = time.monotonic() + 300
    # Die inside the first cell's attacked budget: its clean batches (2 rows) and one attacked batch are stored.
    while _rows(out) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the sweep ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    before = _results(out)
    assert 3 <= len(before) < len(expected)

    resumed_batches = _finish(config, out)
    after = _results(out)
    pd.testing.assert_frame_equal(after, expected)  # the same results as a run that never died
    kept = before.merge(after, on=["cell", "eps", "probe"], suffixes=("", "_after"))
    assert len(kept) == len(before)  # nothing stored before the kill was lost ...
    for column in COLUMNS[3:]:
        assert (kept[column] == kept[f"{column}_after"]).all()  # ... or changed
    assert 0 < resumed_batches < whole_batches  # the batches stored before the kill were not recomputed
    assert _finish(config, out) == 0  # and a finished sweep recomputes nothing


def test_same_seed_gives_identical_results(cli, faces_root, tmp_path):
    run = ("run", "--data", faces_root, "--limit", 2, "--eps", "0,2", "--steps", 1, "--batch-size", 2, "--no-checks")
    for out in ("first", "second"):
        assert cli(*run, "--out", tmp_path / out) == 0
    first, second = _results(tmp_path / "first"), _results(tmp_path / "second")
    assert (first["eps"] > 0).any() and (first["steps"] > 0).any()  # something was attacked (random start included)
    pd.testing.assert_frame_equal(first, second, check_exact=True)


def test_a_run_stopped_before_its_checks_runs_them_when_resumed(cli, faces_root, tmp_path):
    run = ("run", "--target", "arcface", "--defense", "blur:1", "--attack", "pgd", "--data", faces_root,
           "--limit", 2, "--eps", "0,2", "--steps", 1, "--out", tmp_path)  # fmt: skip
    assert cli(*run, "--adaptivity", "adaptive", "--no-checks") == 0  # as if stopped after the attack
    assert cli(*run, "--adaptivity", "non-adaptive") == 0  # records "adaptive beats non-adaptive" on the other
    store = ResultStore(tmp_path / "results.sqlite")
    adaptive = next(key for key, config in store.cells().items() if config["adaptive"])
    assert set(store.checks(adaptive)["name"]) == {"adaptive beats non-adaptive"}
    assert cli(*run, "--adaptivity", "adaptive") == 0  # nothing left to attack: its own checks now run
    assert {"monotone", "gradients", "unbounded", "adaptive beats non-adaptive"} <= set(store.checks(adaptive)["name"])
