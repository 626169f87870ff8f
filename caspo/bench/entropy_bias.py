"""Suite ``entropy``: the bias of the top-k entropy estimate (what the vLLM backend reports) against the exact
full-vocabulary entropy of paper eq. 2, on the same steps.

Steps are sampled by the model (temperature 0.7, ``k`` siblings per arithmetic question), then one teacher-forced
pass (:func:`caspo.models.hf.teacher_forced`) gives at every step token the exact entropy and the estimate from the
top-k log-probs plus the token's own (what vLLM returns), the tail spread uniformly over the rest of the vocabulary
(:func:`caspo.core.confidence.topk_entropy_estimate`). Per k: the token-level bias (estimate − exact, nats), the
bias of the step confidence −mean H that CASPO thresholds with τ, and how often the estimate orders two siblings'
confidences differently from the exact values.
"""

from __future__ import annotations

import statistics

from caspo.bench.common import SuiteResult, percentile, suite_model
from caspo.core.confidence import mean_entropy
from caspo.models.factory import make_backend
from caspo.models.hf import HFBackend, teacher_forced
from caspo.models.prompting import prompter_for_backend
from caspo.tasks import get_task

COLUMNS = ["k", "vocab", "steps", "tokens", "exact_H", "estimate_H", "token_bias_mean", "token_bias_p90", "token_bias_max", "confidence_bias_mean", "confidence_bias_p90", "sibling_order_flips"]


def run(n: int, k: int = 4, topks=(20, 5), model: str = "tiny-chat", engine: str = "hf", seed: int = 0, temperature: float = 0.7, progress: bool = True) -> SuiteResult:
    task = get_task("arith")
    backend = make_backend(suite_model(model, "hf"))  # the exact values need the full logits: the HF backend
    if not isinstance(backend, HFBackend):
        raise TypeError("the entropy suite measures on the HF backend")
    prompter = prompter_for_backend(backend, task)
    problems = task.problems(n, seed=seed, split="test")
    prompts = [prompter(p.question) for p in problems]
    groups = backend.sample_steps(prompts, k, temperature, seeds=[seed + i for i in range(len(prompts))])
    tok = backend.tokenizer
    vocab = int(backend.model.get_output_embeddings().weight.shape[0])
    rows = []
    for topk in topks:
        token_bias, conf_bias, flips, pairs, exact_h, est_h = [], [], 0, 0, [], []
        for prompt, group in zip(prompts, groups):
            texts = [s.text for s in group if s.text]
            if not texts:
                continue
            seqs, spans = backend.step_sequences([prompt] * len(texts), texts)
            scored = teacher_forced(backend.model, seqs, spans, tok.pad_token_id, topk=topk)
            confs = []
            for h, _, est in scored:
                token_bias += [e - x for e, x in zip(est, h)]
                exact_h += h
                est_h += est
                confs.append((-mean_entropy(h), -mean_entropy(est)))
                conf_bias.append(confs[-1][1] - confs[-1][0])
            for i in range(len(confs)):
                for j in range(i + 1, len(confs)):
                    dx, de = confs[i][0] - confs[j][0], confs[i][1] - confs[j][1]
                    if dx != 0:
                        pairs += 1
                        flips += (dx > 0) != (de > 0)
        rows.append({
            "k": topk, "vocab": vocab, "steps": len(conf_bias), "tokens": len(token_bias),
            "exact_H": statistics.fmean(exact_h), "estimate_H": statistics.fmean(est_h),
            "token_bias_mean": statistics.fmean(token_bias), "token_bias_p90": percentile(token_bias, 0.9), "token_bias_max": max(token_bias),
            "confidence_bias_mean": statistics.fmean(conf_bias), "confidence_bias_p90": percentile([abs(b) for b in conf_bias], 0.9),
            "sibling_order_flips": flips / pairs if pairs else 0.0,
        })
    return SuiteResult(
        suite="entropy",
        title=f"Top-k entropy estimate against exact eq. 2 entropy ({model}, {n} questions x {k} sampled steps)",
        command=f"caspo bench --suite entropy --model {model} -n {n}",
        rows=rows,
        columns=COLUMNS,
        notes=[
            "estimate: the top-k log-probs and the token's own, tail mass spread uniformly over the other vocab entries (vLLM backend, scorer.entropy topk)",
            "token_bias = estimate - exact (nats, >= 0: the estimate is an upper bound); confidence_bias = estimated - exact step confidence (-mean H); p90 of its size",
            "sibling_order_flips: share of sibling pairs whose confidences the estimate orders the other way round",
        ],
    )


def plot(plt, res: SuiteResult):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([str(r["k"]) for r in res.rows], [r["token_bias_mean"] for r in res.rows], label="mean token bias")
    ax.bar([str(r["k"]) for r in res.rows], [r["confidence_bias_p90"] for r in res.rows], alpha=0.5, label="p90 |confidence bias|")
    ax.set(xlabel="top-k", ylabel="nats", title=res.title[:60])
    ax.legend()
    return fig
