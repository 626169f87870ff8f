"""How far a round of training moved a policy (issue 15's per-round diagnostics), as plain formulas.

* ``relative_change``: ‖θ_new − θ_old‖ / ‖θ_old‖ over all parameters;
* ``mean_token_kl``: mean over positions of KL(p_new ‖ p_old) of the next-token distributions;
* ``logprob_change``: the mean change of a set of sequence log-probs (chosen or rejected steps of a
  round's pairs: likelihood displacement shows as the chosen steps' change falling below zero).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

__all__ = ["relative_change", "mean_token_kl", "logprob_change"]


def relative_change(old: Iterable[torch.Tensor], new: Iterable[torch.Tensor]) -> float:
    """‖new − old‖₂ / ‖old‖₂ over matching parameter tensors (nan when ``old`` is all zero)."""
    diff = base = 0.0
    for a, b in zip(old, new, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"parameter shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        a, b = a.detach().double(), b.detach().double()
        diff += float(((b - a) ** 2).sum())
        base += float((a**2).sum())
    return math.sqrt(diff) / math.sqrt(base) if base > 0 else float("nan")


def mean_token_kl(new_logits: torch.Tensor, old_logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over the positions where ``mask`` is true of KL(softmax(new) ‖ softmax(old)), in nats."""
    if new_logits.shape != old_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(new_logits.shape)} vs {tuple(old_logits.shape)}")
    lp_new = torch.log_softmax(new_logits.double(), dim=-1)
    lp_old = torch.log_softmax(old_logits.double(), dim=-1)
    kl = (lp_new.exp() * (lp_new - lp_old)).sum(-1)
    m = mask.bool()
    return float(kl[m].mean()) if m.any() else float("nan")


def logprob_change(before: Sequence[float], after: Sequence[float]) -> float:
    """Mean of after − before over matching sequences (nan for none)."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} log-probs before and {len(after)} after")
    return sum(b - a for a, b in zip(before, after)) / len(before) if before else float("nan")
