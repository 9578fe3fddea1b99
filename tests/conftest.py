"""Shared fixtures. Real faces come from ../shared/data (CI has it; elsewhere those tests skip, saying why)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"

torch.set_flush_denormal(True)


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


@pytest.fixture(scope="session")
def faces_root() -> Path:
    return shared_path("data", "faces")


@pytest.fixture(scope="session")
def facenet():
    from redteam.engine import load_target

    return load_target("facenet", torch.device("cpu"))


@pytest.fixture(scope="session")
def faces(faces_root):
    """LFW evaluation faces as identity folders (images load lazily)."""
    from redteam.datasets import ImageFolderDataset

    return ImageFolderDataset(faces_root)


@pytest.fixture(scope="session")
def small_faces(faces_root, tmp_path_factory):
    """12 identities of the evaluation faces (symlinked into a temporary folder): galleries stay cheap to embed."""
    from redteam.datasets import ImageFolderDataset

    root = tmp_path_factory.mktemp("small_faces")
    for identity in sorted(p for p in faces_root.iterdir() if p.is_dir())[:12]:
        (root / identity.name).symlink_to(identity, target_is_directory=True)
    return ImageFolderDataset(root)


@pytest.fixture
def cli(monkeypatch):
    """Run the real ``redteam`` entry point in-process: ``cli("run", "--limit", 3)`` -> exit code."""
    from redteam.cli import main

    def run(*args) -> int:
        monkeypatch.setattr(sys, "argv", ["redteam", *map(str, args)])
        try:
            main()
        except SystemExit as done:
            return int(done.code or 0)
        return 0

    return run
