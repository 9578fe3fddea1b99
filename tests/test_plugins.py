"""Plugins from outside: a user's package adds a target, an attack and a defense through entry points, exactly as the
README's "Extending" says, and `redteam run` uses them on real faces. Capability mismatches fail before any work.

The toy package is written to a temporary folder with its distribution metadata (``*.dist-info/entry_points.txt``)
and put on ``PYTHONPATH``: what ``pip install`` of a real package leaves behind, without touching this environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from redteam.registry import Registry

# The README's "Extending" examples, one file each: what a newcomer writes.
TARGET = '''
"""A recogniser that compares faces by their 16 x 16 grey thumbnails (a stand-in for a user's own model); its
threshold was chosen on faces-train pairs."""

from dataclasses import replace

import torch
from torch import Tensor, nn

from redteam.api import TARGETS, CentralCrop, FaceRecognizer, ModelCard, Preprocessing


@TARGETS.register("thumbnail", "faces compared by their 16 x 16 grey thumbnails")
class Thumbnail(FaceRecognizer):
    card = ModelCard(
        name="thumbnail",
        task="recognition",
        architecture="16 x 16 grey thumbnail of the central half of the face",
        weights="none",
        licence="MIT",
        preprocessing=Preprocessing(size=(16, 16), crop=CentralCrop(0.5), mean=(127.5,) * 3, scale=128.0),
        threshold=0.3,
    )

    def __init__(self) -> None:
        super().__init__()
        self.placement = nn.Parameter(torch.zeros(0))  # a target lives on a device: one (empty) parameter

    def embed(self, images: Tensor) -> Tensor:
        thumbnails = self.preprocess(images).mean(1).flatten(1)
        return thumbnails - thumbnails.mean(1, keepdim=True)


@TARGETS.register("thumbnail-api", "the thumbnail recogniser behind an API that only says match or no match")
class ThumbnailAPI(Thumbnail):
    card = replace(Thumbnail.card, name="thumbnail-api")
    offers = "decisions"
'''

ATTACK = '''
"""Fast gradient sign (one step) and a random search that needs only decisions."""

from dataclasses import dataclass

import torch

from redteam.api import ATTACKS, Attack, AttackResult, objective_gradient


@ATTACKS.register("fgsm", "one signed gradient step to the budget's edge")
@dataclass
class FGSM(Attack):
    name = "fgsm"
    norms = ("linf",)

    def __call__(self, objective, images, budget, generator=None):
        _, gradient = objective_gradient(objective, images)
        adversarial = budget.confine(images)(images + budget.ascent(gradient, budget.eps))
        return AttackResult(adversarial, torch.ones(len(images), dtype=torch.long), objective)


@ATTACKS.register("random-search", "random points of the budget's boundary, kept once the decision flips")
@dataclass
class RandomSearch(Attack):
    name = "random-search"
    norms = ("linf",)
    needs = "decisions"
    tries: int = 10

    def __call__(self, objective, images, budget, generator=None):
        best = images.clone()
        with torch.no_grad():
            for _ in range(self.tries):
                candidate = budget.confine(images)(images + budget.sample(images, generator).sign() * budget.eps)
                fooled = objective(candidate).success
                best[fooled] = candidate[fooled]
        return AttackResult(best, torch.full((len(images),), self.tries), objective)
'''

DEFENSE = '''
"""A box blur in front of the target: differentiable, so adaptive attacks go straight through it."""

import torch.nn.functional as F

from redteam.api import DEFENSES, InputTransform


@DEFENSES.register("box-blur", "3 x 3 box blur")
class BoxBlur(InputTransform):
    name = "box-blur"
    differentiable = True

    def forward(self, images, generator=None):
        return F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
'''

ENTRY_POINTS = """
[redteam.targets]
thumbnail = toy_plugins.target

[redteam.attacks]
fgsm = toy_plugins.attack

[redteam.defenses]
box-blur = toy_plugins.defense:BoxBlur
"""


@pytest.fixture(scope="module")
def toy_package(tmp_path_factory) -> Path:
    """The toy plugin package and its entry points, installed into a folder for PYTHONPATH."""
    root = tmp_path_factory.mktemp("site")
    package = root / "toy_plugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in (("target", TARGET), ("attack", ATTACK), ("defense", DEFENSE)):
        (package / f"{name}.py").write_text(textwrap.dedent(source))
    metadata = root / "toy_plugins-0.1.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugins\nVersion: 0.1\n")
    (metadata / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


def redteam(site: Path, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "redteam"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_plugins_are_listed(toy_package):
    done = redteam(toy_package, "list")
    assert done.returncode == 0, done.stderr
    for name in ("thumbnail", "thumbnail-api", "fgsm", "random-search", "box-blur"):
        assert name in done.stdout


def test_plugin_target_attack_and_defense_run_on_real_faces(toy_package, small_faces, tmp_path):
    out = tmp_path / "run"
    done = redteam(
        toy_package, "run", "--target", "thumbnail", "--attack", "fgsm", "--defense", "box-blur", "--data",
        small_faces.root, "--limit", 12, "--eps", "0,16", "--out", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    curve = pd.read_csv(out / "curve.csv")
    assert set(curve["defense"]) == {"box-blur (adaptive)", "box-blur (non-adaptive)"}
    adaptive = curve[curve["defense"] == "box-blur (adaptive)"].set_index("eps")["accuracy"]
    assert adaptive[0] > 0.5 and adaptive[16] < adaptive[0]  # the thumbnails match, and one step breaks some
    summary = json.loads((out / "run.json").read_text())["evaluations"][0]
    assert summary["threshold"] == 0.3 and summary["config"]["target"] == "thumbnail"


def test_decision_only_target_refuses_gradient_attacks_before_any_work(toy_package, small_faces, tmp_path):
    out = tmp_path / "refused"
    done = redteam(toy_package, "run", "--target", "thumbnail-api", "--attack", "pgd", "--data", small_faces.root,
                   "--out", out)  # fmt: skip
    assert done.returncode == 2
    assert "pgd needs gradients; thumbnail-api answers decisions only (attacks that work with it: random-search)" in (
        done.stderr.replace("\n", " ")
    )
    assert "Traceback" not in done.stderr and not out.exists()
    done = redteam(toy_package, "run", "--target", "thumbnail-api", "--attack", "random-search", "--data",
                   small_faces.root, "--limit", 4, "--eps", "0,16", "--out", out)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(pd.read_csv(out / "curve.csv")) == 2


def test_a_new_file_in_a_plugin_package_registers_itself(tmp_path, monkeypatch):
    """The in-tree route: one file dropped into the package, no other edit (the registry imports every module)."""
    package = tmp_path / "zoo"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "one.py").write_text("from registry_under_test import REGISTRY\nREGISTRY.register('one')(object)\n")
    (package / "two.py").write_text("from registry_under_test import REGISTRY\nREGISTRY.register('two')(int)\n")
    module = type(sys)("registry_under_test")
    module.REGISTRY = Registry("thing", package="zoo")
    monkeypatch.setitem(sys.modules, "registry_under_test", module)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module.REGISTRY.names() == ["one", "two"]
    assert module.REGISTRY.get("two") is int


def test_a_broken_plugin_is_one_line(tmp_path, toy_package):
    broken = tmp_path / "site"
    (broken / "bad_plugin-0.1.dist-info").mkdir(parents=True)
    (broken / "bad_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-plugin\n")
    (broken / "bad_plugin-0.1.dist-info" / "entry_points.txt").write_text("[redteam.attacks]\nbad = no_such_module\n")
    done = redteam(broken, "run", "--attack", "pgd", "--limit", 1)
    assert done.returncode == 2
    assert "redteam.attacks entry point 'bad' (no_such_module) failed to load" in done.stderr
    assert "Traceback" not in done.stderr
