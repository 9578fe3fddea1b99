"""Plugins from outside: a user's package adds a target, an attack and a defense through entry points, exactly as the
README's "Extending" says, and `redteam run` uses them on real faces. Capability mismatches fail before any work.

The package is built from the code blocks of the README's "Extending" section, written to a temporary folder with its
distribution metadata (``*.dist-info/entry_points.txt``) and put on ``PYTHONPATH``: what ``pip install`` of a real
package leaves behind, without touching this environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from redteam.registry import Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

README = Path(__file__).resolve().parents[1] / "README.md"

# Beyond the README: a target that answers decisions only, and an attack that needs no more (capability checks).
EXTRAS = """
from dataclasses import dataclass, replace

import torch

from redteam.api import ATTACKS, TARGETS, QueryAttack, QueryResult, perturbation_size
from my_plugins.target import Thumbnail


@TARGETS.register("thumbnail-api", "the thumbnail recogniser behind an API that only says match or no match")
class ThumbnailAPI(Thumbnail):
    card = replace(Thumbnail.card, name="thumbnail-api")
    offers = "decisions"


@ATTACKS.register("random-corners", "random corners of the budget's box, kept once the decision flips")
@dataclass
class RandomCorners(QueryAttack):
    name = "random-corners"
    norms = ("linf",)
    needs = "decisions"
    default_queries = 10

    def __call__(self, oracle, images, budget, generator):
        best = images.clone()
        for _ in range(int(oracle.remaining().min())):
            candidate = budget.confine(images)(images + budget.sample(images, generator).sign() * budget.eps)
            fooled = oracle(candidate).fooled
            best[fooled] = candidate[fooled]
        size = perturbation_size(best - images, "linf")
        return QueryResult(best, torch.where(size > 0, size, torch.full_like(size, float("inf"))))
"""


def extending_blocks() -> dict[str, str]:
    """The README's "Extending" code blocks, by the path on their first line (``# my_plugins/target.py``)."""
    section = README.read_text().split("## Extending", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", section, flags=re.DOTALL)
    return {block.splitlines()[0].removeprefix("# ").split()[0]: block for block in blocks}


def entry_points_txt(pyproject: str) -> str:
    """``[project.entry-points."group"]`` tables of a pyproject -> a distribution's ``entry_points.txt``."""
    groups = tomllib.loads(pyproject)["project"]["entry-points"]
    return "".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items()) + "\n"
        for group, points in groups.items()
    )


@pytest.fixture(scope="module")
def toy_package(tmp_path_factory) -> Path:
    """The README's plugin package (its files and entry points, plus :data:`EXTRAS`) installed into a folder for
    PYTHONPATH, as ``pip install`` leaves a package: its modules and its ``*.dist-info``."""
    blocks = extending_blocks()
    assert sorted(blocks) == [
        "my_plugins/accessory.py", "my_plugins/attack.py", "my_plugins/defense.py", "my_plugins/target.py",
        "pyproject.toml",
    ]  # fmt: skip
    root = tmp_path_factory.mktemp("site")
    (root / "my_plugins").mkdir()
    (root / "my_plugins" / "__init__.py").write_text("")
    (root / "my_plugins" / "extras.py").write_text(EXTRAS)
    for path, source in blocks.items():
        if path.endswith(".py"):
            (root / path).write_text(source)
    metadata = root / "my_plugins-0.1.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugins\nVersion: 0.1\n")
    extras = "".join(f"[{group}]\nextras = my_plugins.extras\n" for group in ("redteam.targets", "redteam.attacks"))
    (metadata / "entry_points.txt").write_text(entry_points_txt(blocks["pyproject.toml"]) + extras)
    return root


def redteam(site: Path, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "redteam"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_plugins_are_listed(toy_package):
    done = redteam(toy_package, "list")
    assert done.returncode == 0, done.stderr
    for name in ("thumbnail", "thumbnail-api", "fgsm", "random-corners", "box-blur", "cheek-sticker"):
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


def test_a_plugin_accessory_is_optimised_judged_and_printed_like_the_built_in_ones(toy_package, small_faces, tmp_path):
    out = tmp_path / "cheek"
    done = redteam(
        toy_package, "run", "--target", "arcface", "--attack", "cheek-sticker", "--data", small_faces.root,
        "--steps", 2, "--option", "draws=1", "--option", "train_photos=1", "--out", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    assert metrics["covered"] == pytest.approx(0.02, rel=0.1) and metrics["train_photos"] == 1
    assert {"clean_similarity", "random_similarity", "plain_similarity", "sticker_similarity"} <= set(metrics)
    assert (out / "cheek-sticker-sticker.png").is_file() and (out / "cheek-sticker-faces.png").is_file()
    assert "arcface" in set(pd.read_csv(out / "transfer.csv")["target"])


def test_decision_only_target_refuses_gradient_attacks_before_any_work(toy_package, small_faces, tmp_path):
    out = tmp_path / "refused"
    done = redteam(toy_package, "run", "--target", "thumbnail-api", "--attack", "pgd", "--data", small_faces.root,
                   "--out", out)  # fmt: skip
    assert done.returncode == 2
    said = " ".join(done.stderr.split())
    assert "pgd needs gradients; thumbnail-api answers decisions only (attacks that work with it:" in said
    assert "random-corners" in said
    assert "Traceback" not in done.stderr and not out.exists()
    done = redteam(toy_package, "run", "--target", "thumbnail-api", "--attack", "random-corners", "--data",
                   small_faces.root, "--limit", 4, "--eps", "0,16", "--out", out)  # fmt: skip
    assert done.returncode == 0, done.stderr
    curve = pd.read_csv(out / "curve.csv")  # two budgets, and the one above 0 against queries too
    assert len(curve[curve["queries"].isna()]) == 2 and curve["queries"].dropna().between(1, 10).all()


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
