"""The gate's JUnit and SARIF files are what CI systems and code-scanning dashboards accept: JUnit read back by
junitparser, SARIF validated against the OASIS 2.1.0 schema that an npm package ships (``make test`` installs it)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
from junitparser import Failure, JUnitXml

from redteam.ci_formats import write_junit, write_sarif
from redteam.gate import CheckOutcome, Comparison, GateReport

SCHEMA = Path(__file__).resolve().parents[1] / ".venv/node/node_modules/@microsoft/jest-sarif/lib/schemas"
HELD, BROKEN = (
    "facenet / halftone (adaptive) / pgd / dodging / linf",
    "facenet / jpeg (adaptive) / pgd / dodging / linf",
)


@pytest.fixture(scope="module")
def report() -> GateReport:
    comparisons = [
        Comparison(HELD, "accuracy @ 4", 0.60, 0.55, 0.05, baseline_n=40, now_n=40),  # within tolerance
        Comparison(HELD, "area", 0.80, 0.78, 0.05, baseline_error=0.03, now_error=0.03),
        Comparison(BROKEN, "accuracy @ 4", 0.60, 0.10, 0.05, baseline_n=40, now_n=40),  # a real fall
        Comparison(BROKEN, "area", 0.80, 0.40, 0.05, baseline_error=0.03, now_error=0.03),
    ]
    checks = [
        CheckOutcome(HELD, "gradients", True, "finite, non-zero gradients"),
        CheckOutcome(BROKEN, "beats noise", False, "no better than random noise of the same size"),
    ]
    return GateReport(Path("reports/baseline.json"), comparisons, checks)


@pytest.fixture(scope="module")
def sarif_schema() -> dict:
    found = sorted(SCHEMA.glob("sarif-2.1.0*.json"))
    if not found:
        pytest.skip(f"the SARIF 2.1.0 schema is not in {SCHEMA} (run `make test`, which installs it from npm)")
    return json.loads(found[0].read_text())


def test_the_gate_judges_the_fall_not_the_noise(report):
    assert [c.regressed for c in report.comparisons] == [False, False, True, True]
    assert not report.passed and "significantly" in report.summary() and "[0.4" in report.summary()


def test_sarif_validates_against_the_official_schema(report, sarif_schema, tmp_path):
    log = json.loads(write_sarif(report, tmp_path / "gate.sarif").read_text())
    validator = jsonschema.Draft4Validator(sarif_schema)
    assert not list(validator.iter_errors(log))
    broken = copy.deepcopy(log)
    broken["runs"][0]["results"][0]["level"] = "fatal"  # not a SARIF level: the validation can fail
    assert list(validator.iter_errors(broken))

    run = log["runs"][0]
    rules = [rule["id"] for rule in run["tool"]["driver"]["rules"]]
    assert rules == ["regression/accuracy", "regression/area", "check/gradients", "check/beats-noise"]
    levels = {
        (r["ruleId"], r["properties"]["evaluation"] if "properties" in r else ""): r["level"] for r in run["results"]
    }
    assert levels[("regression/accuracy", BROKEN)] == levels[("regression/area", BROKEN)] == "error"
    assert levels[("regression/accuracy", HELD)] == "none"
    assert [r["level"] for r in run["results"] if r["ruleId"] == "check/beats-noise"] == ["warning"]
    for result in run["results"]:
        assert rules[result["ruleIndex"]] == result["ruleId"]
        assert result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "reports/baseline.json"
    fingerprints = [r["partialFingerprints"]["redteamGate/v1"] for r in run["results"]]
    assert len(set(fingerprints)) == len(fingerprints)  # each result is its own alert across runs


def test_junit_reads_back_with_a_failure_per_regressed_evaluation(report, tmp_path):
    suites = JUnitXml.fromfile(str(write_junit(report, tmp_path / "gate.xml")))
    (suite,) = list(suites)
    assert suite.tests == 2 and suite.failures == 1
    cases = {case.name: case for case in suite}
    assert cases[HELD].is_passed and "accuracy @ 4: 0.600" in cases[HELD].system_out
    (failure,) = cases[BROKEN].result
    assert isinstance(failure, Failure) and "fell from 0.600 [" in failure.message
    assert "beats noise failed" in cases[BROKEN].system_out
