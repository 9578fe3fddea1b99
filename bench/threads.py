"""How much do OpenMP's wait policy and the thread count cost on a busy machine? Torch's default (active waiting, a
thread per core) against redteam's (passive waiting, one thread for a single image: ``runtime.threads_for``), fixed
counts, and a short spin before sleeping (libgomp's ``GOMP_SPINCOUNT``, a candidate middle ground).

    python bench/threads.py [--targets facenet:16,arcface:1] [--rounds 3] [--passes 5]

Each measurement is a fresh process (the policy only takes effect before torch is imported) that loads the target
and times ``--passes`` forward+backward passes on real faces at the given batch size, reporting the median wall time
of one pass. Each configuration runs on an idle machine and on one loaded by a second process spinning on one core
(what a CI runner, a laptop or a second redteam process looks like); the settings' order rotates every round. The
last columns are torch's default over redteam's (above 1, the default wastes time) and redteam's over the best
setting measured (the goal: at most 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
#: Set in a measured process's environment: apply redteam's thread policy for the batch.
POLICY = "BENCH_THREAD_POLICY"
#: What each measured process is started with: torch's default (active waiting, one thread per core), redteam's
#: (passive waiting, and the thread count its policy gives the batch: runtime.threads_for), fixed counts, and
#: redteam's with about 0.1 ms of spinning before a waiting thread sleeps.
SETTINGS = {
    "active (torch's default)": {"OMP_WAIT_POLICY": "ACTIVE"},
    "redteam's": {"OMP_WAIT_POLICY": "PASSIVE", POLICY: "1"},
    "passive, 1 thread": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
    "passive, 2 threads": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"},
    "spin 10k, then sleep": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000", POLICY: "1"},
}


def child(target: str, batch: int, passes: int, data: str) -> None:
    """One measurement, in this process: median seconds of a forward+backward pass."""
    import torch

    from redteam.datasets import open_dataset
    from redteam.engine import load_target
    from redteam.runtime import prepare_torch, threads_for

    prepare_torch()
    if os.environ.get(POLICY):
        threads_for(batch)
    model = load_target(target, torch.device("cpu"))
    images = open_dataset(data).load(list(range(batch)))
    times = []
    for _ in range(passes + 1):  # the first pass pays for allocation: left out
        x = images.clone().requires_grad_(True)
        started = time.perf_counter()
        torch.autograd.grad(model.embed(x).square().sum(), x)
        times.append(time.perf_counter() - started)
    print(json.dumps({"seconds": statistics.median(times[1:]), "threads": torch.get_num_threads()}))


def measure(setting: dict[str, str], target: str, batch: int, passes: int, data: str) -> float:
    environment = {**os.environ, **setting}
    command = [sys.executable, __file__, "--child", f"{target}:{batch}", "--passes", str(passes), "--data", data]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


@contextmanager
def load(busy: bool):
    """A second process spinning on one core while the block runs (nothing when ``busy`` is false)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        yield
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="facenet:16,arcface:1", help="target:batch, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--data", default=str(SHARED_FACES) if SHARED_FACES.exists() else "default")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        target, batch = args.child.split(":")
        child(target, int(batch), args.passes, args.data)
        return
    names = list(SETTINGS)
    print(f"{os.cpu_count()} CPUs; forward+backward, median ms per pass ({args.passes} passes, {args.rounds} rounds)")
    print(f"| target | batch | machine | {' | '.join(names)} | default / redteam's | redteam's / best |")
    print("|---|---:|---|" + "---:|" * (len(names) + 2))
    for spec in args.targets.split(","):
        target, batch = spec.split(":")
        for busy in (False, True):
            seconds: dict[str, list[float]] = {name: [] for name in names}
            with load(busy):
                for round_number in range(args.rounds):
                    shift = round_number % len(names)  # the order rotates every round
                    for name in names[shift:] + names[:shift]:
                        seconds[name].append(measure(SETTINGS[name], target, int(batch), args.passes, args.data))
            ms = {name: statistics.median(times) * 1000 for name, times in seconds.items()}
            machine = "loaded (1 busy core)" if busy else "idle"
            shown = " | ".join(f"{ms[name]:.0f}" for name in names)
            best = min(ms.values())
            print(f"| {target} | {batch} | {machine} | {shown} | {ms[names[0]] / ms[names[1]]:.2f} "
                  f"| {ms[names[1]] / best:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
