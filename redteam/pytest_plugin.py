"""The ``robustness_gate`` pytest fixture, for users' test suites (registered through the ``pytest11`` entry point).

Kept apart from :mod:`redteam.gate` so that loading the plugin, which pytest does for every test run, imports
nothing heavy: the gate and its engine load when a test asks for the fixture.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from redteam.gate import GateReport


@pytest.fixture
def robustness_gate(tmp_path: Path) -> Callable[..., GateReport]:
    """``robustness_gate(baseline, tolerance=None, data=None, device="auto")`` re-runs the baseline's evaluations
    and fails the test (with the table of regressions) if robustness fell below it (``tolerance``: the gate's
    default, :data:`redteam.gate.DEFAULT_TOLERANCE`, when not given)."""

    def check(
        baseline: str | Path, tolerance: float | None = None, data: str | Path | None = None, device: str = "auto"
    ) -> GateReport:
        from redteam.gate import DEFAULT_TOLERANCE, check_baseline

        chosen = DEFAULT_TOLERANCE if tolerance is None else tolerance
        report = check_baseline(Path(baseline), tmp_path / "gate", chosen, str(data) if data else None, device)
        if not report.passed:
            table = report.frame()
            pytest.fail(f"{report.summary()}\n{table[table['regressed']].to_string(index=False)}", pytrace=False)
        return report

    return check
