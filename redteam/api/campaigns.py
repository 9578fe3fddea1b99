"""Campaigns: attacks that are whole experiments against one target over a dataset (a printable sticker, a universal
perturbation, model inversion, a poisoning backdoor), with their own metrics, tables, images and curve.

A campaign is a dataclass of its settings registered in :data:`redteam.api.attacks.ATTACKS`. It declares the
threat models it supports (the first is the default ``--threat``), whether it is about one person
(``needs_identity``), and its perturbation axis per ``--norm`` (:class:`Axis`: what ``--eps`` means, its unit,
defaults and bounds). The engine resolves and checks ``--eps`` against the axis, hands the campaign a
:class:`CampaignContext`, stores the :class:`CampaignReport`'s curve with the run's others and writes its tables.
"""

from __future__ import annotations

import io
import math
import random
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd
import torch
from torch import Tensor

from redteam.api.attacks import AttackBase
from redteam.api.targets import TARGETS, FaceRecognizer, Target
from redteam.datasets import FaceDataset
from redteam.errors import RedteamError
from redteam.runtime import chunks, seeded_generator

T = TypeVar("T")


@dataclass(frozen=True)
class Axis:
    """What a campaign's ``--eps`` values are: ``name`` (the curve's measure, e.g. ``area``), ``label`` (its plot
    axis), ``noun`` (one value, in messages: ``sticker area``), ``defaults`` (when ``--eps`` is not given),
    ``low``/``high`` bounds (``high_open``: ``high`` itself excluded), ``whole`` numbers only, and ``includes``
    (values always visited, e.g. the clean point 0)."""

    name: str
    label: str
    noun: str
    defaults: tuple[float, ...]
    low: float = 0.0
    high: float = math.inf
    high_open: bool = False
    whole: bool = False
    includes: tuple[float, ...] = (0.0,)

    def resolve(self, given: Sequence[float], campaign: str) -> tuple[float, ...]:
        """The values to visit, ascending: ``given`` (else the defaults) and ``includes``. Raises a one-line error
        for values out of bounds, or when nothing above the smallest is left to visit."""
        values = sorted({*(float(v) for v in (given or self.defaults)), *self.includes})
        above = values[-1] >= self.high if self.high_open else values[-1] > self.high
        if values[0] < self.low or above or (self.whole and any(v != int(v) for v in values)):
            bracket = ")" if self.high_open else "]"
            kind = "whole numbers" if self.whole else "values"
            raise RedteamError(
                f"{campaign}'s --eps are {self.noun}s, {self.label}: {kind} in [{self.low:g}, {self.high:g}{bracket}; "
                f"got {', '.join(f'{v:g}' for v in values)}."
            )
        if len(values) < 2:
            example = ",".join(f"{v:g}" for v in self.defaults)
            raise RedteamError(f"{campaign} needs a {self.noun} above {values[0]:g} in --eps, e.g. --eps {example}.")
        return tuple(values)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers, recursively (what a stage stores must load without pickled objects)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value.item() if hasattr(value, "item") and not isinstance(value, Tensor) else value


def _no_other_targets(name: str) -> Target:
    raise RedteamError(f"this campaign's context loads no other targets (asked for {name}).")


@dataclass
class CampaignContext:
    """What ``redteam run`` hands a campaign.

    ``target`` is loaded (eval mode, frozen); ``budgets`` are the resolved ``--eps`` values of the campaign's axis
    for ``norm`` (:meth:`Campaign.axis`), ascending, in the units users write them; ``limit`` is ``--limit`` (the
    campaign says what it caps); ``identity`` is ``--identity``; ``load_target(name)`` loads another zoo target on
    the same device (transfer tables). Files the campaign writes go under ``out``. ``progress(what, total)`` starts
    a progress bar and returns its ``advance(n)``.
    """

    target: Target
    target_name: str
    dataset: FaceDataset
    device: torch.device
    out: Path
    load_target: Callable[[str], Target] = field(repr=False, default=_no_other_targets)
    seed: int = 0
    threat: str = "dodging"
    budgets: tuple[float, ...] = ()
    norm: str = "linf"
    limit: int | None = None
    identity: str | None = None
    batch_size: int = 16
    progress: Callable[[str, int], Callable[[int], None]] = field(
        repr=False, default=lambda what, total: lambda n: None
    )
    #: Where finished stages are kept (:meth:`stage`): the run folder's store, set by the engine.
    stored_stage: Callable[[str], bytes | None] = field(repr=False, default=lambda name: None)
    record_stage: Callable[[str, bytes], None] = field(repr=False, default=lambda name, payload: None)
    #: The run folder's evidence log (:mod:`redteam.evidence`), set by the engine: a campaign hands it each image
    #: that fooled the system and an entry naming ``probe`` and ``eps`` (its axis value), the ``score`` and
    #: ``threshold``, and ``saved_score`` / ``saved_fooled``, the verdict on the image as an 8-bit file holds it
    #: (:func:`redteam.evidence.as_saved`); the engine adds the cell and the run's settings.
    record_evidence: Callable[[list[dict[str, Any]], list[Tensor]], None] = field(
        repr=False, default=lambda entries, images: None
    )

    def stage(self, name: str, compute: Callable[[], T]) -> T:
        """``compute()``'s result, stored as soon as it is computed, and on a later run of the same cell read back
        instead: an interrupted campaign resumes after its finished stages. A stage's result is plain data
        (tensors, numbers, text, lists and dicts of them) and must depend only on the run's seed and settings (draw
        from :meth:`generator` with the stage's own parts). Both paths return the stored copy, so a resumed run
        continues from exactly what an uninterrupted one had."""
        payload = self.stored_stage(name)
        if payload is None:
            buffer = io.BytesIO()
            torch.save(_plain(compute()), buffer)
            payload = buffer.getvalue()
            self.record_stage(name, payload)
        return torch.load(io.BytesIO(payload), map_location=self.device, weights_only=True)

    def generator(self, *parts: object) -> torch.Generator:
        """A generator seeded from the run seed and ``parts`` (same seed, same draws)."""
        return seeded_generator(self.device, self.seed, *parts)

    def shuffled(self, items: Sequence[T], *parts: object) -> list[T]:
        """``items`` in an order drawn from ``parts`` (include the seed: a campaign's own split of its data)."""
        order = list(items)
        random.Random(":".join(map(str, parts))).shuffle(order)
        return order

    def load(self, indices: Sequence[int]) -> Tensor:
        """Canonical face images ``[N, 3, S, S]`` of these dataset indices, on the campaign's device."""
        return self.dataset.load(indices).to(self.device)

    def batches(self, items: Sequence[T]) -> list[list[T]]:
        """``items`` in batches of the run's batch size."""
        return list(chunks(items, self.batch_size))

    def recognizers(self, names: Sequence[str] | None = None) -> tuple[list[tuple[str, FaceRecognizer]], list[str]]:
        """Recognisers to judge a result on (transfer tables): ``names`` (default: every zoo recogniser), the target
        itself where named. Returns ``(name, model)`` pairs and one line for each that could not be used (no
        weights, no threshold), so a table can say what it left out."""
        wanted = list(names) if names is not None else [n for n, t in TARGETS.items() if t.card.task == "recognition"]
        models, skipped = [], []
        for name in wanted:
            try:
                model = self.target if name == self.target_name else self.load_target(name)
                if not isinstance(model, FaceRecognizer):
                    raise RedteamError(f"a {model.card.task} model")
                model.threshold  # noqa: B018  (no calibrated threshold: it cannot decide)
            except RedteamError as error:
                skipped.append(f"transfer: {name} skipped ({error})")
                continue
            models.append((name, model))
        return models, skipped


@dataclass
class CampaignReport:
    """What a campaign found.

    ``metrics``: headline numbers (printed, stored in ``run.json``, checked by the regression gate). ``tables``:
    named tables, printed and written as ``<name>.csv`` (e.g. ``transfer``). ``curve``: the campaign's
    accuracy-perturbation view, one row per axis value with columns ``eps, accuracy, n``; it joins ``curve.csv``
    and ``curve.png``. ``images``: files written under the run folder. ``lines``: findings printed after the
    metrics.
    """

    metrics: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    curve: pd.DataFrame | None = None
    images: list[Path] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


class Campaign(AttackBase):
    """An attack that is a whole experiment (see the module docstring)."""

    kind = "campaign"
    #: Its perturbation axes, by ``--norm`` (the first is the default).
    axes: ClassVar[dict[str, Axis]]
    threats: ClassVar[tuple[str, ...]] = ("dodging",)
    #: Whether it needs ``--identity``.
    needs_identity: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "axes" in cls.__dict__:
            cls.norms = tuple(cls.axes)

    def photos_needed(self, threat: str) -> int:
        """Photos of the ``--identity`` person a run under ``threat`` needs (campaigns about one person); without
        ``--identity``, the engine picks the person with the most photos and says so."""
        return 1

    def axis(self, norm: str) -> Axis:
        """The axis ``--eps`` is read on for ``--norm norm`` (a campaign whose axis depends on its settings
        overrides this)."""
        return self.axes[norm]

    @abstractmethod
    def run(self, context: CampaignContext) -> CampaignReport:
        """Run the whole experiment and report it."""


def axis_labels() -> dict[str, str]:
    """Plot labels of every campaign's axes, by name (the per-probe norms' are in :mod:`redteam.plots`)."""
    from redteam.api.attacks import ATTACKS

    return {
        axis.name: axis.label
        for _, attack in ATTACKS.items()
        if issubclass(attack, Campaign)
        for axis in attack.axes.values()
    }
