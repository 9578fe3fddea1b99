"""Planning an evaluation: which batches are left to compute, given what the store already holds.

Fixed-budget attacks (PGD, MIM) visit the budgets in increasing order and attack only the probes still decided
correctly, as AutoAttack does: an adversarial example found within a smaller ball lies inside every larger one, so
those probes count as broken at the larger budgets too (``inherited``). The curve is monotone by construction and
the work shrinks with every budget. Minimal-perturbation attacks (C&W, minnorm) run once per probe; the curve at
any budget is the fraction of probes whose smallest fooling perturbation is larger than it.

The planner needs no model: it reads and writes the store, and hands out :class:`Shard`s that an executor
(:mod:`redteam.engine.execute`) computes, in this process or on a Ray worker.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor

from redteam.api import TARGETS, AttackBase
from redteam.assets import sha256_of
from redteam.datasets import FaceDataset, open_dataset
from redteam.engine.assembly import DefenseChain, build_attack, build_defense, with_recalibration
from redteam.engine.config import RESULTS_VERSION, EvaluationConfig
from redteam.evidence import EvidenceLog
from redteam.results import ResultStore, accuracy_curve
from redteam.runtime import chunks
from redteam.threats import THREATS, Probe, ThreatModel


@dataclass
class Cell:
    """A resolved, checked cell and its data: what its planner and its executors share. ``budgets`` are in image
    units, ascending from 0. ``fingerprint`` digests the content of its inputs; ``key`` is its key in a store (set
    by the planner, :func:`claim_cell`)."""

    config: EvaluationConfig
    dataset: FaceDataset
    threat: ThreatModel
    probes: list[Probe]
    budgets: list[float]
    defense: DefenseChain
    attack: AttackBase
    fingerprint: dict[str, str]
    key: str = ""

    @property
    def minimal(self) -> bool:
        return self.attack.kind == "minimal"

    @property
    def queries(self) -> bool:
        """Its attack only queries the target: every budget is its own attack on every clean-correct probe (no
        ladder: a probe broken at a smaller budget says nothing of the queries a larger one needs)."""
        return self.attack.default_queries is not None


def prepare(config: EvaluationConfig) -> Cell:
    """Resolve and check ``config`` (one-line errors before any model is loaded), open its data, draw its probes."""
    resolved = config.resolve()
    if resolved.campaign:
        raise ValueError(f"{resolved.attack} is a campaign: run it with redteam.engine.run_campaign")
    defense = build_defense(resolved.defense)
    resolved = with_recalibration(resolved, defense)
    attack = build_attack(resolved, defense)
    dataset = open_dataset(resolved.data, align=resolved.align, skip_bad=resolved.skip_bad_images)
    threat = THREATS.get(resolved.threat)(dataset, seed=resolved.seed)
    probes = threat.probes(resolved.limit)
    fingerprint = content_fingerprint(resolved, dataset, defense)
    return Cell(resolved, dataset, threat, probes, resolved.budgets(), defense, attack, fingerprint)


def _count(value: Any) -> int | None:
    """A stored query count (NaN in a frame where none was stored) as an int or ``None``."""
    return None if value is None or value != value else int(value)


def content_fingerprint(config: EvaluationConfig, dataset: FaceDataset, defense: DefenseChain) -> dict[str, str]:
    """Digests of what, besides its settings, determines a cell's results: the images' content, the weights of the
    target and surrogate (a user's file by its sha256), the defense's weights, and redteam's results version."""
    weights = sha256_of(Path(config.weights)) if config.weights else TARGETS.get(config.target).weights_fingerprint()
    parts = [transform.fingerprint() for transform in defense.transforms]
    parts += [wrapper.fingerprint(config.target) for wrapper in defense.wrappers]
    return {
        "results version": str(RESULTS_VERSION),
        "images": dataset.fingerprint(),
        "weights": weights,
        "surrogate weights": ",".join(TARGETS.get(name).weights_fingerprint() for name in config.surrogates),
        "defense weights": hashlib.sha256(":".join(parts).encode()).hexdigest() if parts else "",
    }


def claim_cell(store: ResultStore, config: EvaluationConfig, fingerprint: dict[str, str]) -> tuple[str, list[str]]:
    """This cell's key in ``store`` and what to tell the user about it.

    The key digests the settings and the content fingerprint, so changed weights or photos at the same paths give
    a new cell. Cells of the same settings whose content differs are set aside (kept, but out of curves, reports
    and checks), and the lines returned say what changed. A cell stored before fingerprints existed (keyed by its
    settings alone) is taken over as it is: its results are resumed and its fingerprint recorded from now on."""
    settings = config.settings_key()
    cells = store.cells()
    stored = {"settings_key": settings, "fingerprint": fingerprint}
    legacy = cells.get(settings)
    if legacy is not None and "fingerprint" not in legacy:
        store.update_cell(settings, {**legacy, **stored})
        return settings, []
    key = hashlib.sha256(json.dumps([settings, fingerprint], sort_keys=True).encode()).hexdigest()[:16]
    notes = []
    for other, other_config in cells.items():
        if other == key or other_config.get("settings_key") != settings:
            continue
        if other_config.get("superseded_by") is None:
            changed = [part for part, digest in fingerprint.items() if other_config["fingerprint"].get(part) != digest]
            notes.append(
                f"{config.label}: the {' and '.join(changed)} changed since cell {other} was stored in this folder; "
                f"its results are kept but set aside, and cell {key} is computed for what is there now."
            )
        store.update_cell(other, {**other_config, "superseded_by": key})
    store.register_cell(key, {**config.to_dict(), "cell": key, **stored})
    if key in cells and "superseded_by" in cells[key]:  # back to inputs whose results are stored already
        store.update_cell(key, {k: v for k, v in cells[key].items() if k != "superseded_by"})
    return key, notes


@dataclass(frozen=True)
class Shard:
    """One batch of one evaluation, the unit of work: its probes at the ladder's ``level`` (budget ``eps``), or, when
    ``minimal``, one batch of a minimal-perturbation attack. ``number`` is its place among its level's batches and
    seeds its attack, so it gives the same rows in whichever process computes it."""

    level: int
    eps: float
    number: int
    probes: tuple[Probe, ...]
    minimal: bool = False


@dataclass
class Computed:
    """What computing a shard gives its planner to store: the rows (``results``, or ``minimal`` for a minimal
    attack's shard), a query attack's trajectories, and the evidence of what fooled the system
    (:mod:`redteam.evidence`)."""

    rows: list[dict[str, Any]]
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    evidence: list[tuple[dict[str, Any], Tensor]] = field(default_factory=list)  # fooled probes' entries and images


def result_row(
    cell: Cell,
    probe: Probe,
    eps: float,
    correct: bool,
    score,
    linf,
    l2,
    steps,
    queries: int | None = None,
    stage: str | None = None,
    broken_by: str | None = None,
    liveness: float | None = None,
) -> dict[str, Any]:
    """One row of the store's ``results`` table."""
    config = cell.config
    return {
        "cell": cell.key,
        "target": config.target,
        "surrogate": config.surrogate or config.target,
        "defense": config.defense_label,
        "attack": config.attack,
        "threat": config.threat,
        "norm": config.norm,
        "dataset": cell.dataset.name,
        "eps": eps,
        "probe": probe.key,
        "image": probe.image,
        "reference": probe.reference,
        "identity": cell.dataset.records[probe.image].identity,
        "correct": int(correct),
        "score": float(score),
        "linf": float(linf),
        "l2": float(l2),
        "steps": int(steps),
        "inherited": 0,
        "queries": queries,
        "stage": stage,
        "broken_by": broken_by,
        "liveness": liveness,
    }


class Planner:
    """The batches of ``cell`` left to compute into ``store``, in batches of ``batch_size`` probes. It claims the
    cell's key in the store (``notes`` says what changed, if its inputs did)."""

    def __init__(self, cell: Cell, store: ResultStore, batch_size: int):
        self.cell, self.store, self.batch_size = cell, store, batch_size
        cell.key, self.notes = claim_cell(store, cell.config, cell.fingerprint)
        self.recorded = 0  # batches recorded by this planner (0 on a re-run of a finished evaluation)
        self.evidence = EvidenceLog(store.path.parent)

    def total_work(self) -> int:
        return len(self.cell.probes) * (2 if self.cell.minimal else len(self.cell.budgets))

    def plan(self, advance: Callable[[int], None] = lambda n: None) -> Iterator[list[Shard]]:
        """The batches left to compute, a level at a time. A level's batches may be computed in any order and in any
        process, but all must be recorded before the next level is asked for: it attacks only the probes they leave
        correct. Rows that need no model (probes broken at a smaller budget, a minimal attack's curve) are stored
        here; ``advance(n)`` counts the probes already done or so derived."""
        return self._plan_minimal(advance) if self.cell.minimal else self._plan_ladder(advance)

    def record(self, shard: Shard, computed: Computed) -> None:
        """Store one computed batch under this planner's key for the cell: its evidence, its trajectories, then its
        rows (one transaction each; a batch counts as done once its rows are in)."""
        key = self.cell.key
        self.evidence.record(
            [{**entry, "cell": key} for entry, _ in computed.evidence], [i for _, i in computed.evidence]
        )
        self.store.record_trajectory([{**point, "cell": key} for point in computed.trajectory])
        rows = [{**row, "cell": key} for row in computed.rows]
        if shard.minimal:
            self.store.append_minimal(rows)
        else:
            self.store.append(rows)
        self.recorded += 1

    def stored(self, eps: float) -> pd.DataFrame:
        """This cell's rows at ``eps`` for its probes."""
        rows = self.store.frame(self.cell.key, eps)
        return rows[rows["probe"].isin({p.key for p in self.cell.probes})]

    def curve(self) -> pd.DataFrame:
        results = self.store.frame(self.cell.key)
        wanted = results["probe"].isin({p.key for p in self.cell.probes}) & results["eps"].isin(self.cell.budgets)
        return accuracy_curve(results[wanted])

    def minimal_sizes(self) -> pd.DataFrame:
        """Smallest fooling perturbation per attacked probe (``size``, ``inf`` where the attack failed) and the
        probe's ``identity``; minimal attacks only."""
        found = self.store.minimal(self.cell.key)
        identity = {p.key: self.cell.dataset.records[p.image].identity for p in self.cell.probes}
        found = found[found["probe"].isin(identity)]
        return found.assign(identity=found["probe"].map(identity))[["probe", "size", "identity"]]

    def example_batch(self) -> tuple[int, list[Probe], pd.DataFrame] | None:
        """The first batch of the smallest budget where it holds a fooled probe (else of the largest attacked
        budget), as the ladder formed it: the probes still decided correctly at the budget below, in probe order;
        with its stored rows. ``None`` when no probe was attacked."""
        results = self.store.frame(self.cell.key)
        results = results[results["probe"].isin({p.key for p in self.cell.probes})]
        chosen = None
        for level in range(1, len(self.cell.budgets)):
            below = results[results["eps"] == self.cell.budgets[level - 1]]
            still_correct = set(below.loc[below["correct"], "probe"])
            batch = next(iter(self._batches([p for p in self.cell.probes if p.key in still_correct])), [])
            at = results[results["eps"] == self.cell.budgets[level]].set_index("probe")
            if not batch or not all(p.key in at.index for p in batch):
                break
            chosen = (level, batch, at.loc[[p.key for p in batch]])
            if not chosen[2]["correct"].all():
                break
        return chosen

    def _batches(self, probes: list[Probe]) -> Iterator[list[Probe]]:
        # Fixed batches over all probes attacked at a level: a resumed run forms exactly the same ones.
        return chunks(probes, self.batch_size)

    def _shards(self, level: int, eps: float, attacked: list[Probe], done: set[str], minimal: bool = False):
        batches = enumerate(self._batches(attacked))
        return [Shard(level, eps, n, tuple(b), minimal) for n, b in batches if not all(p.key in done for p in b)]

    def _plan_ladder(self, advance: Callable[[int], None]) -> Iterator[list[Shard]]:
        previous: pd.DataFrame | None = None
        probes = self.cell.probes
        for level, eps in enumerate(self.cell.budgets):
            if self.cell.queries and level > 1:
                previous = self.stored(0.0)  # each budget attacks every clean-correct probe afresh
            done = set(self.store.frame(self.cell.key, eps)["probe"])
            advance(sum(p.key in done for p in probes))
            attacked = probes
            if previous is not None:
                still_correct = set(previous.loc[previous["correct"], "probe"])
                attacked = [p for p in probes if p.key in still_correct]
                broken = previous[~previous["probe"].isin(still_correct | done)]
                inherited = [{**row.to_dict(), "eps": eps, "correct": 0, "inherited": 1, "steps": 0, "queries": None}
                             for _, row in broken.iterrows()]  # fmt: skip
                self.store.append(inherited)
                advance(len(broken))
            shards = self._shards(level, eps, attacked, done)
            if shards:
                yield shards
            previous = self.stored(eps)

    def _plan_minimal(self, advance: Callable[[int], None]) -> Iterator[list[Shard]]:
        """Clean verdicts, then one minimal-perturbation attack per clean-correct probe; every budget's rows follow."""
        cell, probes = self.cell, self.cell.probes
        done = set(self.store.frame(cell.key, 0.0)["probe"])
        advance(sum(p.key in done for p in probes))
        shards = self._shards(0, 0.0, probes, done)
        if shards:
            yield shards
        clean = self.stored(0.0).set_index("probe")
        correct = [p for p in probes if clean.loc[p.key, "correct"]]
        done = set(self.store.minimal(cell.key)["probe"])
        advance(len(probes) - len(correct) + sum(p.key in done for p in correct))
        shards = self._shards(0, 0.0, correct, done, minimal=True)
        if shards:
            yield shards
        found = self.store.minimal(cell.key).set_index("probe")
        rows = []
        for eps in cell.budgets[1:]:
            for probe in probes:
                if probe.key in found.index:
                    hit = found.loc[probe.key]
                    fooled = hit["size"] <= eps
                    rows.append(result_row(cell, probe, eps, not fooled, hit["score"], hit["linf"], hit["l2"],
                                           hit["steps"], _count(hit["queries"])))  # fmt: skip
                else:  # wrong already without an attack
                    row = clean.loc[probe.key]
                    rows.append({**result_row(cell, probe, eps, False, row["score"], 0.0, 0.0, 0), "inherited": 1})
        self.store.append(rows)
