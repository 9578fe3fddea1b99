"""`redteam check`: the regression gate for defenses (re-run a stored evaluation, compare with its baseline).

A baseline is a JSON file listing evaluations, each with its exact configuration (target, defense and how it is
attacked, attack and settings, threat, norm, budgets, probe limit, seed) and the curve it gave. The gate re-runs
every configuration into a run folder and compares, per budget, robust accuracy and the curve's normalised area
(:func:`redteam.results.curve_area`) with the baseline. A value regressed when it fell by more than ``tolerance``
(accuracy points) *and* the fall is significant at ``level`` (one-sided; Newcombe's interval for accuracies, the
bootstrap standard errors for areas): a gate on 40 probes neither fails on one unlucky probe (another seed draws
other probes) nor waves through a defense that stopped working. The report says the smallest fall the probe counts
can detect and how many probes a wanted resolution needs.

In a test suite, the ``robustness_gate`` fixture (:mod:`redteam.pytest_plugin`, registered through the ``pytest11``
entry point) runs the same check and fails the test on a regression::

    def test_defense_holds(robustness_gate):
        robustness_gate("reports/baseline.json", data="path/to/faces")
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from redteam.budgets import display_eps
from redteam.engine import Check, Evaluation, EvaluationConfig, checks_of, run_campaign
from redteam.errors import DataError, RedteamError
from redteam.intervals import (
    beyond_chance,
    fell_significantly,
    probes_needed,
    smallest_detectable_fall,
    wilson_interval,
    with_bounds,
)
from redteam.results import ResultStore, area_estimate, curve_area

DEFAULT_TOLERANCE = 0.05
#: One-sided significance level at which a fall counts as real rather than the luck of the probes drawn.
DEFAULT_LEVEL = 0.05
Progress = Callable[[str, int], Callable[[int], None]]


class RegressionError(RedteamError):
    exit_code = 1


@dataclass(frozen=True)
class Comparison:
    """One gated value: robust accuracy at a budget (``measure`` ``"accuracy @ 2"``) or the curve's ``"area"``.

    Accuracies carry their probe counts (``*_n``), areas their bootstrap standard errors (``*_error``); a value
    regressed when it fell by more than ``tolerance`` and the fall is significant at ``level`` (one-sided). A
    baseline written before intervals has neither: there the tolerance alone decides.
    """

    evaluation: str
    measure: str
    baseline: float
    now: float
    tolerance: float
    level: float = DEFAULT_LEVEL
    baseline_n: int | None = None
    now_n: int | None = None
    baseline_error: float | None = None
    now_error: float | None = None
    baseline_bounds: tuple[float, float] | None = None  # an area's bootstrap interval
    now_bounds: tuple[float, float] | None = None

    @property
    def fall(self) -> float:
        return self.baseline - self.now

    @property
    def significant(self) -> bool:
        if self.baseline_n and self.now_n:
            return fell_significantly(self.baseline, self.baseline_n, self.now, self.now_n, self.level)
        if self.baseline_error is not None and self.now_error is not None:
            return beyond_chance(self.fall, (self.baseline_error, self.now_error), self.level)
        return self.fall > 0

    @property
    def regressed(self) -> bool:
        return self.fall > self.tolerance + 1e-9 and self.significant

    def interval(self, which: str) -> tuple[float, float] | None:
        """The 95% interval of the ``"baseline"`` or ``"now"`` value, where it has one."""
        value, n, bounds = (
            (self.baseline, self.baseline_n, self.baseline_bounds)
            if which == "baseline"
            else (self.now, self.now_n, self.now_bounds)
        )
        return wilson_interval(value, n) if n else bounds

    def text(self, which: str, digits: int = 3) -> str:
        """The value with its interval, e.g. ``0.650 [0.495, 0.779]``."""
        return with_bounds(self.baseline if which == "baseline" else self.now, self.interval(which), digits)

    @property
    def detectable(self) -> float | None:
        """The smallest fall of this accuracy the two runs' probe counts can call significant."""
        if not (self.baseline_n and self.now_n):
            return None
        return smallest_detectable_fall(self.baseline, self.baseline_n, self.now_n, self.level)


@dataclass(frozen=True)
class CheckOutcome:
    """A sanity check of a re-run evaluation (:mod:`redteam.engine.checks`)."""

    evaluation: str
    name: str
    passed: bool
    detail: str


@dataclass
class GateReport:
    baseline: Path
    comparisons: list[Comparison]
    checks: list[CheckOutcome] = field(default_factory=list)
    resolution: float = DEFAULT_TOLERANCE  # the fall a user wants the gate to detect (probes_needed's target)

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.regressed]

    @property
    def passed(self) -> bool:
        return not self.regressions

    def frame(self) -> pd.DataFrame:
        """One row per gated value: evaluation, measure, baseline, now (with intervals), change, detectable fall,
        significant, regressed."""
        return pd.DataFrame(
            {
                "evaluation": [c.evaluation for c in self.comparisons],
                "measure": [c.measure for c in self.comparisons],
                "baseline": [c.text("baseline", digits=2) for c in self.comparisons],
                "now": [c.text("now", digits=2) for c in self.comparisons],
                "change": [-c.fall for c in self.comparisons],
                "detectable": [c.detectable for c in self.comparisons],
                "significant": [c.significant for c in self.comparisons],
                "regressed": [c.regressed for c in self.comparisons],
            }
        )

    def resolution_advice(self) -> str:
        """The smallest fall these probe counts can detect, and how many probes would detect ``resolution``."""
        counted = [c for c in self.comparisons if c.baseline_n and c.now_n and c.baseline > 0]
        if not counted:
            return "no gated accuracy has probe counts on both sides: nothing to size"
        falls = [c.detectable for c in counted if c.detectable is not None]
        probes = max(c.now_n or 0 for c in counted)
        advice = f"with {probes} probes per run the gate tells a fall from chance once it reaches"
        advice += f" {max(falls):.2f}" if falls else " (no fall: even one to zero would not be significant)"
        undetectable = len(counted) - len(falls)
        if falls and undetectable:
            advice += f" ({undetectable} values could fall to zero unnoticed)"
        needed = max(probes_needed(c.baseline, self.resolution, c.level) for c in counted)
        return f"{advice}; a fall of {self.resolution:.2f} needs about {needed} probes per run (--limit)"

    def summary(self) -> str:
        if self.passed:
            return f"{len(self.comparisons)} values within tolerance of {self.baseline} or not significantly below it"
        worst = max(self.regressions, key=lambda c: c.fall)
        return (
            f"robustness regressed: {len(self.regressions)} of {len(self.comparisons)} values fell more than "
            f"{worst.tolerance:g} below {self.baseline}, significantly at level {worst.level:g} (worst: "
            f"{worst.evaluation}, {worst.measure}: {worst.text('baseline')} -> {worst.text('now')})"
        )


def _curve_points(curve: pd.DataFrame) -> list[dict]:
    return [
        {"eps": float(r.eps), "accuracy": float(r.accuracy), "n": int(r.n), "low": float(r.low), "high": float(r.high)}
        for r in curve.itertuples()
    ]


def _area_fields(curve: pd.DataFrame, results: pd.DataFrame) -> dict:
    """The curve's area and, from per-probe results, its interval and standard error (bootstrap over identities)."""
    estimate = area_estimate(results)
    if estimate is None:  # a campaign's own curve: no per-probe results to resample
        return {"area": curve_area(curve)}
    return {"area": curve_area(curve), "area_interval": [estimate.low, estimate.high], "area_error": estimate.error}


def _bounds(fields: dict) -> tuple[float, float] | None:
    return tuple(fields["area_interval"]) if "area_interval" in fields else None


def _evaluated(store: ResultStore, cell: str, config: EvaluationConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A cell's curve and per-probe results, restricted to its configuration's budgets (a store may hold more)."""
    curve, results = store.curves(cell), store.frame(cell)
    if not config.campaign:  # campaigns store only their own budgets
        shown = {round(display_eps(e, config.norm), 6) for e in config.budgets()}
        curve = curve[curve["eps"].round(6).isin(shown)]
        results = results[results["eps"].isin(config.budgets())]
    return curve.sort_values("eps"), results


def write_baseline(runs: Sequence[Path], path: Path) -> list[dict]:
    """Write a baseline from run folders: every evaluation stored in them, its config and its curve (restricted to
    the config's budgets) with intervals. Returns the evaluations written."""
    evaluations = []
    for run in runs:
        if not (run / "results.sqlite").is_file():
            raise RedteamError(f"{run} is not a run folder (no results.sqlite).")
        store = ResultStore(run / "results.sqlite", writable=False)  # a baseline reads kept runs
        for cell, stored in store.cells(current=True).items():
            config = EvaluationConfig.from_dict(stored).resolve()
            curve, results = _evaluated(store, cell, config)
            if curve.empty:
                continue
            evaluations.append(
                {
                    "label": config.label,
                    "config": config.to_dict(),
                    "curve": _curve_points(curve),
                    **_area_fields(curve, results),
                }
            )
    if not evaluations:
        raise RedteamError(f"no evaluations with results in {', '.join(map(str, runs))}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"redteam_baseline": 1, "evaluations": evaluations}, indent=2) + "\n")
    return evaluations


def read_baseline(path: Path) -> list[dict]:
    if not path.is_file():
        raise RedteamError(f"baseline {path} is not a file (write one: `redteam check --baseline {path} --write RUN`).")
    try:
        baseline = json.loads(path.read_text())
        return list(baseline["evaluations"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RedteamError(f"{path} is not a redteam baseline (JSON with an 'evaluations' list).") from None


def rerun(config, out: Path, progress: Progress) -> tuple[str, list[Check]]:
    """Run one stored evaluation again into ``out`` (what it already holds is reused); its cell and, where the
    configuration asks for them, its sanity checks."""
    if config.campaign:
        return run_campaign(config, out, progress).cell, []
    evaluation = Evaluation(config, ResultStore(out / "results.sqlite"))
    evaluation.run(progress(evaluation.config.label, evaluation.planner.total_work()))
    return evaluation.cell.key, checks_of(evaluation) if config.checks else []


def check_baseline(
    path: Path,
    out: Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    data: str | None = None,
    device: str = "auto",
    progress: Progress = lambda what, total: lambda n: None,
    level: float = DEFAULT_LEVEL,
    seed: int | None = None,
    resolution: float | None = None,
) -> GateReport:
    """Re-run every evaluation of the baseline at ``path`` (into ``out``, else a temporary folder; ``data``
    replaces the stored dataset, e.g. where the faces live on this machine; ``seed`` the stored seed, other probes
    and random starts) and compare it with the baseline: a value regressed when it fell by more than
    ``tolerance`` and significantly at ``level``. ``resolution`` (default: the tolerance) is the fall the report's
    advice sizes the probe count for."""
    if tolerance < 0:
        raise RedteamError(f"--tolerance is an accuracy margin (>= 0), not {tolerance}.")
    if not 0 < level < 0.5:
        raise RedteamError(f"--level is a one-sided significance level between 0 and 0.5 (e.g. 0.05), not {level}.")
    entries = read_baseline(path)
    overrides = {"device": device, **({"data": data} if data else {}), **({"seed": seed} if seed is not None else {})}
    with tempfile.TemporaryDirectory(prefix="redteam-check-") as scratch:
        folder = out or Path(scratch)
        comparisons, outcomes = [], []
        for entry in entries:
            config = EvaluationConfig.from_dict({**entry["config"], **overrides})
            try:
                cell, checks = rerun(config, folder, progress)
            except DataError as error:
                if data or Path(config.data).is_absolute() or config.data in ("default", "lfw"):
                    raise
                raise DataError(
                    f"{error} The baseline names its faces relative to where it was written ({config.data}): pass "
                    "--data PATH to say where they are on this machine."
                ) from None
            resolved = config.resolve()
            curve, results = _evaluated(ResultStore(folder / "results.sqlite"), cell, resolved)
            name = resolved.label
            outcomes += [CheckOutcome(name, c.name, c.passed, c.detail) for c in checks]
            now = {round(r.eps, 6): r for r in curve.itertuples()}
            for point in entry["curve"]:
                row = now.get(round(point["eps"], 6))  # a budget the re-run lacks counts as a total loss
                comparisons.append(
                    Comparison(
                        name, f"accuracy @ {point['eps']:g}", point["accuracy"], float(row.accuracy) if row else 0.0,
                        tolerance, level, point.get("n"), int(row.n) if row else None,
                    )
                )  # fmt: skip
            area = _area_fields(curve, results)
            comparisons.append(
                Comparison(
                    name, "area", entry["area"], area["area"], tolerance, level,
                    baseline_error=entry.get("area_error"), now_error=area.get("area_error"),
                    baseline_bounds=_bounds(entry), now_bounds=_bounds(area),
                )
            )  # fmt: skip
    return GateReport(path, comparisons, outcomes, tolerance if resolution is None else resolution)
