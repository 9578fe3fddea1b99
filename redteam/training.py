"""`redteam train ...`: training the defenses that need weights (lqvae purifier, adversarial fine-tuning).

Weights go to ``redteam.assets.cache_dir() / "defenses"`` with their training settings and history; every command is
seeded and checkpoints as it goes, so running it again after an interruption carries on where it stopped.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

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
    import torch

    from redteam.cli import _progress, console
    from redteam.datasets import open_dataset
    from redteam.defenses.lqvae import LQVAEConfig, default_path, face_crops, train_lqvae
    from redteam.engine import resolve_device

    torch.set_flush_denormal(True)
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
    with _progress() as progress:
        task = progress.add_task("reading faces", total=count)
        crops = face_crops(dataset, config, count, advance=lambda n: progress.advance(task, n))
        task = progress.add_task("training", total=epochs * count)
        checkpoint = train_lqvae(
            config, crops, path, resolve_device(device), restart, lambda n: progress.advance(task, n)
        )
    for epoch, losses in enumerate(checkpoint["history"], start=1):
        console.print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()), highlight=False)
    console.print(f"lqvae: {count} faces from {dataset.description} -> {path} ({time.perf_counter() - started:.0f} s)")



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
    import torch

    from redteam.cli import _progress, console
    from redteam.datasets import open_dataset
    from redteam.defenses.adv_train import AdvTrainConfig, train_adversarially, weights_path
    from redteam.engine import resolve_device

    torch.set_flush_denormal(True)
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
    with _progress() as progress:
        task = progress.add_task("fine-tuning", total=epochs * min(config.limit or len(dataset), len(dataset)))
        checkpoint = train_adversarially(
            config, dataset, resolve_device(device), restart, lambda n: progress.advance(task, n)
        )
    history = checkpoint["history"]
    for name in ("clean_similarity", "adversarial_similarity"):
        first, last = (sum(h[name] for h in part) / len(part) for part in (history[:10], history[-10:]))
        console.print(f"{name} to the original embedding: {first:.3f} (first 10 batches) -> {last:.3f} (last 10)")
    report = checkpoint["calibration"]
    console.print(
        f"{target}-at: threshold {report['threshold']:.4f} (accuracy {report['accuracy']:.4f} on {dataset.name}), "
        f"{len(history)} batches in {checkpoint['seconds'] / 60:.1f} min -> {weights_path(target)} "
        f"({time.perf_counter() - started:.0f} s in all)"
    )
