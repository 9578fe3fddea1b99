"""Query attacks side by side: ours against ART's and torchattacks' on the same oracle, probes, budgets and queries.

    python bench/blackbox.py [--target facenet] [--threat dodging] [--probes 8] [--skip 0] [--queries 1000] [--eps 8]

Every contender sees the face system through one of our counting oracles (per probe, so a library that queries
subsets of its batch is still counted per probe): ART and torchattacks get it as a two-class classifier whose
classes are the verification decision ("correct", "fooled"; with scores, the threat's margin as the logit gap).
A contender is stopped when a probe has spent ``--queries``; the oracle's record says what it had found by then.
Score attacks (ℓ∞, ``--eps`` /255): accuracy (probes not yet fooled) after 100, 1,000, 5,000 and 10,000 queries
(those under ``--queries``) and at the budget, success rate and median queries to the first fooling image.
Decision attacks (ℓ2, from the same starting images: another person's photo for dodging, the victim's for
impersonation): median ℓ2 of the smallest fooling image after each share of the queries, and success within
ℓ2 = 1 and 2. "own time" is the share of a contender's time spent outside the face system's forward passes. With
``--surrogate a,b,c`` every decision attack starts from the ensemble's transfer example where it fools the system (the
same starts for all), and ``ours square from transfer`` joins the score attacks.
"""

from __future__ import annotations

import redteam  # noqa: F401  (first, as in the CLI: its OpenMP wait policy only holds if set before torch loads)

# isort: split
import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from redteam.api import ATTACKS, Budget, Oracle
from redteam.budgets import Norm
from redteam.console import Bar, bars, progress
from redteam.engine import EvaluationConfig, prepare
from redteam.engine.execute import Executor
from redteam.runtime import prepare_torch
from redteam.threats import Objective

SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"


class Spent(Exception):
    """A contender reached the query budget: stop it and read the oracle's record."""


class TimedObjective:
    """The verdict objective, timing every forward pass it makes (the oracle's own cost) and advancing ``advance``
    by the queries it answered."""

    def __init__(self, objective: Objective, advance: Callable[[int], None]):
        self.objective, self.advance, self.seconds = objective, advance, 0.0

    def select(self, index: Tensor) -> Callable[[Tensor], object]:
        chosen = self.objective.select(index)

        def judge(images: Tensor):
            started = time.perf_counter()
            verdict = chosen(images)
            self.seconds += time.perf_counter() - started
            self.advance(len(images))
            return verdict

        return judge


def as_classifier(oracle: Oracle, limit: int) -> Callable[[Tensor], Tensor]:
    """One probe's oracle as a two-class model: logits ``[N, 2]`` for ("correct", "fooled"); raises :class:`Spent`
    once the probe has spent ``limit`` queries."""

    def logits(images: Tensor) -> Tensor:
        images = torch.as_tensor(images, dtype=torch.float32)
        room = limit - int(oracle.spent[0])
        if room <= 0:
            raise Spent
        answer = oracle(images[:room], [0] * min(room, len(images)))
        gap = answer.margin if answer.margin is not None else answer.fooled.float() * 2 - 1
        gap = torch.cat([gap, torch.full((len(images) - len(gap),), -1.0)])  # past the budget: never fooled
        return torch.stack([-gap / 2, gap / 2], dim=1)

    return logits


def run_ours(name: str, oracle: Oracle, images: Tensor, budget: Budget | None, starts: Tensor | None) -> None:
    """A query attack: minimal from ``starts`` without a budget; fixed-budget with one, from ``starts`` if given."""
    attack: Any = ATTACKS.get(name)()
    generator = torch.Generator().manual_seed(0)
    if budget is None:
        attack(oracle, images, starts, generator)
    elif starts is None:
        attack(oracle, images, budget, generator)
    else:
        attack(oracle, images, budget, generator, start=starts)


def run_torchattacks_square(oracle: Oracle, images: Tensor, budget: Budget, limit: int) -> None:
    import torchattacks

    for k in range(len(images)):
        model = _Module(as_classifier(oracle.narrow([k]), limit))
        attack = torchattacks.Square(model, norm="Linf", eps=float(budget.eps), n_queries=limit, seed=0)
        try:
            attack(images[k : k + 1], torch.zeros(1, dtype=torch.long))
        except Spent:
            pass


def run_art(name: str, oracle: Oracle, images: Tensor, budget: Budget | None, starts: Tensor | None, limit: int):
    from art.attacks.evasion import HopSkipJump, SquareAttack
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    for k in range(len(images)):
        logits = as_classifier(oracle.narrow([k]), limit)
        classifier = BlackBoxClassifierNeuralNetwork(
            lambda x, logits=logits: logits(torch.from_numpy(x)).numpy(), tuple(images.shape[1:]), 2, clip_values=(0, 1)
        )
        one = images[k : k + 1].numpy()
        try:
            if name == "square":
                assert budget is not None
                SquareAttack(classifier, norm=np.inf, eps=float(budget.eps), max_iter=limit, verbose=False).generate(
                    one, y=np.array([[1.0, 0.0]])
                )
            else:
                assert starts is not None
                HopSkipJump(classifier, norm=2, max_iter=10_000, verbose=False).generate(
                    one, y=np.array([[1.0, 0.0]]), x_adv_init=starts[k : k + 1].numpy()
                )
        except Spent:
            pass


class _Module(torch.nn.Module):
    def __init__(self, logits: Callable[[Tensor], Tensor]):
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # torchattacks reads the model's device from a parameter

    def forward(self, images: Tensor) -> Tensor:
        return self.logits(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="facenet")
    parser.add_argument("--threat", default="dodging", choices=["dodging", "impersonation"])
    parser.add_argument("--data", default=str(SHARED_FACES))
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first SKIP probes (to extend a run)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--eps", type=float, default=8.0, help="ℓ∞ budget of the score attacks, /255")
    parser.add_argument("--only", default="", help="comma-separated contenders to run (default: all)")
    parser.add_argument("--surrogate", default=None, help="start from transfer examples crafted on these (a,b,c)")
    args = parser.parse_args()
    prepare_torch()  # as the CLI: freed memory kept for the next pass (without it, page faults took half the time)
    torch.manual_seed(0)
    cell = prepare(EvaluationConfig(target=args.target, attack="pgd", threat=args.threat, data=args.data,
                                    limit=args.probes, checks=False, surrogate=args.surrogate))  # fmt: skip
    executor = Executor(cell)
    chosen = cell.probes[args.skip :]
    images = cell.dataset.load([p.image for p in chosen])
    crafting, verdict = executor.objectives(chosen)
    with torch.no_grad():
        standing = ~verdict(images).success
    probes = [p for p, keep in zip(chosen, standing.tolist()) if keep]
    kept = torch.nonzero(standing).squeeze(1)
    images, verdict, crafting = images[standing], verdict.select(kept), crafting.select(kept)
    budget, limit = Budget("linf", args.eps / 255), args.queries
    print(f"{args.target} · {args.threat} · probes {args.skip + 1}-{len(cell.probes)}: {len(probes)} decided "
          f"correctly · {limit} queries per probe")  # fmt: skip
    wanted = set(args.only.split(",")) if args.only else None

    with progress() as tracker:  # on stderr: the tables on stdout stay as they are
        bar = bars(tracker)
        score = {
            "ours square": lambda o: run_ours("square", o, images, budget, None),
            "ours nes": lambda o: run_ours("nes", o, images, budget, None),
            "ours random-search": lambda o: run_ours("random-search", o, images, budget, None),
            "torchattacks Square": lambda o: run_torchattacks_square(o, images, budget, limit),
            "ART SquareAttack": lambda o: run_art("square", o, images, budget, None, limit),
        }
        if args.surrogate:
            transferred = executor.transfer_examples(crafting, images, budget, torch.Generator().manual_seed(0))
            score["ours square from transfer"] = lambda o: run_ours("square", o, images, budget, transferred)
        # Accuracy (probes not yet fooled within ε) after the round numbers of queries below the budget.
        checks = sorted({q for q in (100, 1_000, 5_000, 10_000) if q < limit} | {limit})
        print(f"\nscores, ℓ∞ {args.eps:g}/255")
        print(f"| contender | {' | '.join(f'accuracy @{q}' for q in checks)} | success | median queries to success "
              f"| own time |\n|---|{'---|' * len(checks)}---|---|---|")  # fmt: skip
        for name, work in score.items():
            if wanted is None or name in wanted:
                oracle, own = _contest(name, work, verdict, images, "scores", limit, "linf", bar)
                firsts = [_first_success(oracle, k, float(budget.eps)) for k in range(len(images))]
                found = [q for q in firsts if q is not None]
                median = statistics.median(found) if found else float("nan")
                accuracy = " | ".join(f"{1 - sum(q <= mark for q in found) / len(images):.0%}" for mark in checks)
                print(f"| {name} | {accuracy} | {len(found)}/{len(images)} | {median:g} | {own:.1%} |")

        starter = Oracle(verdict, images, "decisions", 16, "l2")
        starts = executor.starting_points(probes, starter, images)
        decision = {
            "ours hsj": lambda o: run_ours("hsj", o, images, None, starts),
            "ours evolutionary": lambda o: run_ours("evolutionary", o, images, None, starts),
            "ours sign-opt": lambda o: run_ours("sign-opt", o, images, None, starts),
            "ART HopSkipJump": lambda o: run_art("hsj", o, images, None, starts, limit),
        }
        marks = sorted({max(1, limit // 10), limit // 2, limit})
        heads = " | ".join(f"median ℓ2 @{q}" for q in marks)
        source = f"transfer from {args.surrogate}, else " if args.surrogate else ""
        spent = starter.spent.tolist()
        print(f"\ndecisions, ℓ2 (starts: {source}{args.threat} starting images, found with {spent} queries)")
        print(f"| contender | {heads} | ℓ2 ≤ 1 | ℓ2 ≤ 2 | own time |\n|---|{'---|' * len(marks)}---|---|---|")
        for name, work in decision.items():
            if wanted is None or name in wanted:
                oracle, own = _contest(name, work, verdict, images, "decisions", limit, "l2", bar)
                sizes = {q: [_size_at(oracle, k, q) for k in range(len(images))] for q in marks}
                cells = " | ".join(f"{statistics.median(sizes[q]):.3g}" for q in marks)
                final = sizes[limit]
                within = [sum(s <= bound for s in final) for bound in (1.0, 2.0)]
                print(f"| {name} | {cells} | {within[0]}/{len(images)} | {within[1]}/{len(images)} | "
                      f"{own:.1%} |")  # fmt: skip


def _contest(
    name: str,
    work: Callable[[Oracle], None],
    verdict: Objective,
    images: Tensor,
    access: str,
    limit: int,
    norm: Norm,
    bar: Bar,
) -> tuple[Oracle, float]:
    """Contender ``name``'s ``work`` run on a fresh oracle of ``verdict`` whose forward passes are timed and whose
    queries are shown on a progress bar: the oracle, and the share of the time spent outside the forward passes."""
    timed = TimedObjective(verdict, bar(f"{name}: queries", len(images) * limit))
    oracle = Oracle(timed, images, access, limit, norm)  # type: ignore[arg-type]
    started = time.perf_counter()
    work(oracle)
    return oracle, 1 - timed.seconds / (time.perf_counter() - started)


def _first_success(oracle: Oracle, probe: int, eps: float) -> int | None:
    """Queries spent when probe's first fooling image within ``eps`` (ℓ∞) was sent."""
    return next((q for q, linf, _ in oracle.improvements(probe) if linf <= eps + 1e-6), None)


def _size_at(oracle: Oracle, probe: int, queries: int) -> float:
    """The probe's smallest fooling ℓ2 among its first ``queries`` queries (inf if none)."""
    return min((l2 for q, _, l2 in oracle.improvements(probe) if q <= queries), default=float("inf"))


if __name__ == "__main__":
    main()
