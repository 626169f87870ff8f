"""Step critics: is a step a correct next step after its prefix, and what is the reference step there.

* ``ExactCritic``: the task's own verifier (arithmetic: exact; GSM8K: calculator annotations and the
  gold step's result). Arithmetic problems are built from the question; file-backed tasks look the
  problem up by its id.
* ``LLMCritic``: a model writes the reference next step greedily and the step is judged against it.
  A real deployment points it at a strong model (the paper: Qwen2.5-Math-7B-Instruct).

Item errors are raised as ``caspo.errors`` exceptions so a gRPC front turns them into
INVALID_ARGUMENT / NOT_FOUND naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from caspo.core.steps import answers_match, final_answer, join_steps, step_result
from caspo.errors import BadRequest, NotFound
from caspo.tasks.base import Judgement, Problem, Task


@dataclass(frozen=True)
class JudgeItem:
    problem_id: str
    question: str
    prefix: tuple[str, ...]
    step: str


def _item_error(i: int, e: Exception) -> Exception:
    return type(e)(f"items[{i}].{e}")


class ExactCritic:
    def __init__(self, task: Task):
        self.task = task
        self.name = f"exact:{task.name}"
        self._by_id: dict[str, Problem] | None = None  # None: problems are built from the question
        if hasattr(task, "make_problem"):
            pass
        elif hasattr(task, "all_problems"):
            self._by_id = {p.id: p for p in task.all_problems("any")}
        else:
            raise TypeError(f"task {task.name!r} has neither make_problem nor all_problems")

    def problem(self, problem_id: str, question: str) -> Problem:
        if self._by_id is None:
            try:
                return self.task.make_problem(question)
            except ValueError as e:
                raise BadRequest(f"question: {e}") from None
        try:
            return self._by_id[problem_id]
        except KeyError:
            where = getattr(self.task, "path", self.task.name)
            raise NotFound(f"problem_id {problem_id!r} is not in the task's data ({where})") from None

    def judge(self, problem_id: str, question: str, prefix: Sequence[str], step: str) -> Judgement:
        return self.task.judge(self.problem(problem_id, question), list(prefix), step)

    async def judge_many(self, items: Sequence[JudgeItem]) -> list[Judgement]:
        out = []
        for i, it in enumerate(items):
            try:
                out.append(self.judge(it.problem_id, it.question, it.prefix, it.step))
            except (BadRequest, NotFound) as e:
                raise _item_error(i, e) from None
        return out


def agrees(step: str, reference: str) -> tuple[bool, str]:
    """Does ``step`` reach what ``reference`` reaches? Final answers must match (numerically or as
    text); other steps must arrive at the same number. A step that states a final answer where the
    reference goes on (or the reverse) disagrees, whatever its number."""
    got_ans, ref_ans = final_answer(step), final_answer(reference)
    if (got_ans is None) != (ref_ans is None):
        return False, "stops early" if got_ans is not None else "goes on where the reference answers"
    if got_ans is not None:
        if answers_match(got_ans, ref_ans):
            return True, "final answer matches the reference"
        return False, f"final answer {got_ans!r}, reference gives {ref_ans!r}"
    got, want = step_result(step), step_result(reference)
    if got is None or want is None:
        return False, "no result to compare" if got is None else "the reference step states no result"
    if got != want:
        return False, f"result {got}, reference step gives {want}"
    return True, f"result {got} matches the reference step"


class LLMCritic:
    def __init__(self, worker, prompt_fn: Callable[[str], str]):
        self.worker = worker  # a ModelWorker (or anything with async sample_steps and .path)
        self.prompt_fn = prompt_fn

    @property
    def name(self) -> str:
        return f"llm:{self.worker.path}"

    def _prompt(self, question: str, prefix: Sequence[str]) -> str:
        return self.prompt_fn(question) + join_steps(list(prefix), getattr(self.worker, "delimiter", "\n"))

    async def judge_many(self, items: Sequence[JudgeItem]) -> list[Judgement]:
        if not items:
            return []
        prompts = [self._prompt(it.question, it.prefix) for it in items]
        refs = await self.worker.sample_steps(prompts, 1, 0.0, [None] * len(prompts))
        out = []
        for it, group in zip(items, refs):
            ref = group[0].text
            if not ref:
                out.append(Judgement(False, "", "the critic model wrote no reference step"))
                continue
            ok, why = agrees(it.step, ref)
            out.append(Judgement(ok, ref, why))
        return out

    async def judge(self, problem_id: str, question: str, prefix: Sequence[str], step: str) -> Judgement:
        return (await self.judge_many([JudgeItem(problem_id, question, tuple(prefix), step)]))[0]
