"""Verification metrics agree with scikit-learn on the same scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from redteam.metrics import verification_report
from redteam.results import curve_area


def test_report_agrees_with_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    genuine, impostor = rng.normal(0.7, 0.15, 400), rng.normal(0.1, 0.15, 20_000)
    report = verification_report(genuine, impostor, far=1e-3)
    labels = np.r_[np.ones(len(genuine)), np.zeros(len(impostor))]
    scores = np.r_[genuine, impostor]
    assert report.auc == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-9)
    assert (impostor >= report.threshold_far).sum() == 20  # exactly FAR 1e-3 of 20,000 impostors accepted
    best = max(((genuine >= t).mean() + (impostor < t).mean()) / 2 for t in np.r_[genuine, impostor])
    assert report.accuracy == pytest.approx(best)


def test_curve_area():
    curve = pd.DataFrame({"eps": [0.0, 1.0, 2.0], "accuracy": [1.0, 0.5, 0.0]})
    assert curve_area(curve) == pytest.approx(0.5)
