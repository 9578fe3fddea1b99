"""The files of a run folder besides its store: ``curve.csv`` and ``curve.png`` for every cell, ``transfer.csv``
once the store holds a transfer run, a campaign's tables as ``<name>.csv``, and ``run.json``; and the folder's lock,
so two processes never write one run folder at once."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from redteam.errors import RedteamError
from redteam.plots import plot_curves
from redteam.results import ResultStore, transfer_matrix


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold the run folder ``out`` (created if needed) for this process. Two processes writing one folder would
    both compute everything still missing; the second is told, in one line, who holds it. A folder this call
    created is removed again if nothing was written into it (a run that failed before its first result)."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: nothing to hold
        yield
        return
    if out.exists() and not out.is_dir():
        raise RedteamError(f"--out {out} is a file; give a folder.")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / ".lock", "a+")
    except OSError as error:
        raise RedteamError(f"cannot write the run folder {out} ({error.strerror}): choose another --out.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RedteamError(
            f"another redteam process (pid {holder}) is writing to {out}: wait for it, or choose another --out."
        ) from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        (out / ".lock").unlink(missing_ok=True)
        handle.close()  # closing releases the lock
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def write_outputs(store: ResultStore, out: Path) -> None:
    """``curve.csv`` and ``curve.png`` for every cell in the store, each accuracy with its 95% interval (``low``,
    ``high``) (with a ``queries`` axis once it holds a query
    attack: rows at each query count, empty ``queries`` for an attack's final state); ``transfer.csv`` once it holds
    a transfer run."""
    results = store.frame()
    curve, queries = store.curves(), store.query_curves()
    if curve.empty:  # a campaign without a curve: nothing to draw
        return
    table = curve if queries.empty else pd.concat([curve, queries], ignore_index=True)
    table.drop(columns="cell").to_csv(out / "curve.csv", index=False)
    plot_curves(curve, out / "curve.png", queries)
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
