"""Real preference pairs from the arithmetic task, for the DPO tests (tests/integration and
tests/reliability): prompt = question + gold steps so far, chosen = the next gold step, rejected = the
same operation with its result + 1, carried into the rewritten expression (an arithmetic slip, as the
three-case rule's case 3 pairs it)."""

from __future__ import annotations

from caspo.core.pairs import CASE_INCORRECT, Pair
from caspo.core.steps import join_steps
from caspo.tasks.arith import ArithTask, Num, Op, allowed, replace, state_after, subtree, to_text


def slipped(question: str, prefix, step: str) -> str:
    """``step`` (the reference operation after ``prefix``) with its result one too high."""
    node = state_after(question, prefix)
    path = allowed(node)[0]
    o = subtree(node, path)
    r = int(step.split("=")[1].split(";")[0]) + 1
    after = replace(node, path, Num(r))
    text = f"{o.left.value}{o.op}{o.right.value}={r}"
    return text + f"; {to_text(after)}" if isinstance(after, Op) else text


def arith_pairs(n: int, seed: int) -> list[Pair]:
    task = ArithTask()
    pairs: list[Pair] = []
    for problem in task.problems(10 * n, seed=seed, split="train"):
        gold = problem.gold_steps
        for j, step in enumerate(gold[:-1]):  # operation steps; the last one is "#### x"
            pairs.append(
                Pair(
                    prompt=task.prompt(problem.question) + join_steps(gold[:j]),
                    chosen=step,
                    rejected=slipped(problem.question, gold[:j], step),
                    case=CASE_INCORRECT,
                    confidence=0.0,
                    tau=0.0,
                )
            )
            if len(pairs) == n:
                return pairs
    raise AssertionError(f"only {len(pairs)} pairs from the problems")
