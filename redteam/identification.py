"""Closed-set face identification: a zoo recogniser's embedding under a softmax head over enrolled identities.

This is the model that model-inversion and poisoning campaigns attack (GMI, MakeupAttack): it is trained on a
chosen set of people rather than calibrated, so it lives beside the zoo instead of in it. The head is a cosine
classifier (scaled cosine similarity to one learned direction per identity), initialised at the identities' mean
embeddings, so even an untrained head is a nearest-class-mean identifier.

Training a real part of the network cheaply: a :class:`SplitRecognizer` cuts a converted graph at an intermediate
tensor; its frozen front runs once per image (:func:`represent`) and the tail and head train on the cached features
for as many epochs as needed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from redteam.api.targets import FaceRecognizer
from redteam.convert.tf_graph import load_frozen_graph
from redteam.datasets import FaceDataset
from redteam.errors import RedteamError
from redteam.finetune import fine_tuned_parameters
from redteam.runtime import batched


@dataclass(frozen=True)
class Roster:
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


def choose_roster(
    dataset: FaceDataset, identities: int, held_out: int = 2, seed: int = 0, include: str | None = None
) -> Roster:
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
    return Roster(names, tuple(train), tuple(train_labels), tuple(test), tuple(test_labels))


class SplitRecognizer(nn.Module):
    """A recogniser converted from a frozen graph (it declares its :class:`~redteam.api.FrozenGraph`), cut in two at
    the intermediate tensor ``at``: a frozen front (``features``: the recogniser's preprocessing and the graph up to
    ``at``, ``[B, 3, H, W] -> [B, ...]``, computed once and cached) and a trainable ``tail`` (the pretrained graph
    from ``at`` on, ``[B, ...] -> [B, D]``).

    Args:
        recognizer: the zoo recogniser (its preprocessing and device are used; it is not changed).
        at: the tensor where the tail begins (a node name, e.g. ``InceptionResnetV1/Repeat_1/block17_10/Relu``).
    """

    def __init__(self, recognizer: FaceRecognizer, at: str):
        super().__init__()
        if recognizer.frozen_graph is None:
            raise RedteamError(f"{recognizer.card.name} is not converted from a frozen graph; it cannot be split.")
        self.preprocess = recognizer.preprocess
        self.graph, self.at = recognizer.frozen_graph, at
        graph = self.graph.file
        self.front = load_frozen_graph(graph, [self.graph.input], [at]).to(recognizer.device).requires_grad_(False)
        self.tail = load_frozen_graph(graph, [at], [self.graph.output]).to(recognizer.device)

    @property
    def device(self) -> torch.device:
        return next(self.tail.parameters()).device

    def features(self, images: Tensor) -> Tensor:
        """The front's output ``[B, ...]`` (graph layout) of ``images [B, 3, H, W]``."""
        return self.front(self.preprocess(images))

    def embed(self, images: Tensor) -> Tensor:
        return self.tail(self.features(images))

    def reset_tail(self) -> None:
        """Back to the pretrained tail (to train again from the same start; the front is kept)."""
        self.tail = load_frozen_graph(self.graph.file, [self.at], [self.graph.output]).to(self.device)


def embedding_of(recognizer: FaceRecognizer | SplitRecognizer, representations: Tensor) -> Tensor:
    """Embeddings ``[B, D]`` of :func:`represent`'s output: through a split recogniser's tail, else as they are."""
    return recognizer.tail(representations) if isinstance(recognizer, SplitRecognizer) else representations


class IdentificationModel(nn.Module):
    """A recogniser's embedding under a cosine-softmax head: ``images [B, 3, H, W] -> logits [B, K]``.

    Args:
        recognizer: the zoo recogniser whose embedding it builds on (fine-tuned in place when ``fit`` says so), or a
            :class:`SplitRecognizer` of one (its tail trains with the head).
        prototypes: ``[K, D]`` initial identity directions (e.g. mean embeddings of each identity's photos).
        scale: softmax temperature on the cosine similarities (logits lie in ``[-scale, scale]``).
    """

    def __init__(self, recognizer: FaceRecognizer | SplitRecognizer, prototypes: Tensor, scale: float = 16.0):
        super().__init__()
        self.recognizer = recognizer
        self.directions = nn.Parameter(F.normalize(prototypes.detach().clone(), dim=-1))
        self.scale = scale

    def classify(self, embeddings: Tensor) -> Tensor:
        """Logits ``[B, K]`` of embeddings ``[B, D]``."""
        return self.scale * F.normalize(embeddings, dim=-1) @ F.normalize(self.directions, dim=-1).T

    def forward(self, images: Tensor) -> Tensor:
        return self.classify(self.recognizer.embed(images))

    def head(self, representations: Tensor) -> Tensor:
        """Logits ``[B, K]`` of :func:`represent`'s output: the part of the model that ``fit`` trains."""
        return self.classify(embedding_of(self.recognizer, representations))

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 32) -> Tensor:
        """Predicted labels ``[B]`` (batched, no gradients)."""
        return torch.cat([self(batch).argmax(-1) for batch in images.split(batch_size)])


@dataclass
class FitConfig:
    """How to train an identification model.

    ``blocks``: a regular expression naming the recogniser parameters fine-tuned with the head (``None``: the head
    alone, trained on cached embeddings: seconds instead of minutes; with a :class:`SplitRecognizer`, the tail's
    parameters, ``None``: the whole tail). ``network_learning_rate``: theirs (``None``: ``learning_rate``; pretrained
    layers want a far smaller step than a fresh head).
    """

    epochs: int = 40
    learning_rate: float = 0.01
    batch_size: int = 32
    blocks: str | None = None
    seed: int = 0
    network_learning_rate: float | None = None


@torch.no_grad()
def embed_all(recognizer: FaceRecognizer | SplitRecognizer, images: Tensor, batch_size: int = 32) -> Tensor:
    """Embeddings ``[N, D]`` of ``images [N, 3, H, W]`` (batched, on the recogniser's device)."""
    return batched(recognizer.embed, images, recognizer.device, batch_size)


@torch.no_grad()
def represent(recognizer: FaceRecognizer | SplitRecognizer, images: Tensor, batch_size: int = 32) -> Tensor:
    """What stays frozen while ``fit`` trains a model on ``recognizer``, ``[N, 3, H, W] -> [N, ...]``: a split
    recogniser's front features, else the embeddings ``[N, D]``. Compute it once; train many epochs (and models:
    a split's front survives ``reset_tail``) on it."""
    if not isinstance(recognizer, SplitRecognizer):
        return embed_all(recognizer, images, batch_size)
    return batched(recognizer.features, images, recognizer.device, batch_size)


def build_identifier(
    recognizer: FaceRecognizer | SplitRecognizer,
    images: Tensor,
    labels: Tensor,
    classes: int,
    represented: bool = False,
) -> IdentificationModel:
    """An identification model whose identity directions start at the mean embedding of each class's ``images``
    (``[N, 3, H, W]``, or their :func:`represent` output when ``represented``)."""
    inputs = images.to(recognizer.device) if represented else represent(recognizer, images)
    with torch.no_grad():
        embeddings = F.normalize(torch.cat([embedding_of(recognizer, x) for x in inputs.split(32)]), dim=-1)
    labels = labels.to(embeddings.device)
    prototypes = torch.zeros(classes, embeddings.shape[1], device=embeddings.device).index_add_(0, labels, embeddings)
    return IdentificationModel(recognizer, prototypes)


def one_view_each(views: Tensor, generator: torch.Generator) -> Tensor:
    """Indices of one randomly drawn image per sample, in random order: ``views [N]`` names each image's sample."""
    keys = views.double() + torch.rand(len(views), generator=generator, dtype=torch.float64)  # random order within
    order = keys.argsort()
    sorted_views = views[order]
    first = torch.ones(len(order), dtype=torch.bool)
    first[1:] = sorted_views[1:] != sorted_views[:-1]
    chosen = order[first]
    return chosen[torch.randperm(len(chosen), generator=generator)]


def fit(
    model: IdentificationModel,
    images: Tensor,
    labels: Tensor,
    config: FitConfig,
    advance: Callable[[int], None] = lambda n: None,
    views: Tensor | None = None,
    represented: bool = False,
) -> list[float]:
    """Train ``model`` on ``images [N, 3, H, W]`` with ``labels [N]`` by cross-entropy; returns the loss per epoch.

    What trains: the head; with a :class:`SplitRecognizer`, its tail too (``config.blocks`` of it), on the front's
    features computed once; with another recogniser and ``config.blocks``, those parameters, through the whole
    network every step. ``represented``: ``images`` are already :func:`represent`'s output (several models trained on
    one cache). ``views [N]``: images with equal values are views of one training sample (flips, makeup looks); each
    epoch trains on one of them, drawn afresh (default: every image its own sample). ``advance`` is called with the
    number of images seen (progress bars). Leaves the model frozen (no gradients).
    """
    recognizer = model.recognizer
    device = model.directions.device
    labels = labels.to(device)
    network: list[nn.Parameter] = []
    logits_of: Callable[[Tensor], Tensor]
    split = isinstance(recognizer, SplitRecognizer)
    if config.blocks is not None and not split:
        network = list(fine_tuned_parameters(recognizer, config.blocks).values())
        inputs, logits_of = images, model  # through the recogniser every step
    else:
        inputs = images if represented else represent(recognizer, images)  # the frozen part runs once
        logits_of = model.head
        if isinstance(recognizer, SplitRecognizer):
            tail = recognizer.tail
            network = list(
                tail.parameters() if config.blocks is None else fine_tuned_parameters(tail, config.blocks).values()
            )
    for parameter in [model.directions, *network]:
        parameter.requires_grad_(True)
    groups: list[dict[str, Any]] = [{"params": [model.directions]}]
    if network:
        groups.append({"params": network, "lr": config.network_learning_rate or config.learning_rate})
    optimiser = torch.optim.Adam(groups, lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    for _ in range(config.epochs):
        total = 0.0
        chosen = torch.randperm(len(labels), generator=generator) if views is None else one_view_each(views, generator)
        for batch in chosen.split(config.batch_size):
            loss = F.cross_entropy(logits_of(inputs[batch].to(device)), labels[batch.to(device)])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
            advance(len(batch))
        losses.append(total / len(chosen))
    model.requires_grad_(False)
    return losses
