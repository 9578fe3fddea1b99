"""Running a campaign (advhat, uap, inversion, makeup-backdoor): build its context, run it, store its curve with
the run folder's other curves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from redteam.api import Campaign, CampaignContext, CampaignReport
from redteam.datasets import FaceDataset, open_dataset
from redteam.engine.assembly import behind_transforms, build_attack, build_defense, load_target, wrap_model
from redteam.engine.config import EvaluationConfig
from redteam.engine.plan import claim_cell, content_fingerprint
from redteam.errors import DataError, UnknownNameError
from redteam.evidence import EvidenceLog
from redteam.results import CURVE_KEYS, ResultStore
from redteam.runtime import CPU_BATCH_SIZE, prepare_torch, resolve_device


@dataclass
class CampaignRun:
    """A campaign ready to run in a run folder: its resolved config (``--identity`` settled), its key in the
    folder's store, the context it runs in, and what to tell the user first (``notes``: a default identity chosen,
    inputs changed since an earlier run). :func:`finish_campaign` fills ``report``."""

    config: EvaluationConfig
    cell: str
    campaign: Campaign
    context: CampaignContext
    notes: list[str]
    report: CampaignReport | None = None


def prepare_campaign(
    config: EvaluationConfig,
    out: Path,
    progress: Callable[[str, int], Callable[[int], None]] = lambda what, total: lambda n: None,
) -> CampaignRun:
    """Resolve and check a campaign, load its target and data, claim its cell in ``out``'s store (stages it
    finished in an earlier run are read back from there)."""
    prepare_torch()
    config = config.resolve()
    chain = build_defense(config.defense)
    campaign = build_attack(config, chain)
    assert isinstance(campaign, Campaign)
    device = resolve_device(config.device)
    dataset = open_dataset(config.data, align=config.align, skip_bad=config.skip_bad_images)
    notes = []
    if campaign.needs_identity and config.identity is None:
        chosen = default_identity(campaign, config, dataset)
        config = replace(config, identity=chosen)
        notes.append(f"--identity not given: {chosen}, the person with the most photos in {dataset.name} "
                     f"({len(dataset.by_identity[chosen])}); pass --identity NAME for another.")  # fmt: skip
    elif config.identity is not None and config.identity not in dataset.by_identity:
        raise UnknownNameError(f"identity in {dataset.name}", config.identity, dataset.by_identity)
    weights = Path(config.weights) if config.weights else None
    model = wrap_model(load_target(config.target, device, config.threshold, weights), config, chain)
    store = ResultStore(out / "results.sqlite")
    cell, changed = claim_cell(store, config, content_fingerprint(config, dataset, chain))
    evidence, about = EvidenceLog(out), {"cell": cell, **_run_keys(config, dataset)}
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
        stored_stage=lambda name: store.stage(cell, name),
        record_stage=lambda name, payload: store.record_stage(cell, name, payload),
        record_evidence=lambda entries, images: evidence.record([{**about, **e} for e in entries], images),
    )
    return CampaignRun(config, cell, campaign, context, notes + changed)


def finish_campaign(run: CampaignRun) -> CampaignRun:
    """Run the campaign (after any stages already stored) and store its curve with the folder's other curves."""
    config, context = run.config, run.context
    run.report = report = run.campaign.run(context)
    if report.curve is not None:
        keys = {"surrogate": config.target, **_run_keys(config, context.dataset)}
        rows = [{"cell": run.cell, **keys, **row} for row in report.curve.to_dict(orient="records")]
        store = ResultStore(context.out / "results.sqlite")
        store.record_curve([{k: row[k] for k in ("cell", *CURVE_KEYS, "eps", "accuracy", "n")} for row in rows])
    return run


def _run_keys(config: EvaluationConfig, dataset: FaceDataset) -> dict[str, str]:
    """What a campaign's stored rows say it ran: target, defense, attack, threat, norm and dataset."""
    return {
        "target": config.target,
        "defense": config.defense_label,
        "attack": config.attack,
        "threat": config.threat,
        "norm": config.norm,
        "dataset": dataset.name,
    }


def run_campaign(
    config: EvaluationConfig,
    out: Path,
    progress: Callable[[str, int], Callable[[int], None]] = lambda what, total: lambda n: None,
) -> CampaignRun:
    """A campaign end to end into ``out``: :func:`prepare_campaign`, then :func:`finish_campaign`."""
    return finish_campaign(prepare_campaign(config, out, progress))


def default_identity(campaign: Campaign, config: EvaluationConfig, dataset: FaceDataset) -> str:
    """The person with the most photos (the first by name among equals), if they are enough for ``campaign``."""
    needed = campaign.photos_needed(config.threat)
    most = max(len(photos) for photos in dataset.by_identity.values())
    if most < needed:
        raise DataError(
            f"{config.attack} ({config.threat}) needs {needed} photos of one person; nobody in {dataset.name} has more "
            f"than {most}: pass --data with more photos per person (identity folders)."
        )
    return min(dataset.by_identity, key=lambda name: (-len(dataset.by_identity[name]), name))
