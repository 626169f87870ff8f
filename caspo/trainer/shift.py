"""What a round of DPO did to the policy, measured on the driver after training (``loop.drift``):
the log-prob change of the round's chosen and rejected steps, the relative weight change, and the KL
to the previous policy on held-out gold solutions. The formulas are ``caspo.core.drift``'s."""

from __future__ import annotations

import random
from typing import Sequence

import torch

from caspo.core.drift import logprob_change, mean_token_kl, relative_change
from caspo.core.pairs import Pair
from caspo.models.hf import load_model

__all__ = ["round_drift"]


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def _logits(model, tok, texts: Sequence[tuple[str, str]], batch: int = 64):
    """For (prompt, completion) pairs: per batch, the logits, the completion mask and the ids."""
    for chunk in _batches(list(texts), batch):
        seqs, masks = [], []
        for prompt, completion in chunk:
            p = tok.encode(prompt, add_special_tokens=False)
            c = tok.encode(completion, add_special_tokens=False)
            seqs.append(p + c)
            masks.append([0] * len(p) + [1] * len(c))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        cm = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, (s, m) in enumerate(zip(seqs, masks)):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
            cm[i, : len(s)] = torch.tensor(m, dtype=torch.bool)
        logits = model(input_ids=ids.to(model.device), attention_mask=att.to(model.device)).logits.float().cpu()
        # the logits at position t predict token t+1: shift so that each completion token has its row
        yield logits[:, :-1], cm[:, 1:], ids[:, 1:]


def _seq_logprobs(model, tok, texts) -> list[float]:
    out = []
    for logits, mask, ids in _logits(model, tok, texts):
        lp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        out += (lp * mask).sum(-1).tolist()
    return out


def _kl(new, old, tok, texts) -> float:
    total, count = 0.0, 0
    for (ln, mask, _), (lo, _, _) in zip(_logits(new, tok, texts), _logits(old, tok, texts)):
        n = int(mask.sum())
        if n:
            total += mean_token_kl(ln, lo, mask) * n
            count += n
    return total / count if count else float("nan")


def round_drift(
    old_path: str,
    new_path: str,
    pairs: Sequence[Pair],
    heldout: Sequence[tuple[str, str]],
    delimiter: str = "\n",
    max_pairs: int = 512,
    seed: int = 0,
) -> dict:
    """``chosen_logp_change`` / ``rejected_logp_change`` (mean over up to ``max_pairs`` of the round's pairs,
    nats per step), ``chosen_fell`` (the share of pairs whose chosen step got less likely), ``margin_change``,
    ``weight_change`` (relative), ``kl_heldout`` (mean per token of KL(new ‖ old) on ``heldout``
    (prompt, solution) texts)."""
    old, tok = load_model(old_path, "cpu")
    new, _ = load_model(new_path, "cpu")
    sample = list(pairs)
    if len(sample) > max_pairs:
        sample = random.Random(seed).sample(sample, max_pairs)
    chosen = [(p.prompt, p.chosen.strip() + delimiter) for p in sample]
    rejected = [(p.prompt, p.rejected.strip() + delimiter) for p in sample]
    c0, c1 = _seq_logprobs(old, tok, chosen), _seq_logprobs(new, tok, chosen)
    r0, r1 = _seq_logprobs(old, tok, rejected), _seq_logprobs(new, tok, rejected)
    return {
        "drift_pairs": len(sample),
        "chosen_logp_change": logprob_change(c0, c1),
        "rejected_logp_change": logprob_change(r0, r1),
        "margin_change": logprob_change([a - b for a, b in zip(c0, r0)], [a - b for a, b in zip(c1, r1)]),
        "chosen_fell": sum(b < a for a, b in zip(c0, c1)) / len(c0) if c0 else float("nan"),
        "weight_change": relative_change(old.parameters(), new.parameters()),
        "kl_heldout": _kl(new, old, tok, list(heldout)),
    }
