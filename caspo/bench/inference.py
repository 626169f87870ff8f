"""Suite ``inference``: greedy vs self-consistency@K vs best-of-K vs CaT@K at equal budget K.

The same held-out problems, the same model and the same search code for every method; accuracy,
latency per question (questions batched ``batch`` at a time, the same for all) and tokens generated
per question, with latency and tokens as ratios to greedy measured in the same run. Paper anchor
(Table 5, Qwen2.5-7B, one query at a time): greedy 1.2 s, CaT 2.8 s (2.3x), SC 12.5 s (10.4x).
"""

from __future__ import annotations

from caspo.models.factory import make_backend
from caspo.bench.common import SuiteResult, suite_model
from caspo.core.search import SearchConfig
from caspo.evaluation import compare, evaluate
from caspo.tasks import get_task

COLUMNS = ["method", "k", "scoring", "accuracy", "vs_greedy", "p_mcnemar", "ece", "latency_s", "latency_x_greedy", "tokens", "tokens_x_greedy", "no_answer"]


def run(n: int, ks=(4, 10), model: str = "tiny", engine: str = "hf", seed: int = 0, batch: int = 16, tau: float = 0.5, temperature: float = 0.7, progress: bool = True) -> SuiteResult:
    task = get_task("arith")
    problems = task.problems(n, seed=seed, split="test")
    backend = make_backend(suite_model(model, engine))
    configs = [SearchConfig(method="greedy", seed=seed)]
    for k in ks:
        configs += [
            SearchConfig(method="sc", k=k, temperature=temperature, seed=seed),
            SearchConfig(method="bon", k=k, temperature=temperature, seed=seed),
            SearchConfig(method="cat", k=k, tau=tau, temperature=temperature, scoring="entropy", seed=seed),
            SearchConfig(method="cat", k=k, tau=tau, temperature=temperature, scoring="logprob", seed=seed),
        ]
    evaluate(backend, task, problems[:batch], configs[0], batch=batch)  # warm up: first calls pay one-off costs
    rows, greedy = [], None
    for cfg in configs:
        rep = evaluate(backend, task, problems, cfg, batch=batch, progress=progress, desc=f"{cfg.method}@{cfg.k}/{cfg.scoring}")
        greedy = greedy or rep
        s, d = rep.summary(), compare(greedy, rep)
        rows.append({
            "method": cfg.method, "k": 1 if cfg.method == "greedy" else cfg.k, "scoring": cfg.scoring if cfg.method in ("cat", "bon") else "–",
            **{c: s[c] for c in ("accuracy", "accuracy_ci", "ece", "ece_ci", "latency_s", "tokens", "no_answer")},
            "vs_greedy": d["accuracy"], "vs_greedy_ci": d["accuracy_ci"], "p_mcnemar": d["accuracy_mcnemar_p"],
        })
    g = rows[0]
    for r in rows:
        r["latency_x_greedy"] = r["latency_s"] / g["latency_s"]
        r["tokens_x_greedy"] = r["tokens"] / g["tokens"]
    return SuiteResult(
        suite="inference",
        title=f"Inference at equal budget ({n} held-out problems, tiny reasoner, τ={tau}, T={temperature}, batch {batch})",
        command=f"caspo bench --suite inference -n {n}",
        rows=rows,
        columns=COLUMNS,
        notes=["Paper anchor (Table 5, Qwen2.5-7B, single queries): CaT 2.3x and SC 10.4x greedy latency."],
    )


def plot(plt, res: SuiteResult):
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in res.rows:
        label = f"{r['method']}@{r['k']}" + (f"/{r['scoring']}" if r["scoring"] != "–" else "")
        lo, hi = r["accuracy_ci"]
        err = [[max(0.0, r["accuracy"] - lo)], [max(0.0, hi - r["accuracy"])]]  # float rounding at 0 and 1
        for a, x in ((ax[0], r["latency_x_greedy"]), (ax[1], r["tokens_x_greedy"])):
            a.errorbar([x], [r["accuracy"]], yerr=err, fmt="o", capsize=3)
            a.annotate(label, (x, r["accuracy"]), fontsize=7)
    ax[0].set(xlabel="latency / greedy latency", ylabel="accuracy (95% Wilson interval)", xscale="log", ylim=(0, 1))
    ax[1].set(xlabel="tokens / greedy tokens", ylabel="accuracy (95% Wilson interval)", xscale="log", ylim=(0, 1))
    fig.suptitle(res.title, fontsize=9)
    return fig
