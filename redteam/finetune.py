"""Fine-tuning parts of a recogniser: choosing its parameters by name, and the adversarially fine-tuned weights that
``redteam train adv`` writes and the ``adv-train`` defense and ``facenet-at`` target load.

Only the fine-tuned parameters are saved, keyed by the base weights' checksum, with a threshold calibrated on the
training faces.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from redteam.api.targets import TARGETS, FaceRecognizer, ModelCard
from redteam.assets import cache_dir
from redteam.errors import MissingWeightsError, RedteamError

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


def tar_text(report: dict) -> str:
    """``TAR 0.874 at FAR 0.001``, or why it was not measured (too few impostor pairs for that rate)."""
    if report["tar_at_far"] is None:
        return f"TAR at FAR {report['far']:g} not measurable on {report['impostor_pairs']} impostor pairs"
    return f"TAR {report['tar_at_far']:.3f} at FAR {report['far']:g}"


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
        f"{report['accuracy']:.3f} at the threshold, {tar_text(report)}, AUC {report['auc']:.4f}",
        metrics={},
        notes=f"adversarially fine-tuned ({config.blocks!r} trained, the rest frozen): {config.epochs} epoch(s) of "
        f"{config.steps}-step ℓ∞ PGD at {config.eps:g}/255 on {checkpoint['images']} faces, "
        f"{checkpoint['seconds'] / 60:.0f} min on {checkpoint['device']}",
    )
