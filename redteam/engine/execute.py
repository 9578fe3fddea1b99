"""Executing an evaluation's batches: the models of one cell, its enrolments, and ``compute(shard) -> rows``.

An executor holds no store: the planner (:mod:`redteam.engine.plan`) decides what to compute and records the rows,
in this process or, for a Ray sweep, in the driver while workers run executors.

With a ``surrogate``, adversarial examples are crafted on the surrogate and judged on the target (transfer). With a
defense, the judge is the defended target as deployed and the attack differentiates it through BPDA/EOT
(adaptive) or differentiates the undefended target (non-adaptive).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from redteam.api import Attack, Budget, MinimalAttack, Target, perturbation_size
from redteam.engine.assembly import behind_transforms, drawing_from, load_target, wrap_model
from redteam.engine.plan import Cell, Shard, result_row
from redteam.errors import RedteamError
from redteam.runtime import autocast, chunks, fit_batch_size, resolve_device, seeded_generator
from redteam.threats import Enrolment, Objective, Probe


class Executor:
    """The loaded models of ``cell`` on ``device``: ``target`` judges (the target behind its defense, as deployed);
    ``crafting`` is what the attack differentiates (the target, a transfer surrogate, or the BPDA view of the
    defense). Both enrol the probes' enrolment images once."""

    def __init__(self, cell: Cell, device: torch.device | None = None):
        self.cell = cell
        config = cell.config
        self.device = device or resolve_device(config.device)
        weights = Path(config.weights) if config.weights else None
        undefended = load_target(config.target, self.device, config.threshold, weights)
        model = wrap_model(undefended, config, cell.defense)
        self.target = behind_transforms(model, config, cell.defense, adaptive=False)
        crafting = model if config.adaptive else undefended
        if config.surrogate:
            crafting = load_target(config.surrogate, self.device)
        if config.adaptive:
            crafting = behind_transforms(crafting, config, cell.defense, adaptive=True)
        self.crafting = crafting
        self.batch_size = self._batch_size()
        self.enrolment = self._enrol(self.target)
        self.crafting_enrolment = self.enrolment if crafting is self.target else self._enrol(crafting)

    def _batch_size(self) -> int:
        requested = self.cell.config.batch_size
        if requested != "auto":
            return requested
        images = self.cell.dataset.load([p.image for p in self.cell.probes[:2]])
        return fit_batch_size(self.crafting, images, self.device)

    def _enrol(self, model: Target) -> Enrolment:
        """The enrolment images embedded by ``model`` (no gradient). A randomised defense draws from a generator of
        its own, the same for judge and attacker: both enrol the same purified faces."""

        def encode(indices: list[int]) -> Tensor:
            with torch.no_grad():
                batches = chunks(indices, self.batch_size)
                return torch.cat([model(self.cell.dataset.load(c).to(self.device)) for c in batches])

        with drawing_from(self.generator("enrol"), model):
            return self.cell.threat.enrol(encode, self.cell.probes)

    def generator(self, *parts: object) -> torch.Generator:
        """A generator for ``parts`` of this cell's run (same seed, same draws, in any process)."""
        return seeded_generator(self.device, self.cell.config.seed, *parts)

    def objectives(self, batch: list[Probe]) -> tuple[Objective, Objective]:
        """(what the attack maximises, what judges the result): the same unless crafting on another model."""
        threat = self.cell.threat
        verdict = threat.objective(self.target, self.enrolment, batch)
        if self.crafting is self.target:
            return verdict, verdict
        return threat.objective(self.crafting, self.crafting_enrolment, batch), verdict

    def compute(self, shard: Shard) -> list[dict[str, Any]]:
        """The rows of one batch, for the planner to record."""
        if shard.minimal:
            return self._attack_minimal(list(shard.probes), shard.number)
        return self._evaluate_batch(list(shard.probes), shard.eps, shard.level, shard.number)

    def craft(
        self, batch: list[Probe], eps: float, level: int, batch_number: int
    ) -> tuple[Tensor, Tensor, Tensor, Objective]:
        """Attack one batch of the ladder exactly as the run does (same seeds): ``(images, adversarial, steps,
        verdict)`` with images ``[B, 3, H, W]``, steps ``[B]``. Randomised defenses keep drawing from the batch's
        generator while the verdict is judged (as the run judges it); reports re-create stored examples with it."""
        images = self.cell.dataset.load([p.image for p in batch]).to(self.device)
        crafting, verdict = self.objectives(batch)
        if eps == 0:
            return images, images, torch.zeros(len(batch), dtype=torch.long), verdict
        attack = self.cell.attack
        assert isinstance(attack, Attack)
        generator = self.generator(level, batch_number)
        with autocast(self.device, self.cell.config.precision):  # type: ignore[arg-type]
            result = attack(crafting, images, Budget(self.cell.config.norm, eps), generator)  # type: ignore[arg-type]
        return images, result.images, result.steps, verdict

    def _evaluate_batch(self, batch: list[Probe], eps: float, level: int, batch_number: int) -> list[dict]:
        with drawing_from(self.generator("defense", level, batch_number), self.crafting, self.target):
            images, adversarial, steps, verdict = self.craft(batch, eps, level, batch_number)
            with torch.no_grad():  # the verdict that is recorded: a fresh look at the final images, by the target
                judged = verdict(adversarial)
        delta = adversarial - images
        linf, l2 = perturbation_size(delta, "linf"), perturbation_size(delta, "l2")
        return [
            result_row(self.cell, probe, eps, not bool(judged.success[k]), judged.score[k], linf[k], l2[k], steps[k])
            for k, probe in enumerate(batch)
        ]

    def _attack_minimal(self, batch: list[Probe], batch_number: int) -> list[dict]:
        """Each probe's smallest fooling perturbation (``inf`` where the target is not fooled): rows of ``minimal``."""
        attack = self.cell.attack
        if not isinstance(attack, MinimalAttack):
            raise RedteamError(f"{attack.name} is not a minimal-perturbation attack.")
        images = self.cell.dataset.load([p.image for p in batch]).to(self.device)
        objective, verdict = self.objectives(batch)
        with drawing_from(self.generator("defense", "min", batch_number), self.crafting, self.target):
            with autocast(self.device, self.cell.config.precision):  # type: ignore[arg-type]
                result = attack(objective, images, self.generator("min", batch_number))
            with torch.no_grad():
                judged = verdict(result.images)
        delta = result.images - images
        size = torch.where(judged.success, result.size, torch.full_like(result.size, float("inf")))
        linf, l2 = perturbation_size(delta, "linf"), perturbation_size(delta, "l2")
        return [
            {
                "cell": self.cell.key,
                "probe": p.key,
                "size": float(size[k]),
                "score": float(judged.score[k]),
                "linf": float(linf[k]),
                "l2": float(l2[k]),
                "steps": int(result.steps[k]),
            }  # fmt: skip
            for k, p in enumerate(batch)
        ]
