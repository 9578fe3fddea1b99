"""Intervals and significance: published values, and a bootstrap that knows probes of one person move together."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from redteam.intervals import (
    difference_interval,
    fell_significantly,
    identity_bootstrap,
    probes_needed,
    sign_test,
    smallest_detectable_fall,
    weighted_mean,
    weighted_median,
    wilson_interval,
)
from redteam.results import area_estimate, curve_area


def test_wilson_and_newcombe_match_the_published_examples():
    # Newcombe (1998), Statistics in Medicine 17: 81/263 -> Wilson 0.2553 to 0.3662; 56/70 - 48/80 -> method 10,
    # 0.0524 to 0.3339.
    assert wilson_interval(81 / 263, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert difference_interval(56 / 70, 70, 48 / 80, 80, 0.95) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert wilson_interval(1.0, 0) == (0.0, 1.0)


def test_the_sign_test_is_the_exact_binomial_tail():
    assert sign_test(1, 0) == 0.5 and sign_test(5, 0) == 1 / 32  # one flip; five of five
    assert sign_test(3, 1) == pytest.approx((4 + 1) / 16)  # 3 or 4 of 4
    assert sign_test(0, 0) == 1.0 and sign_test(0, 3) == 1.0


def test_a_fall_counts_once_the_probes_can_show_it():
    assert not fell_significantly(0.65, 40, 0.55, 40, 0.05)  # 4 probes of 40: chance
    assert fell_significantly(0.65, 40, 0.25, 40, 0.05)
    smallest = smallest_detectable_fall(0.65, 40, 40, 0.05)
    assert smallest is not None and 0.1 < smallest < 0.4
    assert fell_significantly(0.65, 40, 0.65 - smallest, 40, 0.05)
    assert not fell_significantly(0.65, 40, 0.65 - smallest + 1 / 40, 40, 0.05)
    assert smallest_detectable_fall(0.2, 6, 6, 0.05) is None  # from 1 in 6, not even a fall to zero shows
    # the probes that detect a 10-point fall with 80% power detect it at least half the time, so the smallest
    # significant fall at that count is below 10 points; a tenth as many probes cannot
    needed = probes_needed(0.65, 0.10, 0.05)
    assert smallest_detectable_fall(0.65, needed, needed, 0.05) < 0.10 < smallest_detectable_fall(0.65, 30, 30, 0.05)


def test_the_bootstrap_resamples_people_not_probes():
    rng = np.random.default_rng(0)
    people = np.repeat(np.arange(20), 5)
    together = np.repeat(rng.random(20) < 0.5, 5).astype(float)[:, None]  # a person's probes all fall or none do
    apart = rng.permutation(together)  # the same outcomes, shuffled across people
    wide = identity_bootstrap(together, people, lambda v, w: weighted_mean(v, w)[:, 0])
    narrow = identity_bootstrap(apart, people, lambda v, w: weighted_mean(v, w)[:, 0])
    assert wide.value == narrow.value == together.mean()
    # five probes that move together tell what one does: the interval is about sqrt(5) times as wide
    assert 1.6 < wide.error / narrow.error < 3.0
    assert wide.low <= wide.value <= wide.high


def test_weighted_median_is_numpys_median_with_equal_weights():
    values = np.array([3.0, 1.0, np.inf, 2.0, 5.0, 4.0])
    assert weighted_median(values, np.ones((1, 6)))[0] == np.median(values)
    assert weighted_median(values[:5], np.ones((1, 5)))[0] == np.median(values[:5])
    assert weighted_median(values, np.array([[0, 0, 0, 0, 1, 1.0]]))[0] == 4.5


def test_area_interval_surrounds_the_curve_area():
    rows = []
    for probe in range(12):
        for eps, fooled_from in ((0.0, 99), (4 / 255, 6), (8 / 255, 3)):
            rows.append({"probe": str(probe), "identity": f"p{probe // 3}", "eps": eps, "norm": "linf",
                         "correct": probe < fooled_from})  # fmt: skip
    results = pd.DataFrame(rows)
    curve = results.groupby("eps", as_index=False)["correct"].mean().rename(columns={"correct": "accuracy"})
    curve["eps"] *= 255
    estimate = area_estimate(results)
    assert estimate is not None and estimate.value == pytest.approx(curve_area(curve))
    assert estimate.low < estimate.value < estimate.high
    assert area_estimate(results, upto=4).value == pytest.approx(curve_area(curve, upto=4))
