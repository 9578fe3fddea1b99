"""Executing an evaluation's batches: the models of one cell, its enrolments, and ``compute(shard) -> rows``.

An executor holds no store: the planner (:mod:`redteam.engine.plan`) decides what to compute and records the rows,
in this process or, for a Ray sweep, in the driver while workers run executors.

With a ``surrogate`` (one target, or an ensemble of several), adversarial examples are crafted on it and judged on
the target (transfer); a query attack starts from such an example instead, spending no query on it. With a
defense, the judge is the defended target as deployed and the attack differentiates it through BPDA/EOT
(adaptive) or differentiates the undefended target (non-adaptive).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from redteam.api import (
    Attack,
    Budget,
    FaceRecognizer,
    MinimalAttack,
    MinimalQueryAttack,
    Oracle,
    QueryAttack,
    QueryResult,
    Target,
    final_stages,
    perturbation_size,
)
from redteam.budgets import display_eps, eight_bit
from redteam.datasets import open_dataset
from redteam.engine.assembly import (
    DECISION_START_EPS,
    TRANSFER_ATTACK,
    InputDefense,
    behind_transforms,
    drawing_from,
    load_crafting_model,
    load_target,
    wrap_model,
)
from redteam.engine.config import instantiate
from redteam.engine.eot import PROBES as EOT_PROBES
from redteam.engine.eot import EotChoice, choose_eot
from redteam.engine.operating import recalibrated_threshold
from redteam.engine.plan import Cell, Computed, Shard, result_row
from redteam.errors import RedteamError
from redteam.evidence import as_saved
from redteam.results import QueryLedger
from redteam.runtime import autocast, chunks, fit_batch_size, resolve_device, seeded_generator
from redteam.threats import Enrolment, Objective, Probe, Verdict

#: Draws a randomised defense is judged over (an odd number: a majority always exists).
JUDGE_DRAWS = 5
#: Recalibrated thresholds (and false accept rates) found in this process, by :meth:`Executor.deployed_system`.
_RECALIBRATED: dict[tuple, tuple[float, float]] = {}


class Executor:
    """The loaded models of ``cell`` on ``device``: ``target`` judges (the target behind its defense, as deployed);
    ``crafting`` is what the attack differentiates (the target, a transfer surrogate, or the BPDA view of the
    defense). Both enrol the probes' enrolment images once."""

    def __init__(self, cell: Cell, device: torch.device | None = None):
        self.cell = cell
        config = cell.config
        self.device = device or resolve_device(config.device)
        weights = Path(config.weights) if config.weights else None
        undefended = load_target(config.target, self.device, config.threshold, weights, config.access, config.forward)
        self.undefended = undefended
        model = wrap_model(undefended, config, cell.defense)
        self.target = behind_transforms(model, config, cell.defense, adaptive=False)
        crafting = model if config.adaptive else undefended
        if config.surrogate:
            crafting = load_crafting_model(config, self.device)
        if config.adaptive:
            crafting = behind_transforms(crafting, config, cell.defense, adaptive=True)
        self.crafting = crafting
        self.batch_size = self._batch_size()
        self.recalibration: tuple[float, float] | None = None  # (threshold, false accept rate) when recalibrated
        if config.recalibration_faces:
            self._recalibrate(config.recalibration_faces)
        self.enrolment = self._enrol(self.target)
        self.crafting_enrolment = self.enrolment if crafting is self.target else self._enrol(crafting)
        self.eot: EotChoice | None = None  # set by settle_eot, once it is known what the store holds

    def deployed_system(self) -> tuple:
        """What identifies the system this cell's verdicts come from: the same for a defense's adaptive and
        non-adaptive cells, so what is measured on it once in a process holds for both."""
        config, fingerprint = self.cell.config, self.cell.fingerprint
        return (config.target, config.weights, config.threshold, config.defense, config.recalibrate, config.seed,
                config.align, fingerprint["images"], fingerprint["defense weights"])  # fmt: skip

    def _recalibrate(self, faces: str) -> None:
        """Move the defended system's threshold (the judge's, and the attacker's view of it) to where it accepts
        the impostors of ``faces`` (a dataset) as often as the undefended one does at its own."""
        config = self.cell.config
        if config.defense == "none" or not isinstance(self.undefended, FaceRecognizer):
            raise RedteamError("--recalibrate moves a defended recogniser's threshold: give it a --defense.")
        system = self.deployed_system()
        if system not in _RECALIBRATED:
            dataset = open_dataset(faces, align=config.align, skip_bad=config.skip_bad_images)
            _RECALIBRATED[system] = recalibrated_threshold(
                self.target, self.undefended, dataset, self.generator("recalibrate"), self.batch_size
            )
        threshold, far = _RECALIBRATED[system]
        for model in {id(m): m for m in (self.target, self.crafting) if m is not self.undefended}.values():
            model.threshold_override = threshold
        self.recalibration = threshold, far

    def settle_eot(self, known: EotChoice | None = None) -> EotChoice | None:
        """Attacking a randomised defense adaptively, unless ``--option eot`` says: the draws per gradient, ``known``
        (measured for this cell before) or measured now on the cell's first probes (:mod:`redteam.engine.eot`), and
        set on the cell's attack. ``None`` where no count is chosen."""
        cell = self.cell
        attack, config = cell.attack, cell.config
        if not (config.adaptive and cell.defense.randomised and attack.supports_eot) or "eot" in config.attack_options:
            return None
        if known is None:
            batch = cell.probes[:EOT_PROBES]
            crafting, _ = self.objectives(batch)
            images = cell.dataset.load([p.image for p in batch]).to(self.device)
            with drawing_from(self.generator("eot"), self.crafting):
                known = choose_eot(crafting, images)
        cell.attack = replace(attack, eot=known.draws)
        self.eot = known
        return known

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

    def keep_ledger(self, ledger: QueryLedger) -> None:
        """Give a target that keeps a query ledger (a deployed system) its cell's."""
        if type(self.undefended).keeps_ledger:
            self.undefended.ledger = ledger

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

    def compute(self, shard: Shard) -> Computed:
        """The rows of one batch (and a query attack's trajectories), for the planner to record."""
        if shard.minimal:
            return self._attack_minimal(list(shard.probes), shard.number)
        return self._evaluate_batch(list(shard.probes), shard.eps, shard.level, shard.number)

    def oracle(self, verdict: Objective, images: Tensor) -> Oracle:
        """The target as a query attack sees it: only what the attack needs (scores or decisions), counted."""
        config, attack = self.cell.config, self.cell.attack
        assert config.queries is not None  # resolve() gives every query attack its budget
        return Oracle(verdict, images, attack.needs, config.queries, config.norm)  # type: ignore[arg-type]

    def craft(self, batch: list[Probe], eps: float, level: int, batch_number: int) -> Crafted:
        """Attack one batch of the ladder exactly as the run does (same seeds). Randomised defenses keep drawing
        from the batch's generator while the verdict is judged (as the run judges it); reports re-create stored
        examples with it."""
        images = self.cell.dataset.load([p.image for p in batch]).to(self.device)
        crafting, verdict = self.objectives(batch)
        if eps == 0:
            return Crafted(images, images, torch.zeros(len(batch), dtype=torch.long), verdict)
        attack, budget = self.cell.attack, Budget(self.cell.config.norm, eps)  # type: ignore[arg-type]
        generator = self.generator(level, batch_number)
        if isinstance(attack, QueryAttack):  # it queries the target as deployed, never the model
            oracle = self.oracle(verdict, images)
            if self.cell.config.surrogate:
                start = self.transfer_examples(crafting, images, budget, generator)
                found = attack(oracle, images, budget, generator, start=start)
            else:
                found = attack(oracle, images, budget, generator)
            # What the system received (the oracle's 8 bits), not the attack's own floats: that is what is judged.
            return Crafted(images, eight_bit(found.images, images), oracle.spent, verdict, oracle)
        assert isinstance(attack, Attack)
        adversarial, steps, parts = self._through_surrogates(attack, crafting, verdict, images, budget, generator)
        return Crafted(images, adversarial, steps, verdict, parts=parts)

    def _through_surrogates(
        self,
        attack: Attack,
        crafting: Objective,
        verdict: Objective,
        images: Tensor,
        budget: Budget,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor, list[str | None] | None]:
        """A gradient attack, adaptive through every BPDA stand-in the defense offers in turn, each only on the
        probes the ones before left standing (worst case per probe) -> (images, steps, what broke each probe)."""
        model = self.crafting
        variants = model.surrogate_variants() if isinstance(model, InputDefense) else []
        if len(variants) < 2:
            with autocast(self.device, self.cell.config.precision):  # type: ignore[arg-type]
                result = attack(crafting, images, budget, generator)
            return result.images, result.steps, result.parts
        assert isinstance(model, InputDefense)
        adversarial, steps = images.clone(), torch.zeros(len(images), dtype=torch.long, device=images.device)
        parts: list[str | None] = [None] * len(images)
        standing = torch.arange(len(images), device=images.device)
        for number, surrogate in enumerate(variants):
            model.variant = number
            again = attack if number == 0 else attack.gradient_parts()  # a stand-in changes only the gradient
            try:
                with autocast(self.device, self.cell.config.precision):  # type: ignore[arg-type]
                    result = again(crafting.select(standing), images[standing], budget, generator)
            finally:
                model.variant = 0
            with torch.no_grad():
                fooled = verdict.select(standing)(result.images).success
            if number == 0:  # the first stand-in's best points stand for probes nothing fools
                adversarial[standing] = result.images
            adversarial[standing[fooled]] = result.images[fooled]
            steps[standing] += result.steps
            found = result.parts or [None] * len(standing)
            for position, k in zip(standing[fooled].tolist(), torch.nonzero(fooled).squeeze(1).tolist()):
                parts[position] = f"{found[k] or attack.name} via {surrogate}"
            standing = standing[~fooled]
            if len(standing) == 0:
                break
        return adversarial, steps, parts

    def _evaluate_batch(self, batch: list[Probe], eps: float, level: int, batch_number: int) -> Computed:
        with drawing_from(self.generator("defense", level, batch_number), self.crafting, self.target):
            crafted = self.craft(batch, eps, level, batch_number)
            with torch.no_grad():  # the verdict that is recorded: a fresh look at the final images, by the target
                judged = self.judge(crafted.verdict, crafted.adversarial)
                stages, live = self.inspect(crafted.adversarial, judged.score)
                delta = crafted.adversarial - crafted.images
                linf, l2 = perturbation_size(delta, "linf"), perturbation_size(delta, "l2")
                evidence = self.evidence(batch, [eps] * len(batch), crafted.adversarial, (linf, l2), judged,
                                         crafted.verdict)  # fmt: skip
        queries = crafted.oracle.spent.tolist() if crafted.oracle else [None] * len(batch)
        parts = crafted.parts or [None] * len(batch)
        rows = [
            result_row(
                self.cell,
                probe,
                eps,
                not bool(judged.success[k]),
                judged.score[k],
                linf[k],
                l2[k],
                crafted.steps[k],
                queries[k],
                stages[k],
                parts[k] if judged.success[k] else None,
                None if live is None else float(live[k]),
            )  # fmt: skip
            for k, probe in enumerate(batch)
        ]
        return Computed(rows, trajectories(crafted.oracle, batch, eps) if crafted.oracle else [], evidence)

    def evidence(
        self,
        batch: list[Probe],
        sizes: list[float],
        images: Tensor,
        perturbation: tuple[Tensor, Tensor],
        judged: Verdict,
        verdict: Objective,
    ) -> list[tuple[dict[str, Any], Tensor]]:
        """The evidence log's entries (:mod:`redteam.evidence`) for the probes ``judged`` fooled, at the budget (or,
        for a minimal attack, the size) each was fooled at, with the perturbation's ℓ∞ and ℓ2 sizes
        (``perturbation``, ``[B]`` each) and the verdict on the image as an 8-bit file holds it."""
        fooled = [k for k in range(len(batch)) if judged.success[k]]
        if not fooled:
            return []
        saved = as_saved(images[fooled])
        again = self.judge(verdict.select(torch.tensor(fooled, device=images.device)), saved)
        config, records = self.cell.config, self.cell.dataset.records
        linf, l2 = perturbation
        entries = []
        for position, k in enumerate(fooled):
            probe = batch[k]
            entries.append({
                "target": config.target, "defense": config.defense_label, "attack": config.attack,
                "threat": config.threat, "norm": config.norm, "eps": display_eps(sizes[k], config.norm),
                "probe": probe.key, "identity": records[probe.image].identity,
                "reference": records[probe.reference].identity if probe.reference >= 0 else None,
                "score": float(judged.score[k]), "threshold": float(self.target.threshold),
                "linf": float(linf[k]), "l2": float(l2[k]),
                "saved_fooled": bool(again.success[position]), "saved_score": float(again.score[position]),
            })  # fmt: skip
        return [(entry, images[k].cpu()) for entry, k in zip(entries, fooled)]

    def judge(self, verdict: Objective, images: Tensor) -> Verdict:
        """The recorded verdict on ``images``: one look at a deterministic system; a randomised defense is asked
        :data:`JUDGE_DRAWS` times (its draws go on), the probe counting as fooled when most draws are fooled, with
        the draws' mean score (one lucky draw is not a broken probe, nor one unlucky draw a robust one)."""
        if not self.cell.defense.randomised:
            return verdict(images)
        draws = [verdict(images) for _ in range(JUDGE_DRAWS)]
        return Verdict(
            loss=torch.stack([d.loss for d in draws]).mean(0),
            success=torch.stack([d.success for d in draws]).float().mean(0) > 0.5,
            score=torch.stack([d.score for d in draws]).mean(0),
        )

    def inspect(self, images: Tensor, scores: Tensor) -> tuple[list[str | None], Tensor | None]:
        """Where a face system stopped each image (``SYSTEM_STAGES``; ``None`` each for a single model) and its
        liveness check's scores (``None`` without one), from one look at the images as the system sees them: after
        its defense's and intruder's transforms."""
        inspected = self.target.inspect(images)
        if inspected is None:
            return [None] * len(images), None
        before, live = inspected
        return list(final_stages(before, scores, self.target.threshold)), live

    def _attack_minimal(self, batch: list[Probe], batch_number: int) -> Computed:
        """Each probe's smallest fooling perturbation (``inf`` where the target is not fooled): rows of ``minimal``."""
        attack = self.cell.attack
        images = self.cell.dataset.load([p.image for p in batch]).to(self.device)
        objective, verdict = self.objectives(batch)
        oracle = None
        with drawing_from(self.generator("defense", "min", batch_number), self.crafting, self.target):
            generator = self.generator("min", batch_number)
            if isinstance(attack, MinimalQueryAttack):  # decisions only: from starts already on the wrong side
                oracle = self.oracle(verdict, images)
                result = attack(oracle, images, self.starting_points(batch, oracle, images), generator)
                steps = oracle.spent
            else:
                if not isinstance(attack, MinimalAttack):
                    raise RedteamError(f"{attack.name} is not a minimal-perturbation attack.")
                with autocast(self.device, self.cell.config.precision):  # type: ignore[arg-type]
                    found = attack(objective, images, generator)
                result, steps = QueryResult(found.images, found.size), found.steps
            with torch.no_grad():
                judged = verdict(result.images)
                delta = result.images - images
                linf, l2 = perturbation_size(delta, "linf"), perturbation_size(delta, "l2")
                evidence = self.evidence(batch, result.size.tolist(), result.images, (linf, l2), judged, verdict)
                stages, _ = self.inspect(result.images, judged.score)
        size = torch.where(judged.success, result.size, torch.full_like(result.size, float("inf")))
        rows = [
            {
                "cell": self.cell.key,
                "probe": p.key,
                "size": float(size[k]),
                "score": float(judged.score[k]),
                "linf": float(linf[k]),
                "l2": float(l2[k]),
                "steps": int(steps[k]),
                "queries": int(oracle.spent[k]) if oracle else None,
                "stage": stages[k],
            }  # fmt: skip
            for k, p in enumerate(batch)
        ]
        return Computed(rows, trajectories(oracle, batch, 0.0) if oracle else [], evidence)

    def transfer_examples(
        self, crafting: Objective, images: Tensor, budget: Budget, generator: torch.Generator
    ) -> Tensor:
        """Adversarial examples of ``images`` within ``budget`` crafted on the surrogates by the transfer attack
        (:data:`~redteam.engine.assembly.TRANSFER_ATTACK`): a query attack's start, at no query."""
        attack = instantiate(TRANSFER_ATTACK, {"early_stop": False})
        assert isinstance(attack, Attack)
        with autocast(self.device, self.cell.config.precision):  # type: ignore[arg-type]
            return attack(crafting, images, budget, generator).images.detach()

    def starting_points(self, batch: list[Probe], oracle: Oracle, images: Tensor) -> Tensor:
        """Where a decision-based attack starts, per probe: the first candidate the target already decides wrongly
        on (each try a counted query), else a blank grey image; the image itself (nothing to shrink) for a probe
        where none works. The candidates: with ``--surrogate``, a transfer example at ℓ∞
        :data:`~redteam.engine.assembly.DECISION_START_EPS` (far closer than another face), then the threat's
        starting images (another person's photos for dodging, the victim's for impersonation)."""
        starts = images.clone()
        found = torch.zeros(len(batch), dtype=torch.bool)
        candidates: list[list[int | Tensor]] = [list(self.cell.threat.starting_images(probe)) for probe in batch]
        if self.cell.config.surrogate:
            crafting, _ = self.objectives(batch)
            budget = Budget("linf", DECISION_START_EPS)
            transferred = self.transfer_examples(crafting, images, budget, self.generator("start", batch[0].key))
            candidates = [[transferred[k].cpu(), *c] for k, c in enumerate(candidates)]
        for attempt in range(max((len(c) for c in candidates), default=0) + 1):
            trying = [k for k in range(len(batch)) if not found[k] and attempt <= len(candidates[k])]
            trying = [k for k in trying if int(oracle.remaining()[k]) > 0]
            if not trying:
                break
            tried = [self._candidate(candidates[k][attempt]) if attempt < len(candidates[k])
                     else torch.full_like(images[k], 0.5).cpu()  # no face at all
                     for k in trying]  # fmt: skip
            sent = eight_bit(torch.stack(tried).to(self.device), images[trying])  # as the oracle answers it
            answer = oracle(sent, trying)
            for position, k in enumerate(trying):
                if bool(answer.fooled[position]):
                    starts[k], found[k] = sent[position], True
        return starts

    def _candidate(self, candidate: int | Tensor) -> Tensor:
        """A starting candidate as an image: a dataset index is loaded."""
        return candidate if isinstance(candidate, Tensor) else self.cell.dataset.load([candidate])[0]


@dataclass
class Crafted:
    """One attacked batch: ``images`` and ``adversarial`` ``[B, 3, H, W]``, ``steps`` ``[B]`` (gradient steps, or
    queries), the ``verdict`` objective that judges them, and a query attack's ``oracle`` (its counts)."""

    images: Tensor
    adversarial: Tensor
    steps: Tensor
    verdict: Objective
    oracle: Oracle | None = None
    parts: list[str | None] | None = None  # an ensemble's record of which of its attacks broke each probe


def trajectories(oracle: Oracle, batch: list[Probe], eps: float) -> list[dict[str, Any]]:
    """The oracle's record of each probe (queries, smallest fooling perturbation so far), as store rows."""
    return [
        {"probe": probe.key, "eps": eps, "queries": queries, "linf": linf, "l2": l2}
        for k, probe in enumerate(batch)
        for queries, linf, l2 in oracle.trajectory(k)
    ]
