"""The promotion gate: does a newly trained policy reach Serve? One rule, used by the loop, the report
and the operator commands.

A metric's paired change (candidate minus serving, on the same held-out problems, with its paired
bootstrap interval: ``caspo.evaluation.compare_records``) is *better* or *worse* only when its
interval excludes zero, in the metric's good direction (:data:`DIRECTIONS`); otherwise no change is
shown. The gate policies:

* ``always``: every trained policy is served;
* ``not_worse`` (the default): served unless some gate metric is worse;
* ``better``: served only when some gate metric is better and none is worse.

Pure Python; no I/O.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

# the metrics with per-problem paired intervals, and which way is better
DIRECTIONS = {
    "accuracy": "higher",
    "step_accuracy": "higher",
    "ece": "lower",
    "brier": "lower",
    "auroc": "higher",
    "entropy_gap": "higher",
}
POLICIES = ("always", "not_worse", "better")
DEFAULT_GATE_METRICS = ("accuracy", "ece")


def verdict(change: float | None, interval: Sequence[float | None] | None, direction: str) -> str | None:
    """``better``/``worse`` when the interval of the paired change excludes zero, ``no change shown``
    when it holds zero, None when there is no change or no interval to judge by."""
    if change is None or not interval or interval[0] is None or interval[1] is None:
        return None
    lo, hi = float(interval[0]), float(interval[1])
    if math.isnan(lo) or math.isnan(hi):
        return None
    if lo <= 0.0 <= hi:
        return "no change shown"
    return "better" if (change > 0) == (direction == "higher") else "worse"


def check_gate(policy: str, metrics: Sequence[str]) -> None:
    """ValueError naming the field when the policy or a metric is not one the gate knows."""
    if policy not in POLICIES:
        raise ValueError(f"promotion must be one of {', '.join(POLICIES)}, got {policy!r}")
    if not metrics:
        raise ValueError("promotion_metrics must name at least one metric")
    bad = [m for m in metrics if m not in DIRECTIONS]
    if bad:
        raise ValueError(f"promotion_metrics: {', '.join(map(repr, bad))} is not a gate metric (gate metrics: {', '.join(DIRECTIONS)})")


def decide(policy: str, metrics: Sequence[str], comparison: Mapping | None) -> dict:
    """The gate's decision on a candidate against the serving policy.

    ``comparison``: ``compare_records(serving, candidate)`` (keys ``m`` and ``m_ci`` per metric, ``n``);
    None when there is nothing to compare against (always promotes under ``always``, else is refused).
    Returns ``{"promote", "policy", "reason", "figures"}``; ``figures`` holds each gate metric's change,
    interval and verdict.
    """
    check_gate(policy, metrics)
    figures = {}
    for m in metrics:
        change = (comparison or {}).get(m)
        ci = (comparison or {}).get(f"{m}_ci")
        figures[m] = {"change": change, "ci": list(ci) if ci else None, "verdict": verdict(change, ci, DIRECTIONS[m])}
    worse = [m for m in metrics if figures[m]["verdict"] == "worse"]
    better = [m for m in metrics if figures[m]["verdict"] == "better"]
    n = (comparison or {}).get("n")

    def said(ms):
        return ", ".join(f"{m} {_signed(figures[m]['change'])} [{_signed(figures[m]['ci'][0])}, {_signed(figures[m]['ci'][1])}]" for m in ms)

    if policy == "always":
        promote, reason = True, "promotion: always"
    elif comparison is None:
        promote, reason = False, "no evaluation of the serving policy on the same problems to compare with"
    elif worse:
        promote, reason = False, f"worse than serving on {n} held-out problems: {said(worse)} (paired 95% interval excludes 0)"
    elif policy == "better" and not better:
        promote, reason = False, f"not shown better than serving on {n} held-out problems (every interval of {', '.join(metrics)} holds 0)"
    else:
        promote = True
        reason = (f"better than serving on {n} held-out problems: {said(better)}" if better
                  else f"not worse than serving on {n} held-out problems ({', '.join(metrics)}: every interval holds 0)")
    return {"promote": promote, "policy": policy, "reason": reason, "figures": figures, "n": n}


def _signed(v) -> str:
    return "-" if v is None else f"{v:+.3f}"
