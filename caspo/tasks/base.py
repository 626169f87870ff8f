"""What a task is: a source of problems, a prompt format, and an exact step critic."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str  # the gold final answer, as text
    gold_steps: tuple[str, ...] = ()  # a gold solution, one step per entry
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Judgement:
    correct: bool
    reference: str  # the critic's reference (correct) step for this prefix
    reason: str = ""
    checked: bool = True  # False: the task cannot verify this step (task math's intermediate steps); not counted
    p_correct: float | None = None  # a judge critic's P(yes); None: an exact verdict


class Task(Protocol):
    name: str

    def question(self, text: str) -> str:
        """The question as the policy will see it, from what a person typed; TaskError, naming what the
        task accepts, when it cannot take it (the built-in arithmetic takes expressions only; a task for
        a real model takes any non-empty text)."""

    def problems(self, n: int | None, seed: int, split: str = "test") -> list[Problem]:
        """n problems, reproducible from seed; split is 'train' or 'test' (disjoint). A file-backed task
        may take n=None for all of its problems."""

    def prompt(self, question: str) -> str:
        """The text a policy is conditioned on before its first step."""

    def judge(self, problem: Problem, prefix: Sequence[str], step: str) -> Judgement:
        """Is ``step`` a correct next step after ``prefix``? With the reference step for that prefix."""

    def answer_correct(self, problem: Problem, answer: str | None) -> bool:
        """Is a final answer right for the problem?"""

    def error_kind(self, reason: str) -> str:
        """The kind of error a critic's reason names (the taxonomy ``caspo diagnose`` reports)."""


class TaskError(ValueError):
    """A problem with a task's input (unknown task, bad data file). Message names the cause."""
