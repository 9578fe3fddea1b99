"""Run TF.js models in node (pure-JS TensorFlow.js, CPU backend) as the reference for parity tests.

``make install`` puts the pinned npm packages under ``.venv/node``; tests skip, saying why, where node or they are
missing. Tensors travel as ``.npy`` files through ``tests/helpers/tfjs_reference.cjs``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from redteam.convert.tfjs import TFJSModel

ROOT = Path(__file__).resolve().parents[2]  # the repository
NODE_MODULES = ROOT / ".venv" / "node" / "node_modules"
SCRIPT = Path(__file__).with_name("tfjs_reference.cjs")
PACKAGES = ("@tensorflow/tfjs", "@tensorflow/tfjs-backend-wasm", "@vladmandic/face-api")


def require_node() -> str:
    """The node executable, or skip the test."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the TF.js reference runtime needs it")
    missing = [p for p in PACKAGES if not (NODE_MODULES / p / "package.json").is_file()]
    if missing:
        pytest.skip(f"npm packages {', '.join(missing)} are not in {NODE_MODULES} (run `make install`)")
    return node


def model_folder(model: TFJSModel, folder: Path) -> Path:
    """Link a model's JSON and shards into one folder under the names the JSON uses; returns the JSON's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in model.files:
        link = folder / Path(file.member).name
        if not link.exists():
            link.symlink_to(file.path())
    return folder / Path(model.json_file.member).name


def run_reference(job: dict[str, Any], folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as ``folder/<name>.npy``, run the node job (paths in it may name those files), wait."""
    node = require_node()
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(array, dtype="<f4"))
    (folder / "job.json").write_text(json.dumps(job))
    done = subprocess.run(
        [node, str(SCRIPT), str(folder / "job.json")],
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
