"""Run an evaluation: one target, attack and threat model over a ladder of budgets, stored per probe.

Budgets are visited in increasing order and only the probes still decided correctly are attacked again (as
AutoAttack does): an adversarial example found within a smaller ball lies inside every larger one, so those probes
count as broken at the larger budgets too (``inherited``). The curve is monotone by construction and the
work shrinks with every budget.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from redteam import attacks as _attacks  # noqa: F401  (registers the attacks)
from redteam import targets as _targets  # noqa: F401  (registers the targets)
from redteam.attacks.base import ATTACKS, Budget, Norm, perturbation_size
from redteam.datasets import FaceDataset, open_dataset
from redteam.errors import RedteamError
from redteam.results import ResultStore, accuracy_curve
from redteam.targets.base import TARGETS, FaceRecognizer
from redteam.threats import THREATS, Probe, ThreatModel


@dataclass
class EvaluationConfig:
    """Everything that determines the per-probe results of one cell (``out`` and ``limit`` only choose where and how
    many; ``eps`` lists the budgets to visit, in /255 for ℓ∞)."""

    target: str
    attack: str
    data: str = "default"
    threat: str = "dodging"
    norm: Norm = "linf"
    eps: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)
    limit: int | None = None
    seed: int = 0
    attack_options: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    align: bool = False
    batch_size: int = 16
    device: str = "auto"
    defense: str = "none"

    def budgets(self) -> list[float]:
        """Budgets in image units, ascending, always starting with the clean point 0."""
        for eps in self.eps:
            if eps < 0:
                raise RedteamError(f"budget {eps} is negative.")
            if self.norm == "linf" and eps > 255:
                raise RedteamError(f"ℓ∞ budget {eps}/255 exceeds the whole pixel range.")
        scale = 1 / 255 if self.norm == "linf" else 1.0
        return sorted({0.0, *(float(e) * scale for e in self.eps)})

    def cell(self) -> str:
        """Key of the results this config produces (independent of ``eps``, ``limit``, batch size and device)."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("eps", "limit", "batch_size", "device")}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RedteamError("--device cuda asked for, but PyTorch sees no CUDA device.")
    return torch.device(name)


def load_target(name: str, device: torch.device, threshold: float | None = None) -> FaceRecognizer:
    target = TARGETS.get(name)().eval().to(device)
    for parameter in target.parameters():
        parameter.requires_grad_(False)  # attacks need gradients for inputs only
    if threshold is not None:
        target.threshold_override = threshold
    return target


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Evaluation:
    """A prepared evaluation: call :meth:`run` to fill the store, then read :meth:`curve`."""

    config: EvaluationConfig
    store: ResultStore
    target: FaceRecognizer = field(init=False)
    dataset: FaceDataset = field(init=False)
    threat: ThreatModel = field(init=False)
    probes: list[Probe] = field(init=False)

    def __post_init__(self) -> None:
        if torch.get_default_dtype() != torch.float32:
            raise RedteamError("redteam evaluates in float32.")
        torch.set_flush_denormal(True)  # denormals make CPU convolutions ~30x slower
        config = self.config
        self.device = resolve_device(config.device)
        self.budgets = config.budgets()
        attack_class = ATTACKS.get(config.attack)
        settings = {f.name for f in fields(attack_class)}
        unknown = sorted(set(config.attack_options) - settings)
        if unknown:
            raise RedteamError(
                f"{config.attack} has no setting {', '.join(unknown)}; it takes {', '.join(sorted(settings))}."
            )
        self.attack = attack_class(**config.attack_options)
        threat_class = THREATS.get(config.threat)
        self.dataset = open_dataset(config.data, align=config.align)
        self.threat = threat_class(self.dataset, seed=config.seed)
        self.probes = self.threat.probes(config.limit)
        self.target = load_target(config.target, self.device, config.threshold)
        self.cell = config.cell()
        self.store.register_cell(self.cell, {**asdict(config), "cell": self.cell})

    def embed(self, images: Tensor) -> Tensor:
        return self.target.embed(images)

    def _encode(self, indices: list[int]) -> Tensor:
        with torch.no_grad():
            parts = [
                self.embed(self.dataset.load(chunk).to(self.device))
                for chunk in _chunks(indices, self.config.batch_size)
            ]
        return torch.cat(parts)

    def total_work(self) -> int:
        return len(self.probes) * len(self.budgets)

    def run(self, advance: Callable[[int], None] = lambda n: None) -> None:
        """Evaluate every budget, skipping what the store already holds; ``advance(n)`` reports progress."""
        self.threat.enrol(self._encode, self.probes)
        previous: pd.DataFrame | None = None
        for level, eps in enumerate(self.budgets):
            stored = self.store.frame(self.cell, eps)
            done = set(stored["probe"])
            advance(sum(p.key in done for p in self.probes))
            if previous is None:
                attacked, broken = self.probes, []
            else:
                still_correct = set(previous.loc[previous["correct"], "probe"])
                attacked = [p for p in self.probes if p.key in still_correct]
                broken = [p for p in self.probes if p.key not in still_correct and p.key not in done]
                self.store.append(
                    [
                        self._inherited_row(row, eps)
                        for _, row in previous[previous["probe"].isin({p.key for p in broken})].iterrows()
                    ]
                )
                advance(len(broken))
            # Fixed batches over all probes attacked at this budget: a resumed run forms exactly the same ones.
            for batch_number, batch in enumerate(_chunks(attacked, self.config.batch_size)):
                if all(p.key in done for p in batch):
                    continue
                self.store.append(self._evaluate_batch(batch, eps, level, batch_number))
                advance(len(batch))
            previous = self.store.frame(self.cell, eps)
            previous = previous[previous["probe"].isin({p.key for p in self.probes})]

    def _evaluate_batch(self, batch: list[Probe], eps: float, level: int, batch_number: int) -> list[dict]:
        images = self.dataset.load([p.image for p in batch]).to(self.device)
        objective = self.threat.objective(self.embed, self.target, batch)
        if eps == 0:
            adversarial, steps = images, torch.zeros(len(batch), dtype=torch.long)
        else:
            generator = torch.Generator(self.device).manual_seed(
                int(hashlib.sha256(f"{self.config.seed}:{level}:{batch_number}".encode()).hexdigest()[:15], 16)
            )
            result = self.attack(objective, images, Budget(self.config.norm, eps), generator)
            adversarial, steps = result.images, result.steps
        with torch.no_grad():  # the verdict that is recorded: a fresh look at the final images
            verdict = objective(adversarial)
        delta = adversarial - images
        linf, l2 = perturbation_size(delta, "linf"), perturbation_size(delta, "l2")
        return [
            self._row(
                probe,
                eps,
                not bool(verdict.success[k]),
                float(verdict.score[k]),
                float(linf[k]),
                float(l2[k]),
                int(steps[k]),
            )
            for k, probe in enumerate(batch)
        ]

    def _row(self, probe: Probe, eps: float, correct: bool, score: float, linf: float, l2: float, steps: int) -> dict:
        config = self.config
        return {
            "cell": self.cell,
            "target": config.target,
            "defense": config.defense,
            "attack": config.attack,
            "threat": config.threat,
            "norm": config.norm,
            "dataset": self.dataset.name,
            "eps": eps,
            "probe": probe.key,
            "image": probe.image,
            "reference": probe.reference,
            "identity": self.dataset.records[probe.image].identity,
            "correct": int(correct),
            "score": score,
            "linf": linf,
            "l2": l2,
            "steps": steps,
            "inherited": 0,
        }

    def _inherited_row(self, row: pd.Series, eps: float) -> dict:
        return {**row.to_dict(), "eps": eps, "correct": 0, "inherited": 1, "steps": 0}

    def curve(self) -> pd.DataFrame:
        results = self.store.frame(self.cell)
        results = results[results["probe"].isin({p.key for p in self.probes}) & results["eps"].isin(self.budgets)]
        return accuracy_curve(results)
