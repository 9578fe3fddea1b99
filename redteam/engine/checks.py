"""Sanity checks that run with every evaluation and are stored with its results (in the spirit of AutoAttack's).

A failed check does not stop the run: it is a warning that the robustness numbers may be wrong (gradient masking,
a broken attack, a mislabelled run) and it travels with the results into reports and the regression gate.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import pandas as pd
import torch
import torch.nn.functional as F

from redteam.api import (
    Attack,
    Budget,
    FaceRecognizer,
    InputTransform,
    Norm,
    Objective,
    Oracle,
    Target,
    grants,
    objective_gradient,
)
from redteam.attacks.pgd import PGD
from redteam.attacks.random_search import RandomSearch
from redteam.budgets import display_eps
from redteam.engine.assembly import InputDefense, drawing_from, fixed_draws
from redteam.engine.evaluation import Evaluation
from redteam.engine.execute import Executor
from redteam.engine.operating import AcceptRates, accept_rates
from redteam.engine.plan import Cell
from redteam.intervals import sign_test
from redteam.results import accuracy_curve
from redteam.runtime import seeded_generator

#: The check every evaluation runs first.
MONOTONE = "monotone"
SAMPLE = 8  # clean-correct probes the checks attack (they cost a few seconds per model on a CPU)
UNBOUNDED = {"linf": 64 / 255, "l2": 32.0}  # far beyond any meaningful face perturbation
#: Against a randomised defense, an adaptive attack that left more probes standing than the non-adaptive one fails
#: the check only at this one-sided significance (a sign test); above it, the defense's draws explain the difference.
DRAWS_LEVEL = 0.05


@dataclass(frozen=True)
class Check:
    """``cell``: the cell the check is about when it is not the one being checked (a comparison of two cells is
    judged when the second finishes, but concerns the first)."""

    name: str
    passed: bool
    detail: str
    cell: str | None = None


def check_rows(key: str, checks: list[Check]) -> list[dict]:
    """The store's rows of ``checks`` run for cell ``key``."""
    return [{"cell": c.cell or key, "name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]


def checks_of(evaluation: Evaluation, announce: Callable[[str], None] = lambda what: None) -> list[Check]:
    """The checks of a finished local evaluation: run and stored, or, when this process computed nothing new and
    they are stored already, the stored outcome. ``announce`` hears which check runs (some take minutes)."""
    key, store = evaluation.cell.key, evaluation.store
    stored = store.checks(key)
    # Only the cell's own checks, which always include MONOTONE, count as done: a run stopped before its checks
    # holds just what another cell recorded on it (adaptive beats non-adaptive).
    if evaluation.computed == 0 and (stored["name"] == MONOTONE).any():
        return [Check(row.name, bool(row.passed), row.detail) for row in stored.itertuples()]
    checks = run_checks(evaluation.cell, evaluation.executor, store.frame(), store.cells(current=True), announce)
    store.record_checks(check_rows(key, checks))
    return checks


def run_checks(
    cell: Cell,
    executor: Executor,
    results: pd.DataFrame,
    cells: dict[str, dict],
    announce: Callable[[str], None] = lambda what: None,
) -> list[Check]:
    """Run every check of ``cell`` on up to ``SAMPLE`` of its clean-correct probes, given every current row of its
    store and its cells' configurations (other cells feed the transfer and adaptive checks); ``announce`` hears
    which check runs."""
    own = results[(results["cell"] == cell.key) & results["probe"].isin({p.key for p in cell.probes})]
    clean = own[own["eps"] == 0.0].set_index("probe")
    sample = [p for p in cell.probes if p.key in clean.index and clean.loc[p.key, "correct"]][:SAMPLE]
    checks = [_monotone(accuracy_curve(own[own["eps"].isin(cell.budgets)]))]
    checks += _operating_point(cell, own, executor.target)
    announce("the defended operating point")
    checks += _defended_operating_point(cell, executor)
    if executor.eot is not None:
        checks.append(Check("EOT draws", executor.eot.enough, executor.eot.describe()))
    if sample:
        images = cell.dataset.load([p.image for p in sample]).to(executor.device)
        crafting, verdict = executor.objectives(sample)
        eot = cell.attack.eot if cell.attack.supports_eot else 1  # type: ignore[attr-defined]
        white_box = grants(executor.crafting.offers, "gradients")  # gradient checks need what the attack can see
        with drawing_from(executor.generator("checks"), executor.crafting, executor.target):
            if white_box:
                announce("gradients, an unbounded attack, the BPDA stand-ins")
                generator = seeded_generator(executor.device, "unbounded")
                norm = cast(Norm, cell.config.norm)  # resolved: one of the per-probe attack's norms
                checks += [
                    gradient_check(crafting, images),
                    unbounded_check(crafting, images, norm, generator, eot),
                ]
                checks += surrogate_checks(executor.crafting, images[:2])
            announce("beating noise")
            checks.append(_beats_noise(cell, own, verdict, images, sample))
            announce("convergence: twice the effort on probes still standing")
            checks += _converged(cell, own, executor, executor.generator("converged"))
            announce("the defense's randomness fixed")
            checks += _fixed_randomness(cell, own, executor, crafting, verdict, images, sample)
            if cell.queries and cell.budgets[-1] > 0:
                announce("random search with the same queries, and the white-box attack")
                checks.append(_beats_random_search(cell, own, verdict, images, sample))
                if white_box:  # the target's own gradients, not the surrogates' a transfer start was crafted on
                    own_model = verdict if cell.config.surrogate else crafting
                    checks.append(_below_white_box(cell, own, own_model, images, sample))
    if cell.queries:
        checks.append(_within_query_budget(cell, own))
    checks += _transfer_consistency(cell, results)
    checks += _adaptive_consistency(cell, results, cells)
    return checks


def _operating_point(cell: Cell, own: pd.DataFrame, target: Target) -> list[Check]:
    """Clean accuracy far below the card's verification accuracy means the face system was set up wrongly (most
    often a threshold in the wrong unit): every robustness number of the cell is then meaningless."""
    card_accuracy = target.card.metrics.get("verification_accuracy")
    clean = own[own["eps"] == 0.0]["correct"]
    if card_accuracy is None or cell.config.threat not in ("dodging", "impersonation") or len(clean) < 4:
        return []
    accuracy = float(clean.mean())
    passed = accuracy >= card_accuracy - 0.3
    detail = f"clean accuracy {accuracy:.0%} at {target.threshold_text()} (the card's: {card_accuracy:.1%})"
    if not passed and cell.config.defense != "none":
        detail += "; the defended system decides this badly on clean faces: see its defended operating point"
    elif not passed:
        detail += "; is the threshold right? A cosine threshold is in [-1, 1], an L2 one a distance such as 0.6"
    return [Check("operating point", passed, detail)]


#: How much more often than the undefended system a defended one may accept impostors before it is flagged.
FALSE_ACCEPT_MARGIN = 0.1
#: How much less often than the undefended system a defended one may accept genuine pairs before it is flagged.
FALSE_REJECT_MARGIN = 0.1
#: Operating points measured in this process, by the deployed system's settings and the content of its inputs.
_MEASURED_OPERATING_POINTS: dict[tuple, tuple[AcceptRates, AcceptRates]] = {}


def _defended_operating_point(cell: Cell, executor: Executor) -> list[Check]:
    """A defended recogniser's genuine and false accept rates on the cell's faces, next to the undefended one's: a
    defense that makes it accept impostors buys dodging robustness with them (flagged; ``--recalibrate`` fixes its
    threshold), and one that makes it reject genuine pairs buys impersonation robustness (flagged)."""
    config = cell.config
    if config.defense == "none" or config.threat not in ("dodging", "impersonation"):
        return []
    if not isinstance(executor.undefended, FaceRecognizer):
        return []
    # Both cells of a defense (adaptive and not) judge the same deployed system: it is measured once per process.
    key = executor.deployed_system()
    if key not in _MEASURED_OPERATING_POINTS:
        measured = [
            accept_rates(model, cell.dataset, config.seed, executor.generator("operating"), executor.batch_size)
            for model in (executor.target, executor.undefended)
        ]
        _MEASURED_OPERATING_POINTS[key] = measured[0], measured[1]
    defended, plain = _MEASURED_OPERATING_POINTS[key]
    accepts_impostors = defended.impostor > plain.impostor + FALSE_ACCEPT_MARGIN
    rejects_genuine = defended.genuine < plain.genuine - FALSE_REJECT_MARGIN
    passed = not (accepts_impostors or rejects_genuine)
    moved = ""
    if executor.recalibration is not None:
        moved = f", recalibrated on {config.recalibrate} to false accepts {executor.recalibration[1]:.1%} there"
    detail = (
        f"on {defended.pairs} genuine and {defended.pairs} impostor pairs: defended at "
        f"{executor.target.threshold_text()}{moved} accepts {defended.genuine:.0%} genuine, {defended.impostor:.0%} "
        f"impostors; undefended at {executor.undefended.threshold_text()}: {plain.genuine:.0%}, {plain.impostor:.0%}"
    )
    if accepts_impostors:
        detail += "; it accepts impostors it should not, so its dodging robustness is not robustness: --recalibrate"
    if rejects_genuine:
        detail += "; it rejects genuine pairs it should accept, so its impersonation robustness is not robustness"
    return [Check("defended operating point", passed, detail)]


def _monotone(curve: pd.DataFrame) -> Check:
    rises = (curve["accuracy"].diff() > 1e-12).sum()
    return Check(MONOTONE, rises == 0, "accuracy never rises with ε" if rises == 0 else f"{rises} rises with ε")


def gradient_check(objective: Objective, images: torch.Tensor) -> Check:
    """Gradients of the objective must be finite and non-zero for every probe (zero or NaN means masking)."""
    _, gradient = objective_gradient(objective, images)
    norms = gradient.flatten(1).norm(dim=1)
    finite, nonzero = bool(torch.isfinite(gradient).all()), bool((norms > 0).all())
    detail = (
        f"finite: {finite}, non-zero for {int((norms > 0).sum())}/{len(norms)} probes, median ‖∇‖₂ {norms.median():.3g}"
    )
    return Check("gradients", finite and nonzero, detail)


def unbounded_check(
    objective: Objective, images: torch.Tensor, norm: Norm, generator: torch.Generator | None = None, eot: int = 1
) -> Check:
    """PGD with a huge budget against the model the attack differentiates must fool it on every probe. ``eot``:
    the attack's own gradient samples per step (a randomised defense needs them here as much as in the attack)."""
    result = PGD(steps=20, eot=eot)(objective, images, Budget(norm, UNBOUNDED[norm]), generator)
    accuracy = 1 - result.success.float().mean().item()
    return Check("unbounded", accuracy <= 0.1, f"accuracy {accuracy:.0%} under an unbounded PGD-20 (expect ~0%)")


#: A BPDA stand-in whose derivatives correlate less than this with the real transform's is flagged.
MIN_CORRELATION = 0.5
#: The read-out the correlation compares: means over blocks of this many pixels (a halftone is defined there, not
#: per dot), along smooth random directions (noise at 1/16 of the size, enlarged), with central differences of
#: this step.
READOUT_BLOCK, DIRECTION_SCALE, DIFFERENCE_STEP, DIRECTIONS = 16, 16, 8 / 255, 3


def surrogate_checks(model: Target, images: torch.Tensor) -> list[Check]:
    """For each BPDA stand-in an adaptive attack uses, the correlation (in float64) between its directional
    derivatives and central finite differences of the real transform, read out as block means: a stand-in that
    does not move the way the transform does carries no useful gradient, and the adaptive curve overstates
    robustness."""
    if not isinstance(model, InputDefense) or not model.adaptive:
        return []
    checks = []
    for transform in model.transforms:
        assert isinstance(transform, InputTransform)
        if transform.differentiable:
            continue
        for name in transform.surrogates():
            r = surrogate_correlation(transform, name, images)
            detail = f"correlation {r:.2f} with finite differences of the real {transform.name} (float64, block means)"
            checks.append(Check(f"BPDA {transform.name}: {name}", r >= MIN_CORRELATION, detail))
    return checks


def surrogate_correlation(transform: InputTransform, surrogate: str, images: torch.Tensor) -> float:
    """Correlation between ``transform``'s stand-in ``surrogate``'s directional derivatives at ``images`` and
    central differences of ``transform`` itself (a randomised one draws the same for both sides), in float64."""
    exact = copy.deepcopy(transform).double()
    stand_in, x = exact.surrogates()[surrogate], images.detach().double()
    generator = torch.Generator(x.device).manual_seed(0)

    def read(z: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(z, READOUT_BLOCK)

    differences, derivatives = [], []
    for _ in range(DIRECTIONS):
        coarse = (len(x), 3, max(1, x.shape[2] // DIRECTION_SCALE), max(1, x.shape[3] // DIRECTION_SCALE))
        direction = torch.randn(coarse, generator=generator, device=x.device, dtype=x.dtype)
        direction = F.interpolate(direction, size=x.shape[-2:], mode="bilinear", align_corners=False)
        shifted = [(x + sign * DIFFERENCE_STEP * direction).clamp(0, 1) for sign in (1, -1)]
        with torch.no_grad():  # the same draw on both sides: the difference is the transform's, not its noise's
            up, down = (read(exact(z, torch.Generator(x.device).manual_seed(1))) for z in shifted)
        differences.append(((up - down) / (2 * DIFFERENCE_STEP)).flatten())
        moved = (shifted[0] - shifted[1]) / (2 * DIFFERENCE_STEP)  # the direction as clipping to [0, 1] left it
        _, derivative = torch.autograd.functional.jvp(lambda z: read(stand_in(z)), x, moved)
        derivatives.append(derivative.flatten())
    return float(torch.corrcoef(torch.stack([torch.cat(differences), torch.cat(derivatives)]))[0, 1])


def _beats_noise(cell: Cell, own: pd.DataFrame, verdict: Objective, images: torch.Tensor, sample) -> Check:
    """At the largest budget the attack must do at least as well as random noise of that size."""
    eps = cell.budgets[-1]
    if eps == 0:
        return Check("beats noise", True, "no budget above 0")
    noise = Budget(cell.config.norm, eps).sample(images, seeded_generator(images.device, "noise"))  # type: ignore[arg-type]
    with torch.no_grad():
        noise_accuracy = 1 - verdict((images + noise).clamp(0, 1)).success.float().mean().item()
    stored = own[own["eps"] == eps].set_index("probe")
    attack_accuracy = stored.loc[[p.key for p in sample], "correct"].mean()
    # No better than noise is a warning unless the attack fooled everything: both at 100% means nothing works.
    passed = attack_accuracy < noise_accuracy or attack_accuracy == 0
    detail = f"at the largest ε: attack {attack_accuracy:.0%}, noise {noise_accuracy:.0%}"
    if not passed:
        detail += "; the attack does no better than noise: is it attacking at all?"
    return Check("beats noise", passed, detail)


#: The share of the re-attacked survivors that twice the effort may still fool before the attack counts as
#: unconverged (at least one probe may fall).
CONVERGED_SLACK = 1 / 8


def _converged(cell: Cell, own: pd.DataFrame, executor: Executor, generator: torch.Generator) -> list[Check]:
    """Twice the effort (the attack's declared ``effort`` settings doubled; EOT only where it draws already) on up to
    :data:`SAMPLE` of the probes that still stand, at the budget where the cell's probes are nearest half fooled: if
    more than :data:`CONVERGED_SLACK` of them fall (and more than one), the attack had not converged and its curve
    overstates robustness. The survivors are drawn from every probe of the cell, not from the other checks' sample:
    where those all fell, others may still stand."""
    attack = cell.attack
    if not isinstance(attack, Attack) or not attack.effort:
        return []
    stored = own.set_index(["eps", "probe"])["correct"].astype(bool)
    attacked = [p for p in cell.probes if (0.0, p.key) in stored.index]
    standing = {eps: [p for p in attacked if stored.get((eps, p.key), False)] for eps in cell.budgets if eps > 0}
    budgets = [eps for eps, probes in standing.items() if probes]
    if not budgets:
        return [Check("converged", True, f"nothing stands at any budget above 0 (of {len(attacked)} probes)")]
    eps = min(budgets, key=lambda e: abs(len(standing[e]) / len(attacked) - 0.5))
    survivors = standing[eps][:SAMPLE]
    doubled = {s: 2 * getattr(attack, s) for s in attack.effort if s != "eot" or getattr(attack, s) > 1}
    crafting, verdict = executor.objectives(survivors)
    images = cell.dataset.load([p.image for p in survivors]).to(executor.device)
    norm = cast(Norm, cell.config.norm)
    result = replace(attack, **doubled)(crafting, images, Budget(norm, eps), generator)
    with torch.no_grad():
        fallen = int(verdict(result.images).success.sum())
    effort = ", ".join(f"{s} {v}" for s, v in doubled.items())
    detail = (
        f"at ε {display_eps(eps, norm):g}: {len(standing[eps])} of {len(attacked)} probes stand; {len(survivors)} of "
        f"them attacked again with {effort}: {fallen} fell"
    )
    passed = fallen <= max(1.0, CONVERGED_SLACK * len(survivors))
    if not passed:
        detail += "; the attack had not converged: raise its steps (the curve overstates robustness)"
    return [Check("converged", passed, detail)]


#: How far below the run's accuracy the same attack may get once the defense's randomness is fixed to one draw
#: before the robustness counts as resting on that randomness (two probes of eight).
FIXED_RANDOMNESS_SLACK = 1 / 4


def _fixed_randomness(
    cell: Cell, own: pd.DataFrame, executor: Executor, crafting: Objective, verdict: Objective, images, sample
) -> list[Check]:
    """A randomised defense attacked adaptively, at the largest budget, with its randomness fixed to one draw for
    the attack and the verdict alike: if the attack then breaks far more probes, the run's robustness rests on
    the randomness rather than on what the defense does to an image. The attack could not optimise through the
    noise, so more gradient samples per step (EOT) or steps should show more of it."""
    attack = cell.attack
    if not (cell.defense.randomised and cell.config.adaptive and isinstance(attack, Attack)):
        return []
    eps, run_accuracy = _attacked_accuracy(cell, own, sample)
    norm = cast(Norm, cell.config.norm)
    with fixed_draws(0, executor.crafting, executor.target):
        result = attack(crafting, images, Budget(norm, eps), executor.generator("fixed randomness"))
        with torch.no_grad():
            fixed_accuracy = 1 - float(verdict(result.images).success.float().mean())
    detail = (
        f"at ε {display_eps(eps, norm):g}: with the defense's randomness fixed to one draw, {attack.name} leaves "
        f"{fixed_accuracy:.0%} of the checks' probes ({run_accuracy:.0%} with fresh draws, as judged)"
    )
    passed = fixed_accuracy >= run_accuracy - FIXED_RANDOMNESS_SLACK
    if not passed:
        detail += "; the robustness rests on the randomness: raise the attack's eot and steps"
    return [Check("fixed randomness", passed, detail)]


def _attacked_accuracy(cell: Cell, own: pd.DataFrame, sample) -> tuple[float, float]:
    """The largest budget and the stored accuracy there on the checks' probes."""
    eps = cell.budgets[-1]
    return eps, float(own[own["eps"] == eps].set_index("probe").loc[[p.key for p in sample], "correct"].mean())


def _beats_random_search(cell: Cell, own: pd.DataFrame, verdict: Objective, images: torch.Tensor, sample) -> Check:
    """A query attack must do at least as well as random points of the budget's boundary with the same queries."""
    eps, attack_accuracy = _attacked_accuracy(cell, own, sample)
    norm = cast(Norm, cell.config.norm)
    queries = cast(int, cell.config.queries)
    oracle = Oracle(verdict, images, "decisions", queries, norm)
    found = RandomSearch()(oracle, images, Budget(norm, eps), seeded_generator(images.device, "random-search"))
    random_accuracy = 1 - torch.isfinite(found.size).float().mean().item()
    shown = display_eps(eps, norm)
    return Check(
        "beats random search",
        attack_accuracy <= random_accuracy + 1e-9,
        f"at ε {shown:g} with {queries} queries: attack {attack_accuracy:.0%}, random search {random_accuracy:.0%}",
    )


def _below_white_box(cell: Cell, own: pd.DataFrame, crafting: Objective, images: torch.Tensor, sample) -> Check:
    """A query attack sees less than a white-box one: if it does better at the same budget (by more than one probe
    of noise), the gradients the white-box attack follows are masked and its numbers overstate robustness."""
    eps, attack_accuracy = _attacked_accuracy(cell, own, sample)
    norm = cast(Norm, cell.config.norm)
    result = PGD(steps=20)(crafting, images, Budget(norm, eps), seeded_generator(images.device, "white-box"))
    white_accuracy = 1 - result.success.float().mean().item()
    passed = attack_accuracy >= white_accuracy - 1 / len(sample) - 1e-9
    shown = display_eps(eps, norm)
    detail = f"at ε {shown:g}: query attack {attack_accuracy:.0%}, white-box PGD-20 {white_accuracy:.0%}"
    if not passed:
        detail += "; the white-box gradients may be masked"
    return Check("white-box at least as strong", passed, detail)


def _within_query_budget(cell: Cell, own: pd.DataFrame) -> Check:
    """No probe was sent more images than ``--queries``, whatever interruptions and resumes the run went through."""
    spent = own["queries"].dropna()
    most = int(spent.max()) if len(spent) else 0
    budget = cast(int, cell.config.queries)
    return Check("query budget", most <= budget, f"at most {most} of {budget} queries per probe")


def _transfer_consistency(cell: Cell, results: pd.DataFrame) -> list[Check]:
    """White-box accuracy must not exceed transfer accuracy into the same target (when both are stored)."""
    own = results[results["cell"] == cell.key]
    if own.empty:
        return []
    first = own.iloc[0]
    same = results[
        (results["target"] == first["target"])
        & (results["threat"] == first["threat"])
        & (results["norm"] == first["norm"])
        & (results["dataset"] == first["dataset"])
        & (results["defense"] == first["defense"])
    ]
    curves = same.groupby(["surrogate", "attack", "eps"])["correct"].mean()
    white = (
        curves.xs(first["target"], level="surrogate") if first["target"] in curves.index.get_level_values(0) else None
    )
    if white is None or len(curves.index.get_level_values(0).unique()) < 2:
        return []
    checks = []
    for surrogate in sorted(set(curves.index.get_level_values(0)) - {first["target"]}):
        transfer = curves.xs(surrogate, level="surrogate")
        shared = white.index.intersection(transfer.index)
        worse = [(a, e) for a, e in shared if e > 0 and white[(a, e)] > transfer[(a, e)] + 1e-9]
        detail = "white-box ≤ transfer at every shared budget" if not worse else f"white-box above transfer at {worse}"
        checks.append(Check(f"white-box beats transfer from {surrogate}", not worse, detail))
    return checks


def _adaptive_consistency(cell: Cell, results: pd.DataFrame, cells: dict[str, dict]) -> list[Check]:
    """Against a defense, the adaptive attack must do at least as well as the non-adaptive one (when both are
    stored); if it does not, its BPDA surrogate or EOT is too weak and the adaptive curve overstates robustness.
    Against a randomised defense a probe can flip with the defense's draws alone: there the adaptive attack falls
    short only where the probes it left standing and the non-adaptive one broke outnumber the opposite beyond
    chance (a sign test at :data:`DRAWS_LEVEL`)."""
    config = cell.config
    if config.defense == "none":
        return []
    keyed = {replace(config, adaptive=adaptive).settings_key(): adaptive for adaptive in (True, False)}
    modes = {keyed[c["settings_key"]]: key for key, c in cells.items() if c.get("settings_key") in keyed}
    modes[config.adaptive] = cell.key
    if len(modes) < 2:
        return []
    results = results[results["probe"].isin({p.key for p in cell.probes}) & results["cell"].isin(modes.values())]
    standing = results.pivot_table(index=["eps", "probe"], columns="cell", values="correct", aggfunc="first").dropna()
    standing = standing.rename(columns={key: adaptive for adaptive, key in modes.items()}).astype(bool)
    attacked = standing[standing.index.get_level_values("eps") > 0]
    if attacked.empty or set(attacked.columns) != {True, False}:  # no probe both cells attacked
        return []
    worse, within_draws = [], []
    for eps, probes in attacked.groupby(level="eps"):
        wins, losses = int((probes[True] & ~probes[False]).sum()), int((probes[False] & ~probes[True]).sum())
        if wins <= losses:
            continue
        shown = display_eps(eps, config.norm)
        if cell.defense.randomised and (p := sign_test(wins, losses)) >= DRAWS_LEVEL:
            within_draws.append(f"{shown} ({wins} against {losses} probes, p {p:.2f})")
        else:
            worse.append(shown)
    draws = f"within what the defense's draws explain at ε {', '.join(within_draws)}"
    if worse:
        detail = f"adaptive above non-adaptive at ε {worse}" + (f"; {draws}" if within_draws else "")
    elif within_draws:
        detail = f"adaptive above non-adaptive only {draws}"
    else:
        detail = "adaptive ≤ non-adaptive at every shared budget"
    # Judged once both are stored, whichever finished second; it is the adaptive cell's result.
    return [Check("adaptive beats non-adaptive", not worse, detail, cell=modes[True])]
