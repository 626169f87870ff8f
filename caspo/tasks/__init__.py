"""Problem sources and exact step critics."""

from caspo.tasks.arith import ArithTask
from caspo.tasks.base import Judgement, Problem, Task, TaskError
from caspo.tasks.gsm8k import GSM8KTask

TASKS = ("arith", "gsm8k")


def get_task(name: str, data: str | None = None) -> Task:
    """The task called ``name``; ``data`` is the JSONL file that file-backed tasks read (for arith, a
    file of ``{"question", "answer"}`` lines replaces the generated problems)."""
    if name == "arith":
        return ArithTask(data)
    if name == "gsm8k":
        if not data:
            raise TaskError("task gsm8k needs a data file: pass --data PATH (GSM8K-format JSONL)")
        return GSM8KTask(data)
    raise TaskError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")


__all__ = ["Judgement", "Problem", "Task", "TaskError", "TASKS", "get_task"]
