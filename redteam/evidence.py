"""A run's evidence log: every adversarial example that fooled the face system, as a file an auditor can check.

``evidence.jsonl`` in the run folder holds one JSON object per fooled probe and budget: the cell and what it
attacked, the probe and its identity, the budget, the score the system gave and its threshold, the perturbation's
size, where the image lies (``evidence/<cell>/<probe>@<eps>.png``, relative to the run folder) and the sha256 of that
file. A PNG holds 8 bits per channel, so the verdict on the image as saved is recorded as well (``saved_fooled``,
``saved_score``): the file is what an auditor can submit to a deployed system, and it fools it or not by itself.
Written before a batch's results are stored, a line is never lost to an interruption; on a resumed run the batch
recomputes the same image and its line is not written twice.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

LOG = "evidence.jsonl"
FOLDER = "evidence"


def as_saved(images: Tensor) -> Tensor:
    """``images`` in [0, 1] as an 8-bit file holds them: each value rounded to the nearest grey level."""
    return images.mul(255).round().div(255)


def png_bytes(image: Tensor) -> bytes:
    """``image [3, H, W]`` in [0, 1] as 8-bit PNG bytes (rounded to the nearest grey level)."""
    array = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class EvidenceLog:
    """The evidence log of the run folder ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / LOG
        self.written: set[tuple[str, str, float]] = set()
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                entry = json.loads(line)
                self.written.add((entry["cell"], entry["probe"], entry["eps"]))

    def record(self, entries: list[dict[str, Any]], images: list[Tensor]) -> None:
        """Save each image and append its entry (which names ``cell``, ``probe`` and ``eps``), once per key."""
        lines = []
        for entry, image in zip(entries, images):
            key = (entry["cell"], entry["probe"], entry["eps"])
            if key in self.written:
                continue
            relative = Path(FOLDER) / entry["cell"] / f"{_safe(entry['probe'])}@{entry['eps']:g}.png"
            data = png_bytes(image)
            (self.folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (self.folder / relative).write_bytes(data)
            lines.append(
                json.dumps({**entry, "image": relative.as_posix(), "sha256": hashlib.sha256(data).hexdigest()})
            )
            self.written.add(key)
        if lines:
            with self.path.open("a") as log:
                log.write("\n".join(lines) + "\n")


def _safe(name: str) -> str:
    """A probe key as a file name (keys may hold path separators)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
