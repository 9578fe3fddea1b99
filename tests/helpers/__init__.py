"""What tests share besides fixtures: real data from ../shared, reference runtimes (tfjs in node, headless
Chromium), and assertions several detector tests make."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[3] / "shared"


def invoke(monkeypatch: pytest.MonkeyPatch, *args) -> int:
    """Run the real ``redteam`` entry point in-process with ``args`` -> its exit code."""
    from redteam.cli import main

    monkeypatch.setattr(sys, "argv", ["redteam", *map(str, args)])
    try:
        main()
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not here (it ships with the project's CI machines, not with the package)")
    return path


def assert_one_centred_face_with_ordered_landmarks(detector, images: torch.Tensor) -> list[torch.Tensor]:
    """Every LFW photo (centred on one face; others may appear beside it) gives exactly one detected face over the
    image centre, above the detector's threshold, with its five landmarks inside the box and in anatomical order.
    Returns the box ``[4]`` of each image's centred face."""
    centre, centred_boxes = images.shape[-1] / 2, []
    for detections in detector.detect(images):
        assert (detections.scores >= detector.threshold).all()
        centred = ((detections.boxes[:, :2] <= centre) & (detections.boxes[:, 2:] >= centre)).all(1)
        assert centred.sum() == 1
        box, points = detections.boxes[centred][0], detections.landmarks[centred][0]
        left_eye, right_eye, nose, left_mouth, right_mouth = points
        assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
        assert ((points >= box[:2]) & (points <= box[2:])).all()
        centred_boxes.append(box)
    return centred_boxes
