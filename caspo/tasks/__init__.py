"""Problem sources and exact step critics."""

from caspo.tasks.arith import ArithTask
from caspo.tasks.base import Judgement, Problem, Task, TaskError
from caspo.config import TaskConfig
from caspo.tasks.gsm8k import GSM8KTask
from caspo.tasks.math_data import MathTask

TASKS = ("arith", "gsm8k", "math")


def get_task(name: str, data: str | None = None, options: TaskConfig | None = None) -> Task:
    """The task called ``name``; ``data`` is the file that file-backed tasks read (for arith, a file of
    ``{"question", "answer"}`` lines replaces the generated problems; for gsm8k, JSONL or a ``save_to_disk``
    directory; for math, JSONL, Parquet or a
    ``save_to_disk`` directory). ``options``: the config's task section (math's field names, split and
    answer timeout)."""
    if name == "arith":
        return ArithTask(data)
    if name == "gsm8k":
        if not data:
            raise TaskError("task gsm8k needs a data file: pass --data PATH (GSM8K-format JSONL or a save_to_disk directory)")
        return GSM8KTask(data)
    if name == "math":
        if not data:
            raise TaskError("task math needs data: pass --data PATH (JSONL, Parquet or a save_to_disk directory)")
        o = options or TaskConfig()
        return MathTask(data, o.problem_field, o.answer_field, o.solution_field, o.split, o.answer_timeout_s)
    raise TaskError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")


__all__ = ["Judgement", "Problem", "Task", "TaskError", "TASKS", "get_task"]
