"""The configuration of one evaluation (a *cell*): what is attacked, how, on which faces; its key and its label.

A config as typed may hold ``auto`` settings; :meth:`EvaluationConfig.resolve` settles every one of them and every
default (threat by the target's task or the campaign's own, norm by the attack, budgets from
:data:`redteam.budgets.DEFAULT_BUDGETS` or the campaign's axis) and checks everything that can be checked without
loading a model. The cell key is computed on the resolved config, from the settings that determine a probe's
result; it is what lets a run resume and a report find its rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from redteam.api import ACCESS_LEVELS, ATTACKS, TARGETS, AttackBase, Campaign, grants
from redteam.budgets import DEFAULT_BUDGETS
from redteam.errors import RedteamError, UnknownNameError
from redteam.runtime import check_precision, resolve_device
from redteam.threats import THREATS

#: The version of what an unchanged cell computes: bump it with a change that alters stored results (it is part of
#: every new cell's content fingerprint, so a store never mixes results of two versions in one cell).
RESULTS_VERSION = 2  # 2: PGD keeps its best iterate; a randomised defense's verdict is the majority of 5 draws
#: Settings that choose what and how much is computed, not what a given probe's result is.
NOT_IN_KEY = ("eps", "limit", "batch_size", "device", "checks")
#: Settings added after stores existed, left out of the key at these values so that older stores keep their keys.
KEY_DEFAULTS: dict[str, Any] = {
    "precision": "fp32", "skip_bad_images": False, "access": "gradients", "queries": None, "recalibrate": None,
    "far": None, "forward": "torch",
}  # fmt: skip
#: ``--recalibrate none``: judge a defended recogniser at the undefended threshold, even where the defense moves it.
AS_DEPLOYED = "none"
#: The false accept rate of a card's strict threshold (``threshold_far``), as ``redteam calibrate`` measures it.
CARD_FAR = 1e-3


@dataclass
class EvaluationConfig:
    """Everything that determines the per-probe results of one cell, and how much of it to compute.

    ``eps`` lists the budgets to visit as users write them (/255 for ℓ∞; a campaign's axis values); empty means
    the defaults. ``limit``, ``batch_size``, ``device`` and ``checks`` choose what and how much is computed, not what
    a given probe's result is, so they stay out of the cell key.
    """

    target: str
    attack: str
    data: str = "default"
    threat: str = "auto"  # dodging for recognisers, evasion for detectors, a campaign's first threat
    norm: str = "auto"  # the attack's first norm (a campaign's first axis)
    eps: tuple[float, ...] = ()
    limit: int | None = None
    seed: int = 0
    attack_options: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    weights: str | None = None
    surrogate: str | None = None  # a target, or several joined by commas (an ensemble), to craft on (transfer)
    align: bool = False
    batch_size: int | Literal["auto"] = 16  # "auto": as many as fit in accelerator memory (16 on a CPU)
    device: str = "auto"
    precision: str = "fp32"  # of the attack's own passes; every recorded verdict is judged in float32
    defense: str = "none"  # a DEFENSES name, name:key=value,key=value, or a +-joined chain of those
    adaptive: bool = True  # with a defense: attack through it (BPDA/EOT), or craft on the undefended target
    checks: bool = True
    identity: str | None = None  # the person a campaign (advhat, inversion, backdoor) is about
    skip_bad_images: bool = False  # leave out images a face model cannot use (listed), instead of stopping
    access: str = "auto"  # what the target shows the attacker: gradients, scores or decisions (auto: all it offers)
    queries: int | None = None  # per-probe query budget of a query attack (None: the attack's own default)
    recalibrate: str | None = None  # faces to move a defended system's threshold on (its own false accept rate)
    far: float | None = None  # decide at the card's threshold for this false accept rate (sets ``threshold``)
    forward: str = "torch"  # what computes the target's passes: torch, or onnxruntime (scores and decisions only)

    @property
    def attack_class(self) -> type[AttackBase]:
        return ATTACKS.get(self.attack)

    @property
    def surrogates(self) -> tuple[str, ...]:
        """The targets the attack crafts on when not the target itself (several: an ensemble), as listed."""
        return tuple(name.strip() for name in self.surrogate.split(",")) if self.surrogate else ()

    @property
    def campaign(self) -> bool:
        return self.attack_class.kind == "campaign"

    @property
    def defense_label(self) -> str:
        """The ``defense`` column of results and curves: ``none``, or the chain and how it was attacked."""
        if self.defense == "none":
            return "none"
        return f"{self.defense} ({'adaptive' if self.adaptive else 'non-adaptive'})"

    @property
    def label(self) -> str:
        """One line naming the cell (progress bars, the gate's tables, sweep summaries)."""
        target = f"{self.surrogate}→{self.target}" if self.surrogate else self.target
        return f"{target} / {self.defense_label} / {self.attack} / {self.threat} / {self.norm}"

    @property
    def recalibration_faces(self) -> str | None:
        """The faces the defended threshold is recalibrated on, if it is (``--recalibrate``, not ``none``)."""
        return None if self.recalibrate == AS_DEPLOYED else self.recalibrate

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "eps": list(self.eps)}

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> EvaluationConfig:
        """A config from its stored form (run.json, a store's cells, a baseline); other keys are ignored."""
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in stored.items() if k in known})
        return replace(config, eps=tuple(config.eps), attack_options=dict(config.attack_options))

    def resolve(self) -> EvaluationConfig:
        """A copy with every ``auto`` and default settled, checked without loading models or data (one-line
        :class:`RedteamError` otherwise). Resolving a resolved config changes nothing."""
        attack_class = self.attack_class
        norm = attack_class.norms[0] if self.norm == "auto" else self.norm
        if norm not in attack_class.norms:
            kind = " / ".join(attack_class.norms)
            raise RedteamError(
                f"{self.attack} is an {kind} attack: --norm must be {kind.replace(' / ', ' or ')}, not {norm!r}."
            )
        threat = self.threat
        if issubclass(attack_class, Campaign):
            threat = attack_class.threats[0] if threat == "auto" else threat
            if threat not in attack_class.threats:
                raise RedteamError(f"{self.attack} supports --threat {' or '.join(attack_class.threats)}.")
        elif threat == "auto":
            task = TARGETS.get(self.target).card.task
            threat = {"detection": "evasion", "liveness": "flagging"}.get(task, "dodging")
        THREATS.get(threat)
        check_weights(self.target, self.weights)
        surrogate = self._surrogate()
        access, queries = self._access(attack_class)
        self._check_forward(access)
        check_precision(self.precision)
        resolve_device(self.device)  # an unknown or absent device fails here, before any work
        if self.limit is not None and self.limit < 1:
            raise RedteamError(f"--limit must be at least 1, not {self.limit}.")
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise RedteamError(f"--batch-size must be a positive number or auto, not {self.batch_size!r}.")
        resolved = replace(self, norm=norm, threat=threat, access=access, queries=queries, surrogate=surrogate,
                           threshold=self._threshold())  # fmt: skip
        if issubclass(attack_class, Campaign):
            campaign = instantiate(self.attack, self.attack_options)
            assert isinstance(campaign, Campaign)
            eps = campaign.axis(norm).resolve(self.eps, self.attack)
        else:
            eps = tuple(self.eps) or DEFAULT_BUDGETS[norm]
            for value in eps:
                if not math.isfinite(value):
                    raise RedteamError(f"budget {value:g} is not a finite number.")
                if value < 0:
                    raise RedteamError(f"budget {value:g} is negative.")
                if norm == "linf" and value > 255:
                    raise RedteamError(f"ℓ∞ budget {value:g}/255 exceeds the whole pixel range.")
        return replace(resolved, eps=tuple(float(e) for e in eps))

    def _check_forward(self, access: str) -> None:
        """``forward`` is a runtime the target declares, and onnxruntime (no gradients) only serves queries."""
        check_runtime(self.target, self.forward)
        if self.forward != "torch" and access == "gradients":
            raise RedteamError(f"--forward {self.forward} has no gradients: use it with --access score or decision.")

    def _threshold(self) -> float | None:
        """``threshold`` settled: the one given, or, with ``far``, the card's threshold at that false accept rate
        (its calibration's: at :data:`CARD_FAR`, and at the card's ``thresholds_at_far``)."""
        if self.far is None:
            return self.threshold
        if not 0 < self.far < 1:
            raise RedteamError(f"--far is a false accept rate between 0 and 1 (e.g. 1e-3), not {self.far:g}.")
        card = TARGETS.get(self.target).card
        known = {**card.thresholds_at_far, **({CARD_FAR: card.threshold_far} if card.threshold_far else {})}
        chosen = next((t for far, t in known.items() if math.isclose(far, self.far)), None)
        if chosen is None:
            have = f"at FAR {', '.join(f'{far:g}' for far in sorted(known))} only" if known else "at no FAR"
            raise RedteamError(
                f"{self.target}'s calibration has a threshold {have}: for FAR {self.far:g} run `redteam calibrate "
                f"--target {self.target} --data FACES --far {self.far:g}` on calibration faces and pass the threshold "
                "it prints with --threshold."
            )
        if self.threshold is not None and self.threshold != chosen:
            raise RedteamError("--far chooses the threshold: give --far or --threshold, not both.")
        return chosen

    def _surrogate(self) -> str | None:
        """``surrogate`` settled: known names, each once, joined by commas without spaces; None when it is the
        target alone (that is a white-box run)."""
        names = self.surrogates
        for name in names:
            if not name:
                raise RedteamError(f"--surrogate {self.surrogate!r} has an empty name; list targets as a,b,c.")
            TARGETS.get(name)
        if len(set(names)) != len(names):
            raise RedteamError(f"--surrogate lists {sorted({n for n in names if names.count(n) > 1})} twice.")
        if names == (self.target,):
            return None
        return ",".join(names) or None

    def _access(self, attack_class: type[AttackBase]) -> tuple[str, int | None]:
        """``access`` settled (``score`` and ``decision`` accepted for ``scores`` and ``decisions``; ``auto``: all
        the target offers; never more) and the query budget of an attack that only queries."""
        offered = TARGETS.get(self.target).offers
        access = {"score": "scores", "decision": "decisions", "gradient": "gradients"}.get(self.access, self.access)
        access = offered if access == "auto" else access
        if access not in ACCESS_LEVELS:
            raise UnknownNameError("access", self.access, ("auto", *ACCESS_LEVELS))
        if not grants(offered, access):
            raise RedteamError(f"--access {access}: {self.target} answers {offered} at most.")
        if attack_class.default_queries is None:
            if self.queries is not None:
                raise RedteamError(f"--queries is a query attack's budget; {self.attack} does not query.")
            return access, None
        queries = self.queries if self.queries is not None else attack_class.default_queries
        if not isinstance(queries, int) or isinstance(queries, bool) or queries < 1:
            raise RedteamError(f"--queries is a number of queries per probe (at least 1), not {queries!r}.")
        return access, queries

    def budgets(self) -> list[float]:
        """A per-probe evaluation's budgets in image units, ascending, always starting with the clean point 0."""
        resolved = self.resolve()
        scale = 1 / 255 if resolved.norm == "linf" else 1.0
        return sorted({0.0, *(e * scale for e in resolved.eps)})

    def settings_key(self) -> str:
        """Digest of the settings that determine a probe's result (computed on the resolved config). A cell's key
        also covers the content of its inputs (:func:`redteam.engine.plan.claim_cell`); stores written before
        content fingerprints keyed cells by this alone."""
        return _digest(self._settings(NOT_IN_KEY))

    def comparability_key(self, fingerprint: dict[str, str]) -> str:
        """Digest of what makes two runs' numbers comparable: the settings and the content of the inputs
        (``fingerprint``: images, weights, defense weights, results version), but not the seed, the probe count or
        where the faces lie on this machine. Two runs with one key measure the same thing on different draws, so
        their difference is judged against their intervals (``redteam diff``, the gate)."""
        return _digest([self._settings((*NOT_IN_KEY, "seed", "data")), fingerprint])

    def _settings(self, ignored: tuple[str, ...]) -> dict[str, Any]:
        resolved = self.resolve()
        ignored += ("adaptive",) if resolved.defense == "none" else ()  # meaningless without one
        return {
            key: value
            for key, value in asdict(resolved).items()
            if key not in ignored and not (key in KEY_DEFAULTS and KEY_DEFAULTS[key] == value)
        }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_weights(target: str, weights: str | Path | None) -> None:
    """A user's weights file is for targets that take one, and must be a file."""
    if weights is None:
        return
    if not TARGETS.get(target).accepts_weights:
        raise RedteamError(f"{target} has fixed weights; --weights is for targets that load a user's file.")
    if not Path(weights).is_file():
        raise RedteamError(f"--weights {weights} is not a file.")


def check_runtime(target: str, forward: str) -> None:
    """``forward`` is one of the runtimes ``target`` declares (one line naming the targets that run on it)."""
    runtimes = TARGETS.get(target).runtimes
    if forward not in runtimes:
        able = [name for name, cls in TARGETS.items() if forward in getattr(cls, "runtimes", ())]
        raise RedteamError(
            f"--forward {forward}: {target} runs on {' or '.join(runtimes)}"
            + (f"; on {forward}: {', '.join(able)}." if able else ".")
        )


def instantiate(name: str, options: dict[str, Any]) -> AttackBase:
    """The attack ``name`` with ``options`` as its settings, checked (one-line errors naming what it takes)."""
    attack_class = ATTACKS.get(name)
    settings = attack_class.settings()
    unknown = sorted(set(options) - set(settings))
    if unknown:
        raise RedteamError(f"{name} has no setting {', '.join(unknown)}; it takes {', '.join(settings)}.")
    try:
        hints = typing.get_type_hints(attack_class)
    except NameError:  # an annotation its module cannot resolve at run time: its own __init__ checks
        hints = {}
    for setting, value in options.items():
        allowed = _value_types(hints.get(setting))
        if allowed and not (isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)):
            wanted = " or ".join(sorted({_TYPE_NAMES.get(t, t.__name__) for t in allowed}))
            raise RedteamError(f"{name}: {setting} takes {wanted}, not {value!r}.")
    try:
        attack = attack_class(**options)
    except (TypeError, ValueError) as error:
        raise RedteamError(f"{name}: {error}") from None
    for setting in attack_class.positive:
        value = getattr(attack, setting)
        if not value > 0:
            raise RedteamError(f"{name}: {setting} must be above 0, not {value!r}.")
    return attack


_TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "text", type(None): "nothing"}


def _value_types(hint: Any) -> tuple[type, ...]:
    """The plain types a setting annotated ``hint`` accepts (floats take whole numbers too); empty: not checked."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if typing.get_origin(hint) is typing.Literal:
        options = tuple(type(value) for value in typing.get_args(hint))
    if not all(option in _TYPE_NAMES for option in options):
        return ()
    return tuple({*options, *((int,) if float in options else ())})
