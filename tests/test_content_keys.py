"""A cell's key covers the content of its inputs, not only their paths: a different model file or a replaced photo at
the same path gives a new cell, computed afresh, and the run says what changed; the earlier results are kept but
set aside (out of curve.csv, reports and the gate)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
from helpers import shared_path

from redteam.results import ResultStore


def test_a_different_model_file_at_the_same_path_is_a_new_cell(cli, capsys, small_faces, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(shared_path("weights", "arcface.onnx"), model)
    out = tmp_path / "run"
    command = ("run", "--target", "arcface", "--weights", model, "--threshold", 0.3, "--data", small_faces.root,
               "--limit", 6, "--eps", 0, "--no-checks", "--out", out)  # fmt: skip
    assert cli(*command) == 0
    first = ResultStore(out / "results.sqlite").frame()
    capsys.readouterr()

    shutil.copy(shared_path("weights", "mobilefacenet.onnx"), model)  # another recogniser, same path
    assert cli(*command) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "the weights changed since cell" in said and "set aside" in said
    store = ResultStore(out / "results.sqlite")
    second = store.frame()
    assert set(first["cell"]).isdisjoint(second["cell"])  # computed afresh under a new key
    assert not (first.set_index("probe")["score"] - second.set_index("probe")["score"]).abs().lt(1e-6).all()
    assert len(store.cells()) == 2 and len(store.cells(current=True)) == 1
    assert pd.read_csv(out / "curve.csv")["n"].tolist() == [6]  # the curve is the current model's only

    shutil.copy(shared_path("weights", "arcface.onnx"), model)  # back to the first file: its results return
    assert cli(*command) == 0
    assert set(ResultStore(out / "results.sqlite").frame()["cell"]) == set(first["cell"])


def test_a_replaced_photo_at_the_same_path_is_a_new_cell(cli, capsys, faces_root, tmp_path):
    data = tmp_path / "faces"
    for identity in sorted(p for p in faces_root.iterdir() if p.is_dir())[:4]:
        shutil.copytree(identity, data / identity.name)
    out = tmp_path / "run"
    command = ("run", "--data", data, "--limit", 4, "--eps", 0, "--no-checks", "--out", out)
    assert cli(*command) == 0
    capsys.readouterr()
    again = ResultStore(out / "results.sqlite").frame()
    assert cli(*command) == 0  # unchanged photos: the same cell, nothing said
    assert "changed" not in capsys.readouterr().out
    assert ResultStore(out / "results.sqlite").frame().equals(again)

    photos = sorted((data / sorted(p.name for p in data.iterdir())[0]).iterdir())
    other = sorted(p for p in faces_root.iterdir() if p.is_dir())[10]
    shutil.copy(sorted(other.iterdir())[0], photos[0])  # someone else's photo under the same name
    assert cli(*command) == 0
    assert "the images changed since cell" in " ".join(capsys.readouterr().out.split())
    summary = json.loads((out / "run.json").read_text())
    assert summary["cell"] not in set(again["cell"])
