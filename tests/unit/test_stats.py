"""Intervals and paired tests against values worked out by hand."""

import math

import numpy as np
import pytest

from caspo.core.stats import bootstrap_interval, mcnemar, paired_bootstrap_interval, wilson_interval


def test_wilson_matches_the_formula_worked_by_hand():
    # p = 0.7, n = 10, z = 1.96: centre (0.7 + 0.19208) / 1.38415 = 0.64450; half-width
    # 1.96 * sqrt(0.021 + 0.0096040) / 1.38415 = 0.24772  ->  [0.39678, 0.89221]
    lo, hi = wilson_interval(7, 10)
    assert lo == pytest.approx(0.39678, abs=1e-4)
    assert hi == pytest.approx(0.89221, abs=1e-4)


def test_wilson_at_the_edges_stays_inside_zero_one_and_is_not_degenerate():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-4)  # z^2 / (n + z^2) = 3.8415 / 13.8415
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.72247, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_wilson_narrows_like_one_over_root_n():
    w100 = np.diff(wilson_interval(60, 100))[0]
    w1000 = np.diff(wilson_interval(600, 1000))[0]
    assert w100 / w1000 == pytest.approx(math.sqrt(10), rel=0.05)


def test_mcnemar_exact_p_value_by_hand():
    # 1 problem only A solved, 9 only B: p = 2 * P(X <= 1 | Binomial(10, 1/2)) = 2 * 11 / 1024
    a = [True] + [False] * 9 + [True] * 5
    b = [False] + [True] * 9 + [True] * 5
    res = mcnemar(a, b)
    assert (res["only_a"], res["only_b"]) == (1, 9)
    assert res["p_value"] == pytest.approx(22 / 1024)


def test_mcnemar_balanced_and_empty_discordance_give_p_one():
    assert mcnemar([True, False], [False, True])["p_value"] == pytest.approx(1.0)
    assert mcnemar([True, True, False], [True, True, False])["p_value"] == 1.0


def test_mcnemar_large_counts_agree_with_the_normal_approximation():
    # b = 40, c = 70: chi2 with continuity (|b - c| - 1)^2 / (b + c) = 7.6455, p ~ 0.0057
    a = [True] * 40 + [False] * 70
    b = [False] * 40 + [True] * 70
    assert mcnemar(a, b)["p_value"] == pytest.approx(0.0057, abs=0.0012)


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    x = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1] * 10
    a = bootstrap_interval(lambda v: float(v.mean()), [x], seed=3)
    b = bootstrap_interval(lambda v: float(v.mean()), [x], seed=3)
    assert a == b
    assert a[0] < 0.7 < a[1]
    # a bootstrap interval of a proportion is close to Wilson's at n = 100
    w = wilson_interval(70, 100)
    assert a[0] == pytest.approx(w[0], abs=0.03) and a[1] == pytest.approx(w[1], abs=0.03)


def test_bootstrap_drops_undefined_resamples_and_gives_nan_when_most_are():
    assert all(math.isnan(v) for v in bootstrap_interval(lambda v: float("nan"), [[1, 2, 3]]))
    assert all(math.isnan(v) for v in bootstrap_interval(lambda v: float(v.mean()), [[1]]))


def test_paired_difference_cancels_shared_outcomes():
    # B fixes 10 of A's 40 errors and breaks none: the difference is exactly +0.1 and its paired
    # interval excludes 0, while the unpaired intervals of 0.6 and 0.7 at n = 100 overlap
    a = [1] * 60 + [0] * 40
    b = [1] * 70 + [0] * 30
    d, (lo, hi) = paired_bootstrap_interval(lambda v: float(v.mean()), [a], [b])
    assert d == pytest.approx(0.1)
    assert 0 < lo <= 0.1 <= hi
    assert wilson_interval(70, 100)[0] < wilson_interval(60, 100)[1]


def test_paired_arrays_must_cover_the_same_problems():
    with pytest.raises(ValueError):
        paired_bootstrap_interval(lambda v: float(v.mean()), [[1, 0]], [[1, 0, 1]])
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])
