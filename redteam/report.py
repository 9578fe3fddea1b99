"""`redteam report RUN_DIR...`: what a security engineer hands their team after a red-team exercise.

One self-contained HTML file (figures and images inlined as base64 PNG, no script, no network), with Markdown
and JSON beside it, from the run folders that `redteam run` and `redteam sweep` write: a summary table (target x
defense x attack: clean accuracy, robust accuracy at chosen budgets, curve AUC, sanity-check status), the
accuracy-perturbation curves, example images (clean, adversarial, amplified perturbation), the target cards and the
exact command (and seed) that reproduces each number.

The store keeps per-probe results, not images: examples are re-created from the stored configuration with the
run's own seeds (:meth:`redteam.engine.Executor.craft` on the planner's example batch), and the report says whether
the re-created verdicts match the stored ones.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import matplotlib.pyplot as plt
import pandas as pd
import torch

from redteam.api import TARGETS
from redteam.budgets import display_eps
from redteam.console import Tracker
from redteam.diff import diff_runs
from redteam.engine import Evaluation, EvaluationConfig
from redteam.engine.assembly import drawing_from
from redteam.errors import RedteamError
from redteam.intervals import wilson_interval
from redteam.plots import plot_curves  # also selects matplotlib's headless backend before pyplot draws
from redteam.results import ResultStore, area_estimate, curve_area, open_run, transfer_tables

#: How each perturbation measure's budgets are written in column headers.
BUDGET_UNITS = {"linf": "{eps:g}/255 ℓ∞", "l2": "{eps:g} ℓ2"}


@dataclass
class CellSummary:
    """One cell of the report: a target x defense x attack x threat x norm x dataset x seed x settings."""

    run: str
    cell: str
    target: str
    surrogate: str
    defense: str
    attack: str
    threat: str
    norm: str
    dataset: str
    seed: int
    probes: int
    clean: float | None
    clean_interval: list[float] | None
    robust: dict[str, float | None]  # column header -> accuracy at that budget
    intervals: dict[str, list[float] | None]  # column header -> 95% interval [low, high] of that accuracy
    auc: float
    auc_interval: list[float] | None  # 95% interval of the AUC (bootstrap over identities); None for campaigns
    auc_range: str  # the budgets its AUC covers: the same for every cell of one perturbation measure
    checks: list[dict[str, Any]]
    status: str  # "passed", "warning: <failed checks>" or "not run"
    command: str
    curve: list[dict[str, float]]
    config: dict[str, Any]
    examples: dict[str, Any] = field(default_factory=dict)  # "png" (base64), "note", "file"
    ledger: str = ""  # a deployed target's queries: sent, retries, answered from the ledger, latency
    stages: str = ""  # a face system's verdicts on the attacked probes by stage, per budget
    broken_by: str = ""  # an ensemble attack's parts: how many probes each broke, per budget
    liveness: str = ""  # a face system's liveness scores of the attacked probes, per budget
    operating_point: str = ""  # the threshold the system decided at and where it comes from


@dataclass
class Report:
    title: str
    created: str
    runs: list[str]
    columns: list[str]
    cells: list[CellSummary]
    cards: dict[str, dict[str, Any]]
    figures: dict[str, str]  # target -> base64 PNG of its curves
    sweeps: list[str]  # the commands that made sweep folders
    transfer: list[dict[str, Any]] = field(default_factory=list)  # transfer matrices: title, targets, rows
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # claimed vs adaptive robustness, per defense
    differences: dict[str, Any] | None = None  # two runs given: what moved between them (redteam.diff)
    tradeoffs: list[dict[str, Any]] = field(default_factory=list)  # accuracy at each operating point, per system

    def to_json(self) -> dict[str, Any]:
        """Everything but the images."""
        data = asdict(self)
        del data["figures"]
        for cell in data["cells"]:
            cell["examples"] = {k: v for k, v in cell["examples"].items() if k != "png"}
        return data


def _column(norm: str, eps: float) -> str:
    return BUDGET_UNITS.get(norm, "{eps:g} " + norm).format(eps=eps)


def run_command(config: dict[str, Any], eps: list[float], out: Path) -> str:
    """The `redteam run` command that reproduces a cell (same seed, same batches, same settings)."""
    parts = ["redteam", "run", "--target", config["target"], "--attack", config["attack"], "--data", config["data"]]
    parts += ["--threat", config["threat"], "--norm", config["norm"], "--eps", ",".join(f"{e:g}" for e in eps)]
    parts += ["--seed", str(config["seed"]), "--batch-size", str(config["batch_size"])]
    if config.get("limit") is not None:
        parts += ["--limit", str(config["limit"])]
    if config.get("precision", "fp32") != "fp32":
        parts += ["--precision", config["precision"]]
    for key, value in config.get("attack_options", {}).items():
        parts += ["--option", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    if config.get("defense", "none") != "none":
        adaptivity = "adaptive" if config.get("adaptive", True) else "non-adaptive"
        parts += ["--defense", config["defense"], "--adaptivity", adaptivity]
    for flag in ("surrogate", "threshold", "far", "weights", "identity"):
        if config.get(flag) is not None:
            parts += [f"--{flag}", str(config[flag])]
    if config.get("align"):
        parts.append("--align")
    if not config.get("checks", True):
        parts.append("--no-checks")
    return shlex.join([*parts, "--out", str(out)])


def _checks_status(checks: pd.DataFrame) -> str:
    if checks.empty:
        return "not run"
    failed = checks.loc[~checks["passed"], "name"].tolist()
    return "passed" if not failed else "warning: " + ", ".join(failed)


def collect(runs: list[Path], budgets: tuple[float, ...] | None = None) -> Report:
    """Summarise every cell stored in ``runs``; ``budgets`` (display units: /255 for ℓ∞) pick the robust-accuracy
    columns (default: every budget stored)."""
    if not runs:
        raise RedteamError("give at least one run folder.")
    cells, sweeps, wanted = [], [], set(budgets or ())
    per_probe: dict[tuple[str, str], pd.DataFrame] = {}
    transfer: list[dict[str, Any]] = []
    for run in runs:
        store = open_run(run)
        configs, curves, checks, ledgers = store.cells(), store.curves(), store.checks(), store.ledger_summary()
        results = store.frame()
        stages, broken_by, liveness = store.stage_summary(), store.ensemble_summary(), store.liveness_summary()
        for title, table, counts in transfer_tables(results):
            rows = [
                {"surrogate": str(s), "accuracy": [_number(a) for a in row],
                 "intervals": [None if pd.isna(a) else list(wilson_interval(a, int(n))) for a, n in
                               zip(row, counts.loc[s])]}
                for s, row in table.iterrows()
            ]  # fmt: skip
            transfer.append({"title": f"{title} ({run})", "targets": [str(t) for t in table.columns], "rows": rows})
        if (run / "sweep.json").is_file():
            sweeps.append(json.loads((run / "sweep.json").read_text())["command"])
        order = {cell: number for number, cell in enumerate(configs)}  # the order they were run in
        for cell, curve in sorted(curves.groupby("cell", sort=False), key=lambda item: order[item[0]]):
            config, first = configs[cell], curve.iloc[0]
            clean = curve[curve["eps"] == 0]
            cell_checks = checks[checks["cell"] == cell]
            cells.append(
                CellSummary(
                    run=str(run),
                    cell=str(cell),
                    target=str(first["target"]),
                    surrogate=str(first["surrogate"]),
                    defense=str(first["defense"]),
                    attack=str(first["attack"]),
                    threat=str(first["threat"]),
                    norm=str(first["norm"]),
                    dataset=str(first["dataset"]),
                    seed=int(config["seed"]),
                    probes=int(curve["n"].max()),
                    clean=float(clean["accuracy"].iloc[0]) if len(clean) else None,
                    clean_interval=[float(clean["low"].iloc[0]), float(clean["high"].iloc[0])] if len(clean) else None,
                    robust={_column(first["norm"], e): float(a) for e, a in zip(curve["eps"], curve["accuracy"]) if e},
                    intervals={
                        _column(first["norm"], e): [float(low), float(high)]
                        for e, low, high in zip(curve["eps"], curve["low"], curve["high"])
                        if e
                    },
                    auc=curve_area(curve),
                    auc_interval=None,
                    auc_range="",
                    checks=cell_checks[["name", "passed", "detail"]].to_dict(orient="records"),
                    status=_checks_status(cell_checks),
                    command=run_command(config, curve["eps"].tolist(), run),
                    curve=curve[["eps", "accuracy", "n", "low", "high"]].to_dict(orient="records"),
                    config=config,
                    ledger=ledgers.get(str(cell), ""),
                    stages=stages.get(str(cell), ""),
                    broken_by=broken_by.get(str(cell), ""),
                    liveness=liveness.get(str(cell), ""),
                    operating_point=operating_point(config),
                )
            )
            per_probe[(str(run), str(cell))] = results[results["cell"] == cell]
    if not cells:
        raise RedteamError(f"{', '.join(map(str, runs))}: no finished results yet; run or resume them first.")
    stored = sorted({(c.norm, e["eps"]) for c in cells for e in c.curve if e["eps"]})
    if wanted:
        missing = sorted(wanted - {eps for _, eps in stored})
        if missing:
            have = ", ".join(f"{e:g}" for e in sorted({eps for _, eps in stored})) or "none"
            raise RedteamError(
                f"--at {', '.join(f'{e:g}' for e in missing)}: no run has that budget; they have {have}."
            )
        stored = [(norm, eps) for norm, eps in stored if eps in wanted]
    columns = [_column(norm, eps) for norm, eps in stored]
    for cell in cells:
        cell.robust = {column: cell.robust.get(column) for column in columns}
        cell.intervals = {column: cell.intervals.get(column) for column in columns}
    for norm in {cell.norm for cell in cells}:  # one AUC range per measure: the budgets every cell of it reaches
        same = [cell for cell in cells if cell.norm == norm]
        upto = min(max(point["eps"] for point in cell.curve) for cell in same)
        for cell in same:
            cell.auc = curve_area(pd.DataFrame(cell.curve), upto)
            estimate = area_estimate(per_probe[(cell.run, cell.cell)], upto)
            cell.auc_interval = None if estimate is None else [estimate.low, estimate.high]
            cell.auc_range = f"0–{_column(norm, upto)}"
    return Report(
        title="Robustness report: " + ", ".join(sorted({c.target for c in cells})),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        runs=[str(run) for run in runs],
        columns=columns,
        cells=cells,
        cards=_cards(sorted({c.target for c in cells} | {name for c in cells for name in c.surrogate.split(",")})),
        figures={},
        sweeps=sweeps,
        transfer=transfer,
        verdicts=defense_verdicts(cells, columns),
        differences=_differences(runs),
        tradeoffs=operating_tradeoffs(cells),
    )


def operating_point(config: dict[str, Any]) -> str:
    """The threshold a cell decided at and where it comes from: a false accept rate of the card's calibration
    (with that rate's 95% interval on the calibration's impostor pairs), a given threshold, or the card's."""
    card = TARGETS.get(config["target"]).card if config["target"] in TARGETS else None
    far, threshold = config.get("far"), config.get("threshold")
    if far is not None and card is not None:
        counted = re.search(r"([\d,]+) impostor pairs", card.calibration)
        text = f"FAR {far:g}: threshold {threshold:.4g} (card calibration"
        if counted:
            impostors = int(counted.group(1).replace(",", ""))
            low, high = wilson_interval(far, impostors)
            text += f", 95% interval {low:.1e}–{high:.1e} on {impostors:,} impostor pairs"
        return text + ")"
    if threshold is not None:
        return f"threshold {threshold:.4g} (given)"
    if card is not None and card.threshold is not None:
        return f"best accuracy: threshold {card.threshold:.4g} (card calibration)"
    return ""


def operating_tradeoffs(cells: list[CellSummary]) -> list[dict[str, Any]]:
    """Per system and attack run at more than one operating point: its clean and robust accuracy at each (the
    accuracy-vs-FAR trade-off: a stricter threshold rejects more genuine users and may be harder to dodge)."""
    groups: dict[tuple[str, ...], list[CellSummary]] = {}
    for cell in cells:
        key = (cell.target, cell.defense, cell.attack, cell.threat, cell.norm, cell.dataset)
        groups.setdefault(key, []).append(cell)
    tradeoffs = []
    for (target, defense, attack, threat, norm, dataset), group in groups.items():
        points = {cell.operating_point: cell for cell in group}
        if len(points) < 2:
            continue
        rows = [{"label": point, "clean": cell.clean, "clean_interval": cell.clean_interval,
                 "accuracy": list(cell.robust.values()), "intervals": list(cell.intervals.values())}
                for point, cell in points.items()]  # fmt: skip
        tradeoffs.append({"title": f"{target} / {defense} / {attack} / {threat} ({norm}, {dataset})", "rows": rows})
    return tradeoffs


def _differences(runs: list[Path]) -> dict[str, Any] | None:
    """With exactly two run folders, the values that moved between them (``redteam diff``), where any pair up."""
    if len(runs) != 2:
        return None
    found = diff_runs(*runs)
    return found.to_dict() if found.changes else None


def defense_verdicts(cells: list[CellSummary], columns: list[str]) -> list[dict[str, Any]]:
    """Per defended system (target, defense, threat, norm, dataset): the claim (the strongest non-adaptive
    attack), the default adaptive attack (``auto`` where it ran) and the strongest adaptive attack found, per
    budget; the defense "holds" at a budget only where the strongest stays within the default's 95% interval."""
    groups: dict[tuple[str, ...], list[CellSummary]] = {}
    for cell in cells:
        if cell.defense != "none" and cell.surrogate == cell.target:
            key = (cell.target, cell.defense.rsplit(" (", 1)[0], cell.threat, cell.norm, cell.dataset)
            groups.setdefault(key, []).append(cell)
    verdicts = []
    for (target, defense, threat, norm, dataset), group in groups.items():
        adaptive = [c for c in group if c.defense.endswith("(adaptive)")]
        claimed = [c for c in group if c not in adaptive]
        if not adaptive:
            continue
        default = next((c for c in adaptive if c.attack == "auto"), adaptive[0])
        rows: list[dict[str, Any]] = []
        for label, chosen in (("claimed (non-adaptive)", claimed), (f"default adaptive ({default.attack})", [default])):
            if chosen:
                rows.append(_weakest_row(label, chosen, columns, attacks=False))
        strongest = _weakest_row("strongest adaptive found", adaptive, columns, attacks=True)
        rows.append(strongest)
        holds: list[str | None] = []
        for column, accuracy in zip(columns, strongest["accuracy"]):
            interval = default.intervals.get(column)
            if interval is None or accuracy is None:
                holds.append(None)
                continue
            holds.append("holds" if accuracy >= interval[0] else "overstated")
        verdicts.append({"title": f"{target} + {defense}, {threat} ({norm}, {dataset})", "rows": rows, "holds": holds})
    return verdicts


def _weakest_row(label: str, cells: list[CellSummary], columns: list[str], attacks: bool) -> dict[str, Any]:
    """A table row: at each column, the lowest accuracy any of ``cells`` reached, its interval and (``attacks``)
    the attack that reached it."""
    weakest: list[CellSummary | None] = []
    for column in columns:
        reached = [(value, cell) for cell in cells if (value := cell.robust.get(column)) is not None]
        weakest.append(min(reached, key=lambda pair: pair[0])[1] if reached else None)
    return {
        "label": label,
        "accuracy": [None if cell is None else cell.robust[column] for cell, column in zip(weakest, columns)],
        "intervals": [None if cell is None else cell.intervals[column] for cell, column in zip(weakest, columns)],
        "attacks": [None if cell is None or not attacks else cell.attack for cell in weakest],
    }


def _number(value: Any) -> float | None:
    """A table's value, or None where the pivot has no cell (NaN)."""
    return None if pd.isna(value) else float(value)


def _cards(names: list[str]) -> dict[str, dict[str, Any]]:
    cards = {}
    for name in names:
        card = TARGETS.get(name).card.to_dict() if name in TARGETS else {"name": name, "notes": "not registered here"}
        cards[name] = {key: value for key, value in card.items() if value not in (None, "", {})}
    return cards


def _png(figure: plt.Figure) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def curve_figures(runs: list[Path]) -> dict[str, bytes]:
    """Accuracy-perturbation curves, one PNG per target (every defense and attack on it, one panel per norm, and one
    of accuracy against queries where a query attack ran)."""
    stores = [open_run(run) for run in runs]
    curves = pd.concat([store.curves() for store in stores], ignore_index=True)
    queries = pd.concat([store.query_curves() for store in stores], ignore_index=True)
    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        for target, curve in curves.groupby("target"):
            path = Path(scratch) / "curve.png"
            plot_curves(curve, path, queries[queries["target"] == target])
            figures[str(target)] = path.read_bytes()
    return figures


def recreate_examples(summary: CellSummary, count: int, device: str = "auto") -> dict[str, Any]:
    """Re-create ``count`` adversarial examples of one cell with its stored config and seeds, and draw them
    (clean, adversarial, amplified perturbation per probe). Returns ``{"png": bytes, "note": str}`` or a note
    saying why there are none."""
    stored = EvaluationConfig.from_dict({**summary.config, "device": device})
    if stored.campaign:
        return {"note": "campaign: its own images are in its run folder"}
    evaluation = Evaluation(stored, ResultStore(Path(summary.run) / "results.sqlite"))
    config, planner, executor = evaluation.config, evaluation.planner, evaluation.executor
    if evaluation.cell.key != summary.cell:
        return {"note": "its stored configuration no longer gives the same cell (made by another redteam version)"}
    if evaluation.cell.minimal:
        return {"note": "minimal-perturbation attack: examples are re-created for fixed-budget attacks only"}
    chosen = planner.example_batch()
    if chosen is None:
        return {"note": "no probe was attacked (none was decided correctly without an attack)"}
    level, batch, rows = chosen
    eps = evaluation.cell.budgets[level]
    with drawing_from(executor.generator("defense", level, 0), executor.crafting, executor.target):
        crafted = executor.craft(batch, eps, level, 0)
        images, adversarial = crafted.images, crafted.adversarial
        with torch.no_grad():
            judged = crafted.verdict(adversarial)
    scores = judged.score.detach().cpu()
    drift = float((scores - torch.tensor(rows["score"].to_numpy(), dtype=scores.dtype)).abs().max())
    clean = evaluation.store.frame(evaluation.cell.key, 0.0).set_index("probe")
    order = sorted(range(len(batch)), key=lambda k: bool(judged.success[k]), reverse=True)[:count]  # fooled first
    budget = _column(config.norm, display_eps(eps, config.norm))
    figure = _example_figure(
        images[order].cpu(),
        adversarial[order].cpu(),
        [float(clean.loc[batch[k].key, "score"]) for k in order],
        [float(scores[k]) for k in order],
        [bool(judged.success[k]) for k in order],
        budget,
    )
    agreement = "matches the stored scores" if drift < 1e-4 else f"differs from the stored scores by up to {drift:.3g}"
    note = f"first batch at ε = {budget}, re-created from seed {config.seed}: {agreement}"
    return {"png": _png(figure), "note": note}


def _example_figure(clean, adversarial, clean_scores, scores, fooled, budget: str):
    """Rows of (clean, adversarial, perturbation amplified to the full grey range) for ``[N, 3, H, W]`` images."""
    rows = len(clean)
    figure, axes = plt.subplots(rows, 3, figsize=(6.6, 2.5 * rows), squeeze=False)
    for row in range(rows):
        delta = adversarial[row] - clean[row]
        gain = 0.5 / max(float(delta.abs().max()), 1e-12)
        panels = [
            (clean[row], f"clean (score {clean_scores[row]:.3f})"),
            (
                adversarial[row],
                f"adversarial, {budget}\n(score {scores[row]:.3f}, {'fooled' if fooled[row] else 'held'})",
            ),
            ((delta * gain + 0.5).clamp(0, 1), f"perturbation × {gain:.0f}"),
        ]
        for axis, (image, title) in zip(axes[row], panels):
            axis.imshow(image.permute(1, 2, 0).numpy())
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    figure.tight_layout()
    return figure


def _markdown(text: object) -> str:
    """A user string made inert in a Markdown table cell (no HTML, no table breaks, no code spans)."""
    replacements = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|", "`": "\\`", "\n": " ", "*": "\\*", "_": "\\_"}
    return "".join(replacements.get(char, char) for char in str(text))


def _interval(bounds: list[float] | None, percent: bool = True) -> str:
    """A 95% interval as ``[50–78%]`` (or ``[0.412–0.530]`` for an area); empty where there is none."""
    if bounds is None:
        return ""
    low, high = bounds
    return f"[{low:.0%}–{high:.0%}]" if percent else f"[{low:.3f}–{high:.3f}]"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def write_report(report: Report, figures: dict[str, bytes], out: Path) -> list[Path]:
    """Write ``out/report.html`` (self-contained), ``out/report.md`` (its figures in ``out/report_files/``) and
    ``out/report.json``; returns the three paths."""
    if out.exists() and not out.is_dir():
        raise RedteamError(f"--out {out} is a file; give a folder.")
    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    report.figures = {target: base64.b64encode(png).decode() for target, png in figures.items()}
    for target, png in figures.items():
        (files / f"curves-{_slug(target)}.png").write_bytes(png)
    for number, cell in enumerate(report.cells):
        if "png" in cell.examples:
            name = f"examples-{number}-{cell.cell}.png"
            (files / name).write_bytes(cell.examples["png"])
            cell.examples = {"png": base64.b64encode(cell.examples["png"]).decode(), "file": f"report_files/{name}",
                             "note": cell.examples["note"]}  # fmt: skip
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("redteam", "templates"),
        autoescape=jinja2.select_autoescape(["html.j2"]),  # the Markdown template escapes with its md filter
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    environment.filters.update(md=_markdown, percent=_percent, interval=_interval, slug=_slug)
    written = []
    for template, name in (("report.html.j2", "report.html"), ("report.md.j2", "report.md")):
        (out / name).write_text(environment.get_template(template).render(report=report), encoding="utf-8")
        written.append(out / name)
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2, default=str), encoding="utf-8")
    return [*written, out / "report.json"]


def _slug(text: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "-" for char in text)


def make_report(
    runs: list[Path],
    out: Path,
    progress: Tracker,
    budgets: tuple[float, ...] | None = None,
    examples: int = 2,
    device: str = "auto",
) -> list[Path]:
    """Collect ``runs``, draw curves and (``examples`` per cell, 0 for none) re-created examples, write the report."""
    if out.exists() and not out.is_dir():
        raise RedteamError(f"--out {out} is a file; give a folder.")
    if examples < 0:
        raise RedteamError(f"--examples must be 0 or more, got {examples}.")
    report = collect(runs, budgets)
    if examples:
        task = progress.add_task("re-creating examples", total=len(report.cells))
        for cell in report.cells:
            try:
                cell.examples = recreate_examples(cell, examples, device)
            except RedteamError as error:  # e.g. its data moved: the numbers are still worth reporting
                cell.examples = {"note": f"could not be re-created: {error}"}
            progress.advance(task)
    try:
        return write_report(report, curve_figures(runs), out)
    except OSError as error:
        raise RedteamError(f"cannot write the report into {out} ({error.strerror}): choose another --out.") from None
