"""The files of a run folder besides its store: ``curve.csv`` and ``curve.png`` for every cell, ``transfer.csv``
once the store holds a transfer run, a campaign's tables as ``<name>.csv``, and ``run.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from redteam.errors import RedteamError
from redteam.plots import plot_curves
from redteam.results import ResultStore, transfer_matrix


def write_outputs(store: ResultStore, out: Path) -> None:
    """``curve.csv`` and ``curve.png`` for every cell in the store; ``transfer.csv`` once it holds a transfer run."""
    results = store.frame()
    curve = store.curves()
    if curve.empty:  # a campaign without a curve: nothing to draw
        return
    curve.drop(columns="cell").to_csv(out / "curve.csv", index=False)
    plot_curves(curve, out / "curve.png")
    if (results["surrogate"] != results["target"]).any():
        transfer_matrix(results).to_csv(out / "transfer.csv", index=False)


def write_tables(tables: dict[str, pd.DataFrame], out: Path) -> list[Path]:
    """Each named table as ``out/<name>.csv``; returns the paths."""
    paths = []
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
        paths.append(out / f"{name}.csv")
    return paths


def write_summary(summary: dict[str, Any], out: Path) -> Path:
    """``out/run.json``: the exact configuration and what the run found."""
    path = out / "run.json"
    try:
        path.write_text(json.dumps(summary, indent=2, default=str, allow_nan=False))
    except ValueError:  # NaN or infinity in a metric: JSON has neither, write them as null
        path.write_text(json.dumps(_finite(summary), indent=2, default=str))
    except OSError as error:
        raise RedteamError(f"cannot write {path}: {error.strerror}.") from None
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
