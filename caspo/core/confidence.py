"""Token entropy and step confidence (paper eq. 2 and eq. 4; docs/design.md §5).

Every entropy and confidence in the project is computed here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from caspo.core.steps import answer_span


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


def topk_entropy_estimates(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[float]:
    """What a top-k engine (vLLM) reports as each position's entropy, computed from full logits (N, V): the
    position's top-k log-probs together with the given token's (vLLM returns both) put through
    :func:`topk_entropy_estimate` with the vocabulary size V. For measuring the estimate's bias against
    :func:`token_entropy` on the same positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    vocab = logp.shape[-1]
    top = logp.topk(min(k, vocab), dim=-1).indices
    out = []
    for row, ids, t in zip(logp, top.tolist(), token_ids.tolist()):
        keep = dict.fromkeys(ids + [int(t)])  # the top k and the token, each once
        out.append(topk_entropy_estimate(row[list(keep)].tolist(), vocab))
    return out


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


def mean_probability(logprobs: Sequence[float]) -> float:
    """Arithmetic mean of the token probabilities exp(log p) (1 for no tokens)."""
    return float(sum(math.exp(lp) for lp in logprobs) / len(logprobs)) if len(logprobs) else 1.0


def answer_confidence(step: str, token_logprobs: Sequence[float]) -> float:
    """CRew's training-free reward ("Confidence as a Reward", 2025): the mean probability of the tokens
    that write the final answer of ``step``, and of those only.

    ``token_logprobs`` are a step's tokens as every backend reports them: the tokens of its text, then
    the one token that ended it (the step delimiter, or EOS), which the step's length L counts. The
    answer's tokens are located among the text's tokens (all but that last one) by the answer's share of
    the step's characters (exact for a character-level tokenizer such as the built-in model's, close for
    BPE); the end token is never part of the window. A step that states no answer (a path still
    unfinished) gets the mean probability of all its tokens; no tokens, 1."""
    lps = [float(x) for x in token_logprobs]
    span = answer_span(step)
    n = len(lps) - 1  # the text's tokens; the last one ended the step
    if span is None or n < 1 or not step:
        return mean_probability(lps)
    lo = min(n - 1, int(n * span[0] / len(step)))
    hi = max(lo + 1, min(n, round(n * span[1] / len(step))))
    return mean_probability(lps[lo:hi])


# ---- scorings: how a path (a sequence of steps) is scored; one registry, one code path -------------------
@dataclass(frozen=True)
class StepSignal:
    """What a scoring may read about one step: its token entropies and log-probs, whether it states the
    final answer, and (only for ``critic``) the critic's probability that it is a correct next step."""

    token_entropies: tuple[float, ...]
    token_logprobs: tuple[float, ...]
    final: bool = False
    verdict: float | None = None
    text: str = ""  # the step's text: ``crew`` reads where its final answer is written


GROUP_WINDOW = 16  # tokens per sliding window of ``group`` (DeepConf uses 2,048 for long chains; a tiny step is ~8)
CRITIC_FLOOR = 1e-6  # a step the critic rejects multiplies C by this (log: -13.8), so any τ > 1e-6 prunes it

SCORINGS = ("entropy", "logprob", "product", "crew", "gmean", "group", "critic")
# scorings whose path score is a product of per-step multipliers <= 1: it never grows as a path gets
# longer (what CaT's early stop relies on)
CUMULATIVE = ("entropy", "logprob", "product", "critic")
# scorings that read nothing but the policy's own probabilities (``critic`` needs a verifier)
INTRINSIC = tuple(s for s in SCORINGS if s != "critic")
# scorings that tell apart siblings of one step (``caspo diagnose``): ``gmean`` of one step is ``entropy``
STEP_SCORINGS = ("entropy", "logprob", "product", "crew", "group")
# what each scoring is, one line each (the CLI's help and the docs quote these)
SCORING_DOC = {
    "entropy": "paper eq. 2/4: C = prod_j exp(-mean_l H_jl)",
    "logprob": "C = prod_j exp(mean_l log p_jl) (per-step geometric-mean token probability)",
    "product": "entropy x logprob",
    "crew": "token confidence in the final answer: mean p over the tokens that write it (the latest step's tokens while unfinished)",
    "gmean": "length-normalised entropy confidence: geometric mean of the steps' exp(-mean H)",
    "group": "DeepConf: lowest sliding-window mean of -H over the path's tokens, as exp (window GROUP_WINDOW)",
    "critic": "verifier-guided: prod_j critic verdict_j (a rejected step counts CRITIC_FLOOR); not intrinsic",
}


def check_scoring(scoring: str, field: str = "scoring") -> str:
    if scoring not in SCORINGS:
        raise ValueError(f"{field} must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    return scoring


def log_path_score(scoring: str, steps: Sequence[StepSignal], window: int = GROUP_WINDOW) -> float:
    """log of a path's confidence in (0, 1] under ``scoring`` (0 for an empty path). Every scoring of a
    path, a step (a one-step path) or a finished solution in the project is this function.

    * ``entropy``  sum_j -mean_l H_jl                          (log of the paper's C = prod exp(-mean H))
    * ``logprob``  sum_j mean_l log p_jl
    * ``product``  entropy + logprob
    * ``crew``     log mean_l p_l over the tokens of the last step: the final-answer step once the path
                   has one ("Confidence as a Reward": the model's token confidence in its answer)
    * ``gmean``    (1/J) sum_j -mean_l H_jl                    (geometric mean of the entropy multipliers)
    * ``group``    min over windows w of mean_{l in w} -H_l, windows of ``window`` consecutive tokens of
                   the whole path (one window when the path is shorter); DeepConf's lowest group
                   confidence with the full-vocabulary -H in place of its top-k mean log-prob
    * ``critic``   sum_j log max(verdict_j, CRITIC_FLOOR)
    """
    if not steps:
        return 0.0
    if scoring == "entropy":
        return sum(-mean_entropy(s.token_entropies) for s in steps)
    if scoring == "logprob":
        return sum(log_likelihood_multiplier(s.token_logprobs) for s in steps)
    if scoring == "product":
        return sum(-mean_entropy(s.token_entropies) + log_likelihood_multiplier(s.token_logprobs) for s in steps)
    if scoring == "crew":
        return math.log(answer_confidence(steps[-1].text, steps[-1].token_logprobs))
    if scoring == "gmean":
        return sum(-mean_entropy(s.token_entropies) for s in steps) / len(steps)
    if scoring == "group":
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        h = [x for s in steps for x in s.token_entropies]
        if not h:
            return 0.0
        if len(h) <= window:
            return -sum(h) / len(h)
        run = sum(h[:window])
        worst = run
        for i in range(window, len(h)):
            run += h[i] - h[i - window]
            worst = max(worst, run)
        return -worst / window
    if scoring == "critic":
        out = 0.0
        for s in steps:
            if s.verdict is None:
                raise ValueError("scoring critic needs a critic's verdict on every step (run the search through a judged proposer)")
            out += math.log(max(float(s.verdict), CRITIC_FLOOR))
        return out
    check_scoring(scoring)
    raise AssertionError(scoring)


def log_step_score(scoring: str, entropies: Sequence[float], logprobs: Sequence[float], final: bool = False, verdict: float | None = None, text: str = "") -> float:
    """A single step scored as a one-step path (sibling ranking): for ``entropy``, ``logprob`` and
    ``product`` exactly the step's multiplier log c."""
    return log_path_score(scoring, [StepSignal(tuple(entropies), tuple(logprobs), final, verdict, text)])


# ---- step uncertainty: where adaptive CaT branches ------------------------------------------------------
UNCERTAINTIES = ("first_entropy", "mean_entropy", "max_entropy")


def step_uncertainty(measure: str, entropies: Sequence[float]) -> float:
    """How unsure the policy was while writing a step, in nats: the entropy of its first token (a property
    of the prefix alone: every sibling shares it), the mean, or the largest token entropy. 0 for no tokens."""
    if measure not in UNCERTAINTIES:
        raise ValueError(f"uncertainty must be one of {', '.join(UNCERTAINTIES)}, got {measure!r}")
    if not len(entropies):
        return 0.0
    if measure == "first_entropy":
        return float(entropies[0])
    if measure == "mean_entropy":
        return mean_entropy(entropies)
    return float(max(entropies))

