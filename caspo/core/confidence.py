"""Token entropy and step confidence (paper eq. 2 and eq. 4; DESIGN §4).

Every entropy and confidence in the project is computed here and nowhere else.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def token_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Full-vocabulary Shannon entropy in nats, H = -sum p log p, over the last dimension.

    ``logits``: (..., V), the raw logits the sampler saw (before temperature). Computed via
    log_softmax in float32 so huge or -inf logits stay finite. ``mask`` (same leading shape, 1 = real
    token) zeroes padded positions, whatever their logits hold (NaN too). O(V) per token.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    # p*logp with p == 0 is 0; where logp is -inf, torch gives nan for 0*-inf, so use xlogy-style guard
    p = logp.exp()
    h = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    if mask is not None:
        h = _masked(h, mask)
    return h


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(token) of the given tokens under the logits (..., V), padded positions zeroed."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    if mask is not None:
        lp = _masked(lp, mask)
    return lp


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` with padded positions set to 0; a select, since multiplying by 0 keeps NaN and inf."""
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def topk_entropy_estimate(logprobs: Sequence[float], vocab_size: int | None = None) -> float:
    """Entropy in nats of one position estimated from the top-k log-probs alone (what vLLM returns).

    The known tokens contribute their exact -sum p log p. The leftover mass r = 1 - sum p (clamped
    at 0) is the tail, whose shape is unknown:

    * without ``vocab_size`` the tail counts as a single token, -r log r. Concentrating the mass gives
      the least entropy, so the estimate is a **lower bound** on the full-vocabulary entropy.
    * with ``vocab_size`` V the tail is spread uniformly over the other V - k tokens,
      -r log(r / (V - k)). Given the true top-k values that is the largest entropy any distribution
      with that top-k can have, so the estimate is an **upper bound**; it overshoots by the tail's
      distance from uniform, which is small when r is small (a peaked distribution).

    Both bounds tighten as k grows and equal the exact entropy once the k tokens cover the
    vocabulary. Entries of -inf (p = 0) are ignored; duplicated token ids must be removed by the
    caller. Exact values come from :func:`token_entropy` on the full logits.
    """
    known = 0.0
    mass = 0.0
    k = 0
    for lp in logprobs:
        lp = float(lp)
        k += 1
        if lp == float("-inf"):
            continue
        p = math.exp(lp)
        mass += p
        known -= p * lp
    rest = max(0.0, 1.0 - mass)
    if rest <= 1e-12:
        return known
    if vocab_size is None:
        return known - rest * math.log(rest)
    others = vocab_size - k
    if others <= 0:  # the k tokens are the whole vocabulary: the leftover is rounding error
        return known
    return known - rest * math.log(rest / others)


def verdict_probability(logprob_yes: float, logprob_no: float) -> float:
    """P(yes) of a judge's Yes/No verdict from the log-probabilities of the two answers' first tokens,
    renormalised over the two: ``p_yes / (p_yes + p_no)``. NaN when neither has any probability."""
    if logprob_yes == -math.inf and logprob_no == -math.inf:
        return math.nan
    m = max(logprob_yes, logprob_no)
    a, b = math.exp(logprob_yes - m), math.exp(logprob_no - m)
    return a / (a + b)


def mean_entropy(entropies: Sequence[float]) -> float:
    """Mean token entropy of a step; an empty step has no uncertainty to report (0)."""
    return float(sum(entropies) / len(entropies)) if len(entropies) else 0.0


def step_confidence(entropies: Sequence[float]) -> float:
    """Paper eq. 2: confidence(s|q) = -mean_l H_l (≤ 0; higher is more confident)."""
    return -mean_entropy(entropies)


def step_multiplier(entropies: Sequence[float]) -> float:
    """CaT multiplier c = exp(-mean_l H_l) ∈ (0, 1] (paper eq. 4)."""
    return math.exp(-mean_entropy(entropies))


def log_step_multiplier(entropies: Sequence[float]) -> float:
    """log c = -mean entropy: cumulative confidence is kept as a sum of these (log space)."""
    return -mean_entropy(entropies)


def log_likelihood_multiplier(logprobs: Sequence[float]) -> float:
    """log of exp(mean log p(token)): the per-step likelihood score used by ``logprob`` scoring."""
    return float(sum(logprobs) / len(logprobs)) if len(logprobs) else 0.0


SCORINGS = ("entropy", "logprob", "product")


def log_step_score(scoring: str, entropies: Sequence[float], logprobs: Sequence[float]) -> float:
    """log of a step's multiplier under a scoring: ``entropy`` (paper), ``logprob`` or their ``product``."""
    if scoring == "entropy":
        return log_step_multiplier(entropies)
    if scoring == "logprob":
        return log_likelihood_multiplier(logprobs)
    if scoring == "product":
        return log_step_multiplier(entropies) + log_likelihood_multiplier(logprobs)
    raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")


def cumulative_confidence(log_multipliers: Sequence[float]) -> float:
    """C = prod c, computed from log c values (so long chains do not underflow to 0 early)."""
    return math.exp(sum(log_multipliers))
