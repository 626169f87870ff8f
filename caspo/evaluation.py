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
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

from caspo.core import metrics
from caspo.core.cat import Search, SearchConfig, SearchResult, derive_seed, run_searches, run_searches_async
from caspo.models.base import PromptedProposer
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
    records: list[ProblemRecord] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("records")
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def judge_steps(task: Task, problem: Problem, steps: Sequence[str]) -> list[bool]:
    return [task.judge(problem, list(steps[:j]), s).correct for j, s in enumerate(steps)]


def record_of(task: Task, problem: Problem, res: SearchResult) -> ProblemRecord:
    step_ok = judge_steps(task, problem, res.steps)
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
        step_mean_entropy=list(res.step_mean_entropies),
        tokens=res.tokens_generated,
        reason=res.reason,
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
        records=records,
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
    proposer = PromptedProposer(backend, task.prompt)
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
    """``evaluate`` with an async proposer (e.g. the generator service over gRPC)."""
    records: list[ProblemRecord] = []
    t0 = time.perf_counter()
    with progress_bar(len(problems), desc or f"eval {cfg.method}", "q", progress) as bar:
        for s in range(0, len(problems), batch):
            chunk = problems[s : s + batch]
            for p, res in zip(chunk, await run_searches_async(make_searches(chunk, cfg), proposer)):
                records.append(record_of(task, p, res))
            bar.update(len(chunk))
    return report_of(cfg, records, time.perf_counter() - t0)
