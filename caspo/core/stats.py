"""Intervals and paired tests for every accuracy-like figure the project prints.

* a proportion (accuracy, step accuracy): the Wilson score interval (Wilson 1927) — well behaved near
  0 and 1 and for small n, where the normal approximation is not;
* any other statistic (ECE, Brier, AUROC, entropy gap, ...): a percentile bootstrap over problems,
  seeded, so the same data give the same interval;
* two methods on the same problems: the paired difference with a paired bootstrap interval (problems
  resampled together, so what both got right or wrong cancels), and for accuracy the exact McNemar
  test on the discordant problems.

Pure numpy and math; no I/O.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["Z95", "wilson_interval", "bootstrap_interval", "paired_bootstrap_interval", "paired_bootstrap", "mcnemar", "DEFAULT_RESAMPLES"]

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
DEFAULT_RESAMPLES = 2000


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``; ``(nan, nan)`` when n is 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _columns(arrays: Sequence[Sequence]) -> list[np.ndarray]:
    cols = [np.asarray(list(a), dtype=float) for a in arrays]
    if not cols:
        raise ValueError("need at least one array")
    n = len(cols[0])
    if any(len(c) != n for c in cols):
        raise ValueError(f"arrays must have the same length, got {[len(c) for c in cols]}")
    return cols


def bootstrap_interval(
    statistic: Callable[..., float],
    arrays: Sequence[Sequence],
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)``, the arrays resampled together by index.

    A resample where the statistic is undefined (nan, e.g. AUROC with one class) is dropped; with
    fewer than half the resamples left, or with n < 2, the interval is ``(nan, nan)``.
    """
    cols = _columns(arrays)
    n = len(cols[0])
    if n < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        v = statistic(*(c[idx] for c in cols))
        if not math.isnan(v):
            values.append(v)
    if len(values) < resamples / 2:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    lo, hi = np.quantile(np.asarray(values), [a, 1 - a])
    return (float(lo), float(hi))


def paired_bootstrap_interval(
    statistic: Callable[..., float],
    arrays_a: Sequence[Sequence],
    arrays_b: Sequence[Sequence],
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """``statistic(*b) - statistic(*a)`` on the same problems, and its paired bootstrap interval.

    ``arrays_a`` and ``arrays_b`` hold per-problem values of two methods in the same problem order;
    each resample draws one set of problem indices and applies it to both.
    """
    ca, cb = _columns(arrays_a), _columns(arrays_b)
    if len(ca[0]) != len(cb[0]):
        raise ValueError(f"paired arrays must cover the same problems, got {len(ca[0])} and {len(cb[0])}")
    return paired_bootstrap(lambda i: statistic(*(c[i] for c in ca)), lambda i: statistic(*(c[i] for c in cb)), len(ca[0]), resamples, level, seed)


def paired_bootstrap(
    statistic_a: Callable[[np.ndarray], float],
    statistic_b: Callable[[np.ndarray], float],
    n: int,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """The paired bootstrap itself: ``statistic_b(idx) - statistic_a(idx)`` over all ``n`` problems, and its
    percentile interval over resamples of problem indices, each resample's one index array (integers,
    repeats allowed) given to both sides. For statistics that read their own per-problem data, e.g.
    two evaluations' records (``caspo.evaluation.compare_records``)."""
    def diff(idx: np.ndarray) -> float:
        i = idx.astype(int)
        return statistic_b(i) - statistic_a(i)

    idx = np.arange(n)
    return diff(idx), bootstrap_interval(diff, [idx], resamples, level, seed)


def _binom_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (n in the thousands stays exact enough)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    m = max(logs)
    return min(1.0, math.exp(m) * sum(math.exp(v - m) for v in logs))


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact McNemar test of two methods judged on the same problems.

    ``b``: problems only A got right; ``c``: only B. Under "equally accurate" the discordant problems
    split as Binomial(b + c, 1/2); the two-sided p-value is 2 * P(X <= min(b, c)), capped at 1
    (1 when there is no discordant problem).
    """
    a = np.asarray(list(correct_a), dtype=bool)
    bb = np.asarray(list(correct_b), dtype=bool)
    if a.shape != bb.shape:
        raise ValueError(f"correct_a and correct_b must cover the same problems, got {a.shape} and {bb.shape}")
    only_a = int((a & ~bb).sum())
    only_b = int((~a & bb).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else min(1.0, 2 * _binom_cdf_half(min(only_a, only_b), n))
    return {"only_a": only_a, "only_b": only_b, "p_value": p}
