"""Warm-up calibration of adaptive CaT (``caspo calibrate``): the rule that picks
τ and the branching threshold from a grid of measured operating points.

The rule (DeepConf's offline warm-up is the anchor): run greedy on warm-up problems of the training
split, recording the uncertainty of every greedy step; candidate thresholds are quantiles of those
uncertainties (so "branch at the most unsure 25% of steps" is one of them) plus ``inf`` (never branch:
greedy); each (threshold, τ) is run on the same problems; the chosen point has the highest accuracy
among those whose tokens per question stay within the budget (``max_tokens``, by default 2 × greedy's),
ties going to fewer tokens, then to the larger threshold, then to the smaller τ. If no point fits the
budget, the cheapest point is chosen.

The file itself (``calibration.json``: ``tau``, ``branch_threshold``, ``uncertainty`` and the warm-up's
record) is read, written and looked up by ``caspo.models.calibration_file``; this module
stays pure.
"""

from __future__ import annotations

import math
from typing import Sequence

CALIBRATION_FILE = "calibration.json"
DEFAULT_QUANTILES = (0.5, 0.75, 0.9, 0.95)
DEFAULT_TAUS = (0.0, 0.2, 0.4)


def threshold_grid(uncertainties: Sequence[float], quantiles: Sequence[float] = DEFAULT_QUANTILES) -> list[float]:
    """Candidate thresholds: the empirical ``quantiles`` (lower value) of the greedy steps' uncertainties,
    distinct and sorted, then ``inf``. Branching where u > the q-quantile expands at most 1 − q of the steps."""
    vals = sorted(float(u) for u in uncertainties)
    out: list[float] = []
    for q in quantiles:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantiles must be in [0, 1], got {q!r}")
        if vals:
            v = vals[min(len(vals) - 1, int(math.floor(q * (len(vals) - 1))))]
            if v not in out:
                out.append(v)
    return sorted(out) + [math.inf]


def choose_point(points: Sequence[dict], max_tokens: float) -> dict:
    """The operating point (dicts with branch_threshold, tau, accuracy, tokens) the rule above picks."""
    if not points:
        raise ValueError("no operating points to choose from")
    fit = [p for p in points if p["tokens"] <= max_tokens]
    if not fit:
        return min(points, key=lambda p: (p["tokens"], -p["accuracy"]))
    return max(fit, key=lambda p: (p["accuracy"], -p["tokens"], p["branch_threshold"], -p["tau"]))
