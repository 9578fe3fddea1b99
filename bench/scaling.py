"""How does a sweep scale? Probes per second for PGD-10 on FaceNet against Ray workers, gallery size and probes.

    python bench/scaling.py [--probes 32] [--workers 1,2] [--galleries 10,100,600] [--probe-counts 8,16,32]

Every figure is a whole evaluation through the engine (one cell, fresh store, no checks), timed end to end: model
loading, enrolment, the clean pass and the attack; Ray runs start their workers inside the timing but not the local
cluster (reported once). "fixed" is the same evaluation with the clean budget only (no attack), so "attack probes/s"
(probes over the time above it) is the steady rate. PGD runs all its steps (no early stop: at 8/255 most probes fall
in a step or two, which would measure the early stop instead of the work), dodging, ℓ∞ 8/255.

1. Workers: the plain one-process run (torch's default threads, and one thread), then Ray with 1, 2, ... workers of
   one CPU and one thread each.
2. Gallery: identification against galleries of N identities (one enrolment photo each): enrolment is N forward
   passes once; each probe's attack compares with the whole gallery, a [B, N] matrix per step.
3. Probes: dodging with more and more probes, one process.
"""

from __future__ import annotations

import redteam  # noqa: F401  (first, as in the CLI: its OpenMP wait policy only holds if set before torch loads)

# isort: split
import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from rich.progress import Progress

from redteam.distributed import Cluster, ray_cluster, run_on_ray
from redteam.engine import Evaluation, EvaluationConfig
from redteam.results import ResultStore

SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"


def numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


class Bench:
    """Times whole evaluations, each the best of ``reps`` (the least disturbed by other work on the machine)."""

    def __init__(self, data: str, steps: int, batch: int, reps: int, scratch: Path):
        self.data, self.steps, self.batch, self.reps, self.scratch = data, steps, batch, reps, scratch
        self.stores = 0

    def config(self, probes: int, attack: bool = True, **changes) -> EvaluationConfig:
        config = EvaluationConfig(
            "facenet", "pgd", data=self.data, eps=(8,) if attack else (0,), limit=probes, batch_size=self.batch,
            attack_options={"steps": self.steps, "early_stop": False}, checks=False,
        )  # fmt: skip
        return replace(config, **changes)

    def store(self) -> ResultStore:
        self.stores += 1
        return ResultStore(self.scratch / f"{self.stores}.sqlite")  # fresh: nothing resumed

    def best(self, run: Callable[[], object]) -> float:
        times = []
        for _ in range(self.reps):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return min(times)

    def here(self, config: EvaluationConfig) -> float:
        return self.best(lambda: Evaluation(config, self.store()).run())

    def on_ray(self, cluster: Cluster, config: EvaluationConfig) -> float:
        return self.best(lambda: run_on_ray(cluster, [config], self.store(), Progress(disable=True)))

    def enrolment(self, config: EvaluationConfig) -> float:
        """Loading the models and enrolling (an evaluation's fixed cost, before any batch)."""
        return self.best(lambda: Evaluation(config, self.store()))

    def row(self, count: int, fixed: float, seconds: float, **keys: object) -> dict:
        attack = seconds - fixed
        rates = {"probes/s": count / seconds, "attack probes/s": count / attack if attack > 0 else float("nan")}
        return {**keys, "fixed s": fixed, "seconds": seconds, **rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_FACES) if SHARED_FACES.exists() else "default")
    parser.add_argument("--probes", type=int, default=32, help="probes of the worker and gallery tables")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=1, help="best of this many runs per figure")
    parser.add_argument("--workers", type=numbers, default=[1, 2])
    parser.add_argument("--galleries", type=numbers, default=[10, 100, 600], help="identities per gallery")
    parser.add_argument("--probe-counts", type=numbers, default=[8, 16, 32])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="of one-process runs")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    threads = args.threads
    torch.set_num_threads(threads)
    pd.set_option("display.float_format", "{:.2f}".format)

    with tempfile.TemporaryDirectory() as scratch:
        bench = Bench(args.data, args.steps, args.batch, args.reps, Path(scratch))
        print(f"FaceNet, PGD-{args.steps} (all steps), ℓ∞ 8/255, batches of {args.batch}, best of {args.reps}, "
              f"{args.data}")  # fmt: skip
        bench.here(bench.config(args.batch, attack=False))  # warm-up: first-call costs (imports, allocator, caches)

        rows = []
        attacked, clean = bench.config(args.probes), bench.config(args.probes, attack=False)
        for thread_count in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(thread_count)
            keys = {"run": "one process", "workers": 1, "threads each": thread_count}
            rows.append(bench.row(args.probes, bench.here(clean), bench.here(attacked), **keys))
        torch.set_num_threads(threads)
        started = time.perf_counter()
        with ray_cluster("local", max(args.workers)) as cluster:
            ray_start = time.perf_counter() - started
            for count in args.workers:
                workers = replace(cluster, workers=count)
                keys = {"run": "Ray", "workers": count, "threads each": 1}
                fixed, seconds = bench.on_ray(workers, clean), bench.on_ray(workers, attacked)
                rows.append(bench.row(args.probes, fixed, seconds, **keys))
        print(f"\n1. dodging, {args.probes} probes, against workers (the local Ray cluster of {max(args.workers)} CPUs "
              f"took {ray_start:.1f} s to start, not counted)")  # fmt: skip
        print(pd.DataFrame(rows).to_string(index=False))

        rows = []
        identities = sorted(p for p in Path(args.data).iterdir() if p.is_dir()) if Path(args.data).is_dir() else []
        for size in args.galleries:
            if size > len(identities):
                print(f"(no gallery of {size}: {args.data} has {len(identities)} identities)")
                continue
            gallery = Path(scratch) / f"gallery-{size}"
            gallery.mkdir()
            for identity in identities[:size]:  # every evaluation identity has two or more photos
                (gallery / identity.name).symlink_to(identity, target_is_directory=True)
            attacked = bench.config(args.probes, threat="identification", data=str(gallery))
            fixed, seconds = bench.here(replace(attacked, eps=(0,))), bench.here(attacked)
            rows.append(bench.row(args.probes, fixed, seconds, gallery=size, **{"enrol s": bench.enrolment(attacked)}))
        if rows:
            print(f"\n2. identification, {args.probes} probes, one process ({threads} threads), against gallery size")
            print(pd.DataFrame(rows).to_string(index=False))

        rows = []
        for count in args.probe_counts:
            fixed, seconds = bench.here(bench.config(count, attack=False)), bench.here(bench.config(count))
            rows.append(bench.row(count, fixed, seconds, probes=count))
        if rows:
            print(f"\n3. dodging, one process ({threads} threads), against probes")
            print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
