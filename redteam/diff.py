"""`redteam diff RUN_A RUN_B`: which numbers moved between two run folders, beyond what chance explains.

Cells are paired by their settings. Settings on which the two runs differ as wholes (every cell of A has one value,
every cell of B another: the defense swapped, another attack) are what is being compared, so pairs are matched on
the rest; the seed, the probe count and where the faces lie never separate a pair. For each pair, every shared
budget's accuracy and the area over the shared budgets are compared: a value *moved* when the 95% interval of the
difference excludes zero (Newcombe's for accuracies, the bootstrap's standard errors for areas), and each value is
shown with its own interval.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from redteam.engine import EvaluationConfig
from redteam.errors import RedteamError
from redteam.intervals import CONFIDENCE, beyond_chance, difference_interval, wilson_interval
from redteam.results import area_estimate, curve_area, open_run

#: Stored settings that never separate two cells' numbers (how much was computed, and where) or that are compared
#: through the content fingerprint instead (``data``: the same faces may lie at another path).
NOT_COMPARED = {"eps", "limit", "seed", "batch_size", "device", "checks", "data", "cell", "settings_key",
                "fingerprint", "superseded_by"}  # fmt: skip


@dataclass(frozen=True)
class Change:
    """One compared value of a pair of cells: an accuracy at a budget, or the area over the shared budgets."""

    cell: str  # the pair's label (run A's cell)
    measure: str
    a: float
    a_interval: tuple[float, float] | None
    b: float
    b_interval: tuple[float, float] | None
    moved: bool  # the 95% interval of b - a excludes zero

    @property
    def direction(self) -> str:
        return "·" if not self.moved else ("↑ rose" if self.b > self.a else "↓ fell")


@dataclass
class Diff:
    runs: tuple[Path, Path]
    differing: dict[str, tuple[str, str]]  # setting -> (its value in A, in B)
    changes: list[Change]
    only_a: list[str]  # cells with no partner in the other run
    only_b: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": [str(run) for run in self.runs],
            "differing": {key: list(values) for key, values in self.differing.items()},
            "changes": [{**asdict(c), "direction": c.direction} for c in self.changes],
            "only_a": self.only_a,
            "only_b": self.only_b,
        }


def _settings(stored: dict[str, Any]) -> dict[str, str]:
    """What separates a cell's numbers from another's: its settings (as text) and the content it was run on."""
    settings = {
        key: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        for key, value in stored.items()
        if key not in NOT_COMPARED
    }
    fingerprint = stored.get("fingerprint", {})
    settings.update({f"content: {key}": value for key, value in fingerprint.items()})
    return settings


def _run(run: Path) -> tuple[dict[str, dict[str, str]], pd.DataFrame, pd.DataFrame, dict[str, str]]:
    store = open_run(run)
    configs = store.cells(current=True)
    curves = store.curves()
    labels = {cell: EvaluationConfig.from_dict(stored).label for cell, stored in configs.items()}
    settings = {cell: _settings(stored) for cell, stored in configs.items() if cell in set(curves["cell"])}
    return settings, curves, store.frame(), labels


def diff_runs(run_a: Path, run_b: Path) -> Diff:
    """Pair the cells of two run folders and compare every shared value (see the module's docstring)."""
    settings_a, curves_a, results_a, labels_a = _run(run_a)
    settings_b, curves_b, results_b, labels_b = _run(run_b)
    if not settings_a or not settings_b:
        raise RedteamError(f"{run_a if not settings_a else run_b} holds no finished cell to compare.")
    keys = set().union(*settings_a.values(), *settings_b.values())
    differing = {}
    for key in sorted(keys):
        values_a = {s.get(key, "") for s in settings_a.values()}
        values_b = {s.get(key, "") for s in settings_b.values()}
        if len(values_a) == len(values_b) == 1 and values_a != values_b:
            differing[key] = (values_a.pop(), values_b.pop())

    def pairing(settings: dict[str, str]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((k, v) for k, v in settings.items() if k not in differing))

    partners = {pairing(s): cell for cell, s in settings_b.items()}
    changes, only_a, matched = [], [], set()
    for cell, settings in settings_a.items():
        other = partners.get(pairing(settings))
        if other is None:
            only_a.append(labels_a[cell])
            continue
        matched.add(other)
        changes += _compare(
            labels_a[cell],
            (curves_a[curves_a["cell"] == cell], results_a[results_a["cell"] == cell]),
            (curves_b[curves_b["cell"] == other], results_b[results_b["cell"] == other]),
        )
    only_b = [labels_b[cell] for cell in settings_b if cell not in matched]
    shown = {key.removeprefix("content: "): (_short(a), _short(b)) for key, (a, b) in differing.items()}
    return Diff((run_a, run_b), shown, changes, only_a, only_b)


def _short(value: str) -> str:
    """A setting as shown: content digests cut to 12 characters."""
    return value if len(value) <= 20 else value[:12] + "…"


def _compare(label: str, a: tuple[pd.DataFrame, pd.DataFrame], b: tuple[pd.DataFrame, pd.DataFrame]) -> list[Change]:
    (curve_a, results_a), (curve_b, results_b) = a, b
    by_eps_b = {round(row.eps, 6): row for row in curve_b.itertuples()}
    changes = []
    for row in curve_a.sort_values("eps").itertuples():
        other = by_eps_b.get(round(row.eps, 6))
        if other is None:
            continue
        low, high = difference_interval(other.accuracy, int(other.n), row.accuracy, int(row.n), CONFIDENCE)
        changes.append(
            Change(label, f"accuracy @ {row.eps:g}", float(row.accuracy), wilson_interval(row.accuracy, int(row.n)),
                   float(other.accuracy), wilson_interval(other.accuracy, int(other.n)), low > 0 or high < 0)
        )  # fmt: skip
    upto = min(curve_a["eps"].max(), curve_b["eps"].max())
    area_a, area_b = curve_area(curve_a.sort_values("eps"), upto), curve_area(curve_b.sort_values("eps"), upto)
    estimate_a, estimate_b = area_estimate(results_a, upto), area_estimate(results_b, upto)
    if estimate_a is not None and estimate_b is not None:
        two_sided = (1 - CONFIDENCE) / 2  # each tail of the 95% interval of the difference
        moved = beyond_chance(abs(area_b - area_a), (estimate_a.error, estimate_b.error), two_sided)
        changes.append(
            Change(label, f"area 0–{upto:g}", area_a, (estimate_a.low, estimate_a.high), area_b,
                   (estimate_b.low, estimate_b.high), moved)
        )  # fmt: skip
    return changes
