"""Closed-set face identification: a zoo recogniser's embedding under a softmax head over enrolled identities.

This is the model that model-inversion and poisoning campaigns attack (GMI, MakeupAttack): it is trained on a
chosen set of people rather than calibrated, so it lives beside the zoo instead of in it. The head is a cosine
classifier (scaled cosine similarity to one learned direction per identity), initialised at the identities' mean
embeddings, so even an untrained head is a nearest-class-mean identifier.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from redteam.datasets import FaceDataset
from redteam.errors import RedteamError
from redteam.targets.base import FaceRecognizer


@dataclass(frozen=True)
class Enrolment:
    """The identities an identification model knows, and which dataset photos train and test it.

    ``train``/``test`` are dataset indices; ``train_labels``/``test_labels`` index ``names``.
    """

    names: tuple[str, ...]
    train: tuple[int, ...]
    train_labels: tuple[int, ...]
    test: tuple[int, ...]
    test_labels: tuple[int, ...]

    def label(self, name: str) -> int:
        if name not in self.names:
            raise RedteamError(f"{name} is not enrolled; enrolled: {', '.join(self.names[:5])}, ...")
        return self.names.index(name)


def enrol(
    dataset: FaceDataset, identities: int, held_out: int = 2, seed: int = 0, include: str | None = None
) -> Enrolment:
    """Pick ``identities`` people with at least ``held_out + 3`` photos (seeded; ``include`` always among them);
    their last ``held_out`` photos test the model, the others train it."""
    groups = dataset.by_identity
    minimum = held_out + 3
    eligible = sorted(name for name, photos in groups.items() if len(photos) >= minimum)
    if include is not None:
        if include not in groups:
            raise RedteamError(f"--identity {include} is not in {dataset.name}.")
        if include not in eligible:
            raise RedteamError(f"--identity {include} has {len(groups[include])} photos; enrolment needs {minimum}.")
    if len(eligible) < identities:
        raise RedteamError(f"{dataset.name} has {len(eligible)} people with {minimum}+ photos; {identities} asked.")
    others = [name for name in eligible if name != include]
    chosen = random.Random(seed).sample(others, identities - (include is not None))
    names = tuple(sorted(chosen + ([include] if include is not None else [])))
    train, train_labels, test, test_labels = [], [], [], []
    for label, name in enumerate(names):
        photos = groups[name]
        train += photos[:-held_out]
        train_labels += [label] * (len(photos) - held_out)
        test += photos[-held_out:]
        test_labels += [label] * held_out
    return Enrolment(names, tuple(train), tuple(train_labels), tuple(test), tuple(test_labels))


class IdentificationModel(nn.Module):
    """A recogniser's embedding under a cosine-softmax head: ``images [B, 3, H, W] -> logits [B, K]``.

    Args:
        recognizer: the zoo recogniser whose embedding it builds on (fine-tuned in place when ``fit`` says so).
        prototypes: ``[K, D]`` initial identity directions (e.g. mean embeddings of each identity's photos).
        scale: softmax temperature on the cosine similarities (logits lie in ``[-scale, scale]``).
    """

    def __init__(self, recognizer: FaceRecognizer, prototypes: Tensor, scale: float = 16.0):
        super().__init__()
        self.recognizer = recognizer
        self.directions = nn.Parameter(F.normalize(prototypes.detach().clone(), dim=-1))
        self.scale = scale

    def classify(self, embeddings: Tensor) -> Tensor:
        """Logits ``[B, K]`` of embeddings ``[B, D]``."""
        return self.scale * F.normalize(embeddings, dim=-1) @ F.normalize(self.directions, dim=-1).T

    def forward(self, images: Tensor) -> Tensor:
        return self.classify(self.recognizer.embed(images))

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 32) -> Tensor:
        """Predicted labels ``[B]`` (batched, no gradients)."""
        return torch.cat([self(batch).argmax(-1) for batch in images.split(batch_size)])


@dataclass
class FitConfig:
    """How to train an identification model.

    ``blocks``: a regular expression naming the recogniser parameters fine-tuned with the head (``None``: the head
    alone, trained on cached embeddings: seconds instead of minutes).
    """

    epochs: int = 40
    learning_rate: float = 0.01
    batch_size: int = 32
    blocks: str | None = None
    seed: int = 0


@torch.no_grad()
def embed_all(recognizer: FaceRecognizer, images: Tensor, batch_size: int = 32) -> Tensor:
    """Embeddings ``[N, D]`` of ``images [N, 3, H, W]`` (batched, on the recogniser's device)."""
    return torch.cat([recognizer.embed(batch.to(recognizer.device)) for batch in images.split(batch_size)])


def build_identifier(recognizer: FaceRecognizer, images: Tensor, labels: Tensor, classes: int) -> IdentificationModel:
    """An identification model whose identity directions start at the mean embedding of each class's ``images``."""
    embeddings = F.normalize(embed_all(recognizer, images), dim=-1)
    labels = labels.to(embeddings.device)
    prototypes = torch.zeros(classes, embeddings.shape[1], device=embeddings.device).index_add_(0, labels, embeddings)
    return IdentificationModel(recognizer, prototypes)


def fit(
    model: IdentificationModel,
    images: Tensor,
    labels: Tensor,
    config: FitConfig,
    advance: Callable[[int], None] = lambda n: None,
) -> list[float]:
    """Train ``model`` on ``images [N, 3, H, W]`` with ``labels [N]`` by cross-entropy; returns the loss per epoch.

    ``advance`` is called with the number of images seen (progress bars). Leaves the model frozen (no gradients).
    """
    from redteam.defenses.adv_train import fine_tuned_parameters

    device = model.directions.device
    labels = labels.to(device)
    trained = [model.directions]
    if config.blocks is not None:
        trained += list(fine_tuned_parameters(model.recognizer, config.blocks).values())
        inputs = images  # through the recogniser every step
    else:
        inputs = embed_all(model.recognizer, images)  # the recogniser is frozen: embed once
    for parameter in trained:
        parameter.requires_grad_(True)
    optimiser = torch.optim.Adam(trained, lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    for _ in range(config.epochs):
        total = 0.0
        for batch in torch.randperm(len(labels), generator=generator).split(config.batch_size):
            x = inputs[batch].to(device)
            logits = model(x) if config.blocks is not None else model.classify(x)
            loss = F.cross_entropy(logits, labels[batch.to(device)])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
            advance(len(batch))
        losses.append(total / len(labels))
    model.requires_grad_(False)
    return losses
