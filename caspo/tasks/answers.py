"""Are two final answers the same mathematical object? ``math-verify`` (Hugging Face) decides, in a
worker process, with a timeout per comparison.

``\\frac{1}{2}`` and ``0.5``, ``2\\sqrt{2}`` and ``\\sqrt{8}``, ``(x+1)^2`` and ``x^2+2x+1``, ``\\{1,2\\}``
and ``\\{2,1\\}`` are equivalent; ``[0,1)`` and ``[0,1]`` are not. Each answer is read as LaTeX (a bare
answer is put in ``$...$``; text with ``\\boxed{}`` is read from the box), else as a plain expression.

Parsing and simplifying arbitrary LaTeX with sympy can take unbounded time, and math-verify's own
timeout uses ``signal.alarm`` (main thread only; the mesh's services run comparisons elsewhere). So the
comparisons run in a child process (``python -m caspo.answer_worker``): the parent waits ``timeout_s`` for each one and, past it, kills the
child, records that comparison as timed out and starts a fresh child for the rest. An answer that
math-verify cannot parse is not equivalent to anything, and says so (``error``) instead of passing.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from typing import Sequence

from caspo.answer_worker import Verdict, normalise
from caspo.tasks.base import TaskError, read_jsonl

DEFAULT_TIMEOUT_S = 5.0
STARTUP_S = 120.0  # a fresh worker's start-up (python, sympy, math-verify; slow on a busy machine), on top of the first timeout
MAX_ANSWER_CHARS = 1000  # longer answers are refused unread (an answer, not a solution)

def read_answer_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(gold, candidate)`` from a JSONL file of ``{"gold", "candidate"}`` objects (other fields are
    ignored); TaskError naming the file and line for anything else."""
    out = []
    for _, where, obj in read_jsonl(path):
        for key in ("gold", "candidate"):
            if key not in obj:
                raise TaskError(f"{where}: missing field {key!r}")
            if isinstance(obj[key], bool) or not isinstance(obj[key], (str, int, float)):
                raise TaskError(f"{where}: field {key!r} must be a string or a number, got {type(obj[key]).__name__}")
        out.append((str(obj["gold"]), str(obj["candidate"])))
    return out


class AnswerChecker:
    """Equivalence of final answers through one worker process (``python -m caspo.answer_worker``,
    started on first use: a plain child process, whatever process asks — a CLI, a Ray actor, a Serve
    replica). Thread-safe: calls are serialised."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.timeouts = 0  # comparisons that ran past timeout_s (the worker was restarted for each)

    def _start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "caspo.answer_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
            for f in (self._proc.stdin, self._proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        self._proc = None

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _one(self, gold: str, candidate: str) -> Verdict:
        if len(gold) > MAX_ANSWER_CHARS or len(candidate) > MAX_ANSWER_CHARS:
            return Verdict(False, f"answer longer than {MAX_ANSWER_CHARS} characters")
        if not gold.strip() or not candidate.strip():
            return Verdict(False, "empty answer")
        if normalise(gold) == normalise(candidate):
            return Verdict(True)
        fresh = self._proc is None or self._proc.poll() is not None
        if fresh:
            self._start()
        try:
            self._proc.stdin.write(json.dumps([gold, candidate]) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._kill()
            return Verdict(False, "the answer checker died")
        # a fresh worker's first comparison also waits for its start-up (importing sympy)
        ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout_s + (STARTUP_S if fresh else 0.0))
        if ready:
            line = self._proc.stdout.readline()
            if line:
                equivalent, error = json.loads(line)
                return Verdict(bool(equivalent), error)
            self._kill()
            return Verdict(False, "the answer checker died")
        self._kill()
        self.timeouts += 1
        return Verdict(False, f"comparison timed out after {self.timeout_s:g} s")

    def check_many(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        """``[(gold, candidate), ...]`` → one Verdict each, in order."""
        with self._lock:
            return [self._one(g, c) for g, c in pairs]

    def check(self, gold: str, candidate: str) -> Verdict:
        return self.check_many([(gold, candidate)])[0]

    def equivalent(self, gold: str | None, candidate: str | None) -> bool:
        if gold is None or candidate is None:
            return False
        return self.check(gold, candidate).equivalent

    def __del__(self):  # a checker dropped without close() leaves no process behind
        try:
            self._kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
