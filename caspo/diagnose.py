"""``caspo diagnose``: which confidence signal works on a model, and why.

Along each problem's gold trajectory, the policy samples ``k`` next steps (siblings) after every gold
prefix; the task's critic judges each; :func:`caspo.core.siblings.sibling_report` then says, per
scoring, how often the top-scored sibling of a set that mixes right and wrong steps is right, how
many such sets tie, the step AUROC, the entropy of right and wrong steps, where wrong siblings leave
right ones, and what the wrong ones got wrong. A greedy pass over the same problems adds the model's
accuracy and the first error of each wrong greedy solution.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from caspo.core import stats
from caspo.core.contract import Prefix, StepProposer, derive_seed
from caspo.core.search import SearchConfig, run_searches
from caspo.core.confidence import STEP_SCORINGS
from caspo.core.siblings import Sibling, sibling_report
from caspo.evaluation import make_searches
from caspo.progress import bar as progress_bar
from caspo.tasks.base import Problem, Task


def sample_sibling_sets(
    proposer: StepProposer,
    task: Task,
    problems: Sequence[Problem],
    k: int,
    temperature: float,
    seed: int,
    batch: int = 64,
    progress: bool = False,
) -> list[list[Sibling]]:
    """``k`` sampled next steps after every gold prefix (the gold steps before the last), judged."""
    items = [(p, tuple(p.gold_steps[:j])) for p in problems for j in range(len(p.gold_steps))]
    sets: list[list[Sibling]] = []
    with progress_bar(len(items), "diagnose siblings", "prefix", progress) as bar:
        for s in range(0, len(items), batch):
            chunk = items[s : s + batch]
            prefixes = [Prefix(p.question, steps, derive_seed(seed, p.id, len(steps))) for p, steps in chunk]
            for (p, steps), cands in zip(chunk, proposer.propose(prefixes, k, temperature)):
                group = []
                for c in cands:
                    if not c.text.strip():
                        continue
                    j = task.judge(p, list(steps), c.text)
                    group.append(Sibling(c.text.strip(), j.correct, c.token_entropies, c.token_logprobs, j.reason))
                sets.append(group)
            bar.update(len(chunk))
    return sets


def greedy_first_errors(proposer: StepProposer, task: Task, problems: Sequence[Problem], seed: int, batch: int = 64) -> dict:
    """Greedy accuracy (with its Wilson interval) and the critic's reason for the first wrong step of
    each wrong greedy solution."""
    results = []
    for s in range(0, len(problems), batch):
        chunk = problems[s : s + batch]
        results += run_searches(make_searches(chunk, SearchConfig(method="greedy", seed=seed)), proposer)
    correct = 0
    first = Counter()
    for p, r in zip(problems, results):
        ok = task.answer_correct(p, r.answer)
        correct += ok
        if ok:
            continue
        for j, step in enumerate(r.steps):
            jd = task.judge(p, list(r.steps[:j]), step)
            if not jd.correct:
                first[jd.reason] += 1
                break
        else:
            first["no answer" if r.answer is None else "no wrong step"] += 1
    lo, hi = stats.wilson_interval(correct, len(problems))
    return {"n": len(problems), "accuracy": correct / max(1, len(problems)), "accuracy_ci": [lo, hi], "first_errors": dict(first.most_common())}


def diagnose(
    proposer: StepProposer,
    task: Task,
    problems: Sequence[Problem],
    k: int = 4,
    temperature: float = 0.7,
    seed: int = 0,
    scorings: Sequence[str] = STEP_SCORINGS,
    progress: bool = False,
) -> dict:
    sets = sample_sibling_sets(proposer, task, problems, k, temperature, seed, progress=progress)
    error_kind = getattr(task, "error_kind", None)
    report = sibling_report(sets, scorings, error_kind=error_kind, seed=seed)
    report["greedy"] = greedy_first_errors(proposer, task, problems, seed)
    if error_kind is not None:
        kinds = Counter()
        for reason, n in report["greedy"]["first_errors"].items():
            kinds[error_kind(reason)] += n
        report["greedy"]["first_error_kinds"] = dict(kinds.most_common())
    report.update({"n": len(problems), "k": k, "temperature": temperature, "seed": seed})
    return report


def plot(plt, report: dict):
    """Three panels: sibling ranking per scoring (95% intervals, chance level), where wrong siblings
    diverge, and what the wrong siblings got wrong."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    names = list(report["sibling_ranking"])
    vals = [report["sibling_ranking"][s] or math.nan for s in names]
    ci = [report["sibling_ranking_ci"][s] for s in names]
    err = [[v - (c[0] if c[0] is not None else v) for v, c in zip(vals, ci)], [(c[1] if c[1] is not None else v) - v for v, c in zip(vals, ci)]]
    ax.bar(names, vals, yerr=err, capsize=4, color="#4c72b0")
    if report.get("chance") is not None:
        ax.axhline(report["chance"], color="grey", ls="--", label=f"random pick {report['chance']:.2f}")
        ax.legend(loc="lower right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-scored sibling is right")
    ax.set_title(f"sibling ranking ({report['mixed_sets']} mixed sets)")
    for i, s in enumerate(names):
        ax.text(i, 0.02, f"ties {report['ties'][s]}", ha="center", fontsize=8, color="white")
    ax = axes[1]
    hist = report["divergence"]["histogram"]
    ax.bar([f"{i / 10:.1f}" for i in range(10)], hist, color="#dd8452")
    ax.set_xlabel("where a wrong sibling leaves the right one (share of the step)")
    ax.set_ylabel("wrong siblings")
    ax.set_title(f"divergence ({report['divergence']['one_character']} differ in one character)")
    ax = axes[2]
    kinds = report.get("error_kinds") or report["errors"]
    ax.barh(list(kinds)[::-1], list(kinds.values())[::-1], color="#55a868")
    ax.set_xlabel("wrong siblings")
    ax.set_title("what the wrong siblings got wrong")
    fig.suptitle(f"caspo diagnose: n={report['n']} problems, k={report['k']}, T={report['temperature']}")
    fig.tight_layout()
    return fig
