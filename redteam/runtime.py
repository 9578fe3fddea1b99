"""Where and how tensors are computed: device, mixed precision, seeding, batching. Every layer uses these; they use
nothing of redteam but its errors."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
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
    return torch.cat([function(batch.to(device)) for batch in images.split(size)])


def frozen(module: M, device: torch.device) -> M:
    """``module`` on ``device`` in eval mode with parameters that take no gradient (attacks need inputs' only)."""
    module = module.eval().to(device)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


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
    """Process-wide settings every entry point needs: float32 by default, and no denormals (they make CPU
    convolutions ~30x slower)."""
    if torch.get_default_dtype() != torch.float32:
        raise RedteamError("redteam evaluates in float32.")
    torch.set_flush_denormal(True)
