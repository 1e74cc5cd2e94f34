"""The comparison statistics: bootstrap ratio intervals and the verdict rule (unit and property-based)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlci.stats import RatioEstimate, cell_confidence, classify, median_ratio_ci


def _noisy(rng: np.random.Generator, n: int, centre: float, noise: float) -> list[float]:
    return list(centre * (1 + noise * rng.standard_normal(n)))


def test_real_slowdown_is_a_regression_and_reverse_is_an_improvement() -> None:
    rng = np.random.default_rng(1)
    base = _noisy(rng, 40, 10.0, 0.01)
    head = _noisy(rng, 40, 11.0, 0.01)
    assert classify(median_ratio_ci(base, head, paired=False), 0.05) == "regression"
    assert classify(median_ratio_ci(head, base, paired=False), 0.05) == "improvement"


def test_paired_samples_cancel_shared_noise() -> None:
    rng = np.random.default_rng(2)
    drift = 1 + 0.3 * rng.standard_normal(30) ** 2  # the runner slows down and speeds up
    base = list(10.0 * drift)
    head = list(10.6 * drift * (1 + 0.002 * rng.standard_normal(30)))
    paired = median_ratio_ci(base, head, paired=True)
    unpaired = median_ratio_ci(base, head, paired=False)
    assert classify(paired, 0.05) == "regression"
    assert paired.high - paired.low < unpaired.high - unpaired.low


def test_small_change_inside_the_band_is_unchanged_and_noise_is_inconclusive() -> None:
    rng = np.random.default_rng(3)
    base = _noisy(rng, 40, 10.0, 0.005)
    assert classify(median_ratio_ci(base, _noisy(rng, 40, 10.1, 0.005), paired=False), 0.05) == "unchanged"
    wild = _noisy(rng, 6, 10.0, 0.4)
    assert classify(median_ratio_ci(base, wild, paired=False), 0.05) == "inconclusive"


def test_rule_edges() -> None:
    assert classify(RatioEstimate(1.04, 1.01, 1.07, 0.95), 0.05) == "inconclusive"  # above 1, below threshold
    assert classify(RatioEstimate(1.06, 0.99, 1.12, 0.95), 0.05) == "inconclusive"  # interval touches 1
    assert classify(RatioEstimate(1.05, 1.02, 1.08, 0.95), 0.05) == "regression"


def test_bonferroni_cell_confidence() -> None:
    assert cell_confidence(1) == pytest.approx(0.95)
    assert cell_confidence(10) == pytest.approx(0.995)
    with pytest.raises(ValueError):
        median_ratio_ci([1.0, 2.0], [1.0], paired=True)


samples = st.lists(st.floats(min_value=0.5, max_value=2.0), min_size=3, max_size=30)


@settings(max_examples=60, deadline=None)
@given(samples)
def test_identical_samples_are_never_a_change(values: list[float]) -> None:
    estimate = median_ratio_ci(values, list(values), paired=True, resamples=300)
    assert estimate.ratio == pytest.approx(1.0)
    assert classify(estimate, 0.05) in ("unchanged", "inconclusive")


@settings(max_examples=60, deadline=None)
@given(samples, st.floats(min_value=1.2, max_value=3.0))
def test_scaling_head_up_never_reads_as_improvement(values: list[float], factor: float) -> None:
    estimate = median_ratio_ci(values, [v * factor for v in values], paired=True, resamples=300)
    assert estimate.low <= estimate.ratio <= estimate.high
    assert estimate.ratio == pytest.approx(factor)
    assert classify(estimate, 0.05) == "regression"  # paired and exact: the interval is the factor


@settings(max_examples=60, deadline=None)
@given(samples, samples)
def test_swapping_sides_mirrors_the_verdict(base: list[float], head: list[float]) -> None:
    forward = classify(median_ratio_ci(base, head, paired=False, resamples=300, seed=4), 0.05)
    backward = classify(median_ratio_ci(head, base, paired=False, resamples=300, seed=4), 0.05)
    mirror = {"regression": "improvement", "improvement": "regression"}
    if forward in mirror:
        assert backward in (mirror[forward], "inconclusive")
    if backward in mirror:
        assert forward in (mirror[backward], "inconclusive")
