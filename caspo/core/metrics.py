"""Evaluation metrics: accuracy, calibration (ECE, reliability bins, Brier), AUROC, entropy gap.

Pure Python + numpy, no I/O. Every function takes plain sequences and returns plain floats/dicts.
Empty inputs give ``nan`` rather than raising, so a round with nothing to score still reports.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["accuracy", "ece", "reliability_bins", "brier", "auroc", "entropy_gap"]


def _as_bool_array(correct: Sequence[bool], name: str = "correct") -> np.ndarray:
    """Booleans (or 0/1 values) as a float array of 0.0/1.0; anything else is a ValueError."""
    arr = np.asarray(list(correct), dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence, got shape {arr.shape}")
    bad = ~((arr == 0.0) | (arr == 1.0))
    if bad.any():
        raise ValueError(f"{name} must hold booleans (0/1), got {arr[bad][0]!r}")
    return arr


def _as_confidence_array(confidences: Sequence[float]) -> np.ndarray:
    """Confidences as a float array, each checked to lie in [0, 1] (nan is rejected too)."""
    arr = np.asarray(list(confidences), dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"confidences must be a flat sequence, got shape {arr.shape}")
    bad = ~((arr >= 0.0) & (arr <= 1.0))  # also catches nan
    if bad.any():
        raise ValueError(f"confidence must be in [0, 1], got {float(arr[bad][0])!r}")
    return arr


def _check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}")


def accuracy(correct: Sequence[bool]) -> float:
    """Fraction of ``True`` values; ``nan`` for an empty sequence."""
    arr = _as_bool_array(correct)
    return float(arr.mean()) if len(arr) else math.nan


def reliability_bins(
    confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10
) -> list[dict[str, float]]:
    """Per-bin calibration statistics over ``n_bins`` equal-width bins of [0, 1].

    Bin ``i`` holds confidences in ``(i/n, (i+1)/n]``; a confidence of exactly 0 falls in bin 0.
    Edges are the correctly-rounded doubles ``i/n``, so e.g. ``0.1`` lands in bin 0 for n=10.
    Returns one dict per bin (empty bins included) with keys ``lo``, ``hi``, ``count``,
    ``mean_confidence`` and ``accuracy`` (the last two ``nan`` for an empty bin).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    conf = _as_confidence_array(confidences)
    corr = _as_bool_array(correct)
    _check_same_length(conf, corr, "confidences", "correct")

    n = int(n_bins)
    edges = np.arange(n + 1, dtype=float) / n  # i/n, correctly rounded
    # first edge >= conf is edges[i+1] for conf in (edges[i], edges[i+1]]; conf == 0 gives -1 -> bin 0
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n - 1)

    bins: list[dict[str, float]] = []
    for i in range(n):
        members = idx == i
        count = int(members.sum())
        bins.append(
            {
                "lo": float(edges[i]),
                "hi": float(edges[i + 1]),
                "count": count,
                "mean_confidence": float(conf[members].mean()) if count else math.nan,
                "accuracy": float(corr[members].mean()) if count else math.nan,
            }
        )
    return bins


def ece(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (|b|/N) * |accuracy(b) - mean confidence(b)|.

    Bins as in :func:`reliability_bins`. ``nan`` for empty input.
    """
    bins = reliability_bins(confidences, correct, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return math.nan
    return float(
        sum((b["count"] / total) * abs(b["accuracy"] - b["mean_confidence"]) for b in bins if b["count"])
    )


def brier(confidences: Sequence[float], correct: Sequence[bool]) -> float:
    """Brier score: mean of (confidence - correct)^2, confidences in [0, 1]; ``nan`` for empty input."""
    conf = _as_confidence_array(confidences)
    corr = _as_bool_array(correct)
    _check_same_length(conf, corr, "confidences", "correct")
    if len(conf) == 0:
        return math.nan
    return float(np.mean((conf - corr) ** 2))


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties 1/2.

    Rank-based (Mann-Whitney U with average ranks for ties), O(n log n). ``nan`` when only one
    class (or nothing) is present. Scores must be finite or ±inf, not nan.
    """
    s = np.asarray(list(scores), dtype=float)
    y = _as_bool_array(labels, "labels")
    if s.ndim != 1:
        raise ValueError(f"scores must be a flat sequence, got shape {s.shape}")
    _check_same_length(s, y, "scores", "labels")
    if np.isnan(s).any():
        raise ValueError("scores must not contain nan")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan

    # average 1-based ranks: a tie group occupying sorted positions start+1 .. start+count
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    avg_rank = starts + (counts + 1) / 2.0
    ranks = avg_rank[inverse.reshape(-1)]

    u = ranks[y == 1.0].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def entropy_gap(step_entropies_mean: Sequence[float], step_correct: Sequence[bool]) -> float:
    """Mean entropy of incorrect steps minus mean entropy of correct steps.

    Positive when wrong steps are more uncertain. ``nan`` if either group is empty.
    """
    h = np.asarray(list(step_entropies_mean), dtype=float)
    c = _as_bool_array(step_correct, "step_correct")
    _check_same_length(h, c, "step_entropies_mean", "step_correct")
    wrong, right = h[c == 0.0], h[c == 1.0]
    if len(wrong) == 0 or len(right) == 0:
        return math.nan
    return float(wrong.mean() - right.mean())
