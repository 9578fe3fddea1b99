"""Adversarial fine-tuning on real faces: only the chosen blocks change, the result reloads as a defense and as the
facenet-at target with its own calibrated threshold, and a missing training run is one clear line."""

from __future__ import annotations

import pytest
import torch
from helpers import shared_path

from redteam import finetune as finetune_module
from redteam.api import DEFENSES
from redteam.defenses.adv_train import AdversarialFineTuning
from redteam.engine import load_target
from redteam.errors import MissingWeightsError, RedteamError
from redteam.finetune import AdvTrainConfig
from redteam.training import train_adversarially

QUICK = dict(eps=8.0, steps=1, batch_size=4, limit=8, learning_rate=1e-3, impostors=500)


@pytest.fixture(scope="module")
def train_faces(tmp_path_factory):
    """Faces of 12 training identities with two photos each (disjoint from the evaluation faces)."""
    from redteam.datasets import ImageFolderDataset

    root, data = tmp_path_factory.mktemp("adv_faces"), shared_path("data", "faces-train")
    pairs = [p for p in sorted(data.iterdir()) if p.is_dir() and len(list(p.iterdir())) >= 2][:12]
    for identity in pairs:
        (root / identity.name).symlink_to(identity, target_is_directory=True)
    return ImageFolderDataset(root)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh defenses cache (the model weights stay in the real one)."""
    path = tmp_path_factory.mktemp("adv_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune_module, "cache_dir", lambda: path)
        yield path


@pytest.fixture(scope="module")
def fine_tuned(cache, train_faces):
    return train_adversarially(AdvTrainConfig(**QUICK), train_faces, torch.device("cpu"))


def test_only_the_chosen_blocks_are_saved_and_changed(fine_tuned, facenet):
    saved = fine_tuned["state"]
    assert saved and all("Block8_" in name or "Bottleneck" in name for name in saved)
    assert not any("Repeat_2" in name for name in saved)  # the earlier Inception-ResNet-C blocks stay frozen
    original = dict(facenet.named_parameters())
    changed = [name for name, value in saved.items() if not torch.equal(value, original[name])]
    assert len(changed) > len(saved) // 2, changed
    assert fine_tuned["step"] == 2 and len(fine_tuned["history"]) == 2


def test_wrapper_loads_a_new_model_and_leaves_the_target_alone(fine_tuned, facenet, faces):
    before = {name: p.clone() for name, p in facenet.named_parameters() if "Bottleneck" in name}
    defended = DEFENSES.get("adv-train")().wrap(facenet, lambda: load_target("facenet", torch.device("cpu")))
    assert all(torch.equal(p, before[name]) for name, p in facenet.named_parameters() if name in before)
    assert defended.card.name == "facenet-at" and facenet.card.name == "facenet"
    assert defended.threshold == pytest.approx(fine_tuned["calibration"]["threshold"])
    assert not any(p.requires_grad for p in defended.parameters())
    images = faces.load([0, 1])
    with torch.no_grad():
        similarity = torch.nn.functional.cosine_similarity(defended.embed(images), facenet.embed(images))
    assert (similarity < 0.9999).all() and (similarity > 0.5).all()  # fine-tuned, not destroyed
    for name, value in fine_tuned["state"].items():
        assert torch.equal(dict(defended.named_parameters())[name], value)


def test_zoo_entry_is_the_same_model(fine_tuned, faces):
    assert finetune_module.weights_path("facenet").is_file()
    at = load_target("facenet-at", torch.device("cpu"))
    fresh = lambda: load_target("facenet", torch.device("cpu"))  # noqa: E731
    defended = AdversarialFineTuning().wrap(fresh(), fresh)
    images = faces.load([2])
    with torch.no_grad():
        assert torch.equal(at.embed(images), defended.embed(images))
    assert at.card.threshold == defended.card.threshold and "PGD" in at.card.notes


def test_rerunning_a_finished_run_changes_nothing(fine_tuned, train_faces):
    again = train_adversarially(AdvTrainConfig(**QUICK), train_faces, torch.device("cpu"))
    assert again["step"] == fine_tuned["step"] and again["calibration"] == fine_tuned["calibration"]
    with pytest.raises(RedteamError, match="--restart"):
        train_adversarially(AdvTrainConfig(**{**QUICK, "eps": 2.0}), train_faces, torch.device("cpu"))


def test_missing_weights_and_bad_blocks_are_one_line(monkeypatch, tmp_path, facenet):
    monkeypatch.setattr(finetune_module, "cache_dir", lambda: tmp_path)
    with pytest.raises(MissingWeightsError, match="redteam train adv --target facenet --data"):
        AdversarialFineTuning().wrap(facenet, lambda: load_target("facenet", torch.device("cpu")))
    with pytest.raises(RedteamError, match="matches none"):
        finetune_module.fine_tuned_parameters(facenet, "NoSuchBlock")
    with pytest.raises(RedteamError, match="--blocks"):
        AdvTrainConfig(target="arcface")
