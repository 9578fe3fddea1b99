"""The per-probe results store (SQLite) and the accuracy-perturbation curves computed from it.

One row per (cell, eps, probe), where a cell is one target x defense x attack x threat x norm x dataset x seed x
settings combination. Rows are committed a batch at a time, so an interrupted run loses at most the batch in
flight and a re-run skips everything already stored.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from redteam.budgets import QUERY_CHECKPOINTS, display_eps
from redteam.errors import RedteamError
from redteam.intervals import Estimate, identity_bootstrap, weighted_mean, weighted_median, with_intervals

RESULT_COLUMNS: dict[str, str] = {
    "cell": "TEXT",
    "target": "TEXT",
    "surrogate": "TEXT",  # the model the attack was crafted on (the target itself for white-box attacks)
    "defense": "TEXT",
    "attack": "TEXT",
    "threat": "TEXT",
    "norm": "TEXT",
    "dataset": "TEXT",
    "eps": "REAL",  # image units: pixels in [0, 1]
    "probe": "TEXT",
    "image": "INTEGER",
    "reference": "INTEGER",
    "identity": "TEXT",
    "correct": "INTEGER",  # the face system still decides correctly
    "score": "REAL",  # similarity the decision was made on
    "linf": "REAL",  # size of the perturbation actually used
    "l2": "REAL",
    "steps": "INTEGER",
    "inherited": "INTEGER",  # broken at a smaller eps already, so broken here too
    "queries": "INTEGER",  # a query attack's queries for this probe (empty for attacks that do not query)
    "stage": "TEXT",  # a face system's verdict on the image by stage (SYSTEM_STAGES); empty for a single model
    "broken_by": "TEXT",  # the part of an ensemble attack (auto) that fooled the system; empty otherwise
    "liveness": "REAL",  # a face system's liveness score of the face it found; empty without a liveness check
}
#: Where a face system stopped an image, in the order it looks: no face found, flagged by its liveness check, not
#: matched, or accepted as a match.
SYSTEM_STAGES = ("no face", "spoof", "no match", "match")

CURVE_KEYS = ["target", "surrogate", "defense", "attack", "threat", "norm", "dataset"]
MINIMAL_COLUMNS = {"cell": "TEXT", "probe": "TEXT", "size": "REAL", "score": "REAL", "linf": "REAL", "l2": "REAL",
                   "steps": "INTEGER", "queries": "INTEGER", "stage": "TEXT"}  # fmt: skip
#: A query attack's record per probe: the smallest fooling perturbation known after ``queries`` queries (image
#: units, inf before the first), at log-spaced checkpoints; ``eps`` is the budget attacked (0 for minimal attacks).
TRAJECTORY_COLUMNS = {"cell": "TEXT", "probe": "TEXT", "eps": "REAL", "queries": "INTEGER", "linf": "REAL",
                      "l2": "REAL"}  # fmt: skip
#: Columns added since stores were first written, with their types: added to older stores when opened.
ADDED_COLUMNS = {
    "results": {"queries": "INTEGER", "stage": "TEXT", "broken_by": "TEXT", "liveness": "REAL"},
    "minimal": {"queries": "INTEGER", "stage": "TEXT"},
    "ledger": {"hits": "INTEGER"},
}
CHECK_COLUMNS = {"cell": "TEXT", "name": "TEXT", "passed": "INTEGER", "detail": "TEXT"}
#: A campaign's finished stages (an area, a budget, a poison rate), serialised, so an interrupted campaign resumes;
#: also what an evaluation measured once for its cell (its EOT draws).
STAGE_COLUMNS = {"cell": "TEXT", "stage": "TEXT", "payload": "BLOB"}
#: Curves that campaigns (advhat, uap, ...) compute themselves, in ``accuracy_curve``'s columns (eps as displayed).
CURVE_COLUMNS = {"cell": "TEXT", **{key: "TEXT" for key in CURVE_KEYS}, "eps": "REAL", "accuracy": "REAL",
                 "n": "INTEGER"}  # fmt: skip

#: A deployed target's query ledger: one row per distinct request (``request``: a digest of the images sent), its
#: reply (JSON), HTTP status (0 for a tool), seconds until answered, tries it took, when (Unix time), and how often
#: the same request was answered from the ledger instead of being sent again.
LEDGER_COLUMNS = {"cell": "TEXT", "request": "TEXT", "reply": "TEXT", "status": "INTEGER", "latency": "REAL",
                  "attempts": "INTEGER", "at": "REAL", "hits": "INTEGER"}  # fmt: skip

#: Every table besides ``results`` and ``cells``, by name.
TABLES = {"minimal": MINIMAL_COLUMNS, "trajectory": TRAJECTORY_COLUMNS, "checks": CHECK_COLUMNS,
          "stages": STAGE_COLUMNS, "curves": CURVE_COLUMNS, "ledger": LEDGER_COLUMNS}  # fmt: skip


def tally(values: pd.Series, order: tuple[str, ...] | None = None) -> str:
    """How often each value occurs, as ``"a 3, b 0"``: every one of ``order`` in its order, or those present."""
    counts = values.value_counts()
    return ", ".join(f"{value} {int(counts.get(value, 0))}" for value in order or counts.index)


def stage_shares(stages: dict[str, list[str]]) -> dict[str, float]:
    """Per condition's stages (``SYSTEM_STAGES``, one per image): the shares of images in which the face system found
    a face (``{condition}_face_found``) and that it matched (``{condition}_matched``)."""
    shares = {}
    for condition, found in stages.items():
        shares[f"{condition}_face_found"] = 1 - found.count("no face") / len(found)
        shares[f"{condition}_matched"] = found.count("match") / len(found)
    return shares


class QueryLedger:
    """The requests one cell sent a deployed target, kept in its store as they are answered: an identical request
    is answered from here instead of being sent again (within a run, and when an interrupted run resumes)."""

    def __init__(self, path: Path, cell: str):
        self.cell = cell
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)  # autocommit
        self.lock = threading.Lock()  # a target with concurrent requests records from several threads

    def answer(self, request: str) -> Any | None:
        """The stored reply to ``request`` (None if it was never answered)."""
        with self.lock:
            row = self.db.execute("SELECT reply FROM ledger WHERE cell = ? AND request = ?", (self.cell, request))
            found = row.fetchone()
            if found is None:
                return None
            self.db.execute("UPDATE ledger SET hits = hits + 1 WHERE cell = ? AND request = ?", (self.cell, request))
        return json.loads(found[0])

    def record(self, request: str, reply: Any, status: int, latency: float, attempts: int) -> None:
        values = (self.cell, request, json.dumps(reply), status, latency, attempts, time.time(), 0)
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)


@dataclass
class ResultStore:
    """``writable=False`` opens a kept store for reading only (reports): the file is never changed, and tables or
    columns it predates read as empty."""

    path: Path
    writable: bool = True

    def __post_init__(self) -> None:
        """Open the store at ``path``, creating it and its tables as needed. A file that is not a store, or a folder
        that cannot be written, is a one-line :class:`RedteamError`; nothing is ever deleted."""
        try:
            if self.writable:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._create_tables()
            else:
                with self._connect() as db:
                    db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as error:
            if not self.path.is_file() or "unable to open" in str(error) or "readonly" in str(error):
                raise RedteamError(
                    f"cannot write the results store {self.path} ({error}): choose another --out."
                ) from None
            raise RedteamError(
                f"{self.path} is not a readable redteam results store ({error}); it was left as it is: move it away "
                "or choose another --out."
            ) from None
        except OSError as error:
            raise RedteamError(f"cannot write {self.path.parent} ({error.strerror}): choose another --out.") from None

    def _create_tables(self) -> None:
        with self._connect() as db:
            columns = ", ".join(f"{name} {kind}" for name, kind in RESULT_COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS results ({columns}, PRIMARY KEY (cell, eps, probe))")
            db.execute("CREATE TABLE IF NOT EXISTS cells (cell TEXT PRIMARY KEY, config TEXT)")
            minimal = ", ".join(f"{name} {kind}" for name, kind in MINIMAL_COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS minimal ({minimal}, PRIMARY KEY (cell, probe))")
            checks = ", ".join(f"{name} {kind}" for name, kind in CHECK_COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS checks ({checks}, PRIMARY KEY (cell, name))")
            curves = ", ".join(f"{name} {kind}" for name, kind in CURVE_COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS curves ({curves}, PRIMARY KEY (cell, eps))")
            stages = ", ".join(f"{name} {kind}" for name, kind in STAGE_COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS stages ({stages}, PRIMARY KEY (cell, stage))")
            steps = ", ".join(f"{name} {kind}" for name, kind in TRAJECTORY_COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS trajectory ({steps}, PRIMARY KEY (cell, probe, eps, queries))")
            ledger = ", ".join(f"{name} {kind}" for name, kind in LEDGER_COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS ledger ({ledger}, PRIMARY KEY (cell, request))")
            for table, added in ADDED_COLUMNS.items():
                present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, kind in added.items():
                    if name not in present:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def _connect(self) -> sqlite3.Connection:
        if self.writable:
            return sqlite3.connect(self.path, timeout=60)
        return sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=60)

    def ledger(self, cell: str) -> QueryLedger:
        """``cell``'s query ledger in this store."""
        return QueryLedger(self.path, cell)

    def ledger_summary(self) -> dict[str, str]:
        """Per cell with a ledger, one line: requests sent, retries, answers from the ledger, latency percentiles."""
        ledger = self._table("ledger", None)
        lines = {}
        for cell, rows in ledger.groupby("cell"):
            p50, p95 = (1000 * rows["latency"].quantile(q) for q in (0.5, 0.95))
            lines[str(cell)] = (
                f"{len(rows)} requests sent ({int(rows['attempts'].sum()) - len(rows)} retries), "
                f"{int(rows['hits'].sum())} answered from the ledger, latency p50 {p50:.0f} ms, p95 {p95:.0f} ms"
            )
        return lines

    def stage_summary(self) -> dict[str, str]:
        """Per cell of a face system, one line: at each budget, how many attacked probes stopped at each stage; for a
        minimal attack, where each probe's smallest example stopped."""
        lines = self._breakdown("stage", SYSTEM_STAGES)
        minimal = self.minimal()
        if "stage" in minimal:  # a store written before the column was kept, opened read-only, has none
            for cell, rows in minimal[minimal["stage"].notna()].groupby("cell"):
                lines[str(cell)] = f"their smallest examples: {tally(rows['stage'], SYSTEM_STAGES)}"
        return lines

    def liveness_summary(self) -> dict[str, str]:
        """Per cell of a face system with a liveness check, one line: at each budget, the attacked probes' mean
        liveness score and how many the check flagged."""
        return self._per_budget(
            "liveness",
            lambda at: f"mean {at['liveness'].mean():.3f}, {int((at['stage'] == 'spoof').sum())} of {len(at)} flagged",
        )

    def ensemble_summary(self) -> dict[str, str]:
        """Per cell of an ensemble attack, one line: at each budget, how many probes each of its parts broke."""
        return self._breakdown("broken_by")

    def _breakdown(self, column: str, values: tuple[str, ...] | None = None) -> dict[str, str]:
        """Per cell with ``column`` set, one line: at each budget, how many attacked probes had each value (all of
        ``values`` in their order, or those present)."""

        return self._per_budget(column, lambda at: tally(at[column], values))

    def _per_budget(self, column: str, describe: Callable[[pd.DataFrame], str]) -> dict[str, str]:
        """Per cell with ``column`` set, one line: ``describe`` of its attacked probes' rows at each budget."""
        frame = self.frame()
        if column not in frame:  # a store written before the column was kept, opened read-only
            return {}
        lines = {}
        for cell, rows in frame[frame[column].notna() & (frame["eps"] > 0)].groupby("cell"):
            parts = [
                f"at ε {display_eps(eps, at['norm'].iloc[0]):g}: {describe(at)}" for eps, at in rows.groupby("eps")
            ]
            lines[str(cell)] = "; ".join(parts)
        return lines

    def register_cell(self, cell: str, config: dict) -> None:
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO cells VALUES (?, ?)", (cell, json.dumps(config, sort_keys=True)))

    def update_cell(self, cell: str, config: dict) -> None:
        with self._connect() as db:
            db.execute("UPDATE cells SET config = ? WHERE cell = ?", (json.dumps(config, sort_keys=True), cell))

    def cells(self, current: bool = False) -> dict[str, dict]:
        """Every cell's stored configuration; ``current``: without cells set aside because their inputs changed."""
        with self._connect() as db:
            cells = {cell: json.loads(config) for cell, config in db.execute("SELECT cell, config FROM cells")}
        return {c: config for c, config in cells.items() if not (current and "superseded_by" in config)}

    def _set_aside(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` without the rows of cells whose inputs changed since (:meth:`cells`)."""
        kept = self.cells(current=True)
        return frame[frame["cell"].isin(kept)].reset_index(drop=True) if len(frame) else frame

    def _insert(self, table: str, columns: dict[str, str], rows: list[dict]) -> None:
        if not rows:
            return
        names = list(columns)
        values = [tuple(_plain(row[n]) for n in names) for row in rows]
        placeholders = ", ".join("?" * len(names))
        with self._connect() as db:  # one transaction: the batch is stored whole or not at all
            db.executemany(f"INSERT OR REPLACE INTO {table} ({', '.join(names)}) VALUES ({placeholders})", values)

    def append(self, rows: list[dict]) -> None:
        self._insert("results", RESULT_COLUMNS, rows)

    def append_minimal(self, rows: list[dict]) -> None:
        """Smallest fooling perturbation per probe, from a minimal-perturbation attack."""
        self._insert("minimal", MINIMAL_COLUMNS, rows)

    def record_checks(self, rows: list[dict]) -> None:
        self._insert("checks", CHECK_COLUMNS, rows)

    def record_curve(self, rows: list[dict]) -> None:
        """A campaign's own curve (one row per budget), replacing what the same cell stored before."""
        self._insert("curves", CURVE_COLUMNS, rows)

    def record_trajectory(self, rows: list[dict]) -> None:
        self._insert("trajectory", TRAJECTORY_COLUMNS, rows)

    def trajectory(self, cell: str | None = None) -> pd.DataFrame:
        """Query attacks' records (:data:`TRAJECTORY_COLUMNS`) of ``cell``, or of every current cell."""
        frame = self._table("trajectory", cell)
        return frame if cell is not None else self._set_aside(frame)

    def record_stage(self, cell: str, stage: str, payload: bytes) -> None:
        self._insert("stages", STAGE_COLUMNS, [{"cell": cell, "stage": stage, "payload": payload}])

    def stage(self, cell: str, stage: str) -> bytes | None:
        """A campaign stage's stored payload, if it finished in an earlier run."""
        with self._connect() as db:
            row = db.execute("SELECT payload FROM stages WHERE cell = ? AND stage = ?", (cell, stage)).fetchone()
        return None if row is None else bytes(row[0])

    def curves(self, cell: str | None = None) -> pd.DataFrame:
        """The accuracy-perturbation curve of ``cell``, or of every current cell: computed from per-probe results,
        and campaigns' own; each accuracy with its 95% interval (``low``, ``high``)."""
        campaigns = self._table("curves", cell)
        if cell is None:
            campaigns = self._set_aside(campaigns)
        curve = pd.concat([accuracy_curve(self.frame(cell)), campaigns], ignore_index=True)
        curve = curve[[*CURVE_KEYS, "eps", "accuracy", "n", "cell"]].astype({"eps": float, "accuracy": float, "n": int})
        return with_intervals(curve)[[*CURVE_KEYS, "eps", "accuracy", "n", "low", "high", "cell"]]

    def query_curves(self) -> pd.DataFrame:
        """Every current query-attack cell's progress with queries (:func:`query_curve`)."""
        return query_curve(self.frame(), self.trajectory())

    def _table(self, table: str, cell: str | None) -> pd.DataFrame:
        with self._connect() as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone():
                return pd.DataFrame(columns=list(TABLES[table]))  # a store older than the table
            if cell is None:
                return pd.read_sql_query(f"SELECT * FROM {table}", db)
            return pd.read_sql_query(f"SELECT * FROM {table} WHERE cell = ?", db, params=[cell])

    def minimal(self, cell: str | None = None) -> pd.DataFrame:
        return self._table("minimal", cell)

    def checks(self, cell: str | None = None) -> pd.DataFrame:
        frame = self._table("checks", cell)
        frame["passed"] = frame["passed"].astype(bool)
        return frame

    def frame(self, cell: str | None = None, eps: float | None = None) -> pd.DataFrame:
        """Per-probe results of ``cell`` (of every current cell when ``None``), at ``eps`` or every budget."""
        query = "SELECT * FROM results"
        params: list[str | float] = []
        conditions = []
        if cell is not None:
            conditions.append("cell = ?")
            params.append(cell)
        if eps is not None:
            conditions.append("eps = ?")
            params.append(eps)
        if conditions:
            query += " WHERE " + " AND ".join(conditions)
        with self._connect() as db:
            frame = pd.read_sql_query(query, db, params=params)
        for flag in ("correct", "inherited"):
            frame[flag] = frame[flag].astype(bool)
        return frame if cell is not None else self._set_aside(frame)


def open_run(run: Path) -> ResultStore:
    """The results of a run folder; a clear error for anything else (never creates one)."""
    if not run.exists():
        raise RedteamError(f"run folder {run} does not exist.")
    if not run.is_dir():
        raise RedteamError(f"{run} is a file; give run folders (written by `redteam run` or `redteam sweep`).")
    if not (run / "results.sqlite").is_file():
        raise RedteamError(f"{run} holds no results.sqlite; is it a run folder of `redteam run` or `redteam sweep`?")
    return ResultStore(run / "results.sqlite", writable=False)


def _plain(value):
    """numpy scalars and bools -> the Python types sqlite3 binds."""
    value = value.item() if hasattr(value, "item") else value
    return int(value) if isinstance(value, bool) else value


def accuracy_curve(results: pd.DataFrame) -> pd.DataFrame:
    """Accuracy of the face system against perturbation size: one row per cell and budget.

    ``accuracy`` is the fraction of probes still decided correctly, ``low`` and ``high`` its 95% interval; ``eps`` is
    in /255 for ℓ∞.
    """
    if results.empty:
        return pd.DataFrame(columns=[*CURVE_KEYS, "eps", "accuracy", "n", "low", "high", "cell"])
    curve = (
        results.groupby(["cell", *CURVE_KEYS, "eps"], as_index=False)
        .agg(accuracy=("correct", "mean"), n=("correct", "size"))
        .sort_values(["cell", "eps"])
    )
    curve["eps"] = [display_eps(e, n) for e, n in zip(curve["eps"], curve["norm"])]
    return with_intervals(curve[[*CURVE_KEYS, "eps", "accuracy", "n", "cell"]].reset_index(drop=True))


def query_curve(results: pd.DataFrame, trajectory: pd.DataFrame) -> pd.DataFrame:
    """Accuracy against queries, from query attacks' trajectories: per cell, budget and query count, ``accuracy``
    (the fraction of probes still decided correctly after that many queries per probe; probes wrong without an
    attack count as wrong; ``low``, ``high``: its 95% interval) and ``median_size`` (the attacked probes' median
    smallest fooling perturbation by then, in the units budgets are written in; inf while fewer than half are
    fooled). A fixed-budget attack has its own
    trajectory per budget; a minimal one has one (stored at budget 0) read at every budget."""
    columns = [*CURVE_KEYS, "eps", "queries", "accuracy", "median_size", "n", "cell"]
    rows = []
    for (cell, eps), judged in results[results["eps"] > 0].groupby(["cell", "eps"]):
        mine = trajectory[trajectory["cell"] == cell]
        record = mine[mine["eps"] == eps] if (mine["eps"] == eps).any() else mine[mine["eps"] == 0]
        if record.empty:
            continue
        first = judged.iloc[0]
        measure = record["linf"] if first["norm"] == "linf" else record["l2"]
        sizes = record.assign(size=measure).pivot_table(index="probe", columns="queries", values="size", aggfunc="min")
        spent = int(record["queries"].max())
        for queries in [q for q in QUERY_CHECKPOINTS if q < spent] + [spent]:
            known = sizes.loc[:, sizes.columns <= queries]  # a probe's record is its best fooling size so far
            best = known.min(axis=1).fillna(np.inf).to_numpy() if known.shape[1] else np.full(len(sizes), np.inf)
            fooled = int((best <= eps * (1 + 1e-6)).sum())
            shown = [display_eps(b, first["norm"]) if np.isfinite(b) else np.inf for b in best]
            rows.append({**{key: first[key] for key in CURVE_KEYS}, "eps": display_eps(eps, first["norm"]),
                         "queries": queries, "accuracy": (len(sizes) - fooled) / len(judged),
                         "median_size": float(np.median(shown)), "n": len(judged), "cell": cell})  # fmt: skip
    return with_intervals(pd.DataFrame(rows, columns=columns).astype({"queries": "Int64"}))


def curve_area(curve: pd.DataFrame, upto: float | None = None) -> float:
    """Normalised area under one accuracy-perturbation curve (trapezoid; 1 = never fooled), over its own eps range or
    up to ``upto`` (within it; linear between points): areas are comparable only over the same range."""
    eps, accuracy = curve["eps"].to_numpy(float), curve["accuracy"].to_numpy(float)
    return float(_normalised_areas(eps, accuracy[None], upto)[0]) if len(eps) else float("nan")


def _normalised_areas(eps: np.ndarray, accuracy: np.ndarray, upto: float | None = None) -> np.ndarray:
    """``[K]`` budgets (ascending), ``[D, K]`` accuracies -> ``[D]`` normalised trapezoid areas up to ``upto`` (the
    mean accuracy where the budgets span nothing)."""
    if upto is not None and eps[0] < upto < eps[-1]:
        after = int(np.searchsorted(eps, upto))  # eps[after - 1] < upto <= eps[after]
        share = (upto - eps[after - 1]) / (eps[after] - eps[after - 1])
        at_upto = accuracy[:, after - 1] + share * (accuracy[:, after] - accuracy[:, after - 1])
        eps, accuracy = np.append(eps[:after], upto), np.concatenate([accuracy[:, :after], at_upto[:, None]], axis=1)
    if len(eps) < 2 or eps[-1] == eps[0]:
        return accuracy.mean(axis=1)
    widths = eps[1:] - eps[:-1]
    return ((accuracy[:, 1:] + accuracy[:, :-1]) / 2 * widths).sum(axis=1) / (eps[-1] - eps[0])


def area_estimate(results: pd.DataFrame, upto: float | None = None, seed: int = 0) -> Estimate | None:
    """One cell's curve area (up to ``upto``, as :func:`curve_area`) with a 95% interval from a bootstrap over
    identities (probes of one person are not independent); ``None`` without per-probe results (a campaign's own
    curve)."""
    if results.empty:
        return None
    outcomes = results.pivot_table(index="probe", columns="eps", values="correct", aggfunc="first").dropna()
    eps = np.array([display_eps(e, results["norm"].iloc[0]) for e in outcomes.columns])
    people = results.drop_duplicates("probe").set_index("probe")["identity"].loc[outcomes.index].to_numpy()

    def areas(correct: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return _normalised_areas(eps, weighted_mean(correct, weights), upto)

    return identity_bootstrap(outcomes.to_numpy(float), people, areas, seed)


def median_estimate(sizes: pd.Series, identities: pd.Series, seed: int = 0) -> Estimate:
    """The median of per-probe sizes (inf: not fooled) with a 95% interval from a bootstrap over identities."""
    return identity_bootstrap(sizes.to_numpy(float), identities.to_numpy(), weighted_median, seed)


def transfer_matrix(results: pd.DataFrame) -> pd.DataFrame:
    """Accuracy of each target on examples crafted on each surrogate (the diagonal is white-box), per budget."""
    keys = ["threat", "attack", "norm", "defense", "dataset", "eps", "surrogate", "target"]
    matrix = results.groupby(keys, as_index=False).agg(accuracy=("correct", "mean"), n=("correct", "size"))
    matrix["eps"] = [display_eps(e, n) for e, n in zip(matrix["eps"], matrix["norm"])]
    return matrix


def transfer_tables(results: pd.DataFrame) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """The transfer matrix read as tables, one per threat, attack, norm, defense, dataset and budget above 0 that
    holds a transfer run: a row per surrogate set (in the order stored), a column per target, each cell the target's
    accuracy on examples crafted on those surrogates (white-box where the row is the column's own target); with
    the same table of probe counts."""
    matrix = transfer_matrix(results)
    order = {surrogate: k for k, surrogate in enumerate(results["surrogate"].unique())}
    tables = []
    keys = ["threat", "attack", "norm", "defense", "dataset", "eps"]
    for (threat, attack, norm, defense, dataset, eps), group in matrix[matrix["eps"] > 0].groupby(keys):
        if (group["surrogate"] == group["target"]).all():
            continue
        table, counts = (group.pivot(index="surrogate", columns="target", values=v) for v in ("accuracy", "n"))
        rows = sorted(table.index, key=order.__getitem__)
        budget = f"{eps:g}/255" if norm == "linf" else f"{eps:g} ({norm})"
        undefended = "" if defense == "none" else f" · {defense}"
        tables.append((f"{attack} · {threat} · ε {budget}{undefended} · {dataset}", table.loc[rows], counts.loc[rows]))
    return tables
