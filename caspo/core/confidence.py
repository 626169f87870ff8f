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
    token) zeroes padded positions. O(V) per token.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    # p*logp with p == 0 is 0; where logp is -inf, torch gives nan for 0*-inf, so use xlogy-style guard
    p = logp.exp()
    h = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    if mask is not None:
        h = h * mask.to(h.dtype)
    return h


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(token) of the given tokens under the logits (..., V), padded positions zeroed."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    if mask is not None:
        lp = lp * mask.to(lp.dtype)
    return lp


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
