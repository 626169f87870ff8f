"""Warm-up calibration of adaptive CaT (``caspo calibrate``): the file it writes, and the rule that picks
τ and the branching threshold from a grid of measured operating points.

The rule (DeepConf's offline warm-up is the anchor): run greedy on warm-up problems of the training
split, recording the uncertainty of every greedy step; candidate thresholds are quantiles of those
uncertainties (so "branch at the most unsure 25% of steps" is one of them) plus ``inf`` (never branch:
greedy); each (threshold, τ) is run on the same problems; the chosen point has the highest accuracy
among those whose tokens per question stay within the budget (``max_tokens``, by default 2 × greedy's),
ties going to fewer tokens, then to the larger threshold, then to the smaller τ. If no point fits the
budget, the cheapest point is chosen.

A calibration file is JSON with at least ``tau`` (in [0, 1]) and ``branch_threshold`` (>= 0, or the
string "inf") and ``uncertainty``; everything else in it (the warm-up's figures, the grid) is a record.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from caspo.core.confidence import UNCERTAINTIES

CALIBRATION_FILE = "calibration.json"
DEFAULT_QUANTILES = (0.5, 0.75, 0.9, 0.95)
DEFAULT_TAUS = (0.0, 0.2, 0.4)


class CalibrationError(ValueError):
    """A calibration file that is missing or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Calibration:
    tau: float
    branch_threshold: float
    uncertainty: str
    path: str = ""  # where it was read from


def _threshold_value(v) -> float:
    return math.inf if v == "inf" else v


def read_calibration(path: str | os.PathLike) -> Calibration:
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"calibration file {p} does not exist (write one with `caspo calibrate`)")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(f"calibration file {p} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"calibration file {p} must hold a JSON object, got {type(data).__name__}")
    for key in ("tau", "branch_threshold", "uncertainty"):
        if key not in data:
            raise CalibrationError(f"calibration file {p}: {key} is missing")
    tau, th, unc = data["tau"], _threshold_value(data["branch_threshold"]), data["uncertainty"]
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise CalibrationError(f"calibration file {p}: tau must be a number in [0, 1], got {tau!r}")
    if isinstance(th, bool) or not isinstance(th, (int, float)) or math.isnan(th) or th < 0:
        raise CalibrationError(f"calibration file {p}: branch_threshold must be a number >= 0 or \"inf\", got {data['branch_threshold']!r}")
    if unc not in UNCERTAINTIES:
        raise CalibrationError(f"calibration file {p}: uncertainty must be one of {', '.join(UNCERTAINTIES)}, got {unc!r}")
    return Calibration(float(tau), float(th), unc, str(p))


def write_calibration(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` (with tau, branch_threshold, uncertainty) atomically; inf is written as "inf"."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    out = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in data.items()}
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2, default=lambda v: "inf" if v == math.inf else str(v)) + "\n")
    tmp.replace(p)
    read_calibration(p)  # what is written must read back
    return p


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
