"""Face threat models: which probes are attacked, what the face system decides, and what the adversary maximises.

- ``dodging``: a probe of A must stop matching A's enrolment (verification).
- ``impersonation``: a probe of A must match B's enrolment (verification).
- ``identification``: a probe of A must not be ranked top-1 as A in a closed-set gallery of enrolled identities.
- ``evasion``: a face must no longer be found by a detector above its score threshold.
- ``flagging``: a live face must be flagged as a presentation attack by a liveness check (denial of service).

Probes and references are drawn deterministically from the dataset with a seed, or from its LFW pairs file. A threat
model holds no state: ``enrol`` returns the enrolment (:class:`Enrolment`, embeddings of the images probes are
compared with) and ``objective`` takes it, so the same threat serves every model that enrols.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from redteam.datasets import FaceDataset
from redteam.errors import DataError
from redteam.registry import Registry
from redteam.runtime import threads_for

if TYPE_CHECKING:
    from redteam.api.targets import FaceDetector, FaceRecognizer, LivenessDetector

THREATS: Registry[type[ThreatModel]] = Registry("threat model")

Embedder = Callable[[Tensor], Tensor]
Similarity = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Probe:
    """One attacked image. ``reference`` is the enrolment image compared against (-1 for identification)."""

    image: int
    reference: int

    @property
    def key(self) -> str:
        return f"{self.image}:{self.reference}"


@dataclass
class Verdict:
    """Per-sample result of an objective: ``loss`` (the adversary maximises it), ``success`` (the face system
    decided wrongly) and ``score`` (the similarity the decision was made on), each ``[B]``."""

    loss: Tensor
    success: Tensor
    score: Tensor

    def __post_init__(self) -> None:
        # Under bf16 autocast a network's outputs are bf16; losses and scores are kept, compared and stored in float32
        # (a no-op for float32 tensors, and the gradient passes the cast).
        self.loss, self.score = self.loss.float(), self.score.float()


class Objective(ABC):
    """A differentiable threat objective for a batch of probes; ``select`` narrows it to a subset of them."""

    def __init__(self, embed: Embedder, **per_sample: Tensor):
        self.embed = embed
        self.per_sample = per_sample

    def select(self, index: Tensor) -> Objective:
        narrowed = object.__new__(type(self))
        narrowed.__dict__.update(self.__dict__)
        narrowed.per_sample = {k: v[index] for k, v in self.per_sample.items()}
        return narrowed

    def __call__(self, images: Tensor) -> Verdict:
        threads_for(len(images))  # every attack's passes come through here, whatever its batch has shrunk to
        return self.judge(images)

    @abstractmethod
    def judge(self, images: Tensor) -> Verdict:
        """The verdict on ``images [B, 3, H, W]``, one per probe of this objective."""


class VerificationObjective(Objective):
    """Similarity to a per-probe reference embedding against a threshold; ``impersonate`` flips the goal."""

    def __init__(self, embed: Embedder, similarity: Similarity, threshold: float, impersonate: bool, reference: Tensor):
        super().__init__(embed, reference=reference)
        self.similarity, self.threshold, self.impersonate = similarity, threshold, impersonate

    def judge(self, images: Tensor) -> Verdict:
        score = self.similarity(self.embed(images), self.per_sample["reference"])
        margin = score - self.threshold
        if self.impersonate:  # the adversary wants a match
            return Verdict(loss=margin, success=margin >= 0, score=score)
        return Verdict(loss=-margin, success=margin < 0, score=score)


class IdentificationObjective(Objective):
    """Top-1 over a gallery; the loss is the best wrong identity's similarity minus the true one's (CW margin)."""

    def __init__(self, embed: Embedder, similarity_matrix: Similarity, gallery: Tensor, label: Tensor):
        super().__init__(embed, label=label)
        self.similarity_matrix, self.gallery = similarity_matrix, gallery

    def judge(self, images: Tensor) -> Verdict:
        scores = self.similarity_matrix(self.embed(images), self.gallery)
        label = self.per_sample["label"]
        true = scores.gather(1, label[:, None]).squeeze(1)
        wrong = scores.scatter(1, label[:, None], float("-inf")).amax(dim=1)
        return Verdict(loss=wrong - true, success=wrong > true, score=true)


class DetectionObjective(Objective):
    """Detector evasion: ``success`` when the detector finds no face above its threshold; ``score`` is the face score.

    While a face is found, the loss is minus the summed margins of every candidate above the threshold, so each
    step pushes them all down rather than only the best (which another candidate would replace); once none is
    left, it is the best candidate's margin below the threshold. It is continuous and zero on the boundary.
    """

    def __init__(self, detector: FaceDetector):
        super().__init__(detector.candidate_scores)
        self.detector = detector

    def judge(self, images: Tensor) -> Verdict:
        scores = self.embed(images)  # [B, K]
        score = scores.amax(dim=1)
        above = (scores - self.detector.threshold).clamp(min=0).sum(dim=1)
        loss = torch.where(above > 0, -above, self.detector.threshold - score)
        return Verdict(loss=loss, success=~self.detector.detected(images, score), score=score)


class LivenessObjective(Objective):
    """Flagging a live face: ``success`` when its liveness score falls under the check's threshold; ``score`` is the
    liveness score."""

    def __init__(self, check: LivenessDetector):
        super().__init__(check.live_score)
        self.threshold = check.threshold

    def judge(self, images: Tensor) -> Verdict:
        score = self.embed(images)
        margin = score - self.threshold
        return Verdict(loss=-margin, success=margin < 0, score=score)


@dataclass(frozen=True)
class Enrolment:
    """What a model enrolled: the embedding ``[D]`` of each enrolment image (dataset index), computed once."""

    embeddings: dict[int, Tensor] = field(default_factory=dict)

    def stack(self, indices: Sequence[int]) -> Tensor:
        """``[len(indices), D]``."""
        return torch.stack([self.embeddings[index] for index in indices])


class ThreatModel(ABC):
    name: ClassVar[str]
    task: ClassVar[str] = "recognition"  # the kind of target it attacks

    def __init__(self, dataset: FaceDataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    @abstractmethod
    def probes(self, limit: int | None = None) -> list[Probe]:
        """The attacked probes, in a fixed order for this dataset and seed."""

    @abstractmethod
    def objective(self, model, enrolment: Enrolment, probes: list[Probe]) -> Objective:
        """The adversary's objective against ``model`` for a batch of ``probes``, compared with what ``model``
        enrolled (:meth:`enrol`)."""

    def enrolment_images(self, probes: list[Probe]) -> list[int]:
        """Dataset indices of the enrolment images the probes are compared with."""
        return sorted({p.reference for p in probes})

    def starting_images(self, probe: Probe, count: int = 4) -> list[int]:
        """Dataset images a decision-based attack may start from for ``probe``: images the system likely already
        decides wrongly on (by default photos of other people, in an order drawn from the seed)."""
        records = self.dataset.records
        others = [i for i, record in enumerate(records) if record.identity != records[probe.image].identity]
        return random.Random(f"{self.name}:{self.seed}:start:{probe.key}").sample(others, min(count, len(others)))

    def enrol(self, encode: Callable[[list[int]], Tensor], probes: list[Probe]) -> Enrolment:
        """Embed the enrolment images once; ``encode`` maps dataset indices to embeddings ``[N, D]`` (no gradient)."""
        indices = self.enrolment_images(probes)
        return Enrolment(dict(zip(indices, encode(indices)))) if indices else Enrolment()

    def _rng(self) -> random.Random:
        return random.Random(f"{self.name}:{self.seed}")

    def _round_robin(self, candidates: dict[str, list[Probe]], limit: int | None) -> list[Probe]:
        """Interleave identities (shuffled) so any prefix of the probe list spreads over many people."""
        rng = self._rng()
        queues = [list(v) for _, v in sorted(candidates.items())]
        rng.shuffle(queues)
        for queue in queues:
            rng.shuffle(queue)
        ordered: list[Probe] = []
        while any(queues):
            for queue in queues:
                if queue:
                    ordered.append(queue.pop())
        return ordered[:limit] if limit else ordered


def _need_identities(dataset: FaceDataset, minimum: int, what: str) -> None:
    if len(dataset.by_identity) < minimum:
        raise DataError(f"{what} needs at least {minimum} identities; {dataset.name} has {len(dataset.by_identity)}.")


@THREATS.register("dodging", "probe of A must stop matching A's enrolment (verification)")
class Dodging(ThreatModel):
    name = "dodging"
    impersonate = False

    def probes(self, limit: int | None = None) -> list[Probe]:
        if self.dataset.pairs is not None:
            pairs = [Probe(p.second, p.first) for p in self.dataset.pairs if p.same]
            return pairs[:limit] if limit else pairs
        rng = self._rng()
        candidates: dict[str, list[Probe]] = {}
        for identity, indices in self.dataset.by_identity.items():
            if len(indices) >= 2:
                candidates[identity] = [Probe(i, rng.choice([j for j in indices if j != i])) for i in indices]
        if not candidates:
            raise DataError(f"dodging needs identities with two or more images; {self.dataset.name} has none.")
        return self._round_robin(candidates, limit)

    def objective(self, model: FaceRecognizer, enrolment: Enrolment, probes: list[Probe]) -> Objective:
        references = enrolment.stack([p.reference for p in probes])
        return VerificationObjective(model.embed, model.similarity, model.threshold, self.impersonate, references)


@THREATS.register("impersonation", "probe of A must match B's enrolment (verification)")
class Impersonation(Dodging):
    name = "impersonation"
    impersonate = True

    def starting_images(self, probe: Probe, count: int = 4) -> list[int]:
        """B's own photos, the enrolment first: they match B's enrolment already."""
        victim = self.dataset.records[probe.reference].identity
        return [probe.reference, *[i for i in self.dataset.by_identity[victim] if i != probe.reference]][:count]

    def probes(self, limit: int | None = None) -> list[Probe]:
        if self.dataset.pairs is not None:
            pairs = [Probe(p.first, p.second) for p in self.dataset.pairs if not p.same]
            return pairs[:limit] if limit else pairs
        _need_identities(self.dataset, 2, "impersonation")
        rng = self._rng()
        identities = sorted(self.dataset.by_identity)
        candidates = {}
        for identity in identities:
            others = [other for other in identities if other != identity]
            candidates[identity] = [
                Probe(i, rng.choice(self.dataset.by_identity[rng.choice(others)]))
                for i in self.dataset.by_identity[identity]
            ]
        return self._round_robin(candidates, limit)


@THREATS.register("identification", "probe of A must not be ranked top-1 as A in a closed-set gallery")
class Identification(ThreatModel):
    """The gallery enrols one image per identity with two or more images; the others are probes."""

    name = "identification"

    def _gallery(self) -> dict[str, int]:
        rng = self._rng()
        return {
            identity: rng.choice(indices)
            for identity, indices in sorted(self.dataset.by_identity.items())
            if len(indices) >= 2
        }

    def probes(self, limit: int | None = None) -> list[Probe]:
        gallery = self._gallery()
        if len(gallery) < 2:
            raise DataError("identification needs at least 2 identities with two or more images each.")
        candidates = {
            identity: [Probe(i, -1) for i in self.dataset.by_identity[identity] if i != enrolled]
            for identity, enrolled in gallery.items()
        }
        return self._round_robin(candidates, limit)

    def enrolment_images(self, probes: list[Probe]) -> list[int]:
        return list(self._gallery().values())

    def objective(self, model: FaceRecognizer, enrolment: Enrolment, probes: list[Probe]) -> Objective:
        gallery = self._gallery()
        embeddings = enrolment.stack(list(gallery.values()))
        position = {identity: k for k, identity in enumerate(gallery)}
        labels = [position[self.dataset.records[p.image].identity] for p in probes]
        label = torch.tensor(labels, device=embeddings.device)
        return IdentificationObjective(model.embed, model.similarity_matrix, embeddings, label)


@THREATS.register("evasion", "a face must no longer be found by a detector above its threshold")
class Evasion(ThreatModel):
    """Every face image is a probe; nothing is enrolled."""

    name = "evasion"
    task = "detection"

    def probes(self, limit: int | None = None) -> list[Probe]:
        candidates = {
            identity: [Probe(i, -1) for i in indices] for identity, indices in self.dataset.by_identity.items()
        }
        return self._round_robin(candidates, limit)

    def enrolment_images(self, probes: list[Probe]) -> list[int]:
        return []

    def starting_images(self, probe: Probe, count: int = 4) -> list[int]:
        return []  # every image is a face: a decision attack starts from a blank image instead

    def objective(self, model: FaceDetector, enrolment: Enrolment, probes: list[Probe]) -> Objective:
        return DetectionObjective(model)


@THREATS.register("flagging", "a live face must be flagged as a presentation attack (denial of service)")
class Flagging(Evasion):
    """Every face image is a probe (all are live captures); nothing is enrolled."""

    name = "flagging"
    task = "liveness"

    def objective(self, model: LivenessDetector, enrolment: Enrolment, probes: list[Probe]) -> Objective:  # type: ignore[override]
        return LivenessObjective(model)
