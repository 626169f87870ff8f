"""Suite ``tau``: CaT@K accuracy and tokens against the pruning threshold τ, and a warmup-calibrated τ.

Fixed τ in a grid, then DeepConf-style calibration: run CaT with τ=0 on a few warmup problems (not
the evaluation ones), take the answer branches' cumulative confidences, and set τ to their
``percentile`` (keep the most confident ``1 - percentile`` of answers), then evaluate with that τ.
"""

from __future__ import annotations

from caspo.models.factory import make_backend
from caspo.bench.common import SuiteResult, suite_model, percentile
from caspo.core.search import SearchConfig, run_searches
from caspo.evaluation import evaluate, make_searches
from caspo.models.base import PromptedProposer
from caspo.models.prompting import prompter_for_backend
from caspo.tasks import get_task

COLUMNS = ["tau", "how", "scoring", "accuracy", "no_answer", "tokens", "tokens_x_tau0"]


def run(n: int, k: int = 4, taus=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9), warmup: int = 16, pct: float = 0.1, model: str = "tiny", engine: str = "hf", seed: int = 0, batch: int = 16, scorings=("entropy", "logprob"), progress: bool = True) -> SuiteResult:
    task = get_task("arith")
    problems = task.problems(n, seed=seed, split="test")
    warm = task.problems(warmup, seed=seed + 1_000_003, split="test")
    backend = make_backend(suite_model(model, engine))
    rows = []
    for scoring in scorings:
        base_tokens = None
        cal_cfg = SearchConfig(method="cat", k=k, tau=0.0, scoring=scoring, seed=seed + 1)
        confs = [r.confidence for r in run_searches(make_searches(warm, cal_cfg), PromptedProposer(backend, prompter_for_backend(backend, task))) if r.answer is not None]
        calibrated = min(1.0, max(0.0, percentile(confs, pct)))
        grid = [(t, "fixed") for t in taus] + [(calibrated, f"warmup p{int(pct * 100)} of {len(warm)}")]
        for tau, how in grid:
            cfg = SearchConfig(method="cat", k=k, tau=tau, scoring=scoring, seed=seed)
            rep = evaluate(backend, task, problems, cfg, batch=batch, progress=progress, desc=f"cat/{scoring} tau={tau:.2f}")
            row = {"tau": tau, "how": how, "scoring": scoring, "accuracy": rep.accuracy, "accuracy_ci": rep.summary()["accuracy_ci"], "no_answer": rep.no_answer, "tokens": rep.tokens}
            if base_tokens is None:
                base_tokens = rep.tokens
            row["tokens_x_tau0"] = rep.tokens / base_tokens
            rows.append(row)
    return SuiteResult(
        suite="tau",
        title=f"CaT@{k} against τ ({n} held-out problems, tiny reasoner)",
        command=f"caspo bench --suite tau -n {n}",
        rows=rows,
        columns=COLUMNS,
        notes=["`no_answer`: problems where every branch fell under τ (CaT answers \"no confident answer\"); they count as wrong."],
    )


def plot(plt, res: SuiteResult):
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for scoring in sorted({r["scoring"] for r in res.rows}):
        fixed = [r for r in res.rows if r["scoring"] == scoring and r["how"] == "fixed"]
        cal = [r for r in res.rows if r["scoring"] == scoring and r["how"] != "fixed"]
        ax[0].errorbar([r["tau"] for r in fixed], [r["accuracy"] for r in fixed], yerr=[[max(0.0, r["accuracy"] - r["accuracy_ci"][0]) for r in fixed], [max(0.0, r["accuracy_ci"][1] - r["accuracy"]) for r in fixed]], marker="o", capsize=3, label=f"{scoring} (fixed τ)")
        ax[1].plot([r["tau"] for r in fixed], [r["tokens"] for r in fixed], marker="o", label=f"{scoring} (fixed τ)")
        for r in cal:
            ax[0].scatter([r["tau"]], [r["accuracy"]], marker="*", s=150, label=f"{scoring} (warmup τ)")
            ax[1].scatter([r["tau"]], [r["tokens"]], marker="*", s=150)
    ax[0].set(xlabel="τ", ylabel="accuracy (95% Wilson interval)", ylim=(0, 1))
    ax[1].set(xlabel="τ", ylabel="tokens / question")
    ax[0].legend(fontsize=7)
    fig.suptitle(res.title, fontsize=9)
    return fig
