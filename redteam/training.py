"""`redteam train ...`: training the defenses that need weights (lqvae purifier, adversarial fine-tuning).

Weights go to ``redteam.assets.cache_dir() / "defenses"`` with their training settings and history; every command is
seeded and checkpoints as it goes, so running it again after an interruption carries on where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer
from rich.markup import escape
from torch import nn

from redteam.api import Budget, FaceRecognizer
from redteam.assets import save_atomic
from redteam.attacks.pgd import PGD
from redteam.console import console, progress
from redteam.datasets import FaceDataset, open_dataset
from redteam.defenses.lqvae import LQVAEConfig, default_path, face_crops, train_lqvae
from redteam.engine import load_target
from redteam.errors import RedteamError
from redteam.finetune import AdvTrainConfig, fine_tuned_parameters, weights_path
from redteam.metrics import calibrate
from redteam.runtime import prepare_torch, resolve_device, seeded_generator
from redteam.threats import VerificationObjective

train_app = typer.Typer(
    help="Train defenses that need weights; they are saved in the redteam cache.", no_args_is_help=True
)


@train_app.command()
def lqvae(
    data: Annotated[str, typer.Option(help="Identity folders disjoint from your evaluation faces (e.g. faces-train).")],
    epochs: Annotated[int, typer.Option(help="Passes over the training faces.")] = 10,
    image_size: Annotated[int, typer.Option(help="Side of the face crop the VAE works on (multiple of 8).")] = 64,
    latent_channels: Annotated[int, typer.Option(help="Bits per latent position (an S/8 x S/8 grid).")] = 16,
    channels: Annotated[int, typer.Option(help="Width of the first convolution.")] = 32,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    limit: Annotated[int | None, typer.Option(help="Train on the first N images only (quick trials).")] = None,
    seed: int = 0,
    restart: Annotated[bool, typer.Option(help="Discard an existing checkpoint instead of resuming it.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
) -> None:
    """Train the LQ-VAE purifier (`--defense lqvae`) on face crops; resumes from its last finished epoch."""
    prepare_torch()
    config = LQVAEConfig(
        image_size=image_size,
        latent_channels=latent_channels,
        channels=channels,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
    )
    dataset = open_dataset(data)
    count = min(limit or len(dataset), len(dataset))
    path, started = default_path(), time.perf_counter()
    with progress() as tracker:
        task = tracker.add_task("reading faces", total=count)
        crops = face_crops(dataset, config, count, advance=lambda n: tracker.advance(task, n))
        task = tracker.add_task("training", total=epochs * count)
        checkpoint = train_lqvae(
            config,
            crops,
            path,
            resolve_device(device),
            restart,
            lambda n: tracker.advance(task, n),
            trained_on=dataset.spec,
        )
    for epoch, losses in enumerate(checkpoint["history"], start=1):
        console.print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()), highlight=False)
    elapsed = time.perf_counter() - started
    console.print(
        escape(f"lqvae: {count} faces from {dataset.description} -> {path} ({elapsed:.0f} s)"), highlight=False
    )


@train_app.command()
def adv(
    data: Annotated[str, typer.Option(help="Identity folders disjoint from your evaluation faces (e.g. faces-train).")],
    target: Annotated[str, typer.Option(help="Recogniser to fine-tune.")] = "facenet",
    blocks: Annotated[
        str | None, typer.Option(help="Regular expression over parameter names: the blocks to fine-tune.")
    ] = None,
    eps: Annotated[float, typer.Option(help="ℓ∞ budget of the training attack, /255.")] = 4.0,
    steps: Annotated[int, typer.Option(help="PGD steps per batch.")] = 2,
    epochs: int = 1,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    limit: Annotated[int, typer.Option(help="Train on N images (0: all of them).")] = 480,
    seed: int = 0,
    restart: Annotated[bool, typer.Option(help="Discard an existing checkpoint instead of resuming it.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
) -> None:
    """Adversarially fine-tune a recogniser's last blocks (`--defense adv-train`, `facenet-at`) and calibrate it."""
    prepare_torch()
    config = AdvTrainConfig(
        target=target,
        blocks=blocks or "",
        eps=eps,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        limit=limit or None,
        seed=seed,
    )
    dataset = open_dataset(data)
    started = time.perf_counter()
    with progress() as tracker:
        task = tracker.add_task("fine-tuning", total=epochs * min(config.limit or len(dataset), len(dataset)))
        checkpoint = train_adversarially(
            config, dataset, resolve_device(device), restart, lambda n: tracker.advance(task, n)
        )
    history = checkpoint["history"]
    for name in ("clean_similarity", "adversarial_similarity"):
        first, last = (sum(h[name] for h in part) / len(part) for part in (history[:10], history[-10:]))
        console.print(f"{name} to the original embedding: {first:.3f} (first 10 batches) -> {last:.3f} (last 10)")
    report = checkpoint["calibration"]
    summary = (
        f"{target}-at: threshold {report['threshold']:.4f} (accuracy {report['accuracy']:.4f} on {dataset.name}), "
        f"{len(history)} batches in {checkpoint['seconds'] / 60:.1f} min -> {weights_path(target)} "
        f"({time.perf_counter() - started:.0f} s in all)"
    )
    console.print(escape(summary), highlight=False)


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
    path = weights_path(config.target)
    reference = load_target(config.target, device)  # the frozen original: the embeddings to pull back to
    model = load_target(config.target, device)  # a separate copy (converted graphs cannot be deep-copied)
    if not isinstance(model, FaceRecognizer) or not isinstance(reference, FaceRecognizer):
        raise RedteamError(f"adversarial fine-tuning is for recognisers; {config.target} is a detector.")
    trained = fine_tuned_parameters(model, config.blocks)
    for parameter in trained.values():
        parameter.requires_grad_(True)
    optimiser = torch.optim.Adam(trained.values(), lr=config.learning_rate)
    count = min(config.limit or len(dataset), len(dataset))
    checkpoint: dict[str, Any] = {
        "config": asdict(config),
        "data": dataset.name,
        "images": count,
        "step": 0,
        "history": [],
    }
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
