"""Accuracy-perturbation curves as PNG (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

if TYPE_CHECKING:
    from torch import Tensor

#: x-axis of the per-probe perturbation measures; campaigns declare their own axes (``redteam.api.Axis``).
AXIS_LABELS = {"linf": "ε (ℓ∞, /255)", "l2": "ε (ℓ2, image units)"}


def plot_curves(curve: pd.DataFrame, path: Path, queries: pd.DataFrame | None = None) -> None:
    """One line per cell, with a band for its 95% interval where the curve has one (``low``, ``high``); each
    perturbation measure (ℓ∞, ℓ2, area, ...) gets its own panel (their axes differ), and
    query attacks' ``queries`` (:func:`redteam.results.query_curve`) one more: accuracy against queries per budget."""
    from redteam.api.campaigns import axis_labels

    labels = {**axis_labels(), **AXIS_LABELS}
    norms = sorted(curve["norm"].unique())
    panels = len(norms) + (queries is not None and not queries.empty)
    figure, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), squeeze=False)
    for axis, norm in zip(axes[0], norms):
        for _, line in curve[curve["norm"] == norm].groupby("cell", sort=False):
            drawn = axis.plot(line["eps"], line["accuracy"], marker="o", label=_label(line.iloc[0]))
            _band(axis, line["eps"], line, drawn[0].get_color())
        axis.set_xlabel(labels.get(norm, norm))
        axis.set_ylabel("accuracy of the face system")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        axis.set_title(f"accuracy-perturbation curve ({norm})")
    if panels > len(norms):
        assert queries is not None
        axis = axes[0][-1]
        for (_, eps), line in queries.groupby(["cell", "eps"], sort=False):
            first = line.iloc[0]
            label = f"{_label(first)} at {eps:g} ({first.norm})"
            drawn = axis.plot(line["queries"], line["accuracy"], marker=".", label=label)
            _band(axis, line["queries"], line, drawn[0].get_color())
        axis.set_xscale("log")
        axis.set_xlabel("queries per probe")
        axis.set_ylabel("accuracy of the face system")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        axis.set_title("accuracy against queries")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _band(axis, x: pd.Series, line: pd.DataFrame, colour: str) -> None:
    """The 95% interval of a line's accuracies (``low``, ``high``) as a shaded band, where the curve has them."""
    if {"low", "high"} <= set(line.columns):
        axis.fill_between(x, line["low"], line["high"], color=colour, alpha=0.15, linewidth=0)


def _label(cell: pd.Series) -> str:
    model = cell.target if cell.surrogate == cell.target else f"{cell.surrogate}→{cell.target}"
    return f"{model} / {cell.defense} / {cell.attack} / {cell.threat}"


def face_grid(rows: Sequence[tuple[str, Tensor, Sequence[str], Sequence[bool]]], title: str, path: Path) -> Path:
    """A figure of face images in labelled rows (e.g. clean / attacked), a short caption above each face, in red
    where ``marked`` (e.g. the face system now decides wrongly).

    Args:
        rows: ``(label, images [N, 3, H, W] in [0, 1], N captions, N marks)``, the same ``N`` in every row.
    """
    columns = len(rows[0][1])
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, 2.4 * len(rows)), squeeze=False)
    for axis_row, (label, images, captions, marked) in zip(axes, rows):
        for axis, image, caption, mark in zip(axis_row, images, captions, marked):
            axis.imshow(image.permute(1, 2, 0).cpu().numpy())
            axis.set_title(caption, color="red" if mark else "black", fontsize=10)
            axis.set_xticks([])
            axis.set_yticks([])
        axis_row[0].set_ylabel(label)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
