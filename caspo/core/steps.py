"""Steps of a solution: splitting, final-answer detection, numeric results (docs/design.md §5).

A step is one line of the solution (empty lines dropped). A step holding a final-answer marker
(``#### x`` or ``\\boxed{x}``) ends the trajectory.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

DEFAULT_DELIMITER = "\n"

_HASH_ANSWER = re.compile(r"####\s*(.*?)\s*$")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def split_steps(solution: str, delimiter: str = DEFAULT_DELIMITER) -> list[str]:
    """Split a solution into steps; surrounding whitespace stripped, empty steps dropped."""
    return [s.strip() for s in solution.split(delimiter) if s.strip()]


def join_steps(steps: list[str] | tuple[str, ...], delimiter: str = DEFAULT_DELIMITER) -> str:
    """Inverse of split_steps for a prompt: every step followed by the delimiter."""
    return "".join(s + delimiter for s in steps)


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def final_answer(step: str) -> str | None:
    """The final answer a step states (``#### x`` or ``\\boxed{x}``), else None."""
    m = _HASH_ANSWER.search(step)
    if m:
        return m.group(1).strip()
    return _boxed(step)


def answer_span(step: str) -> tuple[int, int] | None:
    """Where in ``step`` its final answer is written, as (start, end) character offsets; None if it
    states none."""
    m = _HASH_ANSWER.search(step)
    if m:
        return (m.start(1), m.end(1)) if m.group(1) else None
    start = step.rfind("\\boxed{")
    answer = _boxed(step)
    if start < 0 or answer is None:
        return None
    i = step.index(answer, start) if answer else start + len("\\boxed{")
    return i, i + len(answer)


def is_final(step: str) -> bool:
    return final_answer(step) is not None


def parse_number(text: str) -> Decimal | None:
    """Parse a number as people write it: commas, currency, percent, trailing dot or units.

    ``"$1,200.50"`` → 1200.50, ``"15%"`` → 15, ``"7 apples"`` → 7. Returns None when there is none.
    The first number in the text is taken.
    """
    if text is None:
        return None
    m = _NUMBER.search(text.replace("−", "-"))
    if not m:
        return None
    try:
        return Decimal(m.group(0).replace(",", ""))
    except InvalidOperation:
        return None


def number_text(n: Decimal) -> str:
    """A number in plain canonical notation: ``30``, ``2.5``, ``-3``, ``0`` (never ``3E+1`` or ``-0``)."""
    if n.is_zero():
        return "0"
    return format(n.normalize(), "f")


def step_result(step: str) -> Decimal | None:
    """The numeric result a step arrives at: its final answer, else the number after its last '=',
    else its last number. None when the step states no number."""
    ans = final_answer(step)
    if ans is not None:
        return parse_number(ans)
    if "=" in step:
        tail = parse_number(step.rsplit("=", 1)[1])
        if tail is not None:
            return tail
    nums = _NUMBER.findall(step)
    if not nums:
        return None
    try:
        return Decimal(nums[-1].replace(",", ""))
    except InvalidOperation:
        return None


def answers_match(predicted: str | None, gold: str | None) -> bool:
    """Final answers match when both parse to the same number, else by normalised text."""
    if predicted is None or gold is None:
        return False
    a, b = parse_number(predicted), parse_number(gold)
    if a is not None and b is not None:
        return a == b
    return predicted.strip().lower() == gold.strip().lower()
