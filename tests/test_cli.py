"""`redteam run` end to end on real faces, resuming, and one clear line for every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from redteam.results import ResultStore

RUN = (
    "run",
    "--target",
    "facenet",
    "--attack",
    "pgd",
    "--limit",
    "6",
    "--eps",
    "0,1,8",
    "--steps",
    "3",
    "--batch-size",
    "2",
)


def test_run_writes_a_monotone_curve_on_real_faces(cli, faces_root, tmp_path):
    out = tmp_path / "run"
    assert cli(*RUN, "--data", faces_root, "--out", out) == 0
    curve = pd.read_csv(out / "curve.csv")
    assert {"target", "defense", "attack", "threat", "norm", "eps", "accuracy", "n"} <= set(curve.columns)
    assert curve["eps"].tolist() == [0, 1, 8] and (curve["n"] == 6).all()
    assert curve["accuracy"].is_monotonic_decreasing
    assert curve["accuracy"].iloc[0] >= 4 / 6 and curve["accuracy"].iloc[-1] == 0  # 8/255 breaks FaceNet
    assert (out / "curve.png").stat().st_size > 10_000
    results = ResultStore(out / "results.sqlite").frame()
    assert len(results) == 18
    attacked = results[(results["eps"] > 0) & ~results["inherited"]]
    assert (attacked["linf"] <= attacked["eps"] + 1e-6).all()


def test_rerun_recomputes_nothing_and_resume_equals_uninterrupted(cli, monkeypatch, faces_root, tmp_path):
    from redteam.attacks.pgd import PGD

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert cli(*RUN, "--data", faces_root, "--out", whole) == 0

    original, calls = PGD.__call__, []

    def interrupt_on_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PGD, "__call__", interrupt_on_second_batch)
    assert cli(*RUN, "--data", faces_root, "--out", resumed) == 130
    partial = ResultStore(resumed / "results.sqlite").frame()
    assert 0 < len(partial) < 18
    monkeypatch.setattr(PGD, "__call__", original)
    assert cli(*RUN, "--data", faces_root, "--out", resumed) == 0

    def refuse(self, *args, **kwargs):
        raise AssertionError("a finished run was attacked again")

    monkeypatch.setattr(PGD, "__call__", refuse)
    assert cli(*RUN, "--data", faces_root, "--out", resumed) == 0

    columns = ["eps", "probe", "correct", "score", "linf", "l2", "steps", "inherited"]
    a, b = (
        ResultStore(p / "results.sqlite").frame().sort_values(["eps", "probe"])[columns].reset_index(drop=True)
        for p in (whole, resumed)
    )
    pd.testing.assert_frame_equal(a, b)


def _identity_folders(root: Path, faces_root: Path, identities: int = 2) -> Path:
    for identity in sorted(p for p in faces_root.iterdir())[:identities]:
        (root / identity.name).mkdir(parents=True)
        for image in sorted(identity.iterdir())[:2]:
            (root / identity.name / image.name).write_bytes(image.read_bytes())
    return root


def _write(path: Path, image: Image.Image | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        image.save(path)


BAD_DATA = {
    "corrupt": (
        lambda root: _write(root / "Aaron_Peirsol" / "broken.jpg", b"\xff\xd8 not a jpeg"),
        "cannot read image",
    ),
    "empty file": (lambda root: _write(root / "Aaron_Peirsol" / "empty.jpg", b""), "cannot read image"),
    "grayscale": (
        lambda root: _write(root / "Aaron_Peirsol" / "gray.png", Image.new("L", (250, 250), 128)),
        "grayscale",
    ),
    "tiny": (lambda root: _write(root / "Aaron_Peirsol" / "tiny.png", Image.new("RGB", (12, 12))), "at least 32"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_images_give_one_line(cli, capsys, faces_root, tmp_path, case):
    root = _identity_folders(tmp_path / "data", faces_root)
    damage, message = BAD_DATA[case]
    damage(root)
    code = cli("run", "--data", root, "--out", tmp_path / "out", "--eps", "0", "--batch-size", "8")
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # one message (rich may wrap it)


@pytest.mark.parametrize(
    "args,message",
    [
        (("--target", "facenett"), "Did you mean 'facenet'"),
        (("--attack", "pgdd"), "Did you mean 'pgd'"),
        (("--threat", "dodge"), "unknown threat model"),
        (("--eps", "1,x"), "comma-separated numbers"),
        (("--eps", "0,-2"), "negative"),
        (("--eps", "300"), "exceeds"),
        (("--norm", "l1"), "linf or l2"),
        (("--attack", "cw", "--norm", "linf"), "cw is an l2 attack"),
        (("--option", "stepz=3"), "no setting stepz"),
        (("--data", "/nonexistent/faces"), "no dataset"),
    ],
)
def test_bad_arguments_give_one_line(cli, capsys, tmp_path, args, message):
    code = cli("run", "--out", tmp_path / "out", *args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_dataset_shapes_that_cannot_work(cli, capsys, faces_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("run", "--data", empty, "--out", tmp_path / "o1") == 2
    assert "no face images" in capsys.readouterr().err
    one = _identity_folders(tmp_path / "one", faces_root, identities=1)
    assert cli("run", "--data", one, "--threat", "impersonation", "--out", tmp_path / "o2") == 2
    assert "at least 2 identities" in capsys.readouterr().err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert cli("run", "--out", a_file) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli("run", "--data", a_file, "--out", tmp_path / "o3") == 2
    assert "is a file" in capsys.readouterr().err


def test_minimal_attack_gives_the_whole_curve_in_one_pass(cli, capsys, faces_root, tmp_path):
    out = tmp_path / "minnorm"
    args = ("run", "--attack", "minnorm", "--steps", 8, "--limit", 4, "--eps", "0,1,4", "--batch-size", 4)
    assert cli(*args, "--data", faces_root, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "median minimal linf perturbation" in printed
    summary = json.loads((out / "run.json").read_text())
    assert 0 < summary["median_minimal_perturbation"] < 4  # /255: FaceNet falls well inside 4/255
    assert [c["name"] for c in summary["checks"]] == [
        "monotone",
        "operating point",
        "gradients",
        "unbounded",
        "beats noise",
    ]
    assert all(c["passed"] for c in summary["checks"])
    curve = pd.read_csv(out / "curve.csv")
    assert curve["accuracy"].is_monotonic_decreasing and len(curve) == 3


def test_an_l2_attack_runs_in_l2_by_default(cli, faces_root, tmp_path):
    out = tmp_path / "cw"
    args = ("run", "--attack", "cw", "--steps", 5, "--option", "search_steps=2", "--limit", 2, "--no-checks")
    assert cli(*args, "--data", faces_root, "--out", out) == 0
    curve = pd.read_csv(out / "curve.csv")
    assert set(curve["norm"]) == {"l2"} and curve["eps"].tolist() == [0, 0.25, 0.5, 1, 2]


def test_identification_run(cli, small_faces, tmp_path):
    out = tmp_path / "identification"
    args = ("run", "--threat", "identification", "--limit", 4, "--eps", "0,4", "--steps", 5, "--no-checks")
    assert cli(*args, "--data", small_faces.root, "--out", out) == 0
    curve = pd.read_csv(out / "curve.csv")
    assert curve["threat"].unique().tolist() == ["identification"]
    assert curve["accuracy"].iloc[0] >= 0.75 and curve["accuracy"].iloc[-1] == 0


@pytest.mark.parametrize("given,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_waits_passively_unless_the_user_says_otherwise(given, expected):
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    environment.update({"OMP_WAIT_POLICY": given} if given else {})
    code = "import redteam, os, torch; print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())"
    shown = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
    assert shown.stdout.split()[0] == expected


SPY_ON_TORCH = """
import builtins, os, runpy, sys
load, seen = builtins.__import__, []
def spy(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        seen.append(os.environ.get("OMP_WAIT_POLICY"))
    return load(name, *args, **kwargs)
builtins.__import__ = spy
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print(seen[0] if seen else "torch not loaded")  # bench/threads.py loads it in children it gives their own settings
"""


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).parents[1] / "bench").glob("*.py")))
def test_benchmarks_time_passes_with_redteams_openmp_policy(script):
    """A benchmark that imported torch before redteam timed torch's active waiting, not what users run."""
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    path = Path(__file__).parents[1] / "bench" / script
    shown = subprocess.run([sys.executable, "-c", SPY_ON_TORCH, str(path)], env=environment, capture_output=True,
                           text=True, check=True, cwd=path.parent)  # fmt: skip
    assert shown.stdout.strip().splitlines()[-1] in ("PASSIVE", "torch not loaded")


def test_threads_option_sets_torchs_thread_count(cli, faces_root, tmp_path):
    import torch

    from redteam.runtime import choose_threads

    before = torch.get_num_threads()
    args = ("run", "--limit", 2, "--eps", "0,1", "--steps", 1, "--no-checks", "--threads", 2 if before == 1 else 1)
    try:
        assert cli(*args, "--data", faces_root, "--out", tmp_path / "out") == 0
        assert torch.get_num_threads() == (2 if before == 1 else 1)
    finally:
        choose_threads(None)
        torch.set_num_threads(before)
