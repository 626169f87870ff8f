"""Synthetic step arithmetic: seeded multi-step problems with an exact step critic.

A problem is a chain of operations applied left to right, e.g. ``12+7*3-5`` means ((12+7)*3)-5.
Its solution has one operation per line and a final answer line::

    12+7=19
    19*3=57
    57-5=52
    #### 52

The critic is exact and local: a step is correct when it applies the next operation to the value the
prefix arrived at (the last result written, or the first operand) and computes it right; after the
last operation the correct step is ``#### value``. The reference step for any prefix follows from that.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Sequence

from caspo.core.steps import answers_match
from caspo.tasks.base import Judgement, Problem

_STEP = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")
_QUESTION = re.compile(r"^\d+(?:[+\-*]\d+)+$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class ArithConfig:
    min_ops: int = 2
    max_ops: int = 4
    max_value: int = 199  # every intermediate value stays in 0..max_value
    max_operand: int = 99  # operands of + and -
    max_multiplier: int = 9
    ops: str = "+-*"
    test_fraction: int = 10  # one problem in this many (by hash) is held out for evaluation


def parse_question(question: str) -> tuple[int, list[tuple[str, int]]]:
    q = question.replace(" ", "")
    if not _QUESTION.match(q):
        raise ValueError(f"not an arithmetic chain like '12+7*3': {question!r}")
    tokens = re.findall(r"[+\-*]|\d+", q)
    start = int(tokens[0])
    ops = [(tokens[i], int(tokens[i + 1])) for i in range(1, len(tokens), 2)]
    return start, ops


def solve(question: str) -> list[str]:
    """The gold solution steps of a question."""
    v, ops = parse_question(question)
    steps = []
    for op, b in ops:
        r = _OPS[op](v, b)
        steps.append(f"{v}{op}{b}={r}")
        v = r
    steps.append(f"#### {v}")
    return steps


class ArithTask:
    name = "arith"

    def __init__(self, config: ArithConfig | None = None):
        self.config = config or ArithConfig()

    # ---- problems ---------------------------------------------------------------------------
    def _split_of(self, question: str) -> str:
        h = int(hashlib.sha1(question.encode()).hexdigest(), 16)
        return "test" if h % self.config.test_fraction == 0 else "train"

    def _sample_question(self, rng: random.Random) -> str:
        c = self.config
        n_ops = rng.randint(c.min_ops, c.max_ops)
        v = rng.randint(1, min(c.max_operand, c.max_value))
        parts = [str(v)]
        for _ in range(n_ops):
            choices = []
            if "+" in c.ops and v < c.max_value:
                choices.append("+")
            if "-" in c.ops and v > 1:
                choices.append("-")
            if "*" in c.ops and 2 * v <= c.max_value:
                choices.append("*")
            op = rng.choice(choices)
            if op == "+":
                b = rng.randint(1, min(c.max_operand, c.max_value - v))
            elif op == "-":
                b = rng.randint(1, min(c.max_operand, v - 1))  # keep values >= 1
            else:
                b = rng.randint(2, min(c.max_multiplier, c.max_value // v))
            v = _OPS[op](v, b)
            parts.append(f"{op}{b}")
        return "".join(parts)

    def make_problem(self, question: str) -> Problem:
        steps = solve(question)
        pid = hashlib.sha1(question.encode()).hexdigest()[:12]
        return Problem(id=f"arith-{pid}", question=question, answer=steps[-1][5:], gold_steps=tuple(steps))

    def problems(self, n: int, seed: int, split: str = "test") -> list[Problem]:
        if split not in ("train", "test", "any"):
            raise ValueError(f"split must be train, test or any, got {split!r}")
        rng = random.Random(f"arith:{seed}:{split}")
        out: list[Problem] = []
        while len(out) < n:
            q = self._sample_question(rng)
            if split == "any" or self._split_of(q) == split:
                out.append(self.make_problem(q))
        return out

    def iter_train_text(self, seed: int):
        """Endless (prompt, solution) pairs from the train split, for base training."""
        rng = random.Random(f"arith-train-stream:{seed}")
        while True:
            q = self._sample_question(rng)
            if self._split_of(q) == "train":
                yield self.prompt(q), "".join(s + "\n" for s in solve(q))

    # ---- format -----------------------------------------------------------------------------
    def prompt(self, question: str) -> str:
        return f"Q:{question.strip()}\n"

    # ---- critic -----------------------------------------------------------------------------
    def reference_step(self, question: str, prefix: Sequence[str]) -> str:
        """The correct next step after ``prefix`` (local semantics, see module doc)."""
        v, ops = parse_question(question)
        for s in prefix:
            m = _STEP.match(s.replace(" ", ""))
            if m:
                v = int(m.group(4))
        i = len(prefix)
        if i >= len(ops):
            return f"#### {v}"
        op, b = ops[i]
        return f"{v}{op}{b}={_OPS[op](v, b)}"

    def judge(self, problem: Problem, prefix: Sequence[str], step: str) -> Judgement:
        ref = self.reference_step(problem.question, prefix)
        got = step.strip().replace(" ", "")
        want = ref.replace(" ", "")
        if got == want:
            return Judgement(True, ref, "matches the next operation")
        m = _STEP.match(got)
        if ref.startswith("####"):
            reason = "an operation after the last one" if m else "wrong final answer"
        elif not m:
            reason = "stops early" if got.startswith("####") else "not a step of the form a op b = c"
        else:
            rm = _STEP.match(want)
            if (m.group(1), m.group(2), m.group(3)) != (rm.group(1), rm.group(2), rm.group(3)):
                reason = "wrong operand or operation"
            else:
                reason = "arithmetic slip"
        return Judgement(False, ref, reason)

    def answer_correct(self, problem: Problem, answer: str | None) -> bool:
        return answers_match(answer, problem.answer)
