"""EOT draws are chosen by measurement: as many as it takes for two independent estimates of the expected gradient
to agree, on a noise of known size and on a real randomised defense in front of a real model; and the checks that
follow an evaluation say which of them runs."""

from __future__ import annotations

import json

import pytest
import torch

from redteam.engine import Evaluation, checks_of
from redteam.engine.config import EvaluationConfig
from redteam.engine.eot import AGREEMENT, CHOICES, choose_eot
from redteam.results import ResultStore
from redteam.threats import Verdict


class NoisyGradient:
    """A loss whose gradient is ones plus Gaussian noise of variance ``variance`` per pixel, drawn afresh per call:
    two n-draw averages then agree to cosine about 1 / (1 + variance / n)."""

    def __init__(self, variance: float):
        self.sigma = variance**0.5
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, x: torch.Tensor) -> Verdict:
        weights = 1 + self.sigma * torch.randn(x.shape, generator=self.generator)
        loss = (x * weights).flatten(1).sum(1)
        return Verdict(loss, torch.zeros(len(x), dtype=torch.bool), loss.detach())


@pytest.mark.parametrize(
    ("variance", "draws", "enough"),
    [(1.0, 8, True), (6.0, 32, True), (100.0, 32, False)],  # agreement 0.89 at 8; 0.73 at 16, 0.84 at 32; 0.24
)
def test_the_fewest_draws_whose_estimates_agree(variance, draws, enough):
    choice = choose_eot(NoisyGradient(variance), torch.zeros(4, 1, 64, 64))  # type: ignore[arg-type]
    expected = 1 / (1 + variance / draws)
    assert (choice.draws, choice.enough) == (draws, enough)
    assert choice.agreement == pytest.approx(expected, abs=0.03)
    assert (choice.agreement >= AGREEMENT) == enough


def test_a_run_through_a_randomised_defense_measures_its_draws(cli, faces_root, tmp_path, capsys, monkeypatch):
    command = ("run", "--target", "arcface", "--attack", "pgd", "--intruder", "jitter", "--adaptivity", "adaptive",
               "--data", faces_root, "--limit", 2, "--eps", "0,2", "--steps", 1)  # fmt: skip
    assert cli(*command, "--out", tmp_path / "measured") == 0
    draws = json.loads((tmp_path / "measured" / "run.json").read_text())["attack_settings"]["eot"]
    assert draws in CHOICES and f"EOT: {draws} draws per gradient" in capsys.readouterr().out
    checks = ResultStore(tmp_path / "measured" / "results.sqlite").checks().set_index("name")
    assert checks.loc["EOT draws", "detail"].startswith(f"{draws} draws per gradient")

    # Run again (or resumed): the count is read from the store, not measured again.
    def measured_again(*args):
        raise AssertionError("the EOT draws were measured again")

    monkeypatch.setattr("redteam.engine.execute.choose_eot", measured_again)
    assert cli(*command, "--eps", "0,2,4", "--out", tmp_path / "measured") == 0
    again = json.loads((tmp_path / "measured" / "run.json").read_text())["attack_settings"]["eot"]
    assert again == draws and f"EOT: {draws} draws per gradient" in capsys.readouterr().out
    monkeypatch.undo()
    # Given by the user, the count is theirs: nothing is measured.
    assert cli(*command, "--option", "eot=2", "--out", tmp_path / "given") == 0
    assert json.loads((tmp_path / "given" / "run.json").read_text())["attack_settings"]["eot"] == 2
    assert "EOT:" not in capsys.readouterr().out


def test_the_checks_say_which_of_them_runs(faces_root, tmp_path):
    config = EvaluationConfig(target="arcface", attack="pgd", data=str(faces_root), defense="jitter", limit=2,
                              eps=(0, 2), attack_options={"steps": 1, "eot": 1})  # fmt: skip
    evaluation = Evaluation(config.resolve(), ResultStore(tmp_path / "results.sqlite"))
    evaluation.run()
    heard: list[str] = []
    names = {check.name for check in checks_of(evaluation, heard.append)}
    assert {"converged", "defended operating point"} <= names
    assert heard[0] == "the defended operating point" and any(what.startswith("convergence") for what in heard)
