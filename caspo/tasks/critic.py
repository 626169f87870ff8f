"""Step critics: is a step a correct next step after its prefix, and what is the reference step there.

* ``ExactCritic``: the task's own verifier (arithmetic: exact; GSM8K: calculator annotations and the
  gold step's result). Arithmetic problems are built from the question; file-backed tasks look the
  problem up by its id.
* ``LLMCritic``: a model writes the reference next step greedily and the step is judged against it.
  A real deployment points it at a strong model (the paper: Qwen2.5-Math-7B-Instruct).
* ``JudgeCritic`` (``critic.kind: judge``): a model *verifies* the step. Its prompt shows the problem,
  the steps so far and the candidate step and asks for Yes or No; P(yes) comes from the judge's
  log-probabilities of the two answers' first tokens at the one position after the prompt (the backends'
  ``answer_logprobs``: one row per item),
  and the step is correct when P(yes) >= ``critic.threshold``. For an incorrect step the judge model
  writes the reference step (greedy, in the policy's prompt format). Verdicts are cached per
  (question, prefix, step) within a scope (the data round that asks), so a repeated question costs nothing.

Item errors are raised as ``caspo.errors`` exceptions so a gRPC front turns them into
INVALID_ARGUMENT / NOT_FOUND naming the field.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from caspo.core.confidence import verdict_probability
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

    async def judge_many(self, items: Sequence[JudgeItem], scope: str = "") -> list[Judgement]:
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

    async def judge_many(self, items: Sequence[JudgeItem], scope: str = "") -> list[Judgement]:
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


JUDGE_SYSTEM = "You are a careful mathematics teacher. You check a student's solution one step at a time."
JUDGE_ANSWERS = ("Yes", "No")


def judge_question(question: str, prefix: Sequence[str], step: str) -> str:
    """The judge's user message: the problem, the steps so far, the candidate step, and the question."""
    so_far = "\n\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(prefix)) or "(none yet)"
    return (
        f"Problem:\n{question.strip()}\n\nSteps so far:\n{so_far}\n\nProposed next step:\n{step.strip()}\n\n"
        "Is the proposed next step correct, given the problem and the steps so far (sound reasoning, right "
        "arithmetic, and if it states a final answer, the right one)? Answer Yes or No."
    )


class JudgeCritic:
    """``critic.kind: judge``: an LLM verifies each step (see the module docstring).

    ``worker``: a ModelWorker (async ``answer_logprobs``/``sample_steps``, ``.path``); ``render(system,
    user)``: the judge model's chat prompt (its chat template, or plain text); ``policy_prompt``: model
    input for the reference step, ``policy_prompt.text(question, prefix)`` (a Prompter).
    """

    def __init__(self, worker, render: Callable[[str, str], str], policy_prompt, threshold: float = 0.5, max_cached: int = 200_000, scopes_kept: int = 2):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"critic.threshold must be in [0, 1], got {threshold}")
        self.worker = worker
        self.render = render
        self.policy_prompt = policy_prompt
        self.threshold = threshold
        self.max_cached = max_cached
        self.scopes_kept = scopes_kept  # a round's eval overlaps the next round's data: keep the newest two
        self._cache: OrderedDict[str, dict] = OrderedDict()  # scope -> {(question, prefix, step): Judgement}
        self.hits = 0
        self.misses = 0
        self.no_verdict = 0  # judge replies with no probability on either answer (marked incorrect, counted)

    @property
    def name(self) -> str:
        return f"judge:{self.worker.path}"

    def prompt(self, it: JudgeItem) -> str:
        return self.render(JUDGE_SYSTEM, judge_question(it.question, it.prefix, it.step))

    def _scope(self, scope: str) -> dict:
        cache = self._cache.get(scope)
        if cache is None:
            cache = self._cache[scope] = {}
            while len(self._cache) > self.scopes_kept:
                self._cache.popitem(last=False)
        self._cache.move_to_end(scope)
        return cache

    async def judge_many(self, items: Sequence[JudgeItem], scope: str = "") -> list[Judgement]:
        if not items:
            return []
        cache = self._scope(scope)
        keys = [(it.question, tuple(it.prefix), it.step) for it in items]
        todo: dict[tuple, JudgeItem] = {}
        for k, it in zip(keys, items):
            if k not in cache and k not in todo:
                todo[k] = it
        self.hits += len(items) - len(todo)
        self.misses += len(todo)
        if todo:
            new = await self._judge(list(todo.values()))
            if len(cache) + len(new) > self.max_cached:
                cache.clear()
            cache.update(zip(todo, new))
        return [cache[k] for k in keys]

    async def _judge(self, items: list[JudgeItem]) -> list[Judgement]:
        prompts = [self.prompt(it) for it in items]
        # one row per item: log p of Yes's and No's first token right after the prompt, nothing else scored;
        # an item over the judge's context length is refused alone (an empty row): no verdict
        answers = await self.worker.answer_logprobs(prompts, JUDGE_ANSWERS)
        probs = [verdict_probability(*row) if row else math.nan for row in answers]
        out: list[Judgement] = []
        wrong = []
        for i, (it, p) in enumerate(zip(items, probs)):
            if math.isnan(p):
                self.no_verdict += 1
                out.append(Judgement(False, "", "the judge gave no verdict (no probability on Yes or No)", p_correct=p))
                wrong.append(i)
            elif p >= self.threshold:
                out.append(Judgement(True, it.step, f"judge P(yes) {p:.3f} >= {self.threshold:g}", p_correct=p))
            else:
                out.append(Judgement(False, "", f"judge P(yes) {p:.3f} < {self.threshold:g}", p_correct=p))
                wrong.append(i)
        if wrong:  # the judge model writes the correct step where the candidate is wrong
            texts = [self.policy_prompt.text(items[i].question, items[i].prefix) for i in wrong]
            refs = await self.worker.sample_steps(texts, 1, 0.0, [None] * len(texts))
            for i, group in zip(wrong, refs):
                ref = group[0].text
                why = out[i].reason if ref else out[i].reason + "; the judge model wrote no reference step"
                out[i] = replace(out[i], reference=ref, reason=why)
        return out
