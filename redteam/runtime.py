"""Where and how tensors are computed: device, mixed precision, seeding, batching. Every layer uses these; they use
nothing of redteam but its errors."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

import torch
from torch import Tensor, nn

from redteam.errors import RedteamError, UnknownNameError

Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Probes per batch on a CPU, where memory is not what limits the batch.
CPU_BATCH_SIZE = 16

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when PyTorch sees one, else the CPU), ``cpu`` or ``cuda[:N]``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RedteamError(f"--device is auto, cpu or cuda[:N], not {name!r}.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RedteamError("--device cuda asked for, but PyTorch sees no CUDA device.")
    if device.type not in ("cpu", "cuda"):
        raise RedteamError(f"--device is auto, cpu or cuda[:N], not {name!r}.")
    return device


def check_precision(name: str) -> None:
    if name not in get_args(Precision):
        raise UnknownNameError("precision", name, get_args(Precision))


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """Mixed precision for an attack's forward and backward passes (``fp32``: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def seeded_generator(device: torch.device, *parts: object) -> torch.Generator:
    """A generator seeded from ``parts`` (the run seed and a place in the run), so a resumed run redraws the same."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()
    return torch.Generator(device).manual_seed(int(digest[:15], 16))


def chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """Consecutive slices of ``items`` of at most ``size``."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


@torch.no_grad()
def batched(function: Callable[[Tensor], Tensor], images: Tensor, device: torch.device, size: int = 32) -> Tensor:
    """``function`` over ``images [N, ...]`` in batches of ``size`` on ``device``, concatenated (no gradients)."""
    parts = []
    for batch in images.split(size):
        threads_for(len(batch))
        parts.append(function(batch.to(device)))
    return torch.cat(parts)


def channels_last(x: Tensor) -> Tensor:
    """Image batches ``[B, C, H, W]`` stored channels-last: oneDNN's convolutions run on that layout without
    converting every layer's input and output (0.6-0.85x the time of the same graph fed channels-first, forward and
    backward, on CPU: bench/targets.py); the values' meaning is unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and x.is_floating_point() else x


def frozen(module: M, device: torch.device) -> M:
    """``module`` on ``device`` in eval mode with parameters that take no gradient (attacks need inputs' only)."""
    module = module.eval().to(device)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def parse_batch_size(text: str, option: str = "--batch-size") -> int | Literal["auto"]:
    """A batch size as typed for ``option``: a number, or ``auto``."""
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise RedteamError(f"{option} wants a number or auto, got {text!r}.") from None


def fit_batch_size(
    forward: Callable[[Tensor], Tensor],
    images: Tensor,
    device: torch.device,
    memory_share: float = 0.6,
    most: int = 512,
) -> int:
    """The largest batch whose ``forward`` and backward pass fits in ``memory_share`` of the free accelerator memory,
    measured on two of ``images [N, 3, H, W]``; :data:`CPU_BATCH_SIZE` on a CPU."""
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    x = images[:2].to(device).requires_grad_(True)
    torch.autograd.grad(forward(x).float().square().sum(), x)
    per_image = (torch.cuda.max_memory_allocated(device) - before) / len(x)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(most, memory_share * free // per_image)))


def prepare_torch() -> None:
    """Process-wide settings every entry point needs: float32 by default, no denormals (they make CPU convolutions
    ~30x slower), and freed memory kept for the next pass."""
    if torch.get_default_dtype() != torch.float32:
        raise RedteamError("redteam evaluates in float32.")
    torch.set_flush_denormal(True)
    keep_freed_memory()


#: glibc's mallopt parameters (malloc.h) and the values redteam sets.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEPT_FREE = 1 << 30


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the next allocation instead of handing it back to the system.

    By default every activation over a few MiB is mapped fresh and unmapped when freed, so each pass pays page faults
    on all of it again (a third of facenet's forward at batch 16 on a 2-core CPU, measured with and without this
    setting; bench/targets.py shows it helps onnxruntime in the same process too). Every block now comes from the
    heap, and up to 1 GiB of freed heap stays mapped. Raising the mmap threshold is not enough: glibc caps it at 32
    MiB, and a fresh 65 MB gradient map (antispoof's first max-pool at batch 16) took 24 ms to fault in against 2 ms
    to zero once kept. Elsewhere (macOS, musl, Windows) nothing changes. Returns whether the C library took the
    settings."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEPT_FREE))


@dataclass
class _ThreadPolicy:
    chosen: int | None = None  # the user's --threads, for every pass
    batch: int = torch.get_num_threads()  # torch's own count (one per core), for a batch


_THREADS = _ThreadPolicy()


def choose_threads(count: int | None) -> None:
    """Run every pass on ``count`` threads (``None``: the policy of :func:`threads_for`)."""
    _THREADS.chosen = count
    torch.set_num_threads(count or _THREADS.batch)


def threads_for(batch: int) -> None:
    """Set torch's thread count for a pass over ``batch`` images, and leave it set for the backward pass that
    follows: one thread for a single image, torch's count otherwise, unless the user chose a count. At batch 1 a
    second thread saves little or no time and doubles the CPU time, and on a busy machine it waits for a core
    (bench/targets.py, bench/threads.py); query attacks and the last probes of a batch run one image at a time."""
    wanted = _THREADS.chosen or (1 if batch == 1 else _THREADS.batch)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside the block, whatever the policy: some CPU kernels (bilinear resizing among them)
    round differently with the work split over more threads, and what runs here must not depend on that."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
