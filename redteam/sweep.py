"""`redteam sweep config.yaml`: a grid of targets x attacks x defenses over a ladder of budgets, into one store.

A sweep file is a YAML mapping. Lists make the grid; everything else applies to every cell::

    data: ../shared/data/faces
    targets: [facenet, arcface]
    attacks: {pgd: {steps: 2}, mim: {steps: 2}}   # or a list of names: [pgd, mim]
    defenses: [none, halftone]                     # optional (default: none)
    adaptive: [true, false]                        # optional: how defended cells are attacked (default: true)
    surrogates: [none, facenet, [facenet, dlib-resnet]]  # optional: craft on these and judge on each target
                                                   # (transfer; a list is an ensemble; none: white-box)
    eps: [0, 1, 2, 4]                              # /255 for linf, image units for l2
    limit: 8
    out: runs/my-sweep                             # optional; --out wins

The whole file is checked before anything runs: a mistake is one line naming the key and value, with the closest
known name. Cells run in turn into ``<out>/results.sqlite``, a batch at a time, so an interrupted sweep (Ctrl-C,
kill -9, a crash) carries on where it stopped when the same command runs again and recomputes nothing finished.
With ``--ray``, Ray workers compute the batches and this process stores them (:mod:`redteam.distributed`).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from redteam.api import ATTACKS, TARGETS
from redteam.console import Tracker
from redteam.engine import Cell, Evaluation, EvaluationConfig, build_attack, build_defense, checks_of
from redteam.errors import RedteamError, UnknownNameError
from redteam.outputs import write_outputs
from redteam.results import ResultStore


class SweepConfigError(RedteamError):
    """A mistake in a sweep file."""


#: Settings shared by every cell: EvaluationConfig fields (and ``steps``, an attack setting) with their YAML types.
SHARED_SETTINGS: dict[str, type | tuple[type, ...]] = {
    "data": str,
    "threat": str,
    "norm": str,
    "eps": list,
    "limit": int,
    "seed": int,
    "threshold": (int, float),
    "align": bool,
    "batch_size": int,
    "device": str,
    "precision": str,
    "checks": bool,
    "skip_bad_images": bool,
    "access": str,
    "queries": int,
    "steps": int,
}
GRID_KEYS = ("targets", "attacks", "defenses", "adaptive", "surrogates")
KNOWN_KEYS = (*GRID_KEYS, *SHARED_SETTINGS, "out")


@dataclass
class Sweep:
    """A parsed, checked sweep file: one :class:`EvaluationConfig` per cell, in the order they run."""

    path: Path
    configs: list[EvaluationConfig]
    out: Path | None  # the file's ``out``, relative to the working directory like the command's own paths
    settings: dict[str, Any]  # the file as read (for sweep.json)


def load_sweep(path: Path) -> Sweep:
    """Read and check a sweep file. Raises :class:`SweepConfigError` (one line) on any mistake."""
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"sweep file {path} {'is a folder' if path.is_dir() else 'does not exist'}.")
    try:
        settings = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SweepConfigError(f"{path} is not valid YAML{where}: {problem}.") from None
    except UnicodeDecodeError:
        raise SweepConfigError(f"{path} is not a text file.") from None
    if not isinstance(settings, dict):
        raise SweepConfigError(f"{path} must be a YAML mapping (targets:, attacks:, eps:, ...), not {_kind(settings)}.")
    for key in settings:
        if key not in KNOWN_KEYS:
            raise SweepConfigError(f"{path}: {UnknownNameError('key', str(key), KNOWN_KEYS)}")
    for key in ("targets", "attacks"):
        if key not in settings:
            raise SweepConfigError(
                f"{path}: {key}: missing; a sweep needs at least one of each of targets and attacks."
            )
    shared = {key: _checked(path, key, settings[key]) for key in SHARED_SETTINGS if key in settings}
    out = settings.get("out")
    if out is not None and not isinstance(out, str):
        raise SweepConfigError(f"{path}: out: expected a folder path, got {_kind(out)} {out!r}.")
    targets = _names(path, "targets", settings["targets"])
    attacks = _attacks(path, settings["attacks"])
    defenses = _names(path, "defenses", settings.get("defenses", ["none"]))
    adaptive = settings.get("adaptive", [True])
    adaptive = adaptive if isinstance(adaptive, list) else [adaptive]
    if not adaptive or not all(isinstance(a, bool) for a in adaptive):
        raise SweepConfigError(f"{path}: adaptive: expected true, false or a list of them, got {adaptive!r}.")
    surrogates = _surrogates(path, settings.get("surrogates", "none"))
    steps = shared.pop("steps", None)
    if "eps" in shared:
        shared["eps"] = tuple(shared["eps"])
    configs: list[EvaluationConfig] = []
    grid = product(surrogates, targets, attacks, defenses, adaptive)
    for surrogate, target, (attack, options), defense, adaptively in grid:
        if defense == "none" and adaptively != adaptive[0]:
            continue  # without a defense there is nothing to be adaptive about: one cell, not two
        options = {**({"steps": steps} if steps is not None else {}), **options}
        config = EvaluationConfig(target, attack, attack_options=options, defense=defense, adaptive=adaptively,
                                  surrogate=surrogate, **shared)  # fmt: skip
        checked = _check_cell(path, config)
        if checked not in configs:  # a target listed as its own surrogate is its white-box cell, once
            configs.append(checked)
    return Sweep(path, configs, Path(out) if out else None, settings)


def _kind(value: object) -> str:
    kinds = {dict: "a mapping", list: "a list", str: "text", bool: "a boolean", int: "a number", float: "a number"}
    return kinds.get(type(value), "nothing" if value is None else type(value).__name__)


def _checked(path: Path, key: str, value: Any) -> Any:
    """One shared setting, type-checked (YAML's bools are not numbers here); a YAML value, so its type depends on
    ``key`` (:data:`SHARED_SETTINGS`)."""
    expected = SHARED_SETTINGS[key]
    wrong_bool = isinstance(value, bool) and expected is not bool
    right_type = isinstance(value, expected)  # a flag, not a guard: value stays Any for the checks by key below
    if wrong_bool or not right_type:
        names = {str: "text", int: "a whole number", bool: "true or false", list: "a list of numbers"}
        wanted = names.get(expected, "a number") if isinstance(expected, type) else "a number"
        raise SweepConfigError(f"{path}: {key}: expected {wanted}, got {_kind(value)} {value!r}.")
    if key == "eps":
        if not value or any(isinstance(e, bool) or not isinstance(e, (int, float)) for e in value):
            raise SweepConfigError(f"{path}: eps: expected a list of numbers, got {value!r}.")
    if key in ("limit", "batch_size", "steps", "queries") and value < 1:
        raise SweepConfigError(f"{path}: {key}: must be at least 1, got {value}.")
    return value


def _names(path: Path, key: str, value: object) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SweepConfigError(f"{path}: {key}: expected a list of names, got {value!r}.")
    if len(set(value)) != len(value):
        raise SweepConfigError(f"{path}: {key}: {sorted({v for v in value if value.count(v) > 1})} listed twice.")
    for name in value:
        try:
            if key == "targets":
                TARGETS.get(name)
            elif key == "defenses":
                build_defense(name)
        except RedteamError as error:
            raise SweepConfigError(f"{path}: {key}: {error}") from None
    return value


def _surrogates(path: Path, value: object) -> list[str | None]:
    """``facenet``, ``[none, facenet, [facenet, dlib-resnet]]`` -> ``[None, "facenet", "facenet,dlib-resnet"]``."""
    entries = value if isinstance(value, list) else [value]
    sets: list[str | None] = []
    for entry in entries:
        members = entry if isinstance(entry, list) else [entry]
        if not members or not all(isinstance(m, str) for m in members):
            raise SweepConfigError(f"{path}: surrogates: expected names or lists of names, got {entry!r}.")
        joined = ",".join(str(m) for m in members)
        sets.append(None if joined == "none" else joined)
    if len(set(sets)) != len(sets):
        raise SweepConfigError(f"{path}: surrogates: {entries!r} lists a set twice.")
    return sets


def _attacks(path: Path, value: object) -> list[tuple[str, dict[str, Any]]]:
    """``[pgd, mim]`` or ``{pgd: {steps: 2}, mim: null}`` -> ``[(name, settings)]``."""
    if isinstance(value, dict):
        pairs = [(name, options or {}) for name, options in value.items()]
        for name, options in pairs:
            if not isinstance(options, dict):
                raise SweepConfigError(f"{path}: attacks: {name}: expected settings (key: value), got {options!r}.")
    else:
        pairs = [(name, {}) for name in _names(path, "attacks", value)]
    for name, _ in pairs:
        try:
            attack_class = ATTACKS.get(str(name))
        except RedteamError as error:
            raise SweepConfigError(f"{path}: attacks: {error}") from None
        if attack_class.kind == "campaign":
            raise SweepConfigError(f"{path}: attacks: {name} is a campaign; run it with `redteam run --attack {name}`.")
    return [(str(name), dict(options)) for name, options in pairs]


def _check_cell(path: Path, config: EvaluationConfig) -> EvaluationConfig:
    """Everything about a cell that can be checked without loading models or data; the cell resolved."""
    where = f"{path}: cell {config.target} x {config.attack} x {config.defense}"
    try:
        resolved = config.resolve()
        build_attack(resolved, build_defense(resolved.defense))
    except RedteamError as error:
        raise SweepConfigError(f"{where}: {error}") from None
    return resolved


def run_sweep(
    sweep: Sweep, out: Path, progress: Tracker, ray: str | None = None, workers: int | None = None
) -> list[dict[str, Any]]:
    """Run every cell into ``out/results.sqlite`` (skipping what it holds), then write the curves: in turn in this
    process, or with ``ray`` (``auto``, ``local`` or a cluster's ``HOST:PORT``) on ``workers`` Ray workers.

    Returns, per cell, its key, label and how many batches this call computed (0 for cells already finished).
    """
    started = time.perf_counter()
    where: dict[str, Any] = {}  # where a Ray sweep ran
    if ray is None:
        store = ResultStore(out / "results.sqlite")
        evaluations = _run_here(sweep.configs, store, progress)
    else:
        from redteam.distributed import ray_cluster, run_on_ray

        with ray_cluster(ray, workers) as cluster:  # connected before anything is written
            store = ResultStore(out / "results.sqlite")
            evaluations, where = run_on_ray(cluster, sweep.configs, store, progress)
    done = [
        {"cell": cell.key, "label": cell.config.label, "batches computed": computed} for cell, computed in evaluations
    ]
    write_outputs(store, out)
    summary = {
        "sweep": str(sweep.path),
        "command": f"redteam sweep {sweep.path} --out {out}",
        "settings": sweep.settings,
        "cells": done,
        "seconds": round(time.perf_counter() - started, 1),
        **({"ray": where} if where else {}),
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    return done


def _run_here(configs: list[EvaluationConfig], store: ResultStore, progress: Tracker) -> list[tuple[Cell, int]]:
    """Each cell in turn in this process, checks after it; returns each cell and the batches this call computed."""
    cells = progress.add_task("cells", total=len(configs))
    done = []
    for config in configs:
        evaluation = Evaluation(config, store)
        task = progress.add_task(config.label, total=evaluation.planner.total_work())
        evaluation.run(functools.partial(progress.advance, task))
        if config.checks:
            checks_of(evaluation)
        done.append((evaluation.cell, evaluation.computed))
        progress.advance(cells)
    return done
