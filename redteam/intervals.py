"""Confidence intervals and significance for the numbers redteam reports.

An accuracy is a proportion of probes: its interval is Wilson's score interval. A curve's area and a median
perturbation size are functions of many probes, and several probes show the same person (their outcomes are not
independent), so their intervals come from a bootstrap that resamples identities, not probes. A fall between two
runs (the regression gate, ``redteam diff``) is judged with Newcombe's interval for a difference of proportions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

#: Confidence of every interval redteam shows.
CONFIDENCE = 0.95
#: Bootstrap resamples of identities: enough for a 95% percentile interval to move by under a point between seeds.
BOOTSTRAP_DRAWS = 2000


def z_score(confidence: float = CONFIDENCE) -> float:
    """The normal quantile of a two-sided interval at ``confidence`` (1.96 at 95%)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(accuracy: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of an accuracy measured on ``n`` probes."""
    if n == 0:
        return 0.0, 1.0
    z = z_score(confidence)
    centre = (accuracy + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(accuracy * (1 - accuracy) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    # at 0 or 1 the interval ends exactly there (the formula leaves rounding dust such as 7e-18)
    low = 0.0 if accuracy <= 0 else float(max(0.0, centre - half))
    high = 1.0 if accuracy >= 1 else float(min(1.0, centre + half))
    return low, high


def with_intervals(curve: pd.DataFrame) -> pd.DataFrame:
    """``curve`` (an ``accuracy`` and ``n`` per row) with its Wilson interval as ``low`` and ``high``."""
    bounds = [wilson_interval(a, int(n)) for a, n in zip(curve["accuracy"], curve["n"])]
    return curve.assign(low=[b[0] for b in bounds], high=[b[1] for b in bounds])


def difference_interval(
    before: float, n_before: int, after: float, n_after: int, confidence: float
) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``before - after`` for two independent proportions (method 10 of
    Newcombe 1998: the two Wilson intervals combined; it keeps its coverage near 0 and 1, where Wald's does not)."""
    low_b, high_b = wilson_interval(before, n_before, confidence)
    low_a, high_a = wilson_interval(after, n_after, confidence)
    difference = before - after
    return (
        difference - float(np.sqrt((before - low_b) ** 2 + (high_a - after) ** 2)),
        difference + float(np.sqrt((high_b - before) ** 2 + (after - low_a) ** 2)),
    )


def fell_significantly(before: float, n_before: int, after: float, n_after: int, level: float) -> bool:
    """Whether ``after`` is below ``before`` at significance ``level`` (one-sided): the lower end of the two-sided
    ``1 - 2 level`` difference interval is above zero."""
    return difference_interval(before, n_before, after, n_after, 1 - 2 * level)[0] > 0


def beyond_chance(difference: float, errors: tuple[float, float], level: float) -> bool:
    """Whether ``difference`` between two independent estimates with standard errors ``errors`` exceeds the
    one-sided normal quantile at ``level`` times its own standard error (any positive difference, where both
    estimates have no spread)."""
    spread = float(np.hypot(*errors))
    return difference > 0 if spread == 0 else difference / spread > NormalDist().inv_cdf(1 - level)


def sign_test(wins: int, losses: int) -> float:
    """The one-sided p-value of ``wins`` against ``losses`` (paired outcomes that disagree) if either side were as
    likely as the other: the exact binomial tail, P(at least ``wins`` of ``wins + losses`` fair coin flips)."""
    flips = wins + losses
    return sum(math.comb(flips, k) for k in range(wins, flips + 1)) / 2**flips


def smallest_detectable_fall(before: float, n_before: int, n_after: int, level: float) -> float | None:
    """The smallest fall from ``before`` (measured on ``n_before`` probes) that a re-run on ``n_after`` probes would
    call significant at ``level``; ``None`` when even a fall to zero would not be."""
    for fooled in range(1, n_after + 1):
        after = before - fooled / n_after
        if after < -1e-9:
            break
        if fell_significantly(before, n_before, max(after, 0.0), n_after, level):
            return fooled / n_after
    return None


def probes_needed(accuracy: float, fall: float, level: float, power: float = 0.8) -> int:
    """Probes per run (both runs alike) for a one-sided test at ``level`` to detect a fall of ``fall`` from
    ``accuracy`` with probability ``power`` (the normal approximation for two proportions)."""
    after = max(accuracy - fall, 0.0)
    z_level, z_power = NormalDist().inv_cdf(1 - level), NormalDist().inv_cdf(power)
    pooled = (accuracy + after) / 2
    spread = z_level * np.sqrt(2 * pooled * (1 - pooled)) + z_power * np.sqrt(
        accuracy * (1 - accuracy) + after * (1 - after)
    )
    return int(np.ceil(spread**2 / max(fall, 1e-9) ** 2))


@dataclass(frozen=True)
class Estimate:
    """A value and its interval; ``error`` is its standard error (the bootstrap's spread)."""

    value: float
    low: float
    high: float
    error: float


def with_bounds(value: float, bounds: tuple[float, float] | None, digits: int = 3) -> str:
    """A value as shown beside its interval, e.g. ``0.650 [0.50, 0.78]`` (the value alone without one)."""
    return f"{value:.3f}" + (f" [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]" if bounds else "")


def identity_bootstrap(
    values: np.ndarray,
    identities: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
    seed: int = 0,
    draws: int = BOOTSTRAP_DRAWS,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """A percentile bootstrap that resamples identities (with all their probes) rather than probes.

    Args:
        values: ``[P, ...]`` one row per probe.
        identities: ``[P]`` the person each probe shows.
        statistic: ``(values [P, ...], weights [D, P]) -> [D]``: the statistic of ``values`` with each probe counted
            ``weights[d, p]`` times; called once with weight 1 everywhere for the estimate itself, then with the
            resamples' weights.
    """
    people, person_of = np.unique(identities, return_inverse=True)
    rng = np.random.default_rng(seed)
    drawn = rng.multinomial(len(people), np.full(len(people), 1 / len(people)), size=draws)  # [D, people]
    estimate = float(statistic(values, np.ones((1, len(values))))[0])
    replicates = statistic(values, drawn[:, person_of].astype(float))
    replicates = replicates[np.isfinite(replicates)]
    if not len(replicates):
        return Estimate(estimate, estimate, estimate, float("nan"))
    tail = (1 - confidence) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return Estimate(estimate, float(low), float(high), float(replicates.std(ddof=1)))


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[P, K]`` values, ``[D, P]`` weights -> ``[D, K]`` weighted means over probes."""
    return weights @ values / weights.sum(axis=1, keepdims=True)


def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[P]`` values (inf allowed), ``[D, P]`` weights -> ``[D]`` the weighted median of each resample (the mean of
    the two middle values where the weight splits evenly, as :func:`numpy.median` does)."""
    order = np.argsort(values)
    ranked = values[order]
    cumulative = np.cumsum(weights[:, order], axis=1)
    half = cumulative[:, -1:] / 2
    lower, upper = ranked[np.argmax(cumulative >= half, axis=1)], ranked[np.argmax(cumulative > half, axis=1)]
    return (lower + upper) / 2
