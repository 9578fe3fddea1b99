"""Building what a config names: targets (with a user's weights and their stored threshold), defense chains in front
of a target, and the attack with the settings a defense or a surrogate implies; and the capability check that fails
before any work when the pieces cannot work together.

With a ``defense`` (a registered name or a ``+``-joined chain, e.g. ``halftone+lqvae``), the target judged is the
defended one, and the attack is either **adaptive** (it differentiates defense + target: BPDA through transforms
without useful gradients, EOT over randomised ones) or **non-adaptive** (it differentiates the undefended target and
the defended one judges, like a transfer attack).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from redteam.api import (
    ACCESS_LEVELS,
    ATTACKS,
    DEFENSES,
    TARGETS,
    AttackBase,
    Campaign,
    Detections,
    FaceDetector,
    FaceRecognizer,
    InputTransform,
    ModelWrapper,
    Target,
    grants,
)
from redteam.calibrations import file_fingerprint, stored_calibration
from redteam.datasets import dataset_available
from redteam.engine.config import AS_DEPLOYED, EvaluationConfig, check_runtime, check_weights, instantiate
from redteam.engine.eot import CHOICES as EOT_CHOICES
from redteam.errors import RedteamError
from redteam.runtime import frozen
from redteam.threats import THREATS

#: What crafts a query attack's starting point on ``--surrogate`` (zero queries): momentum, input diversity and
#: translation invariance, the transfer attack of Dong et al. 2019 / Xie et al. 2019.
TRANSFER_ATTACK = "ti-dim"
#: The ℓ∞ budget of a decision attack's transfer start: a decision attack has no budget of its own, and a start
#: must already fool the target, so it is crafted well above the usual 8/255 (still far closer than another face).
DECISION_START_EPS = 16 / 255


def load_target(
    name: str,
    device: torch.device,
    threshold: float | None = None,
    weights: Path | None = None,
    access: str = "gradients",
    forward: str = "torch",
) -> Target:
    """A registered target in eval mode with frozen parameters. ``weights``: a user's file, for targets that take
    one; its threshold (or that of a target that is a user's file, ``file:model.onnx``) is the one ``redteam
    calibrate`` stored for that file's content, if any. ``threshold`` decides at another operating point; ``access``
    is what attackers get of it; ``forward`` what computes its passes (``onnxruntime``: its network on onnxruntime,
    for score and decision access)."""
    target_class = TARGETS.get(name)
    check_weights(name, weights)
    check_runtime(name, forward)
    target = target_class() if weights is None else target_class(weights=Path(weights))
    fingerprint = file_fingerprint(target_class, Path(weights) if weights else None)
    calibrated = stored_calibration(name, fingerprint) if fingerprint is not None else None
    if calibrated is not None and target.card.threshold is None:
        target.card = replace(
            target.card,
            threshold=calibrated["threshold"],
            threshold_far=calibrated.get("threshold_far"),
            calibration=f"`redteam calibrate` on {calibrated.get('data', 'the calibration faces')}: "
            f"balanced accuracy {calibrated['accuracy']:.3f} at the threshold",
        )
    if access != "gradients":
        target.limit_to(access)  # type: ignore[arg-type]
    target = frozen(target, device)
    if forward == "onnxruntime":
        target.forward_on_onnxruntime()
    if threshold is not None:
        target.decide_at(threshold)
    return target


class SurrogateEnsemble(FaceRecognizer):
    """Several recognisers as one, for transfer attacks that craft on them all (Liu et al. 2017; Dong et al. 2018).

    Its embedding is the members' embeddings side by side, and two faces' similarity is the mean of the members'
    margins over their own thresholds, so it decides "same person" at 0 when the members agree on average. A
    threat objective built on it is the mean of the members' objectives, each on its own scale and threshold.
    """

    def __init__(self, members: Sequence[FaceRecognizer]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.widths = [self._width(m) for m in members]
        names = [m.card.name for m in members]
        self.card = replace(
            members[0].card,
            name=",".join(names),
            architecture=f"ensemble of {', '.join(names)}",
            weights="the members'",
            embedding_dim=sum(self.widths),
            threshold=0.0,
            threshold_far=None,
            calibration="the mean of the members' margins over their own thresholds",
            metrics={},
            parity="",
            notes="a transfer surrogate: its members' cards describe the models",
        )

    @staticmethod
    def _width(member: FaceRecognizer) -> int:
        """A member's embedding size (its card's, else measured on a blank image)."""
        if member.card.embedding_dim:
            return member.card.embedding_dim
        with torch.no_grad():
            return int(member.embed(torch.zeros(1, 3, 112, 112, device=member.device)).shape[1])

    def embed(self, images: Tensor) -> Tensor:
        return torch.cat([member.embed(images) for member in self.recognisers], dim=-1)

    @property
    def recognisers(self) -> list[FaceRecognizer]:
        return [member for member in self.members if isinstance(member, FaceRecognizer)]

    def _margins(self, a: Tensor, b: Tensor, matrix: bool) -> Tensor:
        margins = []
        for member, a_part, b_part in zip(self.recognisers, a.split(self.widths, -1), b.split(self.widths, -1)):
            score = member.similarity_matrix(a_part, b_part) if matrix else member.similarity(a_part, b_part)
            margins.append(score - member.threshold)
        return torch.stack(margins).mean(0)

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        return self._margins(a, b, matrix=False)

    def similarity_matrix(self, a: Tensor, b: Tensor) -> Tensor:
        return self._margins(a, b, matrix=True)


def load_crafting_model(config: EvaluationConfig, device: torch.device) -> Target:
    """What a transfer attack crafts on: the ``--surrogate`` target, or the ensemble of the several it lists."""
    members = [load_target(name, device) for name in config.surrogates]
    if len(members) == 1:
        return members[0]
    recognisers = [m for m in members if isinstance(m, FaceRecognizer)]
    assert len(recognisers) == len(members), "check_capabilities admits recognisers only in an ensemble"
    return frozen(SurrogateEnsemble(recognisers), device)


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["steps=5", "norm=l2"]`` -> ``{"steps": 5, "norm": "l2"}``: numbers, booleans, lists and objects as JSON."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
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

    @property
    def empty(self) -> bool:
        return not self.transforms and not self.wrappers


def build_defense(spec: str) -> DefenseChain:
    """``halftone``, ``halftone:method=ordered,sigma=1``, ``resize:0.5`` (the first setting), ``halftone+lqvae`` ->
    the chain (``none``: empty)."""
    chain = DefenseChain([], [])
    if spec == "none":
        return chain
    for part in spec.split("+"):
        name, _, settings = part.strip().partition(":")
        if name == "none":
            raise RedteamError(f"--defense {spec}: 'none' cannot be part of a chain.")
        defense_class = DEFENSES.get(name)
        parameters = [p for p in inspect.signature(defense_class.__init__).parameters if p != "self"]
        given = [s.strip() for s in settings.split(",") if s.strip()]
        if given and "=" not in given[0] and parameters:  # resize:0.5 sets the first setting
            given[0] = f"{parameters[0]}={given[0]}"
        options = parse_options(given)
        accepted = set(parameters)
        unknown = sorted(set(options) - accepted)
        if unknown:
            takes = ", ".join(sorted(accepted)) or "no settings"
            raise RedteamError(f"defense {name} has no setting {', '.join(unknown)}; it takes {takes}.")
        defense = defense_class(**options)
        if isinstance(defense, InputTransform):
            chain.transforms.append(defense)
        else:
            chain.wrappers.append(defense)
    return chain


class InputDefense(nn.Module):
    """A target seen through input transforms: same kind, card (renamed), threshold and similarity as the target.

    ``adaptive`` chooses what gradients flow through the transforms: their BPDA form (``forward``'s values,
    ``surrogate``'s gradients) for attacking; otherwise ``forward`` itself, the defense as deployed. Randomised
    transforms draw from ``draws`` (:func:`drawing_from` sets it per batch, so a resumed run redraws the same).
    """

    def __init__(self, target: Target, transforms: Sequence[InputTransform], name: str, adaptive: bool):
        super().__init__()
        self.target, self.transforms, self.adaptive = target, nn.ModuleList(transforms), adaptive
        self.card = replace(target.card, name=name)
        self.draws: torch.Generator | None = None
        self.fixed_seed: int | None = None  # set: every pass draws the same randomness (:func:`fixed_draws`)
        self.threshold_override: float | None = None  # a recalibrated threshold of the defended system
        self.variant = 0  # which of :meth:`surrogate_variants` the BPDA view uses

    def surrogate_variants(self) -> list[str]:
        """The BPDA stand-ins an adaptive attack tries, one combination per entry (the k-th surrogate of every
        transform that needs one), named for the store; empty when none is needed or the view is the deployed one."""
        transforms = [t for t in self.transforms if isinstance(t, InputTransform)]
        names = [list(t.surrogates()) for t in transforms if not t.differentiable]
        if not self.adaptive or not names:
            return []
        return ["+".join(each[k % len(each)] for each in names) for k in range(max(map(len, names)))]

    @property
    def threshold(self) -> float:
        """The target's, unless the defended system was recalibrated (``threshold_override``)."""
        return self.threshold_override if self.threshold_override is not None else self.target.threshold

    def defend(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> what the target sees, ``[B, 3, H, W]``."""
        draws = self.draws
        if self.fixed_seed is not None:
            draws = torch.Generator(images.device).manual_seed(self.fixed_seed)
        for transform in self.transforms:
            assert isinstance(transform, InputTransform)
            if not self.adaptive:
                images = transform(images, draws)
                continue
            names = [] if transform.differentiable else list(transform.surrogates())
            images = transform.bpda(images, draws, names[self.variant % len(names)] if names else None)
        return images

    def inspect(self, images: Tensor) -> tuple[list[str], Tensor | None] | None:
        """A face system's stages on what it sees: the images after the transforms (one draw of a random one)."""
        return self.target.inspect(self.defend(images)) if self.target.pipeline else None


class DefendedRecognizer(InputDefense, FaceRecognizer):
    def embed(self, images: Tensor) -> Tensor:
        assert isinstance(self.target, FaceRecognizer)
        return self.target.embed(self.defend(images))

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        assert isinstance(self.target, FaceRecognizer)
        return self.target.similarity(a, b)

    def similarity_matrix(self, a: Tensor, b: Tensor) -> Tensor:
        assert isinstance(self.target, FaceRecognizer)
        return self.target.similarity_matrix(a, b)


class DefendedDetector(InputDefense, FaceDetector):
    def detect(self, images: Tensor) -> list[Detections]:
        assert isinstance(self.target, FaceDetector)
        return self.target.detect(self.defend(images))

    def face_score(self, images: Tensor) -> Tensor:
        assert isinstance(self.target, FaceDetector)
        return self.target.face_score(self.defend(images))

    def candidate_scores(self, images: Tensor) -> Tensor:
        assert isinstance(self.target, FaceDetector)
        return self.target.candidate_scores(self.defend(images))

    def detected(self, images: Tensor, scores: Tensor | None = None) -> Tensor:
        assert isinstance(self.target, FaceDetector)
        return self.target.detected(self.defend(images), scores)


def drawing_from(generator: torch.Generator, *models: Target) -> AbstractContextManager[None]:
    """Randomised defenses in front of ``models`` draw from ``generator`` inside the block."""
    return _on_defenses(models, "draws", generator)


def fixed_draws(seed: int, *models: Target) -> AbstractContextManager[None]:
    """Inside the block, randomised defenses in front of ``models`` draw the same randomness on every pass: one
    fixed draw of the defense, for the attack and the verdict alike (the fixed-randomness diagnostic)."""
    return _on_defenses(models, "fixed_seed", seed)


@contextmanager
def _on_defenses(models: Sequence[Target], attribute: str, value: object) -> Iterator[None]:
    """``attribute`` of each defense among ``models`` set to ``value`` inside the block, ``None`` after it."""
    defended = [m for m in models if isinstance(m, InputDefense)]
    for model in defended:
        setattr(model, attribute, value)
    try:
        yield
    finally:
        for model in defended:
            setattr(model, attribute, None)


def wrap_model(target: Target, config: EvaluationConfig, chain: DefenseChain) -> Target:
    """The configured target with the chain's model wrappers applied (itself when there are none)."""
    weights = Path(config.weights) if config.weights else None
    device = target.device

    def fresh() -> Target:
        return load_target(config.target, device, config.threshold, weights)

    for wrapper in chain.wrappers:
        target = frozen(wrapper.wrap(target, fresh), device)
        if config.threshold is not None:
            target.decide_at(config.threshold)
    return target


def behind_transforms(target: Target, config: EvaluationConfig, chain: DefenseChain, adaptive: bool) -> Target:
    """``target`` seen through the chain's input transforms, deployed or in BPDA form (itself when there are none)."""
    if not chain.transforms:
        return target
    kind = DefendedDetector if isinstance(target, FaceDetector) else DefendedRecognizer
    transforms = [frozen(t, target.device) for t in chain.transforms]
    return kind(target, transforms, f"{config.target}+{config.defense}", adaptive)


def implied_settings(config: EvaluationConfig, chain: DefenseChain) -> dict[str, Any]:
    """Settings that follow from the config unless the user set them: EOT against randomised transforms when
    attacking adaptively; no early stop when crafting on another model than the one that judges (a surrogate, or
    the undefended target): stopping once that model is fooled would hand the judge the weakest examples. They stay
    out of ``attack_options``, so both modes' cells differ only by ``adaptive``."""
    attack_class = config.attack_class
    implied: dict[str, Any] = {}
    if not chain.empty and config.adaptive and chain.randomised and attack_class.supports_eot:
        implied["eot"] = EOT_CHOICES[0]  # until the executor measures how many it needs (redteam.engine.eot)
    crafted_elsewhere = config.surrogate or (not chain.empty and not config.adaptive)
    if crafted_elsewhere and attack_class.supports_early_stop:
        implied["early_stop"] = False
    return implied


def with_recalibration(config: EvaluationConfig, chain: DefenseChain) -> EvaluationConfig:
    """``config`` with the faces its defended recogniser is recalibrated on: ``--recalibrate`` as given, else,
    when a transform of the chain moves the threshold (:attr:`InputTransform.moves_threshold`), the faces it was
    trained on. Fails in one line when it moves it and nobody knows those faces."""
    movers = [t for t in chain.transforms if t.moves_threshold]
    if config.recalibrate == AS_DEPLOYED and not movers:
        return replace(config, recalibrate=None)  # what it means anyway: one cell, not two
    if config.recalibrate or not movers or TARGETS.get(config.target).card.task != "recognition":
        return config
    faces = next((t.trained_on for t in movers if t.trained_on), None)
    if faces is None or not dataset_available(faces):
        unknown = f"the faces it was trained on ({faces}) are not here" if faces else "its training faces are unknown"
        raise RedteamError(
            f"{movers[0].name} changes what {config.target}'s scores mean and {unknown}: give --recalibrate FACES "
            f"(identity folders, not the evaluated ones), or --recalibrate {AS_DEPLOYED} to judge it at "
            f"{config.target}'s own threshold."
        )
    return replace(config, recalibrate=faces)


def check_capabilities(config: EvaluationConfig, chain: DefenseChain) -> None:
    """Fail before any work, in one line that says what would work, when the pieces cannot work together: what
    the attack needs against what the target offers, the threat against the target's task, and what a defense or
    a surrogate asks of the attack (all read from declarations)."""
    attack_class, attack = config.attack_class, config.attack
    demands: list[tuple[str, str, str, str]] = []  # (what asks, what it needs, of which model, what it answers)
    if not config.surrogate or attack_class.default_queries is not None:
        demands.append((attack, attack_class.needs, config.target, config.access))
    if config.surrogate:  # crafting on the surrogates: the attack itself, or a query attack's transfer start
        crafting = attack_class if attack_class.default_queries is None else ATTACKS.get(TRANSFER_ATTACK)
        label = attack if crafting is attack_class else f"{attack}'s transfer start ({TRANSFER_ATTACK})"
        weakest = min((TARGETS.get(n).offers for n in config.surrogates), key=ACCESS_LEVELS.index)
        demands.append((label, crafting.needs, config.surrogate, weakest))
    for label, needs, model, answers in demands:
        if not grants(answers, needs):
            able = _attacks_that(lambda a, answers=answers: grants(answers, a.needs) and a.kind != "campaign")
            restricted = model == config.target and answers != TARGETS.get(model).offers
            restricted_text = f" (--access {answers})" if restricted else ""
            raise RedteamError(
                f"{label} needs {needs}; {model} answers {_access(answers)}{restricted_text} "
                f"(attacks that work with it: {able or 'none registered'})."
            )
    task = THREATS.get(config.threat).task
    for name in (config.target, *config.surrogates):
        kind = TARGETS.get(name).card.task
        if kind != task:
            raise RedteamError(f"{config.threat} attacks {task} models; {name} is a {kind} model.")
    if len(config.surrogates) > 1 and task != "recognition":
        raise RedteamError("an ensemble of surrogates is for recognisers; give a detector one --surrogate.")
    if issubclass(attack_class, Campaign):
        if config.surrogate:
            raise RedteamError(f"{attack} reports its own transfer table; --surrogate is for per-probe attacks.")
    elif attack_class.kind == "minimal" and attack_class.default_queries is None and config.surrogate:
        raise RedteamError(f"{attack} finds minimal perturbations; transfer needs a fixed-budget attack such as pgd.")
    if chain.empty:
        return
    if config.adaptive and chain.randomised and not attack_class.supports_eot:
        able = _attacks_that(lambda a: a.supports_eot)
        raise RedteamError(f"{attack} has no EOT; a randomised defense needs it (attacks with EOT: {able}).")
    if not config.adaptive and attack_class.kind != "fixed-budget":
        raise RedteamError(
            f"{attack} judges its examples on the model it attacks: against a defense, run it with --adaptivity "
            "adaptive (non-adaptive runs need a fixed-budget attack such as pgd)."
        )


def _access(level: str) -> str:
    """``decisions`` -> ``decisions only``; the others as they are."""
    return f"{level} only" if level == ACCESS_LEVELS[0] else level


def _attacks_that(test: Any) -> str:
    return ", ".join(name for name, attack_class in ATTACKS.items() if test(attack_class))


def build_attack(config: EvaluationConfig, chain: DefenseChain) -> AttackBase:
    """The configured attack (its settings checked; a minimal attack in the run's norm), with the settings its
    defense or surrogate implies (:func:`implied_settings`), after :func:`check_capabilities`."""
    check_capabilities(config, chain)
    options = dict(config.attack_options)
    if config.attack_class.kind == "minimal":
        options.setdefault("norm", config.norm)
    for key, value in implied_settings(config, chain).items():
        options.setdefault(key, value)
    return instantiate(config.attack, options)
