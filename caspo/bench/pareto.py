"""Suite ``pareto``: accuracy against generated tokens for every search, on one policy and one problem set.

Greedy; self-consistency@K (majority and confidence-weighted vote); best-of-K; CaT as the paper writes
it (Algorithm 2: ``branching always``, entropy confidence) at each τ; adaptive CaT as the config
recommends (the ``cat`` section, with the policy's calibration file when there is one), and at any
further branching thresholds asked for; and the verifier-guided ceiling (``scoring critic``: candidate
steps ranked by the task's exact critic, Algorithm 2's beam of K, τ 0), at each K. For each row: accuracy with its Wilson
95% interval, tokens generated per question, latency per question as a ratio to greedy's (greedy runs
first and last; its mean is the reference), the paired difference from greedy (bootstrap interval and
exact McNemar p, ``caspo.evaluation.compare``), and the share of the critic ceiling's gain over greedy
(at the same K) that the row recovers. The critic's own cost per judged step is in the notes.
"""

from __future__ import annotations

import dataclasses
import os

from caspo.models.calibration_file import find_calibration
from caspo.models.factory import make_backend
from caspo.bench.common import SuiteResult, suite_model
from caspo.config import load_config
from caspo.core.search import SearchConfig
from caspo.evaluation import JudgedProposer, compare, evaluate_with, task_judge
from caspo.models.base import PromptedProposer
from caspo.models.prompting import prompter_for_backend
from caspo.tasks import get_task

# a column's 95% interval, ``<column>_ci`` in each row, is printed beside it (bench.common.markdown)
COLUMNS = ["name", "k", "accuracy", "tokens", "tokens_x_greedy", "latency_x_greedy", "diff_vs_greedy", "mcnemar_p", "ceiling_share", "branch_points", "no_answer"]
DEFAULT_CONFIG = "configs/tiny-cpu.yaml"


def configs(cat, calibration, ks, taus, thresholds, temperature: float, seed: int, critic: bool) -> list[tuple[str, SearchConfig]]:
    """(row name, search) for every row but greedy, in the order they run."""
    out = []
    rec = cat.search_config(calibration, seed=seed)
    for k in ks:
        out += [
            (f"SC@{k}", SearchConfig(method="sc", k=k, temperature=temperature, seed=seed)),
            (f"wSC@{k} {rec.scoring}", SearchConfig(method="wsc", k=k, temperature=temperature, scoring=rec.scoring, seed=seed)),
            (f"BoN@{k} {rec.scoring}", SearchConfig(method="bon", k=k, temperature=temperature, scoring=rec.scoring, seed=seed)),
        ]
        out += [(f"CaT@{k} Alg.2 entropy τ={t:g}", SearchConfig(method="cat", k=k, tau=t, temperature=temperature, scoring="entropy", seed=seed)) for t in taus]
        out.append((f"CaT@{k} adaptive (recommended)", dataclasses.replace(rec, k=k)))
        out += [(f"CaT@{k} adaptive θ={th:g}", dataclasses.replace(rec, k=k, branch_threshold=th)) for th in thresholds]
        if critic:
            # τ 0: the critic ranks (a rejected step sinks below every accepted one) but does not empty the
            # beam, so a problem whose K candidates are all wrong still gets the search's best guess
            out.append((f"CaT@{k} critic (ceiling)", SearchConfig(method="cat", k=k, tau=0.0, temperature=temperature, scoring="critic", seed=seed)))
    return out


def run(
    n: int,
    model: str = "tiny",
    engine: str = "hf",
    seed: int = 0,
    batch: int = 16,
    ks=(4, 8),
    taus=(0.0, 0.5),
    thresholds=(),
    temperature: float = 0.7,
    critic: bool = True,
    task: str = "arith",
    data: str | None = None,
    calibration: str | None = None,
    config: str | None = None,
    progress: bool = True,
) -> SuiteResult:
    cfg = load_config(config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None))
    t = get_task(task, data, cfg.task if cfg.task.name == task else None)
    problems = t.problems(n or None, seed=seed, split="test" if data is None else "any")
    cal = find_calibration(calibration or cfg.cat.calibration, model)
    backend = make_backend(suite_model(model, engine))
    proposer = PromptedProposer(backend, prompter_for_backend(backend, t))  # model.prompt_format, step_delimiter
    judged = JudgedProposer(proposer, task_judge(t, problems))
    greedy_cfg = SearchConfig(method="greedy", seed=seed)
    evaluate_with(proposer, t, problems[:batch], greedy_cfg, batch=batch)  # warm up: first calls pay one-off costs
    greedy = evaluate_with(proposer, t, problems, greedy_cfg, batch=batch, progress=progress, desc="greedy")
    reports = []
    for name, sc in configs(cfg.cat, cal, ks, taus, thresholds, temperature, seed, critic):
        p = judged if sc.scoring == "critic" else proposer
        reports.append((name, sc, evaluate_with(p, t, problems, sc, batch=batch, progress=progress, desc=name)))
    greedy_end = evaluate_with(proposer, t, problems, greedy_cfg, batch=batch, progress=progress, desc="greedy (again)")
    g_latency = (greedy.latency_s + greedy_end.latency_s) / 2
    ceiling = {sc.k: rep.accuracy for _, sc, rep in reports if sc.scoring == "critic"}
    rows = [_row("greedy", 1, greedy, greedy, g_latency, None)]
    for name, sc, rep in reports:
        rows.append(_row(name, sc.k, rep, greedy, g_latency, None if sc.scoring == "critic" else ceiling.get(sc.k)))
    notes = [f"{len(problems)} problems ({'test split, seed ' + str(seed) if data is None else data}); T={temperature}; greedy latency {g_latency * 1000:.1f} ms/question (mean of a run before and after the others: {greedy.latency_s * 1000:.1f}, {greedy_end.latency_s * 1000:.1f})."]
    cal_path = cal.path if cal else None
    notes.append(f"recommended CaT: {_describe(cfg.cat.search_config(cal, seed=seed))}; calibration: {cal_path or 'none (the cat section as is)'}.")
    if judged.judged:
        notes.append(f"critic cost: {judged.judged} steps judged, {1000 * judged.seconds / judged.judged:.3f} ms per step (exact {task} critic, in process).")
    cmd = f"caspo bench --suite pareto -n {n} --model {model} --ks {' '.join(map(str, ks))} --taus {' '.join(f'{x:g}' for x in taus)} --seed {seed}"
    if thresholds:
        cmd += f" --thresholds {' '.join(f'{x:g}' for x in thresholds)}"
    if data:
        cmd += f" --task {task} --data {data}"
    return SuiteResult(
        suite="pareto",
        title=f"Accuracy against tokens per question ({len(problems)} {task} problems, {model})",
        command=cmd,
        rows=rows,
        columns=COLUMNS,
        notes=notes,
        extra={"calibration": cal_path, "recommended": dataclasses.asdict(cfg.cat.search_config(cal, seed=seed))},
    )


def _describe(sc: SearchConfig) -> str:
    return (f"k={sc.k}, branching {sc.branching} on {sc.uncertainty} > {sc.branch_threshold:g}, width {sc.width}, "
            f"scoring {sc.scoring}, tau {sc.tau:g} on {sc.prune_scoring or sc.scoring}")


def _row(name: str, k: int, rep, greedy, g_latency: float, ceiling: float | None) -> dict:
    diff = compare(greedy, rep)
    gain = None if ceiling is None or ceiling - greedy.accuracy <= 0 else (rep.accuracy - greedy.accuracy) / (ceiling - greedy.accuracy)
    return {
        "name": name,
        "k": k,
        "accuracy": rep.accuracy,
        "accuracy_ci": rep.accuracy_ci,
        "tokens": rep.tokens,
        "tokens_x_greedy": rep.tokens / greedy.tokens if greedy.tokens else None,
        "latency_s": rep.latency_s,
        "latency_x_greedy": rep.latency_s / g_latency if g_latency else None,
        "diff_vs_greedy": diff["accuracy"],
        "diff_vs_greedy_ci": diff["accuracy_ci"],
        "mcnemar_p": diff["accuracy_mcnemar_p"],
        "ceiling_share": gain,
        "branch_points": rep.branch_points,
        "no_answer": rep.no_answer,
    }


def plot(plt, res: SuiteResult):
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in res.rows:
        lo, hi = r["accuracy_ci"]
        kind = "greedy" if r["name"] == "greedy" else r["name"].split(" ", 1)[-1].split(" τ")[0].split(" θ")[0]
        marker = {"greedy": "*", "critic (ceiling)": "X", "adaptive (recommended)": "D"}.get(kind, "o")
        if None in (lo, hi):
            lo = hi = r["accuracy"]
        ax.errorbar(r["tokens"], r["accuracy"], yerr=[[max(0.0, r["accuracy"] - lo)], [max(0.0, hi - r["accuracy"])]], fmt=marker, capsize=3, ms=7 if marker != "o" else 5)
        ax.annotate(r["name"], (r["tokens"], r["accuracy"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="generated tokens per question (log)", ylabel="accuracy (Wilson 95%)", xscale="log")
    ax.grid(alpha=0.3)
    fig.suptitle(res.title, fontsize=9)
    return fig
