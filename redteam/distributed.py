"""Sweeps on Ray (``redteam sweep config.yaml --ray auto``): every batch of every cell a Ray task.

The driver keeps what a one-process sweep keeps: the one ``results.sqlite`` and each cell's planner
(:class:`redteam.engine.Planner`, no model loaded). Worker actors, one CPU each, run executors
(:class:`redteam.engine.Executor`, no store) that compute the batches with the same seeds, keeping each cell's models
loaded and enrolled; the driver stores
their rows as they finish (``ray.wait``), so an interrupted Ray sweep resumes like a local one, and with the same
torch threads per process it stores the same numbers. A cell's next budget starts once its current one is stored,
since it attacks only the probes left correct; other cells fill idle workers meanwhile. A cell's sanity checks run
on a worker, once it and every cell before it are finished, against the rows a one-process sweep would have stored
by then.

Ray is imported only here and only when asked for (``pip install 'redteam[distributed]'``). On a cluster of several
machines, each needs redteam, its weights (``redteam fetch``) and the sweep's data at the same path.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import torch
from rich.progress import TaskID

from redteam.console import Tracker
from redteam.engine import Cell, EvaluationConfig, Executor, Planner, Shard, check_rows, prepare, run_checks
from redteam.errors import RedteamError
from redteam.results import ResultStore
from redteam.runtime import prepare_torch

#: CPUs (and torch threads) per worker: workers share a machine's cores rather than oversubscribing them.
WORKER_CPUS = 1
#: Cells whose models and enrolment a worker keeps (the driver starts a new cell only when a worker is idle).
CACHED_CELLS = 3
#: Shared memory for Ray's object store on a local cluster: it carries only configs, probes and rows.
OBJECT_STORE_BYTES = 100 * 2**20
CONNECT_TIMEOUT_S = 5.0


class RayError(RedteamError):
    """Ray is missing, or the cluster cannot be reached or cannot run the sweep."""


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise RayError("--ray needs Ray: pip install 'ray>=2.9' (redteam's distributed extra).") from None
    return ray


def connect(address: str, workers: int | None) -> ModuleType:
    """Connect this process to Ray: ``auto`` (the running cluster, if any, else a local one), ``local`` (a fresh
    local one for this process) or ``HOST:PORT`` (a cluster's head). A local cluster has ``workers`` CPUs (default:
    this machine's)."""
    ray = import_ray()
    quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if address not in ("auto", "local"):
        _check_answers(address)
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, RuntimeError) as error:
            if "AuthToken" in str(error.__cause__):  # Ray sends a token only where RAY_AUTH_MODE says so
                raise RayError(f"--ray {address}: the cluster wants its token: set RAY_AUTH_MODE=token (the token in "
                               "~/.ray/auth_token or RAY_AUTH_TOKEN).") from None  # fmt: skip
            raise RayError(f"--ray {address}: {str(error).splitlines()[0]}") from None
        return ray
    if address == "auto":
        try:
            ray.init(address="auto", logging_level=logging.ERROR, log_to_driver=False)
            return ray
        except ConnectionError:
            pass  # no cluster running: start one
    ray.init(num_cpus=workers or os.cpu_count(), object_store_memory=OBJECT_STORE_BYTES, **quiet)
    return ray


def _check_answers(address: str) -> None:
    """Fail fast, in one line, when nothing listens at ``address`` (Ray itself retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayError(f"--ray {address}: expected auto, local or HOST:PORT (a Ray head, e.g. 10.0.0.5:6379).")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise RayError(f"--ray {address}: no Ray cluster answers there ({reason.lower()}).") from None


class Worker:
    """A Ray actor's state: the executors of the last :data:`CACHED_CELLS` cells it worked on (models loaded and
    enrolment embedded once), computing batches and sanity checks for the driver. It holds no store."""

    def __init__(self, directory: str, threads: int):
        torch.set_num_threads(threads)
        prepare_torch()
        if Path(directory).is_dir():  # the driver's: relative paths in the sweep file mean the same here
            os.chdir(directory)
        self.executors: OrderedDict[str, Executor] = OrderedDict()
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def _executor(self, config: EvaluationConfig) -> Executor:
        key = json.dumps(asdict(config), sort_keys=True, default=str)
        if key not in self.executors:
            self.executors[key] = executor = Executor(prepare(config))
            executor.settle_eot()  # a worker holds no store: it measures (the same count as any process)
            while len(self.executors) > CACHED_CELLS:
                self.executors.popitem(last=False)
        self.executors.move_to_end(key)
        return self.executors[key]

    def compute(self, index: int, config: EvaluationConfig, shard: Shard) -> tuple[str, int, Any, str]:
        return "batch", index, (shard, self._executor(config).compute(shard)), self.name

    def check(
        self, index: int, config: EvaluationConfig, key: str, rows: list[dict], cells: dict[str, dict]
    ) -> tuple[str, int, Any, str]:
        """The sanity checks of a finished cell (``key`` in the driver's store), on a copy of the rows and cells the
        driver's store holds."""
        executor = self._executor(config)
        executor.cell.key = key
        results = pd.DataFrame(rows)
        for flag in ("correct", "inherited"):
            results[flag] = results[flag].astype(bool)
        checks = run_checks(executor.cell, executor, results, cells)
        return "checks", index, check_rows(executor.cell.key, checks), self.name


@dataclass
class RunningCell:
    """A cell as the driver follows it."""

    planner: Planner  # no models: plans and stores
    plan: Iterator[list[Shard]]
    bar: TaskID
    state: str = "running"  # then "finished" (every batch stored), "checking" (checks in flight), "done"
    pending: int = 0  # batches of its current level submitted and not yet stored


@dataclass
class Cluster:
    """A Ray cluster this process is connected to, and how many workers a sweep starts on it."""

    ray: ModuleType
    workers: int
    address: str


@contextmanager
def ray_cluster(address: str, workers: int | None = None) -> Iterator[Cluster]:
    """Connected to Ray (:func:`connect`) with ``workers`` (default: one per CPU of the cluster) checked against its
    CPUs; disconnects after, which ends the workers, and the cluster if this process started it."""
    ray = connect(address, workers)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        count = workers or max(cpus // WORKER_CPUS, 1)
        if count * WORKER_CPUS > cpus:
            raise RayError(f"--workers {count} needs {count * WORKER_CPUS} CPUs; the Ray cluster has {cpus}.")
        yield Cluster(ray, count, ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


def run_on_ray(
    cluster: Cluster, configs: list[EvaluationConfig], store: ResultStore, progress: Tracker
) -> tuple[list[tuple[Cell, int]], dict[str, Any]]:
    """Evaluate every config on the cluster into ``store``, skipping what it holds. Returns each cell with the
    batches this call stored, in order, and where they ran: address, workers, batches each."""
    for config in configs:
        if not isinstance(config.batch_size, int):
            raise RayError(f"--ray needs a whole-number batch_size (the driver plans the batches), not "
                           f"{config.batch_size!r}.")  # fmt: skip
    from ray.util.actor_pool import ActorPool

    gpus = min(1.0, cluster.ray.cluster_resources().get("GPU", 0) / cluster.workers)  # a share each, if any
    actor = cluster.ray.remote(Worker).options(num_cpus=WORKER_CPUS, num_gpus=gpus)
    pool = ActorPool([actor.remote(os.getcwd(), WORKER_CPUS) for _ in range(cluster.workers)])
    driver = Driver(cluster.ray, pool, store, progress)
    evaluations = driver.run(configs)
    batches = dict(sorted(driver.batches_by.items()))
    return evaluations, {"address": cluster.address, "workers": cluster.workers, "batches per worker": batches}


class Driver:
    """Submits each started cell's current level to the pool, stores results as they come back, starts the next
    cell whenever a worker is idle, and has each finished cell checked in sweep order."""

    def __init__(self, ray: ModuleType, pool: Any, store: ResultStore, progress: Tracker):
        self.ray, self.pool, self.store, self.progress = ray, pool, store, progress
        self.cells: list[RunningCell] = []
        self.batches_by: Counter[str] = Counter()

    def run(self, configs: list[EvaluationConfig]) -> list[tuple[Cell, int]]:
        self.overall = self.progress.add_task("cells", total=len(configs))
        waiting = iter(configs)
        while True:
            while self.pool.has_free() and len(self.cells) < len(configs):
                self._start(next(waiting))
            self._check_in_order()
            if not self.pool.has_next():
                return [(cell.planner.cell, cell.planner.recorded) for cell in self.cells]
            try:
                kind, index, payload, worker = self.pool.get_next_unordered()
            except self.ray.exceptions.RayTaskError as error:
                if isinstance(error.cause, RedteamError):  # a user error (bad data, say): its own line
                    raise error.cause from None
                raise
            cell = self.cells[index]
            if kind == "checks":
                self.store.record_checks(payload)
                self._done(cell)
                continue
            shard, rows = payload
            cell.planner.record(shard, rows)
            self.batches_by[worker] += 1
            self.progress.advance(cell.bar, len(shard.probes))
            cell.pending -= 1
            if cell.pending == 0:
                self._next_level(index)

    def _start(self, config: EvaluationConfig) -> None:
        planner = Planner(prepare(config), self.store, int(config.batch_size))
        bar = self.progress.add_task(config.label, total=planner.total_work())
        self.cells.append(RunningCell(planner, planner.plan(lambda n: self.progress.advance(bar, n)), bar))
        self._next_level(len(self.cells) - 1)

    def _next_level(self, index: int) -> None:
        cell = self.cells[index]
        shards = next(cell.plan, None)
        if shards is None:
            cell.state = "finished"
            return
        cell.pending = len(shards)
        for shard in shards:
            self.pool.submit(lambda worker, job: worker.compute.remote(*job), (index, cell.planner.cell.config, shard))

    def _check_in_order(self) -> None:
        """A cell's checks see the rows of the cells before it, not of the ones after it that this sweep is running
        (transfer and adaptive checks compare cells): as in a one-process sweep."""
        for index, cell in enumerate(self.cells):
            if cell.state == "running":
                return
            if cell.state != "finished":
                continue
            planned = cell.planner.cell
            kept = cell.planner.recorded == 0 and not self.store.checks(planned.key).empty  # as checks_of does
            if not planned.config.checks or kept:
                self._done(cell)
                continue
            later = {c.planner.cell.key for c in self.cells[index + 1 :]}
            rows = self.store.frame()
            rows = rows[~rows["cell"].isin(later)].to_dict(orient="records")
            cell.state = "checking"
            job = (index, planned.config, planned.key, rows, self.store.cells(current=True))
            self.pool.submit(lambda worker, job: worker.check.remote(*job), job)

    def _done(self, cell: RunningCell) -> None:
        cell.state = "done"
        self.progress.advance(self.overall)
