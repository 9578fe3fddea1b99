"""Shared fixtures. Real faces come from ../shared/data (CI has it; elsewhere those tests skip, saying why)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import invoke, shared_path

torch.set_flush_denormal(True)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: each computes on one thread, and so do the commands tests start.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


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
    return lambda *args: invoke(monkeypatch, *args)
