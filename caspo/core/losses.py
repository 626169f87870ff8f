"""Preference losses the DPO trainer adds to TRL's (which has sigmoid DPO, IPO and an NLL term itself).

Inputs are per-sequence log-ratios of the policy to the reference, ``log pi(y) - log pi_ref(y)``
summed over the completion's tokens, for the chosen and the rejected completion of each pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpop_penalty(chosen_logratio: torch.Tensor, lam: float) -> torch.Tensor:
    """DPO-Positive's term (Pal et al. 2024, "Smaug", eq. 3): ``lam * max(0, log pi_ref(y_w) - log pi(y_w))``.

    Zero while the chosen completion is at least as likely as under the reference; it grows as the chosen
    log-prob falls below the reference's, which plain DPO allows whenever the rejected one falls faster
    (likelihood displacement: with minimal pairs, both share most tokens and fall together)."""
    return lam * torch.relu(-chosen_logratio)


def dpop_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float, lam: float) -> torch.Tensor:
    """Per-pair DPOP loss: ``-log sigmoid(beta * (chosen - rejected - dpop_penalty(chosen)))``; with ``lam``
    0 it is the sigmoid DPO loss of the paper."""
    return -F.logsigmoid(beta * (chosen_logratio - rejected_logratio - dpop_penalty(chosen_logratio, lam)))
