"""Thresholds that ``redteam calibrate --weights FILE`` measured for a user's own weights, keyed by the file's sha256.

A zoo target's card carries the threshold calibrated for its published weights; a user's file has none until it is
calibrated. ``redteam calibrate --target arcface --weights FILE --data faces-train`` stores the operating point
here (in the redteam cache), and every later run with a file of the same content uses it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from redteam.assets import cache_dir, sha256_of


def calibration_path(target: str, weights: Path) -> Path:
    return cache_dir() / "calibrations" / f"{target}-{sha256_of(weights)}.json"


def save_calibration(target: str, weights: Path, calibration: dict[str, Any]) -> Path:
    """Store ``calibration`` (a verification report: ``threshold``, ``threshold_far``, ``accuracy``, ...) for this
    target and file content; returns where."""
    path = calibration_path(target, weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"target": target, "weights": str(weights), **calibration}, indent=2))
    return path


def stored_calibration(target: str, weights: Path) -> dict[str, Any] | None:
    """The calibration stored for this target and file content, if any."""
    path = calibration_path(target, weights)
    return json.loads(path.read_text()) if path.is_file() else None
