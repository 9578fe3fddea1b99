"""What an attack is. Every attack is a dataclass whose fields are its settings (``--option key=value``, ``--steps``),
registered in :data:`ATTACKS`, and declares what it is and what it needs, so a mismatch fails before any work:

- ``kind``: ``fixed-budget`` (``attack(objective, images, budget) -> AttackResult``: PGD, MIM), ``minimal``
  (``attack(objective, images) -> MinimalResult``, each sample's smallest fooling perturbation: C&W, minnorm; one
  run gives the whole curve) or ``campaign`` (``attack.run(context) -> CampaignReport``, a whole experiment:
  :mod:`redteam.api.campaigns`);
- ``needs``: what it asks of a target (:data:`redteam.api.targets.Access`): gradients, scores or decisions;
- ``norms``: the perturbation measures it works in (the first is the default ``--norm``);
- ``supports_eot`` / ``supports_early_stop``: it has an ``eot`` setting (gradient samples per step, for randomised
  defenses) / an ``early_stop`` setting (stop each sample once it fools the system), which the engine sets.

An attack knows nothing about faces: it maximises a differentiable per-sample objective (:mod:`redteam.threats`),
whose ``success`` says when the face system is fooled.

Adding an attack = one file in ``redteam/attacks/`` (or a package's ``redteam.attacks`` entry point).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields, is_dataclass
from functools import cached_property
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from redteam.api.oracles import Oracle
from redteam.api.targets import Access
from redteam.budgets import Budget
from redteam.registry import Registry
from redteam.threats import Objective, Verdict

AttackKind = Literal["fixed-budget", "minimal", "campaign"]


def check_attack_class(name: str, attack_class: Any) -> None:
    """What registering an attack requires: a dataclass of an attack kind whose declared settings exist."""
    if not (isinstance(attack_class, type) and issubclass(attack_class, AttackBase)):
        raise TypeError(f"attack {name!r}: register a subclass of Attack, MinimalAttack or Campaign")
    if not is_dataclass(attack_class):
        raise TypeError(f"attack {name!r}: decorate the class with @dataclass (its fields are its settings)")
    settings = {f.name for f in fields(attack_class)}
    queries = issubclass(attack_class, QueryAttack | MinimalQueryAttack)
    if (attack_class.needs != "gradients") != queries:
        raise TypeError(
            f"attack {name!r}: an attack that needs {attack_class.needs} subclasses "
            f"{'QueryAttack or MinimalQueryAttack (it gets an oracle)' if not queries else 'Attack or MinimalAttack'}"
        )
    for declared, setting in (("supports_eot", "eot"), ("supports_early_stop", "early_stop")):
        if getattr(attack_class, declared) and setting not in settings:
            raise TypeError(f"attack {name!r} declares {declared} but has no {setting!r} setting")


ATTACKS: Registry[type[AttackBase]] = Registry(
    "attack", package="redteam.attacks", group="redteam.attacks", check=check_attack_class
)


class AttackBase(ABC):
    """Declarations shared by every kind of attack (see the module docstring)."""

    # Every registered attack is a dataclass (check_attack_class): declared here, so fields() and asdict() take one.
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]
    name: ClassVar[str]
    kind: ClassVar[AttackKind]
    needs: ClassVar[Access] = "gradients"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    supports_eot: ClassVar[bool] = False
    supports_early_stop: ClassVar[bool] = False
    #: Settings that must be above 0 (step counts, step sizes, samples), checked before any work.
    positive: ClassVar[tuple[str, ...]] = ()
    #: Whole-number settings that buy strength (steps, restarts, EOT draws, queries): the convergence check doubles
    #: them and re-attacks what still stands (none declared: the check does not run).
    effort: ClassVar[tuple[str, ...]] = ()
    #: An attack that only queries: its per-probe budget when ``--queries`` is not given (None: not a query attack).
    default_queries: ClassVar[int | None] = None

    @classmethod
    def settings(cls) -> list[str]:
        """Its settings, the names ``--option`` takes."""
        return sorted(f.name for f in fields(cls))


@dataclass
class AttackResult:
    """``images``: adversarial batch; ``steps``: gradient steps used; ``success``: ``judge``'s verdict on ``images``,
    computed on first access (the engine judges the final images itself, so an attack spends no forward pass on
    them unless someone asks); ``parts``: an ensemble's record of which of its attacks broke each sample (``None``
    where none did), kept in the store."""

    images: Tensor
    steps: Tensor
    judge: Objective = field(repr=False)
    parts: list[str | None] | None = None

    @cached_property
    def success(self) -> Tensor:
        with torch.no_grad():
            return self.judge(self.images).success


@dataclass
class MinimalResult:
    """``images``: the smallest adversarial example found per sample (the input where none was found);
    ``size``: its perturbation size in the attack's norm (``inf`` where none was found); ``steps``: gradient steps."""

    images: Tensor
    size: Tensor
    steps: Tensor


def objective_gradient(
    objective: Objective, x: Tensor, eot: int = 1, view: Callable[[Tensor], Tensor] | None = None
) -> tuple[Verdict, Tensor]:
    """Loss gradient w.r.t. ``x`` averaged over ``eot`` evaluations (expectation over transformation, for
    randomised targets and defenses), the objective seeing ``view(x)`` when given (e.g. input diversity). The
    returned verdict averages the losses; a sample counts as a success only if every draw fooled the system."""
    verdicts, gradient = [], None
    for _ in range(eot):
        x = x.detach().requires_grad_(True)
        verdict = objective(view(x) if view else x)
        (draw,) = torch.autograd.grad(verdict.loss.sum(), x)
        gradient = draw if gradient is None else gradient.add_(draw)
        verdicts.append(Verdict(verdict.loss.detach(), verdict.success.detach(), verdict.score.detach()))
    assert gradient is not None, "eot must be at least 1"
    if eot == 1:  # the common case: no averaging passes over the image-sized gradient
        return verdicts[0], gradient
    loss = torch.stack([v.loss for v in verdicts]).mean(0)
    success = torch.stack([v.success for v in verdicts]).all(0)
    score = torch.stack([v.score for v in verdicts]).mean(0)
    return Verdict(loss, success, score), gradient.div_(eot)


class Attack(AttackBase):
    """A fixed-budget attack."""

    kind = "fixed-budget"

    @abstractmethod
    def __call__(
        self, objective: Objective, images: Tensor, budget: Budget, generator: torch.Generator | None = None
    ) -> AttackResult:
        """Maximise ``objective`` around ``images [B, 3, H, W]`` (in ``[0, 1]``) within ``budget``."""

    def gradient_parts(self) -> Attack:
        """What to run again when only the gradient changes (another BPDA stand-in for a defense): the whole
        attack by default; an ensemble leaves out its parts that never look at a gradient, which would only
        repeat their queries."""
        return self


@dataclass
class QueryResult:
    """A query attack's answer: ``images``, the adversarial batch (the input where it found nothing); ``size``, each
    sample's perturbation size in the attack's norm (``inf`` where none fooled the system). The queries it spent are
    the oracle's count."""

    images: Tensor
    size: Tensor


class QueryAttack(AttackBase):
    """A fixed-budget attack that only queries (scores, or decisions only): it searches within ``budget`` around
    ``images`` and never sees a gradient. ``default_queries``: its per-probe budget when ``--queries`` is not given."""

    kind = "fixed-budget"
    needs: ClassVar[Access] = "scores"
    default_queries: ClassVar[int | None] = 1_000

    @abstractmethod
    def __call__(
        self, oracle: Oracle, images: Tensor, budget: Budget, generator: torch.Generator, start: Tensor | None = None
    ) -> QueryResult:
        """Fool ``oracle`` within ``budget`` of ``images [B, 3, H, W]``, asking at most ``oracle.remaining()``.
        ``start``: where to begin the search when given, images within the budget (a transfer attack's examples,
        crafted on surrogates with no query); otherwise the attack's own starting point."""


class MinimalQueryAttack(AttackBase):
    """A decision-based minimal attack: from ``starts`` (images already on the wrong side of the decision, one per
    probe) it shrinks the perturbation towards ``images`` asking only whether the system is still fooled; one run
    gives every budget's answer, and the oracle's record gives the size reached after any number of queries."""

    kind = "minimal"
    needs: ClassVar[Access] = "decisions"
    default_queries: ClassVar[int | None] = 1_000
    norm: str

    @abstractmethod
    def __call__(self, oracle: Oracle, images: Tensor, starts: Tensor, generator: torch.Generator) -> QueryResult:
        """Shrink ``starts - images`` (``[B, 3, H, W]``) in the attack's norm while ``oracle`` stays fooled."""


class MinimalAttack(AttackBase):
    """A minimal-perturbation attack: accuracy at any budget ε is the fraction of samples whose ``size > ε``.
    ``norm`` is a setting the engine fills with the run's norm."""

    kind = "minimal"
    norm: str

    @abstractmethod
    def __call__(self, objective: Objective, images: Tensor, generator: torch.Generator | None = None) -> MinimalResult:
        """Find, per sample, the smallest perturbation of ``images [B, 3, H, W]`` that makes ``objective`` succeed."""
