"""Evaluate a policy on a task with any search method: accuracy and calibration in one pass.

Definitions (the same for every method, so methods compare on one footing):
  * accuracy       — final answer correct; no answer counts as wrong.
  * step_accuracy  — steps of the returned solutions that the task's exact critic accepts.
  * ece, brier     — answer level: the answer branch's cumulative entropy confidence C = Π exp(-mean H)
                     against answer correctness (C = 0 when there is no answer).
  * auroc          — step level: c = exp(-mean H) as a score for step correctness.
  * entropy_gap    — mean token entropy of incorrect steps minus that of correct steps (nats).
  * latency_s      — wall time / questions, questions batched ``batch`` at a time.
  * tokens         — tokens generated per question (all branches, pruned ones included).

Every accuracy-like figure carries a 95% interval (``accuracy_ci`` beside ``accuracy``, ...): the
Wilson score interval for answer accuracy, a percentile bootstrap over problems (2,000 resamples,
seeded; a problem's steps are resampled together) for everything else. ``compare`` judges two
reports on the same problems: paired differences with paired bootstrap intervals, and the exact
McNemar test for accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from caspo.core import metrics, stats
from caspo.core.calibration import DEFAULT_QUANTILES, DEFAULT_TAUS, choose_point, threshold_grid
from caspo.core.contract import Prefix, ProposedStep, derive_seed
from caspo.core.search import Search, SearchConfig, SearchResult, run_searches, run_searches_async
from caspo.core.confidence import step_uncertainty
from caspo.models.base import PromptedProposer
from caspo.models.prompting import prompter_for_backend
from caspo.progress import bar as progress_bar
from caspo.tasks.base import Problem, Task


@dataclass
class ProblemRecord:
    id: str
    question: str
    gold: str
    answer: str | None
    correct: bool
    confidence: float  # entropy C of the answer branch
    search_confidence: float  # C under the search's scoring
    steps: list[str]
    step_correct: list[bool]
    step_mean_entropy: list[float]
    tokens: int
    reason: str
    branch_points: int = 0


@dataclass
class EvalReport:
    method: str
    scoring: str
    k: int
    tau: float
    n: int
    accuracy: float
    step_accuracy: float
    ece: float
    brier: float
    auroc: float
    entropy_gap: float
    latency_s: float
    tokens: float
    no_answer: int
    accuracy_ci: list[float | None] = field(default_factory=lambda: [None, None])
    step_accuracy_ci: list[float | None] = field(default_factory=lambda: [None, None])
    ece_ci: list[float | None] = field(default_factory=lambda: [None, None])
    brier_ci: list[float | None] = field(default_factory=lambda: [None, None])
    auroc_ci: list[float | None] = field(default_factory=lambda: [None, None])
    entropy_gap_ci: list[float | None] = field(default_factory=lambda: [None, None])
    branching: str = "always"
    branch_threshold: float = 0.0
    branch_points: float = 0.0  # steps per question at which a branch expanded
    records: list[ProblemRecord] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("records")
        return {k: _clean(v) for k, v in d.items()}


def _clean(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


# ---- the metrics, as functions of per-problem arrays (so the bootstrap can resample problems) --------
class _Columns:
    """Per-problem answer columns and per-step columns with the index of each step's problem."""

    def __init__(self, records: Sequence[ProblemRecord]):
        self.n = len(records)
        self.correct = np.array([r.correct for r in records], dtype=float)
        self.confidence = np.array([r.confidence for r in records], dtype=float)
        self.step_ok = np.array([ok for r in records for ok in r.step_correct], dtype=float)
        self.step_h = np.array([h for r in records for h in r.step_mean_entropy], dtype=float)
        self.owner = np.array([i for i, r in enumerate(records) for _ in r.step_correct], dtype=int)

    def steps(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(step correctness, step mean entropy) of the problems ``idx`` (with repeats), in one go."""
        counts = np.bincount(idx.astype(int), minlength=self.n)
        w = counts[self.owner]
        return np.repeat(self.step_ok, w), np.repeat(self.step_h, w)


_ANSWER_METRICS: dict[str, Callable] = {
    "ece": lambda conf, ok, n_bins=10: metrics.ece(conf, ok, n_bins),
    "brier": lambda conf, ok: metrics.brier(conf, ok),
}
_STEP_METRICS: dict[str, Callable] = {
    "step_accuracy": lambda ok, h: metrics.accuracy(ok),
    "auroc": lambda ok, h: metrics.auroc(np.exp(-h), ok),
    "entropy_gap": lambda ok, h: metrics.entropy_gap(h, ok),
}


def _answer_stat(cols: _Columns, name: str) -> Callable[[np.ndarray], float]:
    return lambda idx: _ANSWER_METRICS[name](cols.confidence[idx.astype(int)], cols.correct[idx.astype(int)])


def _step_stat(cols: _Columns, name: str) -> Callable[[np.ndarray], float]:
    return lambda idx: _STEP_METRICS[name](*cols.steps(idx))


def _ci(pair) -> list[float | None]:
    return [_clean(float(pair[0])), _clean(float(pair[1]))]


def intervals(records: Sequence[ProblemRecord], seed: int = 0, resamples: int = stats.DEFAULT_RESAMPLES) -> dict:
    """95% intervals of every metric of ``report_of``: Wilson for accuracy, bootstrap over problems else."""
    cols = _Columns(records)
    out = {"accuracy_ci": _ci(stats.wilson_interval(int(cols.correct.sum()), cols.n))}
    idx = [np.arange(cols.n)]
    for name in _ANSWER_METRICS:
        out[f"{name}_ci"] = _ci(stats.bootstrap_interval(_answer_stat(cols, name), idx, resamples, seed=seed))
    for name in _STEP_METRICS:
        out[f"{name}_ci"] = _ci(stats.bootstrap_interval(_step_stat(cols, name), idx, resamples, seed=seed))
    return out


METRICS = ("accuracy", "step_accuracy", "ece", "brier", "auroc", "entropy_gap")  # each with an interval
PAIRED = METRICS


def write_records(path: str | Path, records: Sequence[ProblemRecord]) -> Path:
    """Per-problem results as JSONL, so later comparisons (``caspo report``) can pair them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
    tmp.replace(path)
    return path


def read_records(path: str | Path) -> list[ProblemRecord]:
    return [ProblemRecord(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def compare(a: "EvalReport", b: "EvalReport", seed: int = 0, resamples: int = stats.DEFAULT_RESAMPLES) -> dict:
    """B − A on the same problems: each metric's paired difference with its paired bootstrap interval
    (both reports resampled with the same problem indices), and the exact McNemar test on accuracy."""
    return compare_records(a.records, b.records, seed, resamples)


def compare_records(records_a: Sequence[ProblemRecord], records_b: Sequence[ProblemRecord], seed: int = 0, resamples: int = stats.DEFAULT_RESAMPLES) -> dict:
    """:func:`compare` on per-problem records (what :func:`write_records` wrote)."""
    ids_a, ids_b = [r.id for r in records_a], [r.id for r in records_b]
    if ids_a != ids_b:
        raise ValueError("compare needs two evaluations of the same problems in the same order")
    ca, cb = _Columns(records_a), _Columns(records_b)
    out: dict = {"n": ca.n}
    for name in PAIRED:
        if name == "accuracy":
            fa, fb = (lambda i, c=ca: float(c.correct[i.astype(int)].mean())), (lambda i, c=cb: float(c.correct[i.astype(int)].mean()))
        elif name in _ANSWER_METRICS:
            fa, fb = _answer_stat(ca, name), _answer_stat(cb, name)
        else:
            fa, fb = _step_stat(ca, name), _step_stat(cb, name)
        point, (lo, hi) = stats.paired_bootstrap(fa, fb, ca.n, resamples, seed=seed)
        out[name] = _clean(float(point))
        out[f"{name}_ci"] = _ci((lo, hi))
    m = stats.mcnemar(ca.correct.astype(bool), cb.correct.astype(bool))
    out["accuracy_mcnemar_p"] = m["p_value"]
    out["only_a_correct"], out["only_b_correct"] = m["only_a"], m["only_b"]
    return out


def judge_steps(task: Task, problem: Problem, steps: Sequence[str]) -> list[bool | None]:
    """Each step's verdict; None for a step the task cannot verify (``Judgement.checked`` False)."""
    out = []
    for j, s in enumerate(steps):
        jd = task.judge(problem, list(steps[:j]), s)
        out.append(jd.correct if jd.checked else None)
    return out


def record_of(task: Task, problem: Problem, res: SearchResult) -> ProblemRecord:
    verdicts = judge_steps(task, problem, res.steps)
    # step metrics pair each verified step's verdict with its entropy: unverifiable steps are left out of both
    checked = [i for i, ok in enumerate(verdicts) if ok is not None]
    step_ok = [verdicts[i] for i in checked]
    step_h = [res.step_mean_entropies[i] for i in checked]
    return ProblemRecord(
        id=problem.id,
        question=problem.question,
        gold=problem.answer,
        answer=res.answer,
        correct=task.answer_correct(problem, res.answer),
        confidence=res.entropy_confidence,
        search_confidence=res.confidence,
        steps=list(res.steps),
        step_correct=step_ok,
        step_mean_entropy=step_h,
        tokens=res.tokens_generated,
        reason=res.reason,
        branch_points=res.branch_points,
    )


def report_of(cfg: SearchConfig, records: list[ProblemRecord], seconds: float, n_bins: int = 10) -> EvalReport:
    correct = [r.correct for r in records]
    conf = [r.confidence for r in records]
    step_ok = [ok for r in records for ok in r.step_correct]
    step_h = [h for r in records for h in r.step_mean_entropy]
    return EvalReport(
        method=cfg.method,
        scoring=cfg.scoring,
        k=1 if cfg.method == "greedy" else cfg.k,  # greedy samples once whatever k says
        tau=cfg.tau,
        n=len(records),
        accuracy=metrics.accuracy(correct),
        step_accuracy=metrics.accuracy(step_ok),
        ece=metrics.ece(conf, correct, n_bins),
        brier=metrics.brier(conf, correct),
        auroc=metrics.auroc([math.exp(-h) for h in step_h], step_ok),
        entropy_gap=metrics.entropy_gap(step_h, step_ok),
        latency_s=seconds / max(1, len(records)),
        tokens=sum(r.tokens for r in records) / max(1, len(records)),
        no_answer=sum(r.answer is None for r in records),
        branching=cfg.branching if cfg.method == "cat" else "always",
        branch_threshold=cfg.branch_threshold,
        branch_points=sum(r.branch_points for r in records) / max(1, len(records)),
        records=records,
        **intervals(records),
    )


def make_searches(problems: Sequence[Problem], cfg: SearchConfig) -> list[Search]:
    """One search per problem, each seeded from ``cfg.seed`` and the problem's id (so a problem samples
    the same whatever else shares its batch)."""
    out = []
    for p in problems:
        seed = None if cfg.seed is None else derive_seed(cfg.seed, p.id)
        out.append(Search(p.question, SearchConfig(**{**asdict(cfg), "seed": seed})))
    return out


def evaluate(
    backend,
    task: Task,
    problems: Sequence[Problem],
    cfg: SearchConfig,
    batch: int = 16,
    progress: bool = False,
    desc: str | None = None,
) -> EvalReport:
    """Run ``cfg`` on every problem (``batch`` questions per model call) and score the results."""
    return evaluate_with(PromptedProposer(backend, prompter_for_backend(backend, task)), task, problems, cfg, batch, progress, desc)


def needs_critic(cfg: SearchConfig) -> bool:
    return "critic" in (cfg.scoring, cfg.prune_scoring)


def evaluate_with(
    proposer,
    task: Task,
    problems: Sequence[Problem],
    cfg: SearchConfig,
    batch: int = 16,
    progress: bool = False,
    desc: str | None = None,
) -> EvalReport:
    """``evaluate`` with any (blocking) StepProposer; a ``critic`` scoring gets the task's exact critic."""
    if needs_critic(cfg) and not isinstance(proposer, JudgedProposer):
        proposer = JudgedProposer(proposer, task_judge(task, problems))
    records: list[ProblemRecord] = []
    t0 = time.perf_counter()
    with progress_bar(len(problems), desc or f"eval {cfg.method}", "q", progress) as bar:
        for s in range(0, len(problems), batch):
            chunk = problems[s : s + batch]
            for p, res in zip(chunk, run_searches(make_searches(chunk, cfg), proposer)):
                records.append(record_of(task, p, res))
            bar.update(len(chunk))
    return report_of(cfg, records, time.perf_counter() - t0)


async def evaluate_async(
    proposer,
    task: Task,
    problems: Sequence[Problem],
    cfg: SearchConfig,
    batch: int = 16,
    progress: bool = False,
    desc: str | None = None,
) -> EvalReport:
    """``evaluate`` with an async proposer (e.g. the generator service over gRPC). A ``critic`` scoring
    needs a proposer that sets verdicts (as ``JudgedProposer`` does)."""
    records: list[ProblemRecord] = []
    t0 = time.perf_counter()
    with progress_bar(len(problems), desc or f"eval {cfg.method}", "q", progress) as bar:
        for s in range(0, len(problems), batch):
            chunk = problems[s : s + batch]
            for p, res in zip(chunk, await run_searches_async(make_searches(chunk, cfg), proposer)):
                records.append(record_of(task, p, res))
            bar.update(len(chunk))
    return report_of(cfg, records, time.perf_counter() - t0)


# ---- the verifier-guided yardstick: candidates judged by a critic -------------------------------------
Judge = Callable[[str, Sequence[str], str], float]  # (question, prefix steps, step) -> P(step is right)


def task_judge(task: Task, problems: Sequence[Problem]) -> Judge:
    """The task's exact critic over ``problems`` (looked up by question): 1.0 for a right step, else 0.0."""
    by_question = {p.question: p for p in problems}

    def judge(question: str, prefix: Sequence[str], step: str) -> float:
        if not step.strip():
            return 0.0
        return 1.0 if task.judge(by_question[question], list(prefix), step).correct else 0.0

    return judge


class JudgedProposer:
    """A StepProposer whose candidates carry a critic's verdict (what ``scoring: critic`` reads)."""

    def __init__(self, proposer, judge: Judge):
        self.proposer = proposer
        self.judge = judge
        self.judged = 0  # critic calls so far (what the verifier costs)
        self.seconds = 0.0

    def propose(self, prefixes: Sequence[Prefix], n: int, temperature: float) -> list[list[ProposedStep]]:
        out = self.proposer.propose(prefixes, n, temperature)
        t0 = time.perf_counter()
        judged = [[dataclasses.replace(c, verdict=self.judge(p.question, p.steps, c.text)) for c in cands] for p, cands in zip(prefixes, out)]
        self.seconds += time.perf_counter() - t0
        self.judged += sum(len(c) for c in out)
        return judged


# ---- warm-up calibration (``caspo calibrate``); the rule is caspo.core.calibration's --------------------
class _RecordingProposer:
    """Passes proposals through, recording each greedy step's uncertainty under ``measure``."""

    def __init__(self, proposer, measure: str):
        self.proposer, self.measure, self.values = proposer, measure, []

    def propose(self, prefixes, n, temperature):
        out = self.proposer.propose(prefixes, n, temperature)
        if temperature == 0:
            self.values += [step_uncertainty(self.measure, c.token_entropies) for cands in out for c in cands if c.text.strip()]
        return out


def calibrate(
    proposer,
    task: Task,
    problems: Sequence[Problem],
    base: SearchConfig,
    taus: Sequence[float] = DEFAULT_TAUS,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    max_tokens_x: float = 2.0,
    batch: int = 16,
    progress: bool = False,
) -> dict:
    """Pick ``branch_threshold`` and ``tau`` of adaptive CaT (``base`` gives everything else) on warm-up
    ``problems`` by the rule in ``caspo.core.calibration``: greedy first (its steps' uncertainties give the
    candidate thresholds, its tokens the budget ``max_tokens_x`` × greedy), then every (threshold, τ)."""
    rec = _RecordingProposer(proposer, base.uncertainty)
    greedy = evaluate_with(rec, task, problems, SearchConfig(method="greedy", seed=base.seed), batch, progress, "warm-up greedy")
    points = []
    for th in threshold_grid(rec.values, quantiles):
        for tau in taus:
            cfg = dataclasses.replace(base, method="cat", branching="adaptive", branch_threshold=th, tau=tau)
            rep = evaluate_with(proposer, task, problems, cfg, batch, progress, f"warm-up θ={th:.3g} τ={tau:g}")
            points.append({"branch_threshold": th, "tau": tau, "accuracy": rep.accuracy, "tokens": rep.tokens, "branch_points": rep.branch_points, "no_answer": rep.no_answer})
    best = choose_point(points, max_tokens_x * greedy.tokens)
    return {
        "tau": best["tau"],
        "branch_threshold": best["branch_threshold"],
        "uncertainty": base.uncertainty,
        "rule": f"highest warm-up accuracy within {max_tokens_x:g} x greedy's tokens per question; ties: fewer tokens, larger threshold, smaller tau",
        "search": {k: v for k, v in asdict(base).items() if k not in ("tau", "branch_threshold", "uncertainty", "seed", "method")},
        "warmup": {"n": len(problems), "split": "train", "seed": base.seed, "greedy_accuracy": greedy.accuracy, "greedy_tokens": greedy.tokens,
                   "accuracy": best["accuracy"], "tokens": best["tokens"], "steps": len(rec.values)},
        "grid": points,
    }
