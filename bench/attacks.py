"""How fast is our PGD? Against torchattacks, ART, and the forward+backward passes it cannot avoid.

    python bench/attacks.py [--target facenet] [--batch 16] [--steps 10] [--eps 1] [--reps 5] [--device auto]
    python bench/attacks.py --device cuda --batch 64 --steps 20 --bf16 --curve-batch auto   # the CUDA checks

Everything runs in one process on the same target, inputs, threat objective and budget. Contenders are timed in
alternating order, ``--reps`` times, and the median is reported, with the images attacked per second (on CUDA the
clock waits for the device). On a CPU ``--device auto`` is the CPU. The "fwd+bwd limit" is ``steps`` forward and
backward passes of the objective on the whole batch: the work PGD needs when no sample stops early (our PGD runs
with early stopping off for that comparison, as torchattacks and ART have none). A second table times whole
accuracy-perturbation curves through the engine: six budgets against one, in batches of ``--curve-batch`` (``auto``:
as many as fit in accelerator memory).
"""

from __future__ import annotations

import redteam  # noqa: F401  (first, as in the CLI: its OpenMP wait policy only holds if set before torch loads)

# isort: split
import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from redteam.api import Budget
from redteam.attacks.external import ArtPGD, TorchattacksPGD
from redteam.attacks.pgd import PGD
from redteam.datasets import open_dataset
from redteam.engine import Evaluation, EvaluationConfig, load_target
from redteam.errors import RedteamError
from redteam.results import ResultStore
from redteam.runtime import autocast, parse_batch_size, prepare_torch, resolve_device
from redteam.threats import Dodging

SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"


def finished(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously: a clock read too early times the queueing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], object], device: torch.device) -> float:
    """Seconds ``work`` takes; a contender that times itself (to leave out its set-up) returns its own figure."""
    finished(device)
    started = time.perf_counter()
    result = work()
    finished(device)
    return result if isinstance(result, float) else time.perf_counter() - started


def alternate(contenders: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each contender over ``reps`` rounds, the order rotating every round."""
    names = list(contenders)
    for name in names:  # warm-up: first calls pay for allocation and lazy initialisation
        contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(reps):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed(contenders[name], device))
    return {name: statistics.median(times) for name, times in samples.items()}


def curve_batch(text: str) -> int | Literal["auto"]:
    """``--curve-batch`` as typed; a bad value is argparse's one-line usage error, not a traceback."""
    try:
        return parse_batch_size(text, "--curve-batch")
    except RedteamError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="facenet")
    parser.add_argument("--data", default=str(SHARED_FACES) if SHARED_FACES.exists() else "default")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eps", type=float, default=1.0, help="ℓ∞ budget in /255")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--curve-probes", type=int, default=32)
    parser.add_argument("--curve-batch", type=curve_batch, default=16, help="whole curves' batch size, or auto")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bf16", action="store_true", help="also time our PGD under bfloat16 autocast")
    parser.add_argument("--compile", action="store_true", help="also time our PGD on the torch.compile'd target")
    args = parser.parse_args()
    prepare_torch()  # the process settings every redteam entry point makes (flushing denormals among them)
    torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    target = load_target(args.target, device)
    dataset = open_dataset(args.data)
    threat = Dodging(dataset, seed=0)
    probes = threat.probes(args.batch)
    enrolment = threat.enrol(lambda idx: target.embed(dataset.load(idx).to(device)).detach(), probes)
    images = dataset.load([p.image for p in probes]).to(device)
    objective = threat.objective(target, enrolment, probes)
    budget = Budget("linf", args.eps / 255)

    def limit() -> None:
        x = images.clone()
        for _ in range(args.steps):
            x.requires_grad_(True)
            (gradient,) = torch.autograd.grad(objective(x).loss.sum(), x)
            x = x.detach() + 0 * gradient

    contenders = {
        "fwd+bwd limit": limit,
        "ours (no early stop)": lambda: PGD(steps=args.steps, early_stop=False)(objective, images, budget),
        "torchattacks": lambda: TorchattacksPGD(steps=args.steps)(objective, images, budget),
        "ART": lambda: ArtPGD(steps=args.steps)(objective, images, budget),
        "ours (early stop)": lambda: PGD(steps=args.steps)(objective, images, budget),
    }
    if args.bf16:

        def mixed() -> None:
            with autocast(device, "bf16"):
                PGD(steps=args.steps, early_stop=False)(objective, images, budget)

        contenders["ours, bf16 autocast"] = mixed
    if args.compile:
        compiled_target = load_target(args.target, device)
        compiled_target.embed = torch.compile(compiled_target.embed)  # the instance's embed shadows the class's
        compiled = threat.objective(compiled_target, enrolment, probes)
        started = time.perf_counter()
        PGD(steps=1, early_stop=False)(compiled, images, budget)
        print(f"torch.compile: {time.perf_counter() - started:.0f} s to compile (first forward and backward)")
        contenders["ours, torch.compile"] = lambda: PGD(steps=args.steps, early_stop=False)(compiled, images, budget)
    print(
        f"{args.target}, {len(probes)} dodging probes from {dataset.description}, PGD-{args.steps} at "
        f"ℓ∞ {args.eps:g}/255, on {device} ({torch.get_num_threads()} CPU threads), median of {args.reps} "
        "alternating rounds"
    )
    seconds = alternate(contenders, args.reps, device)
    base = seconds["fwd+bwd limit"]
    for name, value in seconds.items():
        print(f"  {name:22s} {value:7.2f} s   {value / base:5.2f}x the limit   {len(probes) / value:8.1f} images/s")
    ours = seconds["ours (no early stop)"]
    print(
        f"  ours is {seconds['torchattacks'] / ours:.2f}x as fast as torchattacks and "
        f"{seconds['ART'] / ours:.2f}x as fast as ART"
    )

    with tempfile.TemporaryDirectory() as scratch:
        counter = iter(range(10**6))

        def curve(budgets: tuple[float, ...], attack: str = "pgd", options: dict | None = None) -> Callable[[], None]:
            def work() -> float:
                config = EvaluationConfig(
                    target=args.target, attack=attack, data=args.data, eps=budgets, limit=args.curve_probes,
                    attack_options=options or {"steps": args.steps}, batch_size=args.curve_batch, checks=False,
                    device=str(device),
                )  # fmt: skip
                store = ResultStore(Path(scratch) / f"{next(counter)}.sqlite")  # fresh store: nothing resumed
                evaluation = Evaluation(config, store)  # loading the model and data is not timed
                return timed(evaluation.run, device)

            return work

        ladder = (0.5, 1, 2, 4, 8, 16)
        curves = {
            f"one budget ({args.eps:g}/255)": curve((args.eps,)),
            "six budgets, PGD ladder": curve(ladder),
            "six budgets, minnorm one pass": curve(ladder, "minnorm", {"steps": args.steps}),
        }
        print(
            f"\nwhole curves through the engine, {args.curve_probes} probes in batches of {args.curve_batch}, median "
            f"of {max(args.reps // 2, 1)} rounds"
        )
        seconds = alternate(curves, max(args.reps // 2, 1), device)
        base = seconds[f"one budget ({args.eps:g}/255)"]
        for name, value in seconds.items():
            print(f"  {name:32s} {value:7.2f} s   {value / base:5.2f}x one budget")


if __name__ == "__main__":
    main()
