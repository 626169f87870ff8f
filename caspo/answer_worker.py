"""The answer-equivalence worker: ``python -m caspo.answer_worker`` reads one JSON ``[gold, candidate]`` a
line and writes one JSON ``[equivalent, error]`` a line, comparing with ``math-verify``.

A module of its own, outside ``caspo.tasks``, so that the worker process starts by importing only
math-verify (and sympy): :class:`caspo.tasks.answers.AnswerChecker` runs it and times each comparison.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())


@dataclass(frozen=True)
class Verdict:
    equivalent: bool
    error: str | None = None  # why no comparison was made: unparsable answer, timeout, too long


def _as_latex(text: str) -> str:
    """What math-verify reads: text holding a box or math delimiters as is, a bare answer as ``$...$``."""
    t = text.strip()
    if "\\boxed" in t or "$" in t or "\\(" in t or "\\[" in t:
        return t
    return f"${t}$"


def normalise(text: str) -> str:
    return " ".join(text.strip().strip("$").split()).rstrip(".")


def compare(gold: str, candidate: str) -> Verdict:
    """One comparison, in this process and without a timeout (the worker calls this)."""
    if normalise(gold) == normalise(candidate) and normalise(gold):
        return Verdict(True)
    g = parse(_as_latex(gold), extraction_config=_EXTRACTION, parsing_timeout=None)
    c = parse(_as_latex(candidate), extraction_config=_EXTRACTION, parsing_timeout=None)
    if g and c and verify(g, c, timeout_seconds=None):
        return Verdict(True)
    # math-verify gives back only the text (no sympy object) for what it cannot read: say so, not just "no"
    for name, parsed in (("gold", g), ("candidate", c)):
        if not any(not isinstance(x, str) for x in parsed):
            return Verdict(False, f"math-verify cannot parse the {name} answer")
    return Verdict(False)


def _serve(stdin, stdout) -> None:
    """The worker: one JSON ``[gold, candidate]`` a line in, one JSON verdict a line out."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" line: the parent times out
    for line in stdin:
        try:
            gold, cand = json.loads(line)
            v = compare(str(gold), str(cand))
        except Exception as e:  # noqa: BLE001 - sympy raises anything on odd input: not equivalent, said why
            v = Verdict(False, f"math-verify failed: {type(e).__name__}")
        stdout.write(json.dumps([v.equivalent, v.error]) + "\n")
        stdout.flush()


if __name__ == "__main__":
    _serve(sys.stdin, sys.stdout)
