"""`redteam calibrate` on a detector measures recall: faces found at the image centre, blank images not."""

from __future__ import annotations

import json

from PIL import Image


def test_detector_recall_counts_centred_faces_only(cli, faces_root, tmp_path):
    data = tmp_path / "data"
    for identity in sorted(faces_root.iterdir())[:3]:
        (data / identity.name).mkdir(parents=True)
        image = sorted(identity.iterdir())[0]
        (data / identity.name / image.name).write_bytes(image.read_bytes())
    (data / "nobody").mkdir()
    for shade in (40, 200):  # no face in a flat grey image
        Image.new("RGB", (250, 250), (shade, shade, shade)).save(data / "nobody" / f"grey{shade}.png")
    report = tmp_path / "recall.json"
    assert cli("calibrate", "--target", "retinaface", "--data", data, "--json", report) == 0
    measured = json.loads(report.read_text())
    assert measured["images"] == 5 and measured["found"] == 3
    assert measured["recall"] == 0.6 and measured["median_score"] >= 0.9


def test_thresholds_of_a_users_weights_are_stored_by_content_and_used(cli, capsys, monkeypatch, tmp_path):
    """A user's InsightFace file has no threshold until it is calibrated; after `calibrate --weights`, runs with a
    file of the same content (any path) decide at the stored one, and a file of other content still has none."""
    import shutil

    from helpers import shared_path

    from redteam import calibrations

    monkeypatch.setattr(calibrations, "cache_dir", lambda: tmp_path / "cache")
    weights = tmp_path / "model.onnx"
    shutil.copy(shared_path("weights", "mobilefacenet.onnx"), weights)
    train, faces = shared_path("data", "faces-train"), shared_path("data", "faces")
    people = tmp_path / "train"
    people.mkdir()
    for identity in [p for p in sorted(train.iterdir()) if len(list(p.iterdir())) >= 2][:15]:
        (people / identity.name).symlink_to(identity, target_is_directory=True)
    run = ("run", "--target", "arcface", "--weights", weights, "--data", faces, "--limit", 2, "--eps", 0, "--no-checks")

    assert cli(*run, "--out", tmp_path / "before") == 2
    assert "no calibrated threshold" in capsys.readouterr().err

    report = tmp_path / "calibration.json"
    arguments = ("--target", "arcface", "--weights", weights, "--data", people, "--impostors", 300, "--json", report)
    assert cli("calibrate", *arguments) == 0
    threshold = json.loads(report.read_text())["threshold"]
    said = " ".join(capsys.readouterr().out.split())
    assert "thresholds stored" in said
    assert "FAR 0.001 cannot be measured on 300 impostor pairs: it needs 10,000" in said  # not a made-up rate
    assert json.loads(report.read_text())["threshold_far"] is None

    moved = tmp_path / "elsewhere.onnx"
    shutil.copy(weights, moved)
    assert cli(*run[:4], moved, *run[5:], "--out", tmp_path / "after") == 0
    assert json.loads((tmp_path / "after" / "run.json").read_text())["threshold"] == threshold

    other = tmp_path / "other.onnx"
    shutil.copy(shared_path("weights", "arcface.onnx"), other)
    assert cli(*run[:4], other, *run[5:], "--out", tmp_path / "other") == 2
