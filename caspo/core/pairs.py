"""Preference pairs from judged steps: the three-case rule of Algorithm 1 (docs/design.md §5, "Pairs").

For a sub-question ``prompt`` (question + steps so far along the corrected trajectory) and the
policy's step ``s`` with step confidence ``c`` (paper eq. 2, ``-mean entropy``, so ``c <= 0``):

1. ``s`` correct and ``c > tau``  -> skip (the model is already right and sure);
2. ``s`` correct and ``c <= tau`` -> (chosen = ``s``, rejected = the most likely sampled competitor
   the critic judges incorrect); skip when there is none;
3. ``s`` incorrect                -> (chosen = the critic's reference step, rejected = ``s``).

``tau`` is on the same scale as ``c`` (a non-positive negated mean entropy), usually a quantile of
the round's step confidences (:func:`tau_from_quantile`).

A :class:`Pair` keeps this one form from the rule that builds it to the DPO trainer that reads it;
only the gRPC and Redis boundaries turn it into something else and back.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


__all__ = [
    "CASE_UNSURE_CORRECT",
    "CASE_INCORRECT",
    "CASE_TRAJECTORY",
    "CASES",
    "SKIP_CONFIDENT",
    "SKIP_NO_COMPETITOR",
    "Candidate",
    "Pair",
    "Skip",
    "build_pair",
    "Solution",
    "solution_pair",
    "SKIP_ALL_CORRECT",
    "SKIP_ALL_WRONG",
    "tau_from_quantile",
    "resolve_tau",
    "pair_key",
]

CASE_UNSURE_CORRECT = "correct_unsure"
CASE_INCORRECT = "incorrect"
CASE_TRAJECTORY = "trajectory"  # the control run's pairs: the most likely right vs the most likely wrong full solution
CASE_CREW = "crew"  # CRew-DPO: the most answer-confident correct vs the most answer-confident wrong solution
CASES = (CASE_UNSURE_CORRECT, CASE_INCORRECT, CASE_TRAJECTORY, CASE_CREW)

SKIP_CONFIDENT = "skip_confident_correct"
SKIP_NO_COMPETITOR = "skip_no_incorrect_competitor"


@dataclass(frozen=True)
class Candidate:
    """A sampled competing step: its text, the critic's judgement, and its total log-prob under the policy."""

    text: str
    correct: bool
    logprob: float


@dataclass(frozen=True)
class Pair:
    """One DPO preference pair; ``case`` is one of ``CASES``.

    ``confidence`` is the policy step's eq. 2 confidence and ``tau`` the threshold it was compared to.
    The lineage — ``policy_version`` that wrote the step, ``question_id``, ``critic`` that judged it —
    is known once the round is (the three-case rule leaves it empty). ``key`` names the pair by its
    content alone, so the same pair put twice is stored once.
    """

    prompt: str
    chosen: str
    rejected: str
    case: str
    confidence: float
    tau: float
    policy_version: int = 0
    question_id: str = ""
    critic: str = ""

    @property
    def key(self) -> str:
        return pair_key(self)


@dataclass(frozen=True)
class Skip:
    """No pair for this step; ``reason`` is SKIP_CONFIDENT or SKIP_NO_COMPETITOR."""

    reason: str


def _check_number(value: float, name: str) -> float:
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must not be nan")
    return v


def build_pair(
    prompt: str,
    step: str,
    correct: bool,
    confidence: float,
    competitors: Sequence[Candidate],
    reference: str,
    tau: float,
) -> Pair | Skip:
    """Apply the three-case rule to one judged step and return a :class:`Pair` or a :class:`Skip`.

    ``confidence`` is the paper's eq. 2 step confidence (``-mean token entropy``, <= 0) and ``tau`` is
    on the same scale. Case 2 rejects the competitor with the highest ``logprob`` among those judged
    incorrect whose text differs from ``step`` (compared after stripping whitespace); ties go to the
    first one. ``reference`` is only used in case 3, where a reference equal to ``step`` (the critic
    disagreeing with itself) or an empty reference is a ValueError.
    """
    confidence = _check_number(confidence, "confidence")
    tau = _check_number(tau, "tau")

    if correct:
        if confidence > tau:
            return Skip(reason=SKIP_CONFIDENT)
        step_key = step.strip()
        best: Candidate | None = None
        for cand in competitors:
            if cand.correct or cand.text.strip() == step_key:
                continue
            lp = _check_number(cand.logprob, "competitor logprob")
            if best is None or lp > best.logprob:  # strict: first occurrence wins ties
                best = cand
        if best is None:
            return Skip(reason=SKIP_NO_COMPETITOR)
        return Pair(
            prompt=prompt,
            chosen=step,
            rejected=best.text,
            case=CASE_UNSURE_CORRECT,
            confidence=confidence,
            tau=tau,
        )

    if not reference.strip():
        raise ValueError("step is judged incorrect but the critic's reference step is empty")
    if reference.strip() == step.strip():
        raise ValueError(
            f"step is judged incorrect but equals the critic's reference step: {step.strip()!r}"
        )
    return Pair(
        prompt=prompt,
        chosen=reference,
        rejected=step,
        case=CASE_INCORRECT,
        confidence=confidence,
        tau=tau,
    )


@dataclass(frozen=True)
class Solution:
    """A sampled full solution of a question: its text, whether its final answer is right, a score."""

    text: str
    correct: bool
    score: float


SKIP_ALL_CORRECT = "all_correct"
SKIP_ALL_WRONG = "all_wrong"


def solution_pair(solutions: Sequence[Solution]) -> tuple[Solution, Solution] | Skip:
    """(chosen, rejected) among one question's sampled solutions: the highest-scored correct one and
    the highest-scored wrong one (ties to the first). The trajectory control scores a solution by its
    mean token log-prob; CRew-DPO by its confidence in the final answer (``confidence.answer_confidence``),
    so its rejected solution is the one the model was surest of while wrong."""
    best: dict[bool, Solution] = {}
    for sol in solutions:
        if not sol.text.strip():
            continue
        _check_number(sol.score, "solution score")
        if sol.correct not in best or sol.score > best[sol.correct].score:
            best[sol.correct] = sol
    if True not in best:
        return Skip(reason=SKIP_ALL_WRONG)
    if False not in best:
        return Skip(reason=SKIP_ALL_CORRECT)
    return best[True], best[False]


def tau_from_quantile(confidences: Sequence[float], q: float) -> float:
    """The ``q``-quantile (numpy linear interpolation) of a round's step confidences."""
    qf = float(q)
    if not (0.0 <= qf <= 1.0):  # also rejects nan
        raise ValueError(f"quantile q must be in [0, 1], got {q!r}")
    arr = np.asarray(list(confidences), dtype=float)
    if arr.size == 0:
        raise ValueError("cannot take a quantile of an empty set of confidences")
    if np.isnan(arr).any():
        raise ValueError("confidences must not contain nan")
    return float(np.quantile(arr, qf, method="linear"))


def resolve_tau(confidences: Sequence[float], tau: float | None, quantile: float) -> float:
    """``tau`` when set explicitly, else :func:`tau_from_quantile` of ``confidences`` at ``quantile``."""
    if tau is not None:
        return _check_number(tau, "tau")
    return tau_from_quantile(confidences, quantile)


def pair_key(pair: Pair) -> str:
    """Stable content hash of a pair: sha256 hex of canonical JSON of prompt/chosen/rejected."""
    canonical = json.dumps(
        {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected},
        sort_keys=True,
        ensure_ascii=True,  # escapes non-ASCII, so any str (even lone surrogates) encodes
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
