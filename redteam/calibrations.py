"""Thresholds that ``redteam calibrate --weights FILE`` measured for a user's own weights, keyed by the file's sha256.

A zoo target's card carries the threshold calibrated for its published weights; a user's file has none until it is
calibrated. ``redteam calibrate --target arcface --weights FILE --data faces-train`` (or ``--target
file:model.onnx``) stores the operating point here (in the redteam cache), and every later run with a file of the
same content uses it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redteam.assets import cache_dir, sha256_of

if TYPE_CHECKING:
    from redteam.api import Target


def calibration_path(target: str, fingerprint: str) -> Path:
    """Where a calibration of ``target`` for the file content ``fingerprint`` (a sha256) is kept (a ``file:``
    target under its scheme: the path it was named by does not matter, its content does)."""
    return cache_dir() / "calibrations" / f"{target.partition(':')[0]}-{fingerprint}.json"


def file_fingerprint(target_class: type[Target], weights: Path | None) -> str | None:
    """The content digest a calibration is kept under: of ``--weights``, or of the target's own user file (a
    ``file:`` target's :meth:`weights_fingerprint`); ``None`` for a zoo target with its published weights."""
    if weights is not None:
        return sha256_of(weights)
    return target_class.weights_fingerprint() if target_class.user_file is not None else None


def save_calibration(target: str, fingerprint: str, calibration: dict[str, Any]) -> Path:
    """Store ``calibration`` (a verification report: ``threshold``, ``threshold_far``, ``accuracy``, ...) for this
    target and file content; returns where."""
    path = calibration_path(target, fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"target": target, **calibration}, indent=2))
    return path


def stored_calibration(target: str, fingerprint: str) -> dict[str, Any] | None:
    """The calibration stored for this target and file content, if any."""
    path = calibration_path(target, fingerprint)
    return json.loads(path.read_text()) if path.is_file() else None
