"""Which confidence signal works on a model, and why: statistics of sibling steps (``caspo diagnose``).

A *sibling set* is the group of distinct next steps a policy samples after one correct prefix, each
judged by the critic and carrying its token entropies and log-probs. A scoring (``STEP_SCORINGS``) is
useful for CaT only if it (a) separates right from wrong steps in general (step AUROC) and (b) ranks
siblings — among steps that share a context up to their point of divergence, puts a right one on top.
Eq. 2 entropy is a property of the context *before* a token is chosen, so siblings that diverge late
tie under it; this module counts those ties, where siblings diverge, and what the wrong ones got
wrong. Pure: no model, no I/O.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from caspo.core import metrics, stats
from caspo.core.confidence import STEP_SCORINGS, UNCERTAINTIES, log_step_score, mean_entropy, step_uncertainty
from caspo.core.steps import final_answer

TIE_TOLERANCE = 1e-3  # two scores closer than this count as equal (float noise from batching is ~1e-6)


@dataclass(frozen=True)
class Sibling:
    text: str
    correct: bool
    token_entropies: tuple[float, ...]
    token_logprobs: tuple[float, ...]
    reason: str = ""  # the critic's reason (what went wrong, for a wrong step)


def distinct(siblings: Sequence[Sibling]) -> list[Sibling]:
    """One sibling per distinct step text (the first sampled), in sampling order."""
    seen: dict[str, Sibling] = {}
    for s in siblings:
        seen.setdefault(s.text.strip(), s)
    return list(seen.values())


def is_mixed(siblings: Sequence[Sibling]) -> bool:
    kinds = {s.correct for s in siblings}
    return kinds == {True, False}


def score(sibling: Sibling, scoring: str) -> float:
    return log_step_score(scoring, sibling.token_entropies, sibling.token_logprobs, final=final_answer(sibling.text) is not None, text=sibling.text)


def top_choice(siblings: Sequence[Sibling], scoring: str, tol: float = TIE_TOLERANCE) -> tuple[float, bool, bool]:
    """Ranking one set by a scoring: (probability that the top pick is right when ties among the top are
    broken at random, whether the top tie mixes right and wrong steps, whether every score ties)."""
    scores = [score(s, scoring) for s in siblings]
    best = max(scores)
    top = [s for s, v in zip(siblings, scores) if v >= best - tol]
    p_right = sum(s.correct for s in top) / len(top)
    return p_right, is_mixed(top), max(scores) - min(scores) < tol


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(frozen=True)
class Divergence:
    position: int  # first character where the wrong step leaves its closest right sibling
    relative: float  # position / length of that right sibling (0 = at the first character)
    one_character: bool  # same length, exactly one character differs


def divergence(wrong: str, right: Sequence[str]) -> Divergence:
    """Where ``wrong`` leaves the right sibling it shares the longest prefix with."""
    best = max(right, key=lambda r: common_prefix(wrong, r))
    pos = common_prefix(wrong, best)
    one = len(wrong) == len(best) and sum(x != y for x, y in zip(wrong, best)) == 1
    return Divergence(pos, pos / max(1, len(best)), one)


def sibling_report(
    sets: Sequence[Sequence[Sibling]],
    scorings: Sequence[str] = STEP_SCORINGS,
    error_kind: Callable[[str], str] | None = None,
    tol: float = TIE_TOLERANCE,
    seed: int = 0,
) -> dict:
    """Everything ``caspo diagnose`` reports about sibling sets (each a sequence of sampled siblings).

    * ``sibling_ranking``: scoring → mean probability (random tie-breaking) that the top-scored sibling of
      a mixed set (distinct steps, some right and some wrong) is right; ``sibling_ranking_ci`` its 95%
      bootstrap interval over sets; ``chance``: the same for a uniformly random pick;
    * ``ties``: scoring → mixed sets whose top-scored group holds a right and a wrong step within ``tol``;
      ``all_tied``: sets where every sibling's score agrees within ``tol``;
    * ``step_auroc`` (+ ``_ci``): scoring → AUROC of the score for step correctness over distinct siblings;
    * ``uncertainty_auroc``: measure → AUROC of minus the step uncertainty (``step_uncertainty``: first-token,
      mean or largest token entropy) for step correctness over distinct siblings: which measure tells adaptive
      CaT where the policy is likely wrong, i.e. where to branch;
    * ``entropy``: mean step entropy of right and wrong siblings and their gap (wrong − right);
    * ``divergence``: where wrong siblings leave the closest right one (median relative position, share of
      one-character differences, a 10-bin histogram of the relative position);
    * ``errors``: the critic's reasons for wrong siblings, and ``error_kinds`` grouped by ``error_kind``.
    """
    uniq = [distinct(s) for s in sets]
    mixed = [s for s in uniq if is_mixed(s)]
    flat = [x for s in uniq for x in s]
    out: dict = {
        "sets": len(uniq),
        "mixed_sets": len(mixed),
        "siblings": sum(len(s) for s in sets),
        "distinct_siblings": len(flat),
        "distinct_correct": sum(x.correct for x in flat),
        "scorings": list(scorings),
        "tie_tolerance": tol,
    }
    chance = [sum(x.correct for x in s) / len(s) for s in mixed]
    out["chance"] = _mean(chance)
    out["chance_ci"] = _mean_ci(chance, seed)
    out["sibling_ranking"], out["sibling_ranking_ci"], out["ties"], out["all_tied"] = {}, {}, {}, {}
    out["step_auroc"], out["step_auroc_ci"] = {}, {}
    labels = [x.correct for x in flat]
    for sc in scorings:
        picks = [top_choice(s, sc, tol) for s in mixed]
        p = [q for q, _, _ in picks]
        out["sibling_ranking"][sc] = _mean(p)
        out["sibling_ranking_ci"][sc] = _mean_ci(p, seed)
        out["ties"][sc] = sum(t for _, t, _ in picks)
        out["all_tied"][sc] = sum(a for _, _, a in picks)
        scores = [score(x, sc) for x in flat]
        out["step_auroc"][sc] = _nan_to_none(metrics.auroc(scores, labels)) if flat else None
        out["step_auroc_ci"][sc] = _ci(stats.bootstrap_interval(metrics.auroc, [scores, labels], seed=seed)) if flat else [None, None]
    # where to branch: how well each step-uncertainty measure flags wrong steps (AUROC of -u for correctness)
    out["uncertainty_auroc"] = {
        m: (_nan_to_none(metrics.auroc([-step_uncertainty(m, x.token_entropies) for x in flat], labels)) if flat else None) for m in UNCERTAINTIES
    }
    h_right = [mean_entropy(x.token_entropies) for x in flat if x.correct]
    h_wrong = [mean_entropy(x.token_entropies) for x in flat if not x.correct]
    out["entropy"] = {
        "correct": _mean(h_right),
        "incorrect": _mean(h_wrong),
        "gap": _nan_to_none(metrics.entropy_gap(h_right + h_wrong, [True] * len(h_right) + [False] * len(h_wrong))) if flat else None,
    }
    divs = []
    for s in mixed:
        right = [x.text.strip() for x in s if x.correct]
        divs += [divergence(x.text.strip(), right) for x in s if not x.correct]
    rel = sorted(d.relative for d in divs)
    hist = Counter(min(9, int(r * 10)) for r in rel)
    out["divergence"] = {
        "wrong_siblings": len(divs),
        "median_relative_position": rel[len(rel) // 2] if rel else None,
        "one_character": sum(d.one_character for d in divs),
        "histogram": [hist.get(i, 0) for i in range(10)],
    }
    reasons = Counter(x.reason for x in flat if not x.correct)
    out["errors"] = dict(reasons.most_common())
    if error_kind is not None:
        kinds = Counter()
        for r, n in reasons.items():
            kinds[error_kind(r)] += n
        out["error_kinds"] = dict(kinds.most_common())
    return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _nan_to_none(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _ci(pair: tuple[float, float]) -> list[float | None]:
    return [_nan_to_none(pair[0]), _nan_to_none(pair[1])]


def _mean_ci(values: Sequence[float], seed: int) -> list[float | None]:
    if len(values) < 2:
        return [None, None]
    return _ci(stats.bootstrap_interval(lambda v: float(v.mean()), [values], seed=seed))
