"""One evaluation in one process: a planner and an executor over the same cell, filling one store."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from redteam.engine.config import EvaluationConfig
from redteam.engine.eot import EotChoice
from redteam.engine.execute import Executor
from redteam.engine.plan import Cell, Planner, prepare
from redteam.results import ResultStore
from redteam.runtime import prepare_torch

#: The store's stage holding a cell's measured EOT draws (:class:`redteam.engine.eot.EotChoice`, as JSON).
EOT_STAGE = "eot draws"


class Evaluation:
    """``Evaluation(config, store).run()`` fills ``store`` with the cell's per-probe results (skipping what it
    holds); then :meth:`curve`. ``cell`` is the resolved config with its data and probes, ``executor`` its loaded
    models, ``planner`` what is left to do. Given a path, the store is opened there only once the config checked
    out and the models loaded: a run that cannot start leaves nothing behind."""

    def __init__(self, config: EvaluationConfig, store: ResultStore | Path):
        prepare_torch()
        self.cell: Cell = prepare(config)
        self.executor = Executor(self.cell)
        store = store if isinstance(store, ResultStore) else ResultStore(Path(store))
        self.planner = Planner(self.cell, store, self.executor.batch_size)
        self.executor.keep_ledger(store.ledger(self.cell.key))
        self._settle_eot(store)

    def _settle_eot(self, store: ResultStore) -> None:
        """The EOT draws this cell was measured to need, measured once: a resumed or repeated run reads them."""
        stored = store.stage(self.cell.key, EOT_STAGE)
        known = EotChoice(**json.loads(stored)) if stored is not None else None
        choice = self.executor.settle_eot(known)
        if choice is not None and known is None:
            store.record_stage(self.cell.key, EOT_STAGE, json.dumps(asdict(choice)).encode())

    @property
    def config(self) -> EvaluationConfig:
        return self.cell.config

    @property
    def store(self) -> ResultStore:
        return self.planner.store

    @property
    def computed(self) -> int:
        """Batches this process computed (0 on a re-run of a finished evaluation)."""
        return self.planner.recorded

    def run(self, advance: Callable[[int], None] = lambda n: None) -> None:
        """Evaluate every budget, skipping what the store already holds; ``advance(n)`` reports progress."""
        for shards in self.planner.plan(advance):
            for shard in shards:
                self.planner.record(shard, self.executor.compute(shard))
                advance(len(shard.probes))

    def curve(self) -> pd.DataFrame:
        return self.planner.curve()
