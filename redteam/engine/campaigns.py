"""Running a campaign (advhat, uap, inversion, makeup-backdoor): build its context, run it, store its curve with
the run folder's other curves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from redteam.api import Campaign, CampaignContext, CampaignReport
from redteam.datasets import open_dataset
from redteam.engine.assembly import behind_transforms, build_attack, build_defense, load_target, wrap_model
from redteam.engine.config import EvaluationConfig
from redteam.engine.plan import claim_cell, content_fingerprint
from redteam.errors import UnknownNameError
from redteam.results import CURVE_KEYS, ResultStore
from redteam.runtime import CPU_BATCH_SIZE, prepare_torch, resolve_device


@dataclass
class CampaignRun:
    """A finished campaign: its resolved config, its key in the run folder's store, the context it ran in and its
    report (whose first lines say what changed, when its inputs did since an earlier run into the same folder)."""

    config: EvaluationConfig
    cell: str
    context: CampaignContext
    report: CampaignReport


def run_campaign(
    config: EvaluationConfig,
    out: Path,
    progress: Callable[[str, int], Callable[[int], None]] = lambda what, total: lambda n: None,
) -> CampaignRun:
    """Run a campaign end to end into ``out`` (its curve joins ``out/results.sqlite``)."""
    prepare_torch()
    config = config.resolve()
    chain = build_defense(config.defense)
    campaign = build_attack(config, chain)
    assert isinstance(campaign, Campaign)
    device = resolve_device(config.device)
    dataset = open_dataset(config.data, align=config.align)
    if config.identity is not None and config.identity not in dataset.by_identity:
        raise UnknownNameError(f"identity in {dataset.name}", config.identity, dataset.by_identity)
    weights = Path(config.weights) if config.weights else None
    model = wrap_model(load_target(config.target, device, config.threshold, weights), config, chain)
    context = CampaignContext(
        target=behind_transforms(model, config, chain, adaptive=True),  # a campaign judges on what it attacks
        target_name=config.target,
        dataset=dataset,
        device=device,
        out=out,
        load_target=lambda name: load_target(name, device),
        seed=config.seed,
        threat=config.threat,
        budgets=config.eps,
        norm=config.norm,
        limit=config.limit,
        identity=config.identity,
        batch_size=config.batch_size if isinstance(config.batch_size, int) else CPU_BATCH_SIZE,
        progress=progress,
    )
    store = ResultStore(out / "results.sqlite")
    cell, notes = claim_cell(store, config, content_fingerprint(config, dataset, chain))
    report = campaign.run(context)
    report.lines[:0] = notes
    if report.curve is not None:
        keys = {
            "target": config.target,
            "surrogate": config.target,
            "defense": config.defense_label,
            "attack": config.attack,
            "threat": config.threat,
            "norm": config.norm,
            "dataset": dataset.name,
        }
        rows = [{"cell": cell, **keys, **row} for row in report.curve.to_dict(orient="records")]
        store.record_curve([{k: row[k] for k in ("cell", *CURVE_KEYS, "eps", "accuracy", "n")} for row in rows])
    return CampaignRun(config, cell, context, report)
