"""task ``math``: competition-style problems with LaTeX final answers (MATH, MATH500, AIME, ...).

Data: a JSONL file (one object a line), a Parquet file, or a directory written by ``datasets``'
``save_to_disk`` (read with ``load_from_disk``; a ``DatasetDict`` gives its ``train``/``test`` splits),
each record with a problem, a final answer and optionally a worked solution. The field names are
config keys (``task.problem_field``, ``task.answer_field``, ``task.solution_field``; defaults
``problem``, ``answer``, ``solution``, as in MATH500). A record without an answer field takes the last
``\\boxed{}`` of its solution. A record that has neither, or a problem that is not a non-empty string,
is refused with the file, the line (or row) and the field.

Final answers are compared with ``math-verify`` (:mod:`caspo.tasks.answers`), in a worker process
with a timeout per comparison. Intermediate steps have no exact verifier here: ``judge`` returns
them unchecked (``Judgement.checked`` False), evaluation leaves them out of step metrics, and the
config refuses ``critic.kind: exact`` for this task (the judge critic verifies steps).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq

from caspo.core.steps import final_answer, split_steps
from caspo.tasks.answers import DEFAULT_TIMEOUT_S, AnswerChecker
from caspo.tasks.base import Judgement, Problem, TaskError, hash_split, read_jsonl, read_saved_dataset, sample_problems

SOLUTION_DELIMITER = "\n\n"  # a worked solution's steps are its paragraphs


def _problem(obj, where: str, fields: tuple[str, str, str], idx: str, meta: dict) -> Problem:
    pf, af, sf = fields
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if pf not in obj:
        raise TaskError(f"{where}: missing field {pf!r} (task.problem_field)")
    if not isinstance(obj[pf], str) or not obj[pf].strip():
        raise TaskError(f"{where}: field {pf!r} must be a non-empty string")
    solution = obj.get(sf)
    if solution is not None and not isinstance(solution, str):
        raise TaskError(f"{where}: field {sf!r} must be a string, got {type(solution).__name__}")
    answer = obj.get(af)
    if isinstance(answer, bool) or (answer is not None and not isinstance(answer, (str, int, float))):
        raise TaskError(f"{where}: field {af!r} must be a string or a number, got {type(answer).__name__}")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        answer = final_answer(solution) if solution else None
        if not answer:
            raise TaskError(f"{where}: missing field {af!r} (task.answer_field) and no \\boxed{{}} answer in {sf!r}")
    steps = tuple(split_steps(solution, SOLUTION_DELIMITER)) if solution else ()
    return Problem(id=f"math-{idx}", question=obj[pf].strip(), answer=str(answer).strip(), gold_steps=steps, meta=meta)


def load_math(path: str | Path, fields: tuple[str, str, str] = ("problem", "answer", "solution"), split: str | None = None) -> list[Problem]:
    """Problems from a JSONL file, a Parquet file or a ``save_to_disk`` directory. ``split`` picks one
    split of a DatasetDict; without it every split is read and remembered (``meta["split"]``)."""
    p = Path(path)
    if p.is_dir():
        out = []
        for name, d in read_saved_dataset(p, split, "task.split"):
            for i, row in enumerate(d, 1):
                tag = f"{name}-{i}" if name else str(i)
                out.append(_problem(row, f"{path}, {'split ' + name + ', ' if name else ''}row {i}", fields, tag, {"row": i, "split": name, "path": str(path)}))
        return out
    if not p.is_file():
        raise TaskError(f"data file not found: {path}")
    if p.suffix == ".parquet":
        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises its own kinds for a broken file
            raise TaskError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        return [_problem(r, f"{path}, row {i}", fields, str(i), {"row": i, "path": str(path)}) for i, r in enumerate(rows, 1)]
    out = [_problem(obj, where, fields, str(n), {"line": n, "path": str(path)}) for n, where, obj in read_jsonl(path)]
    if not out:
        raise TaskError(f"{path}: no problems")
    return out


class MathTask:
    name = "math"
    test_fraction = 10  # without dataset splits, one problem in this many (by hash) is "test"

    def __init__(
        self,
        path: str | Path,
        problem_field: str = "problem",
        answer_field: str = "answer",
        solution_field: str = "solution",
        split: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        self.path = Path(path)
        self._problems = load_math(path, (problem_field, answer_field, solution_field), split)
        self.checker = AnswerChecker(timeout_s)
        # final answers that were not compared, by why (unparsable, timed out): marked wrong and counted here
        self.answer_errors: Counter = Counter()

    # ---- problems ---------------------------------------------------------------------------
    def split_of(self, p: Problem) -> str:
        named = p.meta.get("split")
        if named in ("train", "test"):
            return named
        return hash_split(p.question, self.test_fraction)

    def all_problems(self, split: str = "any") -> list[Problem]:
        if split not in ("train", "test", "any"):
            raise ValueError(f"split must be train, test or any, got {split!r}")
        return [p for p in self._problems if split == "any" or self.split_of(p) == split]

    def problems(self, n: int | None, seed: int, split: str = "test") -> list[Problem]:
        return sample_problems(self.all_problems(split), n, f"math:{seed}:{split}")

    # ---- format -----------------------------------------------------------------------------
    def question(self, text: str) -> str:
        if not text or not text.strip():
            raise TaskError("empty question")
        return text.strip()

    def prompt(self, question: str) -> str:
        """The plain format (a base model); chat models get their chat template (caspo.models.prompting)."""
        return f"Problem: {question.strip()}\nSolution:\n"

    # ---- critic -----------------------------------------------------------------------------
    def reference_step(self, problem: Problem, prefix: Sequence[str]) -> str:
        i = len(prefix)
        return problem.gold_steps[i] if i < len(problem.gold_steps) - 1 else f"The final answer is $\\boxed{{{problem.answer}}}$."

    def judge(self, problem: Problem, prefix: Sequence[str], step: str) -> Judgement:
        ref = self.reference_step(problem, prefix)
        ans = final_answer(step)
        if ans is None:
            return Judgement(True, ref, "not checked: task math verifies final answers only (critic.kind judge verifies steps)", checked=False)
        v = self.checker.check(problem.answer, ans)
        if v.error:
            self.answer_errors[v.error] += 1
            return Judgement(False, ref, f"final answer {ans!r} not compared: {v.error}")
        if v.equivalent:
            return Judgement(True, ref, "final answer correct")
        return Judgement(False, ref, f"final answer {ans!r}, expected {problem.answer!r}")

    def answer_correct(self, problem: Problem, answer: str | None) -> bool:
        if answer is None:
            return False
        v = self.checker.check(problem.answer, answer)
        if v.error:
            self.answer_errors[v.error] += 1
        return v.equivalent

    def error_kind(self, reason: str) -> str:
        if "not compared" in reason:
            return "unparsable answer"
        if reason.startswith("final answer"):
            return "wrong final answer"
        return reason
