"""Real preference pairs from the synthetic arithmetic task, for the DPO tests (tests/integration and
tests/reliability): prompt = question + gold steps so far, chosen = the next gold step, rejected = it
with its result + 1 (an incorrect step, as the three-case rule's case 3 pairs it)."""

from __future__ import annotations

import re

from caspo.core.pairs import CASE_INCORRECT, Pair
from caspo.core.steps import join_steps
from caspo.tasks.arith import ArithTask

_STEP = re.compile(r"^(.*=)(-?\d+)$")


def arith_pairs(n: int, seed: int) -> list[Pair]:
    task = ArithTask()
    pairs: list[Pair] = []
    for problem in task.problems(10 * n, seed=seed, split="train"):
        gold = problem.gold_steps
        for j, step in enumerate(gold[:-1]):  # operation steps; the last one is "#### x"
            m = _STEP.match(step)
            assert m, step
            pairs.append(
                Pair(
                    prompt=task.prompt(problem.question) + join_steps(gold[:j]),
                    chosen=step,
                    rejected=f"{m.group(1)}{int(m.group(2)) + 1}",
                    case=CASE_INCORRECT,
                    confidence=0.0,
                    tau=0.0,
                )
            )
            if len(pairs) == n:
                return pairs
    raise AssertionError(f"only {len(pairs)} pairs from the problems")
