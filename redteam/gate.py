"""`redteam check`: the regression gate for defenses (re-run a stored evaluation, compare with its baseline).

A baseline is a JSON file listing evaluations, each with its exact configuration (target, defense and how it is
attacked, attack and settings, threat, norm, budgets, probe limit, seed) and the curve it gave. The gate re-runs
every configuration into a run folder and compares, per budget, robust accuracy and the curve's normalised area
(:func:`redteam.results.curve_area`) with the baseline: anything more than ``tolerance`` (accuracy points) below
it is a regression. Runs are deterministic for a given seed and device, so an unchanged defense reproduces its
baseline; the tolerance absorbs numerical drift across machines.

In a test suite, the ``robustness_gate`` fixture (:mod:`redteam.pytest_plugin`, registered through the ``pytest11``
entry point) runs the same check and fails the test on a regression::

    def test_defense_holds(robustness_gate):
        robustness_gate("reports/baseline.json", data="path/to/faces")
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from redteam.budgets import display_eps
from redteam.engine import Evaluation, EvaluationConfig, run_campaign
from redteam.errors import DataError, RedteamError
from redteam.results import ResultStore, curve_area

DEFAULT_TOLERANCE = 0.05
Progress = Callable[[str, int], Callable[[int], None]]


class RegressionError(RedteamError):
    exit_code = 1


@dataclass(frozen=True)
class Comparison:
    """One gated value: robust accuracy at a budget (``measure`` ``"accuracy @ 2"``) or the curve's ``"area"``."""

    evaluation: str
    measure: str
    baseline: float
    now: float
    tolerance: float

    @property
    def regressed(self) -> bool:
        return self.now < self.baseline - self.tolerance - 1e-9


@dataclass
class GateReport:
    baseline: Path
    comparisons: list[Comparison]

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.regressed]

    @property
    def passed(self) -> bool:
        return not self.regressions

    def frame(self) -> pd.DataFrame:
        """One row per gated value: evaluation, measure, baseline, now, change, regressed."""
        frame = pd.DataFrame([asdict(c) for c in self.comparisons]).drop(columns="tolerance")
        frame["change"] = frame["now"] - frame["baseline"]
        frame["regressed"] = [c.regressed for c in self.comparisons]
        return frame

    def summary(self) -> str:
        if self.passed:
            return f"{len(self.comparisons)} values within tolerance of {self.baseline}"
        worst = min(self.regressions, key=lambda c: c.now - c.baseline)
        return (
            f"robustness regressed: {len(self.regressions)} of {len(self.comparisons)} values fell more than "
            f"{worst.tolerance:g} below {self.baseline} (worst: {worst.evaluation}, {worst.measure}: "
            f"{worst.baseline:.3f} -> {worst.now:.3f})"
        )


def _curve_points(curve: pd.DataFrame) -> list[dict]:
    return [{"eps": float(r.eps), "accuracy": float(r.accuracy), "n": int(r.n)} for r in curve.itertuples()]


def write_baseline(runs: Sequence[Path], path: Path) -> list[dict]:
    """Write a baseline from run folders: every evaluation stored in them, its config and its curve (restricted to
    the config's budgets). Returns the evaluations written."""
    evaluations = []
    for run in runs:
        if not (run / "results.sqlite").is_file():
            raise RedteamError(f"{run} is not a run folder (no results.sqlite).")
        store = ResultStore(run / "results.sqlite", writable=False)  # a baseline reads kept runs
        for cell, stored in store.cells(current=True).items():
            config = EvaluationConfig.from_dict(stored).resolve()
            curve = store.curves(cell)
            if not config.campaign:  # campaigns store only their own budgets
                shown = {round(display_eps(e, config.norm), 6) for e in config.budgets()}
                curve = curve[curve["eps"].round(6).isin(shown)]
            if curve.empty:
                continue
            evaluations.append(
                {
                    "label": config.label,
                    "config": config.to_dict(),
                    "curve": _curve_points(curve),
                    "area": curve_area(curve),
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


def rerun(config, out: Path, progress: Progress) -> pd.DataFrame:
    """Run one stored evaluation again into ``out`` (what it already holds is reused) and return its curve."""
    if config.campaign:
        return ResultStore(out / "results.sqlite").curves(run_campaign(config, out, progress).cell)
    evaluation = Evaluation(config, ResultStore(out / "results.sqlite"))
    evaluation.run(progress(evaluation.config.label, evaluation.planner.total_work()))
    return evaluation.curve()


def check_baseline(
    path: Path,
    out: Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    data: str | None = None,
    device: str = "auto",
    progress: Progress = lambda what, total: lambda n: None,
) -> GateReport:
    """Re-run every evaluation of the baseline at ``path`` (into ``out``, else a temporary folder; ``data``
    replaces the stored dataset, e.g. where the faces live on this machine) and compare it with the baseline."""
    if tolerance < 0:
        raise RedteamError(f"--tolerance is an accuracy margin (>= 0), not {tolerance}.")
    entries = read_baseline(path)
    with tempfile.TemporaryDirectory(prefix="redteam-check-") as scratch:
        folder = out or Path(scratch)
        comparisons = []
        for entry in entries:
            config = EvaluationConfig.from_dict(
                {**entry["config"], "device": device, **({"data": data} if data else {})}
            )
            try:
                curve = rerun(config, folder, progress).sort_values("eps")
            except DataError as error:
                if data or Path(config.data).is_absolute() or config.data in ("default", "lfw"):
                    raise
                raise DataError(
                    f"{error} The baseline names its faces relative to where it was written ({config.data}): pass "
                    "--data PATH to say where they are on this machine."
                ) from None
            accuracy = {round(e, 6): a for e, a in zip(curve["eps"], curve["accuracy"])}
            name = config.resolve().label
            for point in entry["curve"]:
                now = accuracy.get(round(point["eps"], 6), 0.0)  # a budget the re-run lacks counts as a total loss
                comparisons.append(Comparison(name, f"accuracy @ {point['eps']:g}", point["accuracy"], now, tolerance))
            comparisons.append(Comparison(name, "area", entry["area"], curve_area(curve), tolerance))
    return GateReport(path, comparisons)
