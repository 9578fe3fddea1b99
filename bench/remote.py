"""What the wire costs: queries per second through a deployed target against the same model called in-process.

    python bench/remote.py [--target facenet] [--queries 64] [--concurrency 1,4] [--forward torch|onnxruntime]

Starts `redteam serve --target T --expose decision` on 127.0.0.1 (a free port), points the shipped example spec at
it, and times the same comparisons (probe photo against reference photo, each a different image so no ledger or
cache answers them): the oracle in-process (a batch of the whole set, as query attacks send them), and the remote
target answering the same batch with each ``--concurrency`` (the spec's requests in flight at once). ``--forward``
says what embeds faces on both sides. Every way is warmed up with one call first. Prints queries per second and the
ratio to in-process, measured in this one run.
"""

from __future__ import annotations

import redteam  # noqa: F401  (first, as in the CLI: its OpenMP wait policy only holds if set before torch loads)

# isort: split
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from redteam.api import Oracle
from redteam.budgets import eight_bit
from redteam.engine import EvaluationConfig, load_target, prepare
from redteam.engine.execute import Executor

ROOT = Path(__file__).resolve().parents[1]
SHARED_FACES = ROOT.parent / "shared" / "data" / "faces"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="facenet")
    parser.add_argument("--data", default=str(SHARED_FACES))
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--forward", default="torch", choices=("torch", "onnxruntime"))
    args = parser.parse_args()
    cell = prepare(EvaluationConfig(target=args.target, attack="hsj", access="decision", data=args.data, limit=1,
                                    checks=False, forward=args.forward))  # fmt: skip
    executor = Executor(cell)
    images = cell.dataset.load([cell.probes[0].image])
    _, verdict = executor.objectives(cell.probes[:1])

    def distinct(seed: int) -> torch.Tensor:
        """The probe with a little seeded noise per image: every comparison is a new request (no cache answers)."""
        noise = torch.rand((args.queries, *images.shape[1:]), generator=torch.Generator().manual_seed(seed))
        return (images + 0.03 * (noise - 0.5)).clamp(0, 1)

    oracle = Oracle(verdict, images, "decisions", 10 * args.queries, "l2")
    oracle(images)  # warm-up: first calls pay one-off costs
    batch = distinct(0)
    started = time.perf_counter()
    oracle(batch, [0] * args.queries)
    in_process = args.queries / (time.perf_counter() - started)
    print(f"{args.target} on {args.forward} · {args.queries} comparisons")
    print("| how | queries/s | ratio to in-process |\n|---|---|---|")
    print(f"| in-process oracle, one batch | {in_process:.1f} | 1.00 |")

    port = _free_port()
    environment = {**os.environ, "REDTEAM_API_KEY": "bench-key"}
    command = [str(Path(sys.executable).parent / "redteam"), "serve", "--target", args.target, "--expose", "decision",
               "--port", str(port), "--api-key-env", "REDTEAM_API_KEY", "--forward", args.forward]  # fmt: skip
    service = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(port)
        os.environ["REDTEAM_API_KEY"] = "bench-key"
        with tempfile.TemporaryDirectory() as folder:
            example = (ROOT / "examples" / "remote" / "reference-decision.yaml").read_text()
            pointed = example.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
            reference = cell.dataset.load([cell.probes[0].reference])[0]
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                spec = Path(folder) / f"api-{concurrency}.yaml"  # a spec of its own: targets are loaded by name
                spec.write_text(f"{pointed}concurrency: {concurrency}\n")
                remote: Any = load_target(f"remote:{spec}", torch.device("cpu"))
                encoded = remote.encode(reference)
                remote.compare(encoded, encoded)  # warm-up: a connection, and the reference's embedding cached
                batch = distinct(concurrency)  # new images for each way, so none was answered before
                local = oracle(batch, [0] * args.queries).fooled
                references = reference.flatten().expand(args.queries, -1)
                started = time.perf_counter()
                answers = remote.similarity(eight_bit(batch, images).flatten(1), references)  # as the oracle sends
                rate = args.queries / (time.perf_counter() - started)
                agree = sum((a < 0.5) == bool(f) for a, f in zip(answers.tolist(), local.tolist()))
                print(f"| remote, concurrency {concurrency} | {rate:.1f} | {rate / in_process:.2f} |  "
                      f"(decisions agreeing with in-process: {agree}/{args.queries})")  # fmt: skip
    finally:
        service.terminate()
        service.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(port: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", headers={"X-API-Key": "bench-key"}).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the service did not come up in 180 s")


if __name__ == "__main__":
    main()
