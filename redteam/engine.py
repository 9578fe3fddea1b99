"""Run an evaluation: one target, attack and threat model, stored per probe, giving an accuracy-perturbation curve.

Fixed-budget attacks (PGD, MIM) visit the budgets in increasing order and attack only the probes still decided
correctly, as AutoAttack does: an adversarial example found within a smaller ball lies inside every larger one, so
those probes count as broken at the larger budgets too (``inherited``). The curve is monotone by construction and
the work shrinks with every budget. Minimal-perturbation attacks (C&W, minnorm) run once per probe; the curve at
any budget is the fraction of probes whose smallest fooling perturbation is larger than it.

With a ``surrogate``, adversarial examples are crafted on the surrogate and judged on the target (transfer).

With a ``defense`` (a registered name or a ``+``-joined chain, e.g. ``halftone+lqvae``), the target judged is the
defended one, and the attack is either **adaptive** (it differentiates defense + target: BPDA through transforms
without useful gradients, EOT over randomised ones) or **non-adaptive** (it differentiates the undefended target and
the defended one judges, like a transfer attack). Each is its own cell, labelled ``<defense> (adaptive)`` or
``<defense> (non-adaptive)`` in the results' ``defense`` column.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor, nn

from redteam import attacks as _attacks  # noqa: F401  (registers the attacks)
from redteam import defenses as _defenses  # noqa: F401  (registers the defenses)
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
from redteam.defenses.base import DEFENSES, InputTransform, ModelWrapper
from redteam.errors import RedteamError, UnknownNameError
from redteam.results import CURVE_KEYS, ResultStore, accuracy_curve
from redteam.targets.base import TARGETS, FaceDetector, FaceRecognizer, Target
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
    batch_size: int | Literal["auto"] = 16  # "auto": as many as fit in accelerator memory (16 on a CPU)
    device: str = "auto"
    precision: Precision = "fp32"  # of the attack's own passes; every recorded verdict is judged in float32
    defense: str = "none"  # a DEFENSES name, name:key=value,key=value, or a +-joined chain of those
    adaptive: bool = True  # with a defense: attack through it (BPDA/EOT), or craft on the undefended target
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

    @property
    def defense_label(self) -> str:
        """The ``defense`` column of results and curves: ``none``, or the chain and how it was attacked."""
        if self.defense == "none":
            return "none"
        return f"{self.defense} ({'adaptive' if self.adaptive else 'non-adaptive'})"

    def cell(self) -> str:
        """Key of the results this config produces."""
        ignored = ("eps", "limit", "batch_size", "device", "checks")
        if self.defense == "none":
            ignored += ("adaptive",)  # meaningless without a defense (and keeps older cells' keys)
        if self.precision == "fp32":
            ignored += ("precision",)  # keeps the keys of cells stored before mixed precision existed
        settings = {k: v for k, v in asdict(self).items() if k not in ignored}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Probes per batch on a CPU, where memory is not what limits the batch.
CPU_BATCH_SIZE = 16


def check_precision(name: str) -> None:
    if name not in ("fp32", *AUTOCAST_DTYPES):
        raise UnknownNameError("precision", name, ["fp32", *AUTOCAST_DTYPES])


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """Mixed precision for an attack's forward and backward passes (``fp32``: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def fit_batch_size(target: Target, images: Tensor, memory_share: float = 0.6, most: int = 512) -> int:
    """The largest batch whose forward and backward pass through ``target`` fits in ``memory_share`` of the free
    accelerator memory, measured on two of ``images [N, 3, H, W]``; :data:`CPU_BATCH_SIZE` on a CPU."""
    device = target.device
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    x = images[:2].to(device).requires_grad_(True)
    output = target.embed(x) if isinstance(target, FaceRecognizer) else target.candidate_scores(x)
    torch.autograd.grad(output.float().square().sum(), x)
    per_image = (torch.cuda.max_memory_allocated(device) - before) / len(x)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(most, memory_share * free // per_image)))


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
    target = frozen(target, device)
    if threshold is not None:
        target.threshold_override = threshold
    return target


def frozen(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` on ``device`` in eval mode with parameters that take no gradient (attacks need inputs' only)."""
    module = module.eval().to(device)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def parse_options(pairs: Sequence[str]) -> dict[str, object]:
    """``["steps=5", "norm=l2"]`` -> ``{"steps": 5, "norm": "l2"}``: numbers, booleans, lists and objects as JSON."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise RedteamError(f"an option is key=value, got {pair!r}.")
        try:
            parsed = json.loads(value) if value.strip()[:1] in "0123456789-[{tf" else value
        except json.JSONDecodeError:  # text that only starts like JSON: a name such as facenet, or nothing
            parsed = value
        options[key.strip().replace("-", "_")] = parsed
    return options


@dataclass
class DefenseChain:
    """A built ``--defense``: input transforms in the order images pass through them, and model wrappers."""

    transforms: list[InputTransform]
    wrappers: list[ModelWrapper]

    @property
    def randomised(self) -> bool:
        return any(t.randomised for t in self.transforms)


def build_defense(spec: str) -> DefenseChain:
    """``halftone``, ``halftone:method=ordered,sigma=1``, ``halftone+lqvae`` -> the chain (``none``: empty)."""
    chain = DefenseChain([], [])
    if spec == "none":
        return chain
    for part in spec.split("+"):
        name, _, settings = part.strip().partition(":")
        if name == "none":
            raise RedteamError(f"--defense {spec}: 'none' cannot be part of a chain.")
        defense_class = DEFENSES.get(name)
        options = parse_options([s for s in settings.split(",") if s.strip()])
        accepted = set(inspect.signature(defense_class.__init__).parameters) - {"self"}
        unknown = sorted(set(options) - accepted)
        if unknown:
            takes = ", ".join(sorted(accepted)) or "no settings"
            raise RedteamError(f"defense {name} has no setting {', '.join(unknown)}; it takes {takes}.")
        defense = defense_class(**options)
        (chain.transforms if isinstance(defense, InputTransform) else chain.wrappers).append(defense)
    return chain


class InputDefense:
    """A target seen through input transforms: same kind, card (renamed), threshold and similarity as the target.

    ``adaptive`` chooses what gradients flow through the transforms: their BPDA form (``forward``'s values,
    ``surrogate``'s gradients) for attacking; otherwise ``forward`` itself, the defense as deployed.
    """

    def __init__(self, target: Target, transforms: Sequence[InputTransform], name: str, adaptive: bool):
        super().__init__()
        self.target, self.transforms, self.adaptive = target, nn.ModuleList(transforms), adaptive
        self.card = replace(target.card, name=name)

    @property
    def threshold(self) -> float:
        return self.target.threshold

    def defend(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> what the target sees, ``[B, 3, H, W]``."""
        for transform in self.transforms:
            images = transform.bpda(images) if self.adaptive else transform(images)
        return images


class DefendedRecognizer(InputDefense, FaceRecognizer):
    def embed(self, images: Tensor) -> Tensor:
        return self.target.embed(self.defend(images))

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        return self.target.similarity(a, b)

    def similarity_matrix(self, a: Tensor, b: Tensor) -> Tensor:
        return self.target.similarity_matrix(a, b)


class DefendedDetector(InputDefense, FaceDetector):
    def detect(self, images: Tensor):
        return self.target.detect(self.defend(images))

    def face_score(self, images: Tensor) -> Tensor:
        return self.target.face_score(self.defend(images))

    def candidate_scores(self, images: Tensor) -> Tensor:
        return self.target.candidate_scores(self.defend(images))

    def detected(self, images: Tensor, scores: Tensor | None = None) -> Tensor:
        return self.target.detected(self.defend(images), scores)


def wrap_model(target: Target, config: EvaluationConfig, chain: DefenseChain) -> Target:
    """The configured target with the chain's model wrappers applied (itself when there are none)."""
    for wrapper in chain.wrappers:
        target = frozen(wrapper.wrap(target, config.target), target.device)
        if config.threshold is not None:
            target.threshold_override = config.threshold
    return target


def behind_transforms(target: Target, config: EvaluationConfig, chain: DefenseChain, adaptive: bool) -> Target:
    """``target`` seen through the chain's input transforms, deployed or in BPDA form (itself when there are none)."""
    if not chain.transforms:
        return target
    kind = DefendedDetector if isinstance(target, FaceDetector) else DefendedRecognizer
    transforms = [frozen(t, target.device) for t in chain.transforms]
    return kind(target, transforms, f"{config.target}+{config.defense}", adaptive)


#: Gradient samples per step when an adaptive attack meets a randomised defense and ``--option eot`` is not given.
EOT_SAMPLES = 8


def attack_through_defense(config: EvaluationConfig, chain: DefenseChain) -> dict[str, object]:
    """Check that the attack can meet the chain in the config's mode; return the settings it needs unless the user
    set them: EOT against randomised transforms, and no early stop when crafting on the undefended target (stopping
    once the undefended model is fooled would hand the defense the weakest examples). Like the transfer default,
    they follow from the config, so they stay out of its ``attack_options`` and both modes' cells differ only by
    ``adaptive``."""
    if not chain.transforms and not chain.wrappers:
        return {}
    attack_class = ATTACKS.get(config.attack)
    settings = {f.name for f in fields(attack_class)}
    if config.adaptive and chain.randomised:
        if "eot" not in settings:
            raise RedteamError(f"{config.attack} has no eot setting; a randomised defense needs EOT (use pgd or mim).")
        return {"eot": EOT_SAMPLES}
    if not config.adaptive:
        if not issubclass(attack_class, Attack):
            raise RedteamError(
                f"{config.attack} judges its examples on the model it attacks: against a defense, run it with "
                "--adaptivity adaptive (non-adaptive runs need a fixed-budget attack such as pgd)."
            )
        if "early_stop" in settings:
            return {"early_stop": False}
    return {}


def build_attack(config: EvaluationConfig, defense: DefenseChain | None = None) -> Attack | MinimalAttack | Campaign:
    """The configured attack, with its settings checked; minimal attacks work in the run's norm; against a
    ``defense``, with the settings attacking it needs (:func:`attack_through_defense`)."""
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
    for key, value in attack_through_defense(config, defense or DefenseChain([], [])).items():
        options.setdefault(key, value)
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
class Evaluation:
    """A prepared evaluation: call :meth:`run` to fill the store, then read :meth:`curve`.

    Without ``models``, nothing is loaded: it plans the work and stores its rows (:meth:`plan`, :meth:`record`)
    while other processes, which load the models, compute it (:meth:`compute`): a distributed sweep's driver."""

    config: EvaluationConfig
    store: ResultStore
    models: bool = True
    target: Target = field(init=False)  # judges: the target behind its defense, as deployed
    surrogate: Target = field(init=False)  # what the attack differentiates (the target, a transfer model, or BPDA)
    dataset: FaceDataset = field(init=False)
    threat: ThreatModel = field(init=False)
    probes: list[Probe] = field(init=False)

    def __post_init__(self) -> None:
        if torch.get_default_dtype() != torch.float32:
            raise RedteamError("redteam evaluates in float32.")
        torch.set_flush_denormal(True)  # denormals make CPU convolutions ~30x slower
        self.config = config = replace(self.config)  # resolves "auto" settings in its own copy, not the caller's
        self.device = resolve_device(config.device)
        check_precision(config.precision)
        self.budgets = config.budgets()
        self.defense = build_defense(config.defense)
        self.attack = build_attack(config, self.defense)
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
        if self.models:
            self._load_models(threat_class)
        self.batch_size = self._batch_size()
        self.cell = config.cell()
        self.store.register_cell(self.cell, {**asdict(config), "cell": self.cell})
        self.computed = 0  # batches attacked or judged by this process (0 on a re-run of a finished evaluation)

    def _load_models(self, threat_class: type[ThreatModel]) -> None:
        """The target that judges, the model the attack differentiates, and the threat that enrols on the latter."""
        config = self.config
        weights = Path(config.weights) if config.weights else None
        undefended = load_target(config.target, self.device, config.threshold, weights)
        model = wrap_model(undefended, config, self.defense)
        self.target = behind_transforms(model, config, self.defense, adaptive=False)
        crafting = model if config.adaptive else undefended
        if config.surrogate:
            crafting = load_target(config.surrogate, self.device)
        if config.adaptive:
            crafting = behind_transforms(crafting, config, self.defense, adaptive=True)
        self.surrogate = crafting
        self.crafting_threat = self.threat
        if self.surrogate is not self.target:
            self.crafting_threat = threat_class(self.dataset, seed=config.seed)

    @property
    def minimal(self) -> bool:
        return isinstance(self.attack, MinimalAttack)

    def _batch_size(self) -> int:
        requested = self.config.batch_size
        if requested == "auto":
            return fit_batch_size(self.surrogate, self.dataset.load([p.image for p in self.probes[:2]]))
        if not isinstance(requested, int) or requested < 1:
            raise RedteamError(f"--batch-size must be a positive number or auto, not {requested!r}.")
        return requested

    def objectives(self, batch: list[Probe]) -> tuple[Objective, Objective]:
        """(what the attack maximises, what judges the result): the same unless attacking through a surrogate."""
        verdict = self.threat.objective(self.target, batch)
        if self.surrogate is self.target:
            return verdict, verdict
        return self.crafting_threat.objective(self.surrogate, batch), verdict

    def _encoder(self, model: Target) -> Callable[[list[int]], Tensor]:
        def encode(indices: list[int]) -> Tensor:
            with torch.no_grad():
                batches = chunks(indices, self.batch_size)
                return torch.cat([model.embed(self.dataset.load(c).to(self.device)) for c in batches])

        return encode

    def total_work(self) -> int:
        return len(self.probes) * (2 if self.minimal else len(self.budgets))

    def enrol(self) -> None:
        """Embed the enrolment images the probes are compared with: needed before any batch is attacked or judged."""
        self.threat.enrol(self._encoder(self.target), self.probes)
        if self.surrogate is not self.target:
            self.crafting_threat.enrol(self._encoder(self.surrogate), self.probes)

    def run(self, advance: Callable[[int], None] = lambda n: None) -> None:
        """Evaluate every budget, skipping what the store already holds; ``advance(n)`` reports progress."""
        self.enrol()
        for shards in self.plan(advance):
            for shard in shards:
                self.record(shard, self.compute(shard))
                advance(len(shard.probes))

    def plan(self, advance: Callable[[int], None] = lambda n: None) -> Iterator[list[Shard]]:
        """The batches left to compute, a level at a time. A level's batches may be computed in any order and in any
        process, but all must be recorded before the next level is asked for: it attacks only the probes they leave
        correct. Rows that need no model (probes broken at a smaller budget, a minimal attack's curve) are stored
        here; ``advance(n)`` counts the probes already done or so derived."""
        return self._plan_minimal(advance) if self.minimal else self._plan_ladder(advance)

    def compute(self, shard: Shard) -> list[dict]:
        """The rows of one batch, for :meth:`record` (after :meth:`enrol`)."""
        if shard.minimal:
            return self._attack_minimal(list(shard.probes), shard.number)
        return self._evaluate_batch(list(shard.probes), shard.eps, shard.level, shard.number)

    def record(self, shard: Shard, rows: list[dict]) -> None:
        """Store one computed batch (one transaction: whole or not at all)."""
        (self.store.append_minimal if shard.minimal else self.store.append)(rows)
        self.computed += 1

    def _current(self, eps: float) -> pd.DataFrame:
        stored = self.store.frame(self.cell, eps)
        return stored[stored["probe"].isin({p.key for p in self.probes})]

    def _shards(
        self, level: int, eps: float, attacked: list[Probe], done: set[str], minimal: bool = False
    ) -> list[Shard]:
        # Fixed batches over all probes attacked at this level: a resumed run forms exactly the same ones.
        batches = enumerate(chunks(attacked, self.batch_size))
        return [Shard(level, eps, n, tuple(b), minimal) for n, b in batches if not all(p.key in done for p in b)]

    def _plan_ladder(self, advance: Callable[[int], None]) -> Iterator[list[Shard]]:
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
            shards = self._shards(level, eps, attacked, done)
            if shards:
                yield shards
            previous = self._current(eps)

    def craft(
        self, batch: list[Probe], eps: float, level: int, batch_number: int
    ) -> tuple[Tensor, Tensor, Tensor, Objective]:
        """Attack one batch of the ladder exactly as the run does (same seeds): ``(images, adversarial, steps,
        verdict)`` with images ``[B, 3, H, W]``, steps ``[B]``; reports re-create stored examples with it."""
        images = self.dataset.load([p.image for p in batch]).to(self.device)
        crafting, verdict = self.objectives(batch)
        self._seed_defense(level, batch_number)
        if eps == 0:
            return images, images, torch.zeros(len(batch), dtype=torch.long), verdict
        generator = seeded_generator(self.device, self.config.seed, level, batch_number)
        with autocast(self.device, self.config.precision):
            result = self.attack(crafting, images, Budget(self.config.norm, eps), generator)
        return images, result.images, result.steps, verdict

    def _evaluate_batch(self, batch: list[Probe], eps: float, level: int, batch_number: int) -> list[dict]:
        images, adversarial, steps, verdict = self.craft(batch, eps, level, batch_number)
        with torch.no_grad():  # the verdict that is recorded: a fresh look at the final images, by the target
            judged = verdict(adversarial)
        delta = adversarial - images
        linf, l2 = perturbation_size(delta, "linf"), perturbation_size(delta, "l2")
        return [
            self._row(probe, eps, not bool(judged.success[k]), judged.score[k], linf[k], l2[k], steps[k])
            for k, probe in enumerate(batch)
        ]

    def _seed_defense(self, *parts: object) -> None:
        """Randomised defenses draw from the global generator: seed it per batch, so a resumed run redraws the same."""
        if self.defense.randomised:
            torch.manual_seed(seeded_generator(torch.device("cpu"), self.config.seed, "defense", *parts).initial_seed())

    def _plan_minimal(self, advance: Callable[[int], None]) -> Iterator[list[Shard]]:
        """Clean verdicts, then one minimal-perturbation attack per clean-correct probe; every budget's rows follow."""
        done = set(self.store.frame(self.cell, 0.0)["probe"])
        advance(sum(p.key in done for p in self.probes))
        shards = self._shards(0, 0.0, self.probes, done)
        if shards:
            yield shards
        clean = self._current(0.0).set_index("probe")
        correct = [p for p in self.probes if clean.loc[p.key, "correct"]]
        done = set(self.store.minimal(self.cell)["probe"])
        advance(len(self.probes) - len(correct) + sum(p.key in done for p in correct))
        shards = self._shards(0, 0.0, correct, done, minimal=True)
        if shards:
            yield shards
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

    def _attack_minimal(self, batch: list[Probe], batch_number: int) -> list[dict]:
        """Each probe's smallest fooling perturbation (``inf`` where the target is not fooled): rows of ``minimal``."""
        images = self.dataset.load([p.image for p in batch]).to(self.device)
        objective, verdict = self.objectives(batch)
        self._seed_defense("min", batch_number)
        with autocast(self.device, self.config.precision):
            generator = seeded_generator(self.device, self.config.seed, "min", batch_number)
            result = self.attack(objective, images, generator)
        with torch.no_grad():
            judged = verdict(result.images)
        delta = result.images - images
        size = torch.where(judged.success, result.size, torch.full_like(result.size, float("inf")))
        linf, l2 = perturbation_size(delta, "linf"), perturbation_size(delta, "l2")
        return [
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

    def _row(self, probe: Probe, eps: float, correct: bool, score, linf, l2, steps) -> dict:
        config = self.config
        return {
            "cell": self.cell,
            "target": config.target,
            "surrogate": config.surrogate or config.target,
            "defense": config.defense_label,
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
    chain = build_defense(config.defense)
    attack = build_attack(config, chain)
    assert isinstance(attack, Campaign)
    device = resolve_device(config.device)
    dataset = open_dataset(config.data, align=config.align)
    if config.identity is not None and config.identity not in dataset.by_identity:
        raise UnknownNameError(f"identity in {dataset.name}", config.identity, dataset.by_identity)
    weights = Path(config.weights) if config.weights else None
    model = wrap_model(load_target(config.target, device, config.threshold, weights), config, chain)
    context = CampaignContext(
        target=behind_transforms(model, config, chain, adaptive=True),  # a campaign judges on what it attacks
        target_name=config.target,
        dataset=dataset,
        device=device,
        out=out,
        seed=config.seed,
        threat=config.threat,
        budgets=tuple(config.eps),
        norm=config.norm,
        limit=config.limit,
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
            "defense": config.defense_label,
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
