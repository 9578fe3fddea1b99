"""Run an evaluation: one target, attack and threat model, stored per probe, giving an accuracy-perturbation curve.

Fixed-budget attacks (PGD, MIM) visit the budgets in increasing order and attack only the probes still decided
correctly, as AutoAttack does: an adversarial example found within a smaller ball lies inside every larger one, so
those probes count as broken at the larger budgets too (``inherited``). The curve is monotone by construction and
the work shrinks with every budget. Minimal-perturbation attacks (C&W, minnorm) run once per probe; the curve at
any budget is the fraction of probes whose smallest fooling perturbation is larger than it.

With a ``surrogate``, adversarial examples are crafted on the surrogate and judged on the target (transfer).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from redteam import attacks as _attacks  # noqa: F401  (registers the attacks)
from redteam import targets as _targets  # noqa: F401  (registers the targets)
from redteam.attacks.base import (
    ATTACKS,
    Attack,
    Budget,
    Campaign,
    CampaignContext,
    CampaignReport,
    MinimalAttack,
    Norm,
    perturbation_size,
)
from redteam.datasets import FaceDataset, open_dataset
from redteam.errors import RedteamError, UnknownNameError
from redteam.results import CURVE_KEYS, ResultStore, accuracy_curve
from redteam.targets.base import TARGETS, Target
from redteam.threats import THREATS, Objective, Probe, ThreatModel


@dataclass
class EvaluationConfig:
    """Everything that determines the per-probe results of one cell. ``eps`` lists the budgets to visit (/255 for
    ℓ∞); it, ``limit``, ``batch_size``, ``device`` and ``checks`` choose what and how much is computed, not what a
    given probe's result is, so they stay out of the cell key."""

    target: str
    attack: str
    data: str = "default"
    threat: str = "auto"  # dodging for recognisers, evasion for detectors
    norm: Norm = "linf"
    eps: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)
    limit: int | None = None
    seed: int = 0
    attack_options: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    weights: str | None = None
    surrogate: str | None = None
    align: bool = False
    batch_size: int = 16
    device: str = "auto"
    defense: str = "none"
    checks: bool = True
    identity: str | None = None  # the person a campaign (advhat, inversion, backdoor) is about

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
        """Key of the results this config produces."""
        ignored = ("eps", "limit", "batch_size", "device", "checks")
        settings = {k: v for k, v in asdict(self).items() if k not in ignored}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RedteamError("--device cuda asked for, but PyTorch sees no CUDA device.")
    return torch.device(name)


def load_target(name: str, device: torch.device, threshold: float | None = None, weights: Path | None = None) -> Target:
    """Build a registered target in eval mode with frozen parameters; ``weights`` loads a user's checkpoint
    into targets that take one (their ``__init__`` has a ``weights`` argument)."""
    target_class = TARGETS.get(name)
    if weights is None:
        target = target_class()
    elif "weights" in inspect.signature(target_class.__init__).parameters:
        if not Path(weights).is_file():
            raise RedteamError(f"--weights {weights} is not a file.")
        target = target_class(weights=Path(weights))
    else:
        raise RedteamError(f"{name} has fixed weights; --weights is for targets that load user checkpoints.")
    target = target.eval().to(device)
    for parameter in target.parameters():
        parameter.requires_grad_(False)  # attacks need gradients for inputs only
    if threshold is not None:
        target.threshold_override = threshold
    return target


def build_attack(config: EvaluationConfig) -> Attack | MinimalAttack | Campaign:
    """The configured attack, with its settings checked; minimal attacks work in the run's norm."""
    attack_class = ATTACKS.get(config.attack)
    if config.norm not in attack_class.norms:
        raise RedteamError(f"{config.attack} is an {' / '.join(attack_class.norms)} attack; not --norm {config.norm}.")
    settings = {f.name for f in fields(attack_class)}
    options = dict(config.attack_options)
    if issubclass(attack_class, MinimalAttack):
        options.setdefault("norm", config.norm)
        if config.surrogate:
            raise RedteamError(f"{config.attack} finds minimal perturbations; transfer needs a fixed-budget attack.")
    if issubclass(attack_class, Campaign):
        if config.surrogate:
            raise RedteamError(f"{config.attack} reports its own transfer table; --surrogate is for per-probe attacks.")
        if config.threat not in attack_class.threats:
            raise RedteamError(f"{config.attack} supports --threat {' or '.join(attack_class.threats)}.")
        if attack_class.needs_identity and not config.identity:
            raise RedteamError(f"{config.attack} is about one person: pass --identity NAME (a folder of --data).")
    unknown = sorted(set(options) - settings)
    if unknown:
        raise RedteamError(
            f"{config.attack} has no setting {', '.join(unknown)}; it takes {', '.join(sorted(settings))}."
        )
    if config.surrogate and "early_stop" in settings:
        options.setdefault("early_stop", False)  # stopping when the surrogate is fooled would weaken transfer
    try:
        attack = attack_class(**options)
    except ValueError as error:
        raise RedteamError(f"{config.attack}: {error}") from None
    return attack


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def seeded_generator(device: torch.device, *parts: object) -> torch.Generator:
    """A generator seeded from the run seed and the batch's place in the run, so resumed runs redraw the same."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()
    return torch.Generator(device).manual_seed(int(digest[:15], 16))


@dataclass
class Evaluation:
    """A prepared evaluation: call :meth:`run` to fill the store, then read :meth:`curve`."""

    config: EvaluationConfig
    store: ResultStore
    target: Target = field(init=False)
    surrogate: Target = field(init=False)
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
        self.attack = build_attack(config)
        task = TARGETS.get(config.target).card.task
        if config.threat == "auto":
            config.threat = "evasion" if task == "detection" else "dodging"
        threat_class = THREATS.get(config.threat)
        for name in filter(None, (config.target, config.surrogate)):
            kind = TARGETS.get(name).card.task
            if kind != threat_class.task:
                raise RedteamError(f"{config.threat} attacks {threat_class.task} models; {name} is a {kind} model.")
        self.dataset = open_dataset(config.data, align=config.align)
        self.threat = threat_class(self.dataset, seed=config.seed)
        self.probes = self.threat.probes(config.limit)
        weights = Path(config.weights) if config.weights else None
        self.target = load_target(config.target, self.device, config.threshold, weights)
        self.surrogate, self.crafting_threat = self.target, self.threat
        if config.surrogate:
            self.surrogate = load_target(config.surrogate, self.device)
            self.crafting_threat = threat_class(self.dataset, seed=config.seed)
        self.cell = config.cell()
        self.store.register_cell(self.cell, {**asdict(config), "cell": self.cell})
        self.computed = 0  # batches attacked or judged by this process (0 on a re-run of a finished evaluation)

    @property
    def minimal(self) -> bool:
        return isinstance(self.attack, MinimalAttack)

    def objectives(self, batch: list[Probe]) -> tuple[Objective, Objective]:
        """(what the attack maximises, what judges the result): the same unless attacking through a surrogate."""
        verdict = self.threat.objective(self.target, batch)
        if self.surrogate is self.target:
            return verdict, verdict
        return self.crafting_threat.objective(self.surrogate, batch), verdict

    def _encoder(self, model: Target) -> Callable[[list[int]], Tensor]:
        def encode(indices: list[int]) -> Tensor:
            with torch.no_grad():
                batches = chunks(indices, self.config.batch_size)
                return torch.cat([model.embed(self.dataset.load(c).to(self.device)) for c in batches])

        return encode

    def total_work(self) -> int:
        return len(self.probes) * (2 if self.minimal else len(self.budgets))

    def run(self, advance: Callable[[int], None] = lambda n: None) -> None:
        """Evaluate every budget, skipping what the store already holds; ``advance(n)`` reports progress."""
        self.threat.enrol(self._encoder(self.target), self.probes)
        if self.surrogate is not self.target:
            self.crafting_threat.enrol(self._encoder(self.surrogate), self.probes)
        if self.minimal:
            self._run_minimal(advance)
        else:
            self._run_ladder(advance)

    def _current(self, eps: float) -> pd.DataFrame:
        stored = self.store.frame(self.cell, eps)
        return stored[stored["probe"].isin({p.key for p in self.probes})]

    def _run_level(self, eps: float, level: int, attacked: list[Probe], advance: Callable[[int], None]) -> None:
        done = set(self.store.frame(self.cell, eps)["probe"])
        # Fixed batches over all probes attacked at this budget: a resumed run forms exactly the same ones.
        for batch_number, batch in enumerate(chunks(attacked, self.config.batch_size)):
            if all(p.key in done for p in batch):
                continue
            self.store.append(self._evaluate_batch(batch, eps, level, batch_number))
            self.computed += 1
            advance(len(batch))

    def _run_ladder(self, advance: Callable[[int], None]) -> None:
        previous: pd.DataFrame | None = None
        for level, eps in enumerate(self.budgets):
            done = set(self.store.frame(self.cell, eps)["probe"])
            advance(sum(p.key in done for p in self.probes))
            attacked = self.probes
            if previous is not None:
                still_correct = set(previous.loc[previous["correct"], "probe"])
                attacked = [p for p in self.probes if p.key in still_correct]
                broken = previous[~previous["probe"].isin(still_correct | done)]
                self.store.append([self._inherited_row(row, eps) for _, row in broken.iterrows()])
                advance(len(broken))
            self._run_level(eps, level, attacked, advance)
            previous = self._current(eps)

    def _evaluate_batch(self, batch: list[Probe], eps: float, level: int, batch_number: int) -> list[dict]:
        images = self.dataset.load([p.image for p in batch]).to(self.device)
        crafting, verdict = self.objectives(batch)
        if eps == 0:
            adversarial, steps = images, torch.zeros(len(batch), dtype=torch.long)
        else:
            generator = seeded_generator(self.device, self.config.seed, level, batch_number)
            result = self.attack(crafting, images, Budget(self.config.norm, eps), generator)
            adversarial, steps = result.images, result.steps
        with torch.no_grad():  # the verdict that is recorded: a fresh look at the final images, by the target
            judged = verdict(adversarial)
        delta = adversarial - images
        linf, l2 = perturbation_size(delta, "linf"), perturbation_size(delta, "l2")
        return [
            self._row(probe, eps, not bool(judged.success[k]), judged.score[k], linf[k], l2[k], steps[k])
            for k, probe in enumerate(batch)
        ]

    def _run_minimal(self, advance: Callable[[int], None]) -> None:
        """Clean verdicts, then one minimal-perturbation attack per clean-correct probe; every budget's rows follow."""
        self._run_level(0.0, 0, self.probes, advance)
        clean = self._current(0.0).set_index("probe")
        correct = [p for p in self.probes if clean.loc[p.key, "correct"]]
        done = set(self.store.minimal(self.cell)["probe"])
        advance(len(self.probes) - len(correct) + sum(p.key in done for p in correct))
        for batch_number, batch in enumerate(chunks(correct, self.config.batch_size)):
            if all(p.key in done for p in batch):
                continue
            images = self.dataset.load([p.image for p in batch]).to(self.device)
            objective, _ = self.objectives(batch)
            result = self.attack(
                objective, images, seeded_generator(self.device, self.config.seed, "min", batch_number)
            )
            with torch.no_grad():
                judged = objective(result.images)
            delta = result.images - images
            size = torch.where(judged.success, result.size, torch.full_like(result.size, float("inf")))
            linf, l2 = perturbation_size(delta, "linf"), perturbation_size(delta, "l2")
            self.store.append_minimal(
                [
                    {
                        "cell": self.cell,
                        "probe": p.key,
                        "size": float(size[k]),
                        "score": float(judged.score[k]),
                        "linf": float(linf[k]),
                        "l2": float(l2[k]),
                        "steps": int(result.steps[k]),
                    }  # fmt: skip
                    for k, p in enumerate(batch)
                ]
            )
            self.computed += 1
            advance(len(batch))
        found = self.store.minimal(self.cell).set_index("probe")
        rows = []
        for eps in self.budgets[1:]:
            for probe in self.probes:
                if probe.key in found.index:
                    hit = found.loc[probe.key]
                    fooled = hit["size"] <= eps
                    rows.append(self._row(probe, eps, not fooled, hit["score"], hit["linf"], hit["l2"], hit["steps"]))
                else:  # wrong already without an attack
                    row = clean.loc[probe.key]
                    rows.append(self._row(probe, eps, False, row["score"], 0.0, 0.0, 0))
                    rows[-1]["inherited"] = 1
        self.store.append(rows)

    def _row(self, probe: Probe, eps: float, correct: bool, score, linf, l2, steps) -> dict:
        config = self.config
        return {
            "cell": self.cell,
            "target": config.target,
            "surrogate": config.surrogate or config.target,
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
            "score": float(score),
            "linf": float(linf),
            "l2": float(l2),
            "steps": int(steps),
            "inherited": 0,
        }

    def _inherited_row(self, row: pd.Series, eps: float) -> dict:
        return {**row.to_dict(), "eps": eps, "correct": 0, "inherited": 1, "steps": 0}

    def curve(self) -> pd.DataFrame:
        results = self.store.frame(self.cell)
        results = results[results["probe"].isin({p.key for p in self.probes}) & results["eps"].isin(self.budgets)]
        return accuracy_curve(results)

    def minimal_sizes(self) -> pd.Series:
        """Smallest fooling perturbation per attacked probe (``inf`` where the attack failed), minimal attacks only."""
        found = self.store.minimal(self.cell)
        return found[found["probe"].isin({p.key for p in self.probes})]["size"]


def run_campaign(
    config: EvaluationConfig,
    out: Path,
    progress: Callable[[str, int], Callable[[int], None]] = lambda what, total: lambda n: None,
) -> tuple[CampaignContext, CampaignReport]:
    """Run a campaign (advhat, uap, ...) end to end: load, run, store its curve with the run folder's curves."""
    torch.set_flush_denormal(True)
    attack_class = ATTACKS.get(config.attack)
    if config.threat == "auto":
        config.threat = attack_class.threats[0]
    attack = build_attack(config)
    assert isinstance(attack, Campaign)
    device = resolve_device(config.device)
    dataset = open_dataset(config.data, align=config.align)
    if config.identity is not None and config.identity not in dataset.by_identity:
        raise UnknownNameError(f"identity in {dataset.name}", config.identity, dataset.by_identity)
    weights = Path(config.weights) if config.weights else None
    context = CampaignContext(
        target=load_target(config.target, device, config.threshold, weights),
        target_name=config.target,
        dataset=dataset,
        device=device,
        out=out,
        seed=config.seed,
        threat=config.threat,
        budgets=tuple(config.eps),
        identity=config.identity,
        load_target=lambda name: load_target(name, device),
        progress=progress,
    )
    out.mkdir(parents=True, exist_ok=True)
    report = attack.run(context)
    store, cell = ResultStore(out / "results.sqlite"), config.cell()
    store.register_cell(cell, {**asdict(config), "cell": cell})
    if report.curve is not None:
        keys = {
            "target": config.target,
            "surrogate": config.target,
            "defense": config.defense,
            "attack": config.attack,
            "threat": config.threat,
            "norm": config.norm,
            "dataset": dataset.name,
        }
        rows = [{"cell": cell, **keys, **row} for row in report.curve.to_dict(orient="records")]
        store.record_curve([{k: row[k] for k in ("cell", *CURVE_KEYS, "eps", "accuracy", "n")} for row in rows])
    for name, table in report.tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    return context, report
