"""Adversarial fine-tuning (``adv-train``): a recogniser's last blocks retrained against PGD on disjoint identities.

Madry et al.'s min-max on the embedding objective, at a CPU-feasible size: for each batch of training faces, PGD
(``redteam.attacks.pgd``, the dodging objective of ``redteam.threats``) pushes each face's embedding away from the
*original* model's embedding of the same face; the chosen blocks are then trained to pull the adversarial and the
clean embeddings back to it (cosine). Anchoring on the frozen original keeps the embedding space, so enrolments
and the clean price stay small. Only the fine-tuned parameters are saved, keyed by the base weights' checksum,
with a threshold calibrated on the training faces (``redteam.metrics.calibrate``).

The result is used as ``--defense adv-train`` (any target that has been fine-tuned) and as the ``facenet-at`` target.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from redteam.assets import cache_dir, save_atomic
from redteam.attacks.base import Budget
from redteam.attacks.pgd import PGD
from redteam.datasets import FaceDataset
from redteam.defenses.base import DEFENSES, ModelWrapper
from redteam.errors import MissingWeightsError, RedteamError
from redteam.metrics import calibrate
from redteam.targets.base import TARGETS, FaceRecognizer, ModelCard
from redteam.threats import VerificationObjective

#: The blocks fine-tuned by default, as a regular expression over parameter names.
DEFAULT_BLOCKS = {"facenet": r"Block8_|Bottleneck"}  # the last Inception-ResNet-C block and the embedding layer


def train_hint(target_name: str) -> str:
    return f"redteam train adv --target {target_name} --data path/to/faces-train"


@dataclass
class AdvTrainConfig:
    """Fine-tuning settings; saved with the weights."""

    target: str = "facenet"
    blocks: str = ""  # regular expression over parameter names (default: DEFAULT_BLOCKS[target])
    eps: float = 4.0  # ℓ∞ budget of the training attack, /255
    steps: int = 2  # PGD steps per batch
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 1e-3
    clean_weight: float = 1.0  # weight of the clean-embedding term next to the adversarial one
    limit: int | None = 480  # train on the dataset's first N images only (None: all): a CPU-sized default
    checkpoint_every: int = 10  # batches
    impostors: int = 100_000  # random impostor pairs of the threshold calibration
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.blocks:
            if self.target not in DEFAULT_BLOCKS:
                raise RedteamError(f"say which blocks of {self.target} to fine-tune: --blocks REGEX (parameter names).")
            self.blocks = DEFAULT_BLOCKS[self.target]

    def resumable_with(self, other: AdvTrainConfig) -> bool:
        ignored = ("epochs", "checkpoint_every", "impostors")
        return {k: v for k, v in asdict(self).items() if k not in ignored} == {
            k: v for k, v in asdict(other).items() if k not in ignored
        }


def weights_path(target_name: str) -> Path:
    """Where the fine-tuned blocks of ``target_name`` live, keyed by the checksum of its base weights."""
    files = TARGETS.get(target_name).weights
    digest = hashlib.sha256("".join(f.sha256 for f in files).encode()).hexdigest()[:16]
    return cache_dir() / "defenses" / f"adv-train-{target_name}-{digest}.pt"


def fine_tuned_parameters(model: nn.Module, blocks: str) -> dict[str, nn.Parameter]:
    """The parameters whose names match ``blocks`` (a regular expression)."""
    chosen = {name: p for name, p in model.named_parameters() if re.search(blocks, name)}
    if not chosen:
        raise RedteamError(f"--blocks {blocks!r} matches none of the target's parameters.")
    return chosen


def apply_adversarial_weights(model: FaceRecognizer, target_name: str) -> ModelCard:
    """Load the fine-tuned blocks of ``target_name`` into ``model`` (in place); returns the fine-tuned model's card
    (its threshold calibrated on the training faces). Raises MissingWeightsError when they are not trained yet."""
    path = weights_path(target_name)
    if not path.is_file():
        raise MissingWeightsError(
            f"no adversarially fine-tuned weights for {target_name} at {path}: run `{train_hint(target_name)}` first."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "calibration" not in checkpoint:
        raise MissingWeightsError(f"{path} is an unfinished run: run `{train_hint(target_name)}` again to finish it.")
    missing = set(checkpoint["state"]) - {name for name, _ in model.named_parameters()}
    if missing:
        raise MissingWeightsError(f"{path} does not fit {target_name} (no parameter {sorted(missing)[0]}).")
    model.load_state_dict(checkpoint["state"], strict=False)
    config, report = AdvTrainConfig(**checkpoint["config"]), checkpoint["calibration"]
    return replace(
        model.card,
        name=f"{target_name}-at",
        threshold=report["threshold"],
        threshold_far=report["threshold_far"],
        calibration=f"`redteam train adv` on {checkpoint['data']}: {report['genuine_pairs']} genuine and "
        f"{report['impostor_pairs']} impostor pairs of its training identities; balanced accuracy "
        f"{report['accuracy']:.3f} at the threshold, TAR {report['tar_at_far']:.3f} at FAR {report['far']:g}, "
        f"AUC {report['auc']:.4f}",
        metrics={},
        notes=f"adversarially fine-tuned ({config.blocks!r} trained, the rest frozen): {config.epochs} epoch(s) of "
        f"{config.steps}-step ℓ∞ PGD at {config.eps:g}/255 on {checkpoint['images']} faces, "
        f"{checkpoint['seconds'] / 60:.0f} min on {checkpoint['device']}",
    )


@DEFENSES.register("adv-train", "adversarial fine-tuning: the target's last blocks retrained against PGD")
class AdversarialFineTuning(ModelWrapper):
    """The target with its adversarially fine-tuned blocks (``redteam train adv``), as a new model: the target it
    is given is left untouched (an undefended cell may still use it)."""

    name = "adv-train"

    def wrap(self, target: nn.Module, target_name: str) -> nn.Module:
        from redteam.engine import load_target

        defended = load_target(target_name, target.device, target.threshold_override)
        defended.card = apply_adversarial_weights(defended, target_name)
        return defended


def train_adversarially(
    config: AdvTrainConfig,
    dataset: FaceDataset,
    device: torch.device,
    restart: bool = False,
    advance: Callable[[int], None] = lambda n: None,
) -> dict:
    """Fine-tune ``config.blocks`` of ``config.target`` against PGD on ``dataset``; checkpoints every few batches
    to :func:`weights_path` (a resumed run skips the batches done, whose order is fixed by the seed), then
    calibrates the threshold on ``dataset``. Returns the checkpoint."""
    from redteam.engine import load_target, seeded_generator

    path = weights_path(config.target)
    reference = load_target(config.target, device)  # the frozen original: the embeddings to pull back to
    model = load_target(config.target, device)  # a separate copy (converted graphs cannot be deep-copied)
    if not isinstance(model, FaceRecognizer):
        raise RedteamError(f"adversarial fine-tuning is for recognisers; {config.target} is a detector.")
    trained = fine_tuned_parameters(model, config.blocks)
    for parameter in trained.values():
        parameter.requires_grad_(True)
    optimiser = torch.optim.Adam(trained.values(), lr=config.learning_rate)
    count = min(config.limit or len(dataset), len(dataset))
    checkpoint = {"config": asdict(config), "data": dataset.name, "images": count, "step": 0, "history": []}
    checkpoint.update(seconds=0.0, device=str(device))
    if path.is_file() and not restart:
        previous = torch.load(path, map_location="cpu", weights_only=True)
        if not AdvTrainConfig(**previous["config"]).resumable_with(config):
            raise RedteamError(f"{path} was trained with other settings; pass --restart to train it again.")
        model.load_state_dict(previous["state"], strict=False)
        optimiser.load_state_dict(previous["optimiser"])
        checkpoint.update({k: previous[k] for k in ("step", "history", "seconds", "calibration") if k in previous})
    attack = PGD(steps=config.steps, early_stop=False)
    budget = Budget("linf", config.eps / 255)
    batches = [
        order[start : start + config.batch_size].tolist()
        for epoch in range(config.epochs)
        for order in [torch.randperm(count, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))]
        for start in range(0, count, config.batch_size)
    ]
    advance(sum(len(b) for b in batches[: checkpoint["step"]]))
    started = time.perf_counter()
    for step in range(checkpoint["step"], len(batches)):
        images = dataset.load(batches[step]).to(device)
        with torch.no_grad():
            anchor = reference.embed(images)
        objective = VerificationObjective(model.embed, model.similarity, model.threshold, False, anchor)
        adversarial = attack(objective, images, budget, seeded_generator(device, config.seed, "adv", step)).images
        adversarial_similarity = F.cosine_similarity(model.embed(adversarial), anchor, dim=-1).mean()
        clean_similarity = F.cosine_similarity(model.embed(images), anchor, dim=-1).mean()
        loss = (1 - adversarial_similarity) + config.clean_weight * (1 - clean_similarity)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        checkpoint.pop("calibration", None)  # the model changed: calibrate again at the end
        similarities = {"adversarial_similarity": adversarial_similarity, "clean_similarity": clean_similarity}
        checkpoint["history"].append({name: float(value.detach()) for name, value in similarities.items()})
        checkpoint["step"] = step + 1
        advance(len(batches[step]))
        if checkpoint["step"] % config.checkpoint_every == 0 or checkpoint["step"] == len(batches):
            checkpoint["seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            _save(checkpoint, model, trained, optimiser, path)
    if "calibration" not in checkpoint:
        report = calibrate(model.requires_grad_(False), dataset, config.impostors)
        checkpoint["calibration"] = report.to_dict()
        _save(checkpoint, model, trained, optimiser, path)
    return checkpoint


def _save(
    checkpoint: dict, model: nn.Module, trained: dict[str, nn.Parameter], optimiser: torch.optim.Optimizer, path: Path
) -> None:
    state = model.state_dict()
    checkpoint.update(state={name: state[name].cpu() for name in trained}, optimiser=optimiser.state_dict())
    save_atomic(checkpoint, path)
