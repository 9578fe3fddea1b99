"""The regression gate's verdict in the formats CI systems and security dashboards read.

- **JUnit XML** (``redteam check --junit FILE``): one test suite, each evaluated cell a test case that fails when a
  value of it regressed; the compared values and the sanity checks are in the case's output.
- **SARIF 2.1.0** (``redteam check --sarif FILE``): one rule per sanity check and per kind of regression (an
  accuracy at a budget, a curve's area). A regression is an ``error``, a failed check a ``warning``; values and
  checks that held are results of kind ``pass``, so a dashboard sees what was gated, not only what failed. Every
  result points at the baseline file and carries a fingerprint that stays the same across runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from redteam import __version__
from redteam.errors import RedteamError
from redteam.gate import CheckOutcome, Comparison, GateReport

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
#: Rules for the two kinds of gated value: ``measure`` starts with the kind (``accuracy @ 4``, ``area``).
REGRESSION_RULES = {
    "accuracy": "Robust accuracy at a budget fell below the baseline by more than the tolerance, significantly.",
    "area": "The accuracy-perturbation curve's area fell below the baseline by more than the tolerance, significantly.",
}


def write_junit(report: GateReport, path: Path) -> Path:
    """``path``: the gate as JUnit XML, a test case per evaluated cell (failed where a value of it regressed)."""
    evaluations = list(dict.fromkeys(c.evaluation for c in report.comparisons))
    failed = {c.evaluation for c in report.regressions}
    suites = ElementTree.Element("testsuites", name="redteam check", tests=str(len(evaluations)))
    suites.set("failures", str(len(failed)))
    suite = ElementTree.SubElement(suites, "testsuite", name=f"redteam check {report.baseline}")
    suite.set("tests", str(len(evaluations)))
    suite.set("failures", str(len(failed)))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    for evaluation in evaluations:
        case = ElementTree.SubElement(suite, "testcase", classname="redteam.gate", name=evaluation)
        mine = [c for c in report.comparisons if c.evaluation == evaluation]
        regressed = [c for c in mine if c.regressed]
        if regressed:
            failure = ElementTree.SubElement(case, "failure", type="RobustnessRegression")
            failure.set("message", "; ".join(_regression_text(c) for c in regressed))
            failure.text = "\n".join(_regression_text(c) for c in regressed)
        lines = [f"{c.measure}: {c.text('baseline')} -> {c.text('now')}" for c in mine]
        lines += [_check_text(o) for o in report.checks if o.evaluation == evaluation]
        ElementTree.SubElement(case, "system-out").text = "\n".join(lines)
    ElementTree.indent(suites)
    return _write(path, ElementTree.tostring(suites, encoding="unicode", xml_declaration=True) + "\n")


def write_sarif(report: GateReport, path: Path) -> Path:
    """``path``: the gate as a SARIF 2.1.0 log (see the module's docstring)."""
    check_names = list(dict.fromkeys(o.name for o in report.checks))
    rules: list[dict[str, Any]] = [
        {
            "id": f"regression/{kind}",
            "name": f"{kind.capitalize()}Regression",
            "shortDescription": {"text": description},
            "defaultConfiguration": {"level": "error"},
        }
        for kind, description in REGRESSION_RULES.items()
    ]
    rules += [
        {
            "id": f"check/{_slug(name)}",
            "name": name,
            "shortDescription": {"text": f"redteam's sanity check '{name}' (a sign the numbers can be trusted)."},
            "defaultConfiguration": {"level": "warning"},
        }
        for name in check_names
    ]
    index = {str(rule["id"]): k for k, rule in enumerate(rules)}
    results = [_comparison_result(c, index, report.baseline) for c in report.comparisons]
    results += [_check_result(o, index, report.baseline) for o in report.checks]
    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {"driver": {"name": "redteam", "version": __version__, "rules": rules}},
                "invocations": [{"executionSuccessful": True}],
                "results": results,
            }
        ],
    }
    return _write(path, json.dumps(log, indent=2) + "\n")


def _comparison_result(comparison: Comparison, index: dict[str, int], baseline: Path) -> dict[str, Any]:
    rule = f"regression/{comparison.measure.split()[0]}"
    values = f"{comparison.evaluation}, {comparison.measure}: {comparison.text('baseline')} -> {comparison.text('now')}"
    outcome: dict[str, Any] = (
        {"kind": "fail", "level": "error", "message": {"text": _regression_text(comparison)}}
        if comparison.regressed
        else {"kind": "pass", "level": "none", "message": {"text": f"held: {values}"}}
    )
    properties = {
        "evaluation": comparison.evaluation,
        "measure": comparison.measure,
        "baseline": comparison.baseline,
        "now": comparison.now,
        "significant": comparison.significant,
    }
    key = f"{comparison.evaluation}|{comparison.measure}"
    return {"ruleId": rule, "ruleIndex": index[rule], **outcome, **_where(baseline, key), "properties": properties}


def _check_result(outcome: CheckOutcome, index: dict[str, int], baseline: Path) -> dict[str, Any]:
    rule = f"check/{_slug(outcome.name)}"
    verdict = {"kind": "pass", "level": "none"} if outcome.passed else {"kind": "fail", "level": "warning"}
    where = _where(baseline, f"{outcome.evaluation}|{outcome.name}")
    return {"ruleId": rule, "ruleIndex": index[rule], **verdict, "message": {"text": _check_text(outcome)}, **where}


def _where(baseline: Path, key: str) -> dict[str, Any]:
    """The baseline file as the result's location, and a fingerprint that identifies the result across runs."""
    uri = baseline.resolve().as_uri() if baseline.is_absolute() else baseline.as_posix()
    return {
        "locations": [{"physicalLocation": {"artifactLocation": {"uri": uri}}}],
        "partialFingerprints": {"redteamGate/v1": hashlib.sha256(key.encode()).hexdigest()[:32]},
    }


def _regression_text(comparison: Comparison) -> str:
    return (
        f"{comparison.evaluation}, {comparison.measure} fell from {comparison.text('baseline')} to "
        f"{comparison.text('now')} (more than {comparison.tolerance:g}, significant at level {comparison.level:g})"
    )


def _check_text(outcome: CheckOutcome) -> str:
    return f"{outcome.evaluation}: {outcome.name} {'passed' if outcome.passed else 'failed'}: {outcome.detail}"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _write(path: Path, text: str) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as error:
        raise RedteamError(f"cannot write {path}: {error.strerror}.") from None
    return path
