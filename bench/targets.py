"""Every zoo target's network against its native runtime and against onnxruntime on our own export of it.

    python bench/targets.py [--targets facenet,arcface,...] [--batches 1,16] [--rounds 5] [--machine idle,loaded]

Per target and batch size, in one process and on the same real faces, each contender computes the target's network
on the exact tensor the target feeds it (captured from a call of the target on the faces):

- ``ours fwd``: our converted module, without autograd; ``ours fwd+bwd``: forward and the gradient to the input;
- ``native``: the runtime the weights were published for (cv2.dnn, LiteRT, onnxruntime, dlib), fed what it reads;
  a runtime whose file bakes in batch 1 gets the images one by one;
- ``ort(export)``: onnxruntime on our module exported to ONNX, the yardstick for a forward pass on this CPU.

Contenders take turns, in a rotating order, for ``--rounds`` rounds after one warm-up; each cell is the median CPU time
(all threads of this process) and wall time of one call. "loaded" reruns everything while a second process spins on
one core (what a CI runner or a laptop running other work looks like). Threads: every runtime's own default; redteam's
is torch's thread count with passive waiting (redteam/__init__.py).

The TF.js models (mobileface, faceapi-resnet, blazeface, liveness, antispoof) are timed in tfjs on node's
WebAssembly backend, by the parity tests' runner in a process of its own (after the in-process contenders, so not
interleaved with them); without node and the npm packages `make install` puts in .venv/node, they have no native
column.
"""

from __future__ import annotations

import redteam  # noqa: F401  (first, as in the CLI: its OpenMP wait policy only holds if set before torch loads)

# isort: split
import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from redteam.convert.onnx_forward import export_onnx, onnx_session
from redteam.datasets import open_dataset
from redteam.engine import load_target
from redteam.runtime import prepare_torch, threads_for

sys.path.insert(0, str(Path(__file__).parent))
from threads import SHARED_FACES, load  # noqa: E402  (a sibling script: the same load as its measurements)

SHARED_WEIGHTS = SHARED_FACES.parents[1] / "weights"
DEFAULT_TARGETS = "facenet,arcface,mobileface,dlib-resnet,faceapi-resnet,retinaface,scrfd,blazeface,liveness,antispoof"
#: Targets whose weights are not shipped by a registry package: the file each is measured with.
WEIGHTS = {"scrfd": SHARED_WEIGHTS / "scrfd_500m.onnx"}

Call = Callable[[], object]
#: Seconds between calls: runtimes whose idle threads spin for a while (onnxruntime's, OpenCV's) go quiet before the
#: next contender's clock starts, so one's waiting does not land on another's time.
PAUSE = 0.1


def network_input(model: nn.Module, images: Tensor) -> Tensor:
    """The tensor ``model`` feeds its network ``model.net`` when called on ``images``."""
    seen: list[Tensor] = []
    hook = model.net.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(images)
    finally:
        hook.remove()
    return seen[0]


def outputs_sum(outputs: Tensor | tuple[Tensor, ...]) -> Tensor:
    parts = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum(p.float().square().sum() for p in parts)  # type: ignore[return-value]


def ours(net: nn.Module, x: Tensor, images_per_pass: int) -> dict[str, Call]:
    """Our network as the target runs it: ``images_per_pass`` images at a time, on the threads redteam's policy
    gives that many images (what an attack's objective sets)."""
    threads = lambda: threads_for(min(len(x), images_per_pass))  # noqa: E731

    def forward() -> object:
        threads()
        with torch.no_grad():
            return [net(part) for part in x.split(images_per_pass)]

    def forward_backward() -> object:
        threads()
        leaf = x.clone().requires_grad_(True)
        return torch.autograd.grad(sum(outputs_sum(net(part)) for part in leaf.split(images_per_pass)), leaf)

    return {"ours fwd": forward, "ours fwd+bwd": forward_backward}


def ort_call(session, x: np.ndarray) -> Call:
    """A session's forward on ``x``; a file with batch 1 baked in gets the images one by one."""
    name, batch = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
    if isinstance(batch, int) and batch != len(x):
        return lambda: [session.run(None, {name: x[i : i + 1]}) for i in range(len(x))]
    return lambda: session.run(None, {name: x})


def exported(net: nn.Module, x: Tensor) -> Call:
    """onnxruntime on our module's export (what ``redteam run --forward onnxruntime`` runs)."""
    return ort_call(onnx_session(export_onnx(net, x)), x.contiguous().numpy())


def native(name: str, x: np.ndarray) -> tuple[str, Call] | None:
    """The published runtime's forward on the network input ``x [B, 3, H, W]`` (what each runtime reads)."""
    if name == "facenet":
        import cv2

        from redteam.targets.facenet import GRAPH

        net = cv2.dnn.readNetFromTensorflow(str(GRAPH.path()))

        def facenet() -> object:  # the graph bakes in batch 1
            for image in x:
                net.setInput(image[None])
                net.forward()
            return None

        return "cv2.dnn", facenet
    if name == "arcface":
        from redteam.targets.arcface import MOBILEFACENET_TFLITE
        from redteam.targets.model_file import LiteRtRuntime

        runtime = LiteRtRuntime(MOBILEFACENET_TFLITE.path())
        return "LiteRT", lambda: runtime(x)
    if name == "retinaface":
        from redteam.targets.retinaface import WEIGHTS_PY, onnx_bytes

        return "onnxruntime", ort_call(onnx_session(onnx_bytes(WEIGHTS_PY.path())), x)
    if name == "scrfd":
        return "onnxruntime", ort_call(onnx_session(str(WEIGHTS["scrfd"])), x)
    if name == "dlib-resnet":
        import dlib

        from redteam.targets.dlib_resnet import DESCRIPTOR

        recogniser = dlib.face_recognition_model_v1(str(DESCRIPTOR.path()))
        chips = [np.ascontiguousarray(c.transpose(1, 2, 0).round().clip(0, 255).astype(np.uint8)) for c in x]
        return "dlib", lambda: recogniser.compute_face_descriptor(chips)
    return None


def tfjs(name: str, model: nn.Module, x: Tensor, rounds: int) -> tuple[str, tuple[float, float]] | None:
    """Median (CPU s, wall s) of tfjs in node (WebAssembly backend) running a TF.js model on ``x``'s images, timed
    in its own process by the parity tests' runner (tests/helpers/tfjs_reference.cjs); ``None`` for other models
    or where node and the npm packages are missing."""
    if name not in TFJS_TARGETS:
        return None
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    import pytest
    from helpers.tfjs_node import model_folder, run_reference

    nhwc = x.permute(0, 2, 3, 1).numpy()
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        timings = {"timings": str(folder / "t.json"), "repeat": rounds, "backend": "wasm"}
        if name == "faceapi-resnet":
            from redteam.targets.faceapi import RECOGNITION_MODEL

            manifest = model_folder(RECOGNITION_MODEL, folder / "model")
            job = {"kind": "faceapi", "net": "FaceRecognitionNet", "manifest": str(manifest), **timings}
            job |= {"input": str(folder / "x.npy"), "output": str(folder / "y.npy")}
            arrays = {"x": nhwc * 255}  # face-api takes 0-255 pixels
        else:
            graph = model_folder(TFJS_TARGETS[name](model), folder / "model")
            inputs = {model.net.input_names[0]: str(folder / "x.npy")}
            outputs = {out: str(folder / f"{k}.npy") for k, out in enumerate(model.net.output_names)}
            job = {"kind": "graph", "model": str(graph), "inputs": inputs, "outputs": outputs, **timings}
            job["per_sample"] = name == "blazeface"  # its graph bakes in batch 1
            arrays = {"x": nhwc}
        try:
            run_reference(job, folder, arrays)
        except pytest.skip.Exception as missing:
            print(f"  no tfjs column for {name}: {missing}", file=sys.stderr)
            return None
        measured = json.loads((folder / "t.json").read_text())
    return "tfjs (wasm)", (statistics.median(measured["cpu"]) / 1e3, statistics.median(measured["wall"]) / 1e3)


def _tfjs_targets() -> dict[str, Callable[[nn.Module], object]]:
    from redteam.targets.arcface import MOBILEFACE
    from redteam.targets.blazeface import BLAZEFACE_BACK

    return {
        "mobileface": lambda _: MOBILEFACE,
        "blazeface": lambda _: BLAZEFACE_BACK,
        "liveness": lambda model: model.model,
        "antispoof": lambda model: model.model,
        "faceapi-resnet": lambda _: None,  # face-api's own network class, not a graph model
    }


TFJS_TARGETS = _tfjs_targets()


def timed(call: Call) -> tuple[float, float]:
    time.sleep(PAUSE)
    cpu, wall = time.process_time(), time.perf_counter()
    call()
    return time.process_time() - cpu, time.perf_counter() - wall


def measure(contenders: dict[str, Call], rounds: int) -> dict[str, tuple[float, float]]:
    """Median (CPU s, wall s) of one call per contender; contenders take turns, the order rotating every round."""
    names = list(contenders)
    for name in names:
        contenders[name]()  # warm-up: allocation, lazy initialisation
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            samples[name].append(timed(contenders[name]))
    return {n: (statistics.median(c for c, _ in s), statistics.median(w for _, w in s)) for n, s in samples.items()}


def bench(name: str, batch: int, rounds: int, data: str) -> dict:
    model = load_target(name, torch.device("cpu"), weights=WEIGHTS.get(name))
    images = open_dataset(data).load(list(range(batch)))
    x = network_input(model, images)
    contenders = ours(model.net, x, getattr(model, "images_per_pass", len(x)))
    # dlib reads 8-bit chips: its network input is the chip on a 0-1 scale
    found = native(name, (x * 255 if name == "dlib-resnet" else x).contiguous().numpy())
    if found is not None:
        contenders[found[0]] = found[1]
    contenders["ort(export)"] = exported(model.net, x)
    times = measure(contenders, rounds)
    if found is None and (in_node := tfjs(name, model, x, rounds)) is not None:
        found, times[in_node[0]] = in_node, in_node[1]
    return {"target": name, "batch": batch, "native": found[0] if found else None, "times": times}


def table(results: list[dict], machine: str) -> str:
    head = (
        f"| target | batch | ours fwd (CPU / wall ms) | fwd+bwd / fwd | native | native (CPU / wall ms) "
        f"| ours / native (CPU) | ort(export) (CPU / wall ms) | ours / ort(export) (CPU) |\n"
        f"|---|---:|---:|---:|---|---:|---:|---:|---:|  <!-- {machine} -->"
    )
    rows = [head]

    def ms(pair: tuple[float, float] | None) -> str:
        return "-" if pair is None else f"{pair[0] * 1e3:.1f} / {pair[1] * 1e3:.1f}"

    def ratio(a: tuple[float, float] | None, b: tuple[float, float] | None) -> str:
        return "-" if a is None or b is None or b[0] <= 0 else f"{a[0] / b[0]:.2f}"

    for r in results:
        t = r["times"]
        mine, backward = t["ours fwd"], t["ours fwd+bwd"]
        theirs, export = t.get(r["native"]) if r["native"] else None, t.get("ort(export)")
        rows.append(
            f"| {r['target']} | {r['batch']} | {ms(mine)} | {ratio(backward, mine)} | {r['native'] or '-'} "
            f"| {ms(theirs)} | {ratio(mine, theirs)} | {ms(export)} | {ratio(mine, export)} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=DEFAULT_TARGETS)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--machine", default="idle,loaded", help="idle, loaded or both")
    parser.add_argument("--data", default=str(SHARED_FACES) if SHARED_FACES.exists() else "default")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    prepare_torch()
    batch_threads = torch.get_num_threads()
    names = [n for n in args.targets.split(",") if n not in WEIGHTS or WEIGHTS[n].exists()]
    everything = {}
    for machine in args.machine.split(","):
        results = []
        with load(busy=machine == "loaded"):
            for name in names:
                for batch in (int(b) for b in args.batches.split(",")):
                    results.append(bench(name, batch, args.rounds, args.data))
                    print(f"  {machine} {name} b{batch}: " + json.dumps(results[-1]["times"]), file=sys.stderr)
        everything[machine] = results
        print(f"\n{machine} machine, torch {torch.__version__}, {batch_threads} threads for a batch, 1 for one image\n")
        print(table(results, machine))
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
