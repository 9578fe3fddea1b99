"""The same attacks through torchattacks and the Adversarial Robustness Toolbox, for cross-checks and benchmarks.

Both libraries attack classifiers with cross-entropy, so a face threat model is shown to them as one
(:class:`FaceClassifier`): identification as a gallery classifier whose logits are scaled cosine similarities,
verification as two classes (match, non-match) with logits ``scale * (similarity - threshold)`` and 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from redteam.api import ATTACKS, Attack, AttackResult, Budget, MinimalAttack, MinimalResult, Norm
from redteam.errors import RedteamError
from redteam.threats import IdentificationObjective, Objective, VerificationObjective


class FaceClassifier(nn.Module):
    """A threat objective as a classifier for one batch of probes; ``labels`` are the correct decisions."""

    def __init__(self, objective: Objective, scale: float = 30.0):
        super().__init__()
        if not isinstance(objective, VerificationObjective | IdentificationObjective):
            raise RedteamError(f"external attack libraries cannot drive a {type(objective).__name__}")
        self.objective, self.scale = objective, scale
        # An empty parameter on the probes' device: the libraries look for the device among a model's parameters.
        device = next(iter(objective.per_sample.values())).device
        self.placement = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)

    @property
    def classes(self) -> int:
        if isinstance(self.objective, IdentificationObjective):
            return len(self.objective.gallery)
        return 2

    def forward(self, images: Tensor) -> Tensor:
        objective = self.objective
        embeddings = objective.embed(images)
        if isinstance(objective, IdentificationObjective):
            return self.scale * objective.similarity_matrix(embeddings, objective.gallery)
        margin = objective.similarity(embeddings, objective.per_sample["reference"]) - objective.threshold
        return self.scale * torch.stack([margin, torch.zeros_like(margin)], dim=1)

    def labels(self) -> Tensor:
        objective = self.objective
        if isinstance(objective, IdentificationObjective):
            return objective.per_sample["label"]
        reference = objective.per_sample["reference"]
        correct = 1 if objective.impersonate else 0  # the right decision: match for dodging, non-match otherwise
        return torch.full((len(reference),), correct, dtype=torch.long, device=reference.device)


def _torchattacks():
    try:
        import torchattacks
    except ImportError:
        raise RedteamError("this attack needs torchattacks: pip install --no-deps torchattacks") from None
    return torchattacks


@ATTACKS.register("torchattacks-pgd", "torchattacks' PGD (ℓ∞ or ℓ2) on the face threat model seen as a classifier")
@dataclass
class TorchattacksPGD(Attack):
    name = "torchattacks-pgd"
    positive = ("steps",)
    steps: int = 10
    step_size: float = 2.5  # per step, in units of eps / steps, like ours
    random_start: bool = True

    def __call__(
        self, objective: Objective, images: Tensor, budget: Budget, generator: torch.Generator | None = None
    ) -> AttackResult:
        torchattacks = _torchattacks()
        classifier = FaceClassifier(objective)
        alpha = self.step_size * budget.eps / self.steps
        kind = torchattacks.PGD if budget.norm == "linf" else torchattacks.PGDL2
        attack = kind(classifier, eps=budget.eps, alpha=alpha, steps=self.steps, random_start=self.random_start)
        adversarial = attack(images, classifier.labels())
        steps = torch.full((len(images),), self.steps, dtype=torch.long)
        return AttackResult(adversarial, steps, objective)


@ATTACKS.register("torchattacks-mim", "torchattacks' MIFGSM (ℓ∞ momentum) on the face threat model")
@dataclass
class TorchattacksMIM(Attack):
    name = "torchattacks-mim"
    positive = ("steps",)
    norms = ("linf",)
    steps: int = 10
    momentum: float = 1.0

    def __call__(
        self, objective: Objective, images: Tensor, budget: Budget, generator: torch.Generator | None = None
    ) -> AttackResult:
        if budget.norm != "linf":
            raise RedteamError("torchattacks' MIFGSM is an ℓ∞ attack.")
        classifier = FaceClassifier(objective)
        attack = _torchattacks().MIFGSM(
            classifier, eps=budget.eps, alpha=budget.eps / self.steps, steps=self.steps, decay=self.momentum
        )
        adversarial = attack(images, classifier.labels())
        steps = torch.full((len(images),), self.steps, dtype=torch.long)
        return AttackResult(adversarial, steps, objective)


@ATTACKS.register("torchattacks-cw", "torchattacks' C&W ℓ2 (one constant c) on the face threat model")
@dataclass
class TorchattacksCW(MinimalAttack):
    name = "torchattacks-cw"
    positive = ("steps",)
    norms = ("l2",)
    norm: Norm = "l2"
    steps: int = 100
    const: float = 1.0
    learning_rate: float = 0.01

    def __call__(self, objective: Objective, images: Tensor, generator: torch.Generator | None = None) -> MinimalResult:
        classifier = FaceClassifier(objective)
        attack = _torchattacks().CW(classifier, c=self.const, kappa=0, steps=self.steps, lr=self.learning_rate)
        adversarial = attack(images, classifier.labels())
        with torch.no_grad():
            fooled = objective(adversarial).success
        size = (adversarial - images).flatten(1).norm(dim=1)
        size = torch.where(fooled, size, torch.full_like(size, float("inf")))
        steps = torch.full((len(images),), self.steps, dtype=torch.long)
        return MinimalResult(adversarial, size, steps)


@ATTACKS.register("art-pgd", "ART's ProjectedGradientDescent (ℓ∞ or ℓ2) on the face threat model")
@dataclass
class ArtPGD(Attack):
    name = "art-pgd"
    positive = ("steps",)
    steps: int = 10
    step_size: float = 2.5
    random_start: bool = True

    def __call__(
        self, objective: Objective, images: Tensor, budget: Budget, generator: torch.Generator | None = None
    ) -> AttackResult:
        try:
            from art.attacks.evasion import ProjectedGradientDescentPyTorch
            from art.estimators.classification import PyTorchClassifier
        except ImportError:
            raise RedteamError("this attack needs adversarial-robustness-toolbox (and packaging)") from None
        classifier = FaceClassifier(objective)
        estimator = PyTorchClassifier(
            model=classifier,
            loss=nn.CrossEntropyLoss(),
            input_shape=tuple(images.shape[1:]),
            nb_classes=classifier.classes,
            clip_values=(0.0, 1.0),
            device_type="gpu" if images.is_cuda else "cpu",
        )
        attack = ProjectedGradientDescentPyTorch(
            estimator,
            norm=np.inf if budget.norm == "linf" else 2,
            eps=budget.eps,
            eps_step=self.step_size * budget.eps / self.steps,
            max_iter=self.steps,
            num_random_init=int(self.random_start),
            batch_size=len(images),  # one batch: the classifier's references are per probe, in order
            verbose=False,
        )
        labels = classifier.labels().cpu().numpy()
        adversarial = torch.from_numpy(attack.generate(images.cpu().numpy(), y=labels)).to(images.device)
        steps = torch.full((len(images),), self.steps, dtype=torch.long)
        return AttackResult(adversarial, steps, objective)
