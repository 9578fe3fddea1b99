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
