"""Unit tests for caspo.core.metrics, against values worked out by hand."""

from __future__ import annotations

import math
import random

import pytest

from caspo.core.metrics import accuracy, auroc, brier, ece, entropy_gap, reliability_bins


# ---------------------------------------------------------------- accuracy


def test_accuracy_fraction_true():
    assert accuracy([True, False, True, True]) == pytest.approx(0.75)


def test_accuracy_empty_is_nan():
    assert math.isnan(accuracy([]))


# ---------------------------------------------------------------- ECE / reliability bins


def test_ece_hand_computed():
    # n_bins=10, conf [0.05, 0.15, 0.15, 0.95], correct [F, T, F, T], N=4
    # bin0 (0, .1]:  {0.05}        acc 0   conf .05 -> |0 - .05|  = .05, weight 1/4 -> .0125
    # bin1 (.1, .2]: {0.15, 0.15}  acc .5  conf .15 -> |.5 - .15| = .35, weight 2/4 -> .175
    # bin9 (.9, 1]:  {0.95}        acc 1   conf .95 -> |1 - .95|  = .05, weight 1/4 -> .0125
    # ECE = .0125 + .175 + .0125 = 0.2
    assert ece([0.05, 0.15, 0.15, 0.95], [False, True, False, True]) == pytest.approx(0.2)


def test_ece_single_bin():
    # one bin: acc = 2/3, mean conf = (0.2 + 0.4 + 0.9)/3 = 0.5 -> ECE = |2/3 - 1/2| = 1/6
    assert ece([0.2, 0.4, 0.9], [True, False, True], n_bins=1) == pytest.approx(1 / 6)


def test_ece_perfectly_calibrated_is_zero():
    # conf 1.0 always right, conf 0.0 always wrong -> every bin has |acc - conf| = 0
    assert ece([1.0, 1.0, 0.0, 0.0], [True, True, False, False]) == pytest.approx(0.0)


def test_ece_bin_edge_exact_tenth_goes_to_lower_bin():
    # 0.1 is the upper edge of bin0 (0, .1], so it must not share a bin with 0.2.
    # correct:  bin0 {0.1} acc 1 -> .9 ; bin1 {0.2} acc 0 -> .2 ; ECE = .5*.9 + .5*.2 = 0.55
    # (if 0.1 fell into bin1 with 0.2: acc .5, conf .15 -> ECE 0.35)
    assert ece([0.1, 0.2], [True, False]) == pytest.approx(0.55)


@pytest.mark.parametrize(
    "conf, expected_bin",
    [(0.0, 0), (0.1, 0), (0.10000001, 1), (0.3, 2), (0.7, 6), (0.9, 8), (0.95, 9), (1.0, 9)],
)
def test_reliability_bin_edges(conf, expected_bin):
    bins = reliability_bins([conf], [True], n_bins=10)
    counts = [b["count"] for b in bins]
    assert counts[expected_bin] == 1
    assert sum(counts) == 1


def test_reliability_bins_fields():
    bins = reliability_bins([0.05, 0.15, 0.15, 0.95], [False, True, False, True], n_bins=10)
    assert len(bins) == 10
    assert bins[0]["lo"] == 0.0 and bins[0]["hi"] == pytest.approx(0.1)
    assert bins[9]["lo"] == pytest.approx(0.9) and bins[9]["hi"] == 1.0
    assert bins[1]["count"] == 2
    assert bins[1]["mean_confidence"] == pytest.approx(0.15)
    assert bins[1]["accuracy"] == pytest.approx(0.5)
    assert bins[5]["count"] == 0
    assert math.isnan(bins[5]["mean_confidence"]) and math.isnan(bins[5]["accuracy"])


def test_ece_empty_is_nan():
    assert math.isnan(ece([], []))


@pytest.mark.parametrize("bad", [1.2, -0.1, float("nan")])
def test_ece_rejects_out_of_range_confidence(bad):
    with pytest.raises(ValueError, match=r"confidence must be in \[0, 1\]") as err:
        ece([0.5, bad], [True, False])
    assert repr(bad) in str(err.value)


def test_ece_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        ece([0.5, 0.6], [True])


def test_ece_rejects_bad_n_bins():
    with pytest.raises(ValueError, match="n_bins"):
        ece([0.5], [True], n_bins=0)


# ---------------------------------------------------------------- Brier


def test_brier_hand_computed():
    # conf [0.8, 0.3, 0.5], correct [1, 1, 0]
    # (0.8-1)^2 + (0.3-1)^2 + (0.5-0)^2 = 0.04 + 0.49 + 0.25 = 0.78 ; / 3 = 0.26
    assert brier([0.8, 0.3, 0.5], [True, True, False]) == pytest.approx(0.26)


def test_brier_empty_is_nan_and_validates():
    assert math.isnan(brier([], []))
    with pytest.raises(ValueError, match="1.5"):
        brier([1.5], [True])
    with pytest.raises(ValueError, match="same length"):
        brier([0.5], [True, False])


# ---------------------------------------------------------------- AUROC


def _auroc_bruteforce(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_hand_computed():
    # positives {0.9, 0.7}, negatives {0.8, 0.6}
    # (0.9,0.8) win, (0.9,0.6) win, (0.7,0.8) loss, (0.7,0.6) win -> 3/4
    assert auroc([0.9, 0.8, 0.7, 0.6], [True, False, True, False]) == pytest.approx(0.75)


def test_auroc_with_ties_hand_computed():
    # positives {0.5, 0.8}, negatives {0.5, 0.2}
    # (0.5,0.5) tie 1/2, (0.5,0.2) win, (0.8,0.5) win, (0.8,0.2) win -> 3.5/4 = 0.875
    assert auroc([0.5, 0.5, 0.2, 0.8], [True, False, False, True]) == pytest.approx(0.875)


def test_auroc_all_tied_is_half():
    assert auroc([0.3, 0.3, 0.3, 0.3], [True, False, True, False]) == pytest.approx(0.5)


def test_auroc_perfect_and_inverted():
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == pytest.approx(1.0)
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == pytest.approx(0.0)


def test_auroc_matches_bruteforce_with_many_ties():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 40)
        scores = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, -math.inf]) for _ in range(n)]
        labels = [rng.random() < 0.4 for _ in range(n)]
        if all(labels) or not any(labels):
            continue
        assert auroc(scores, labels) == pytest.approx(_auroc_bruteforce(scores, labels))


def test_auroc_one_class_is_nan():
    assert math.isnan(auroc([0.1, 0.2], [True, True]))
    assert math.isnan(auroc([0.1, 0.2], [False, False]))
    assert math.isnan(auroc([], []))


def test_auroc_validation():
    with pytest.raises(ValueError, match="same length"):
        auroc([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="nan"):
        auroc([0.1, float("nan")], [True, False])


# ---------------------------------------------------------------- entropy gap


def test_entropy_gap_hand_computed():
    # incorrect steps {0.5, 0.7} mean 0.6 ; correct steps {0.1, 0.3} mean 0.2 ; gap 0.4
    assert entropy_gap([0.1, 0.3, 0.5, 0.7], [True, True, False, False]) == pytest.approx(0.4)


def test_entropy_gap_sign():
    # confident-when-wrong model: incorrect steps have lower entropy -> negative gap
    assert entropy_gap([0.9, 0.1], [True, False]) == pytest.approx(-0.8)


def test_entropy_gap_nan_when_a_group_is_empty():
    assert math.isnan(entropy_gap([0.1, 0.2], [True, True]))
    assert math.isnan(entropy_gap([0.1, 0.2], [False, False]))
    assert math.isnan(entropy_gap([], []))
