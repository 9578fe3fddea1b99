"""A face system as an API shows it to an attacker: images in, answers out, and every image counted.

A query attack gets an :class:`Oracle`, never the model: with ``scores`` access each answer is whether the system
was fooled and the threat's margin (what the attacker maximises, from the score the API returns); with
``decisions`` access only whether it was fooled. Answers are computed without autograd on detached inputs, so no
gradient reaches the attack. Every image is answered as a deployed system receives it, with 8 bits per channel
(:func:`~redteam.budgets.eight_bit`), and recorded so: an attack cannot win on a difference no upload can carry, and
a run against a model held here reproduces one over the wire. Each image sent is one query of its probe (a batch of
k images of one probe is k), and a probe's hard budget can never be exceeded: a query past it raises
:class:`QueryBudgetExceeded`.

The oracle also keeps, per probe, the smallest fooling perturbation among everything queried so far and when it
improved: the attack-independent record from which query curves are drawn (what an attacker holding every answer
would have after q queries).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from redteam.budgets import QUERY_CHECKPOINTS, Norm, grey_levels, onto_levels, perturbation_size
from redteam.threats import Objective

#: Images the model sees at once when an attack sends more (memory, not meaning).
CALL_SIZE = 256


class QueryBudgetExceeded(RuntimeError):
    """An attack asked for more queries than its probe's budget (a bug in the attack: it must ask ``remaining``)."""


@dataclass
class Answer:
    """Per queried image: ``fooled`` ``[K]`` (the system decided wrongly) and, with score access, ``margin`` ``[K]``
    (the threat's loss, larger is closer to fooling it; ``None`` with decisions only)."""

    fooled: Tensor
    margin: Tensor | None


@dataclass
class _Ledger:
    """What every view of one oracle shares, per probe of the batch: queries spent and the best fooling image."""

    origins: Tensor
    origin_levels: Tensor  # the origins' grey levels, for the 8-bit rounding of every query
    spent: Tensor
    best: Tensor
    best_size: Tensor
    improved: list[list[tuple[int, float, float]]] = field(default_factory=list)  # (queries, linf, l2)


class Oracle:
    """The face system behind ``objective`` for a batch of probes with ``origins [B, 3, H, W]``, answering at
    ``access`` (``scores`` or ``decisions``) with ``budget`` queries per probe; ``norm`` measures the best fooling
    perturbation it records. :meth:`narrow` gives a view of some of the probes, sharing the count."""

    def __init__(self, objective: Objective, origins: Tensor, access: str, budget: int, norm: Norm):
        if access not in ("scores", "decisions"):
            raise ValueError(f"an oracle answers scores or decisions, not {access}")
        self._objective, self.access, self.budget, self.norm = objective, access, budget, norm
        origins = origins.detach()
        count = len(origins)
        self._ledger = _Ledger(
            origins=origins,
            origin_levels=grey_levels(origins),
            spent=torch.zeros(count, dtype=torch.long, device=origins.device),
            best=origins.clone(),
            best_size=torch.full((count,), float("inf"), device=origins.device),
            improved=[[] for _ in range(count)],
        )
        self._probes = torch.arange(count, device=origins.device)  # this view's probes, in the whole batch

    def __len__(self) -> int:
        return len(self._probes)

    def narrow(self, index: Sequence[int] | Tensor) -> Oracle:
        """A view of this oracle's probes ``index`` (positions in this view), sharing counts and records."""
        view = object.__new__(Oracle)
        view.__dict__.update(self.__dict__)
        view._probes = self._probes[torch.as_tensor(index, dtype=torch.long, device=self._probes.device)]
        return view

    @property
    def spent(self) -> Tensor:
        """Queries spent per probe of this view ``[N]``."""
        return self._ledger.spent[self._probes]

    def remaining(self) -> Tensor:
        """Queries left per probe of this view ``[N]``."""
        return self.budget - self.spent

    def __call__(self, images: Tensor, probes: Sequence[int] | Tensor | None = None) -> Answer:
        """Answers for ``images [K, 3, H, W]``, the k-th for this view's probe ``probes[k]`` (default: one image per
        probe, in order). Raises :class:`QueryBudgetExceeded` before answering if any probe would go past its
        budget."""
        local = torch.arange(len(self)) if probes is None else torch.as_tensor(probes, dtype=torch.long)
        index = self._probes[local.to(self._probes.device)]
        asked = torch.bincount(index, minlength=len(self._ledger.spent))
        if bool((self._ledger.spent + asked > self.budget).any()):
            most = int((self._ledger.spent + asked).max())
            raise QueryBudgetExceeded(f"{most} queries asked of a budget of {self.budget} per probe")
        fooled, margin = [], []
        with torch.no_grad():  # in slices: an attack may send thousands of images at once, too many to copy whole
            for start in range(0, len(images), CALL_SIZE):
                part = slice(start, start + CALL_SIZE)
                received = onto_levels(images[part].detach(), self._ledger.origin_levels[index[part]])
                verdict = self._objective.select(index[part])(received)
                self._record(received, index[part], verdict.success)
                fooled.append(verdict.success)
                margin.append(verdict.loss)
        return Answer(torch.cat(fooled), torch.cat(margin) if self.access == "scores" else None)

    def _record(self, images: Tensor, index: Tensor, fooled: Tensor) -> None:
        """Count the queries of ``images`` (the k-th for probe ``index[k]``) and keep each probe's smallest fooling
        perturbation, with the query (in the order sent) that found it. Only fooling images are looked at one by
        one (this runs per slice of a call)."""
        ledger = self._ledger
        running, order = ledger.spent.tolist(), []  # each image's query number for its probe, in plain ints
        probes = index.tolist()
        for probe in probes:
            running[probe] += 1
            order.append(running[probe])
        fooling = torch.nonzero(fooled).squeeze(1)
        if len(fooling):  # sizes of the fooling images only: most of what a boundary attack sends does not fool
            delta = images[fooling] - ledger.origins[index[fooling]]
            sizes = perturbation_size(delta, self.norm).tolist()
            for j, k in enumerate(fooling.tolist()):
                probe = probes[k]
                if sizes[j] < float(ledger.best_size[probe]):
                    ledger.best_size[probe], ledger.best[probe] = sizes[j], images[k]
                    linf, l2 = (float(perturbation_size(delta[j : j + 1], norm)) for norm in ("linf", "l2"))
                    ledger.improved[probe].append((order[k], linf, l2))
        ledger.spent += torch.bincount(index, minlength=len(ledger.spent))

    def best_so_far(self) -> tuple[Tensor, Tensor]:
        """This view's smallest fooling images ``[N, 3, H, W]`` among everything queried (the origin where none
        fooled) and their sizes in the oracle's norm ``[N]`` (``inf`` where none): an attacker keeps every answer."""
        return self._ledger.best[self._probes].clone(), self._ledger.best_size[self._probes].clone()

    def improvements(self, probe: int) -> list[tuple[int, float, float]]:
        """For probe ``probe`` of the whole batch: ``(queries, linf, l2)`` each time its smallest fooling perturbation
        (in the oracle's norm) shrank, in the order sent."""
        return list(self._ledger.improved[probe])

    def trajectory(self, probe: int) -> list[tuple[int, float, float]]:
        """For probe ``probe`` of the whole batch: ``(queries, linf, l2)`` of the best fooling perturbation known at
        each checkpoint below the queries spent and at the last query (``inf`` before the first), image units."""
        spent = int(self._ledger.spent[probe])
        marks = [q for q in QUERY_CHECKPOINTS if q < spent] + [spent]
        points, best = [], (float("inf"), float("inf"))
        improved = iter(self._ledger.improved[probe])
        pending = next(improved, None)
        for mark in marks:
            while pending is not None and pending[0] <= mark:
                best, pending = pending[1:], next(improved, None)
            points.append((mark, *best))
        return points


def bisect_boundary(oracle: Oracle, images: Tensor, fooling: Tensor, tolerance: float, norm: Norm = "l2") -> Tensor:
    """The point on each path from ``images`` to ``fooling`` (``[N, 3, H, W]``, ``fooling`` decided wrongly) nearest
    the image that still fools ``oracle``, to within ``tolerance`` of the path's length: a binary search, one query
    per probe and halving, while the probe has queries left. The path (:func:`toward`) is the segment between them
    for ℓ2, and for ℓ∞ ``fooling`` clipped to a growing box around the image (HopSkipJump's ℓ∞ projection)."""
    # float64: in float32 a gap below the spacing of floats near ``high`` never closes, and the search would spend
    # the whole budget on it.
    low = torch.zeros(len(images), dtype=torch.float64, device=images.device)
    high = torch.ones(len(images), dtype=torch.float64, device=images.device)
    while True:
        searching = torch.nonzero((high - low > tolerance) & (oracle.remaining() > 0)).squeeze(1)
        if len(searching) == 0:
            return toward(images, fooling, high, norm)
        middle = (low[searching] + high[searching]) / 2
        fooled = oracle(toward(images[searching], fooling[searching], middle, norm), searching).fooled
        high[searching] = torch.where(fooled, middle, high[searching])
        low[searching] = torch.where(fooled, low[searching], middle)


def toward(images: Tensor, other: Tensor, weight: Tensor, norm: Norm = "l2") -> Tensor:
    """The point a share ``weight [N]`` of the way from ``images`` to ``other``: for ℓ2 on the segment between them,
    for ℓ∞ ``other`` clipped to the box around ``images`` of that share of their ℓ∞ distance."""
    if norm == "l2":
        return blend(images, other, weight)
    delta = other - images
    radius = (weight.to(images.dtype) * delta.flatten(1).abs().amax(1)).view(-1, *([1] * (images.dim() - 1)))
    return images + torch.maximum(torch.minimum(delta, radius), -radius)


def blend(images: Tensor, other: Tensor, weight: Tensor) -> Tensor:
    """``(1 - w) images + w other`` with a weight ``[N]`` per sample."""
    weight = weight.to(images.dtype).view(-1, *([1] * (images.dim() - 1)))
    return (1 - weight) * images + weight * other
