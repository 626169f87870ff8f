"""What a task is: a source of problems, a prompt format, and an exact step critic."""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

from datasets import Dataset, DatasetDict, load_from_disk


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


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, str, dict]]:
    """``(line number, "PATH, line N", object)`` for each non-blank line of a JSONL file of objects.
    TaskError for a missing file, and, naming the line, for malformed JSON or a line that is not an
    object; the caller checks the object's fields and names the line with the second item."""
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"data file not found: {path}")
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, where, obj


def read_saved_dataset(path: str | os.PathLike, split: str | None = None, split_source: str = "") -> list[tuple[str | None, Dataset]]:
    """``(split name, Dataset)`` parts of a directory written by ``datasets``' ``save_to_disk``: one part
    (name None) for a Dataset; for a DatasetDict, the split ``split`` (TaskError naming the splits it has
    when it has not; ``split_source`` names where the split was chosen), or every split when ``split`` is
    None. TaskError when the directory is no such dataset."""
    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise TaskError(f"{path}: not a dataset saved with save_to_disk ({str(e).splitlines()[0]})") from None
    if not isinstance(ds, DatasetDict):
        return [(None, ds)]
    if split is not None and split not in ds:
        raise TaskError(f"{path}: no split {split!r}{f' ({split_source})' if split_source else ''}; it has {', '.join(ds)}")
    return [(split, ds[split])] if split is not None else list(ds.items())


def hash_split(question: str, test_fraction: int) -> str:
    """``"test"`` for one question in ``test_fraction`` (by a hash of its text), else ``"train"``: a
    file without named splits gets two disjoint ones that do not depend on the file's order."""
    h = int(hashlib.sha1(question.encode("utf-8")).hexdigest(), 16)
    return "test" if h % test_fraction == 0 else "train"


def sample_problems(pool: list[Problem], n: int | None, key: str) -> list[Problem]:
    """``n`` problems of ``pool`` (None: all of them) in an order reproducible from ``key`` (the
    task's name, the seed and the split)."""
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = list(pool)
    random.Random(key).shuffle(pool)
    return pool if n is None else pool[:n]
