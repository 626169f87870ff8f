"""GSM8K: grade-school word problems with calculator-annotated gold solutions.

A data file holds one JSON object a line, ``{"question": ..., "answer": ...}`` (or is a directory written
by ``datasets``' ``save_to_disk`` with those two columns: :func:`load_gsm8k`); the answer is a
worked solution, one step a line, with calculator annotations ``<<expr=value>>`` inside the steps and
a last line ``#### <final answer>``::

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.
    Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.
    #### 72

The step critic checks what can be checked exactly: every calculator annotation in a step must
evaluate to the value it states (and the number written right after it must be that value), and the
step's numeric result must equal the result of the gold step at the same position. A final-answer
step is judged by its answer alone.

Expressions are evaluated by :func:`eval_fraction`, an AST walker over a small arithmetic grammar with
exact rational arithmetic (never ``eval``).
"""

from __future__ import annotations

import ast
import math
import random
import re
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from caspo.core.steps import answers_match, final_answer, split_steps, step_result
from caspo.tasks.base import Judgement, Problem, TaskError, hash_split, read_jsonl, read_saved_dataset, sample_problems

# ---- safe arithmetic --------------------------------------------------------------------------

MAX_EXPR_LEN = 500  # characters; GSM8K annotations are at most ~30
MAX_STEP_CHARS = 4096  # a step the verifier reads; GSM8K steps are under 500
MAX_EXPONENT = 100  # |exponent| of **
MAX_DIGITS = 100  # any intermediate value: |numerator|, denominator < 10**MAX_DIGITS
_LIMIT = 10**MAX_DIGITS

_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])")
# A number followed by '%' and then an operator, ')' or the end means a percentage (N/100); a '%'
# followed by an operand is the modulo operator.
_PERCENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*%(?=\s*(?:[)+\-*/]|$))")
_LEADING_ZEROS = re.compile(r"(?<![\d.])0+(?=\d)")
_UNICODE_OPS = str.maketrans({"−": "-", "×": "*", "÷": "/", "–": "-"})
# what a calculator writes; Python's other literals (1_000, 0x10, 0b11, 0o7, 1j) are not numbers here
_DECIMAL_LITERAL = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _normalise(expr: str) -> str:
    """Calculator notation → Python arithmetic: drop '$', thousands commas, leading zeros; N% → (N/100)."""
    s = expr.translate(_UNICODE_OPS).replace("$", "").strip()
    s = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)
    s = _LEADING_ZEROS.sub("", s)
    s = _PERCENT.sub(r"(\1/100)", s)
    return s


def _check(v: Fraction) -> Fraction:
    if abs(v.numerator) >= _LIMIT * v.denominator:
        raise ValueError(f"result too large (more than 10**{MAX_DIGITS})")
    if v.denominator >= _LIMIT:
        raise ValueError(f"result too precise (denominator over 10**{MAX_DIGITS})")
    return v


def _log10(v: Fraction) -> float:
    """log10 of the larger of |numerator| and denominator (how many digits a power would need)."""
    return max(math.log10(abs(v.numerator)) if v.numerator else 0.0, math.log10(v.denominator))


def _pow(base: Fraction, exp: Fraction) -> Fraction:
    if abs(exp) > MAX_EXPONENT:
        raise ValueError(f"exponent too large: |{exp}| > {MAX_EXPONENT}")
    if exp.denominator == 1:
        e = int(exp)
        if base != 0 and abs(e) * _log10(base) > MAX_DIGITS + 1:
            raise ValueError(f"result too large (more than 10**{MAX_DIGITS})")
        if base == 0 and e < 0:
            raise ValueError("division by zero (0 to a negative power)")
        return base**e
    # a fractional power (a root): exact when the result is exact to 50 digits, else rounded there
    if base < 0:
        raise ValueError("fractional power of a negative number")
    if base == 0:
        if exp < 0:
            raise ValueError("division by zero (0 to a negative power)")
        return Fraction(0)
    if abs(float(exp)) * abs(math.log10(abs(base.numerator)) - math.log10(base.denominator)) > MAX_DIGITS:
        raise ValueError(f"result too large (more than 10**{MAX_DIGITS})")
    with localcontext() as ctx:
        ctx.prec = 50
        b = Decimal(base.numerator) / Decimal(base.denominator)
        e = Decimal(exp.numerator) / Decimal(exp.denominator)
        return Fraction(b**e)


def _binop(op: ast.operator, a: Fraction, b: Fraction) -> Fraction:
    if isinstance(op, ast.Add):
        return a + b
    if isinstance(op, ast.Sub):
        return a - b
    if isinstance(op, ast.Mult):
        return a * b
    if isinstance(op, ast.Pow):
        return _pow(a, b)
    if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)):
        if b == 0:
            raise ValueError("division by zero")
        if isinstance(op, ast.Div):
            return a / b
        return Fraction(a // b) if isinstance(op, ast.FloorDiv) else a % b
    raise ValueError(f"operator not allowed: {type(op).__name__}")


def _walk(node: ast.AST, src: str) -> Fraction:
    if isinstance(node, ast.Expression):
        return _walk(node.body, src)
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"only numbers are allowed, got {v!r}")
        text = ast.get_source_segment(src, node) or repr(v)
        if not _DECIMAL_LITERAL.fullmatch(text):
            raise ValueError(f"not a decimal number: {text!r}")
        try:
            return _check(Fraction(text))  # the literal as written, not a float
        except (ValueError, ZeroDivisionError):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"number out of range: {text}") from None
            return _check(Fraction(v))
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return -_walk(node.operand, src)
        if isinstance(node.op, ast.UAdd):
            return _walk(node.operand, src)
        raise ValueError(f"operator not allowed: {type(node.op).__name__}")
    if isinstance(node, ast.BinOp):
        a = _walk(node.left, src)
        b = _walk(node.right, src)
        return _check(_binop(node.op, a, b))
    if isinstance(node, ast.Call):
        raise ValueError("function calls are not allowed")
    if isinstance(node, ast.Attribute):
        raise ValueError("attribute access is not allowed")
    if isinstance(node, ast.Name):
        raise ValueError(f"names are not allowed: {node.id!r}")
    if isinstance(node, ast.Tuple):
        raise ValueError("a comma that is not a thousands separator")
    raise ValueError(f"syntax not allowed: {type(node).__name__}")


def eval_fraction(expr: str) -> Fraction:
    """The exact rational value of a calculator expression as written in GSM8K annotations.

    Allowed: numeric literals (``1,200`` thousands commas, ``$``, ``15%`` = 15/100 before an operator
    or at the end), ``+ - * / // % **``, unary ``+``/``-``, parentheses. ``**`` takes
    ``|exponent| <= 100`` and every intermediate value must stay under ``10**100``.
    Arithmetic is rational (``0.1*3`` is exactly ``0.3``). Anything else raises ValueError.
    """
    if not isinstance(expr, str):
        raise ValueError(f"expression must be a string, got {type(expr).__name__}")
    if len(expr) > MAX_EXPR_LEN:
        raise ValueError(f"expression too long ({len(expr)} characters, at most {MAX_EXPR_LEN})")
    src = _normalise(expr)
    if not src:
        raise ValueError("empty expression")
    try:
        tree = ast.parse(src, mode="eval")
    except (SyntaxError, MemoryError, RecursionError, ValueError) as e:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from e
    try:
        return _walk(tree, src)
    except RecursionError:
        raise ValueError(f"expression nested too deeply: {expr!r}") from None


def _to_decimal(v: Fraction, prec: int = 50) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = prec
        return Decimal(v.numerator) / Decimal(v.denominator)


# ---- calculator annotations -------------------------------------------------------------------

# the number written right after an annotation: a fraction (``3/4``) is read whole
_NUMBER_AFTER = re.compile(r"\s*\$?\s*((-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+)(?:/\d+(?:\.\d+)?)?)")


def annotation_spans(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, body)`` of every ``<<body>>`` in ``text``, as ``re.finditer(r"<<(.*?)>>")`` finds them.

    A scan in linear time: the regex tries every ``<<`` against the rest of its line, so a step of
    ``<<`` without ``>>`` cost quadratic time. An annotation never spans a line, and once a ``<<`` has
    no ``>>`` after it on its line, no later ``<<`` of that line has one either."""
    out = []
    offset = 0
    for line in text.split("\n"):
        pos = 0
        while True:
            start = line.find("<<", pos)
            if start < 0:
                break
            end = line.find(">>", start + 2)
            if end < 0:
                break
            out.append((offset + start, offset + end + 2, line[start + 2 : end]))
            pos = end + 2
        offset += len(line) + 1
    return out


def calc_annotations(step: str) -> list[tuple[str, str]]:
    """All ``<<expr=value>>`` annotations of a step, as (expr, value) stripped; value after the last '='."""
    out = []
    for _, _, body in annotation_spans(step):
        if "=" in body:
            expr, value = body.rsplit("=", 1)
            out.append((expr.strip(), value.strip()))
    return out


def _decimals(value: str) -> int:
    m = re.search(r"\.(\d+)", value)
    return len(m.group(1)) if m else 0


def value_matches(computed: Fraction, value: str) -> bool:
    """Does a written value state ``computed``? Exactly, or rounded to the decimals it is written with
    (``10/3=3.33``; integers must be exact). ``20%`` may mean 20 or 0.2."""
    candidates = [eval_fraction(value)]
    if value.rstrip().endswith("%"):
        candidates.append(eval_fraction(value.rstrip()[:-1]))
    d = _decimals(value)
    half_ulp = Fraction(1, 2 * 10**d) if d else Fraction(0)
    return any(computed == w or (d and abs(computed - w) <= half_ulp) for w in candidates)


def verify_step_annotations(step: str) -> tuple[bool, str]:
    """(True, reason) when every calculator annotation of the step evaluates to the value it states
    and the number written right after an annotation (if any) is that value; else (False, reason).

    A step with no annotation is vacuously true, with the reason ``"no calculator annotation"``;
    callers that must tell such steps apart (check_data) use :func:`calc_annotations` first. A step
    longer than ``MAX_STEP_CHARS`` is refused unread.
    """
    if len(step) > MAX_STEP_CHARS:
        return False, f"step is {len(step)} characters; the verifier reads at most {MAX_STEP_CHARS} characters"
    spans = annotation_spans(step)
    for start, end, body in spans:
        if "=" not in body:
            return False, f"annotation without '=': {step[start:end]}"
    if step.count("<<") != step.count(">>"):
        return False, "unbalanced '<<' / '>>'"
    if not spans:
        return True, "no calculator annotation"
    for _, end, body in spans:
        expr, value = (p.strip() for p in body.rsplit("=", 1))
        try:
            computed = eval_fraction(expr)
        except ValueError as e:
            return False, f"cannot evaluate {expr!r}: {e}"
        try:
            ok = value_matches(computed, value)
        except ValueError as e:
            return False, f"value {value!r} of {expr!r} is not a number: {e}"
        if not ok:
            return False, f"{expr}={value} is wrong: {expr} = {_fmt(computed)}"
        shown = _NUMBER_AFTER.match(step, end)
        if shown:
            # the number as written, a fraction whole (``<<3/4=3/4>>3/4``), or the part before its
            # slash, which is all that was read before fractions were (``<<2*3=6>>6/2=3`` stays right)
            ok = any(_states(computed, written) for written in {shown.group(1), shown.group(2)})
            if not ok:
                return False, f"writes {shown.group(1)} after <<{expr}={value}>>"
    return True, f"{len(spans)} annotation{'s' if len(spans) != 1 else ''} verified"


def _states(computed: Fraction, written: str) -> bool:
    try:
        return value_matches(computed, written)
    except ValueError:
        return False


def _fmt(v: Fraction) -> str:
    d = _to_decimal(v, 12)
    return format(d.normalize(), "f") if d == d.to_integral_value() else str(d)


# ---- data -------------------------------------------------------------------------------------


def _problem(obj: dict, where: str, n: int, meta: dict) -> Problem:
    """One GSM8K record (``where`` names it in errors) as problem ``gsm8k-<n>``."""
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("question", "answer"):
        if key not in obj:
            raise TaskError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], str):
            raise TaskError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    steps = split_steps(obj["answer"])
    final = final_answer(steps[-1]) if steps else None
    if not final or not steps[-1].lstrip().startswith("####"):
        raise TaskError(f"{where}: answer does not end with a '#### <final answer>' line")
    return Problem(id=f"gsm8k-{n}", question=obj["question"], answer=final.replace(",", ""), gold_steps=tuple(steps), meta=meta)


def load_jsonl(path: str | Path) -> list[Problem]:
    """GSM8K problems from a JSONL file; ids are ``gsm8k-<1-based line number>``.

    Raises TaskError for a missing file, and for a line that is not a JSON object with string
    ``question`` and ``answer`` fields or whose answer has no ``#### <final answer>`` last line.
    """
    return [_problem(obj, where, n, {"line": n, "path": str(path)}) for n, where, obj in read_jsonl(path)]


def load_gsm8k(path: str | Path) -> list[Problem]:
    """GSM8K problems from a JSONL file (:func:`load_jsonl`) or a directory written by ``datasets``'
    ``save_to_disk``: a Dataset, or a DatasetDict whose ``train`` split is read (as the hub's
    ``openai/gsm8k`` ``main`` saves). A saved dataset's ids are ``gsm8k-<1-based row>``, the line numbers
    the same rows have in the train JSONL. TaskError, naming the path, for anything else."""
    p = Path(path)
    if not p.is_dir():
        return load_jsonl(p)
    parts = read_saved_dataset(p, "train") if (p / "dataset_dict.json").exists() else read_saved_dataset(p)
    return [_problem(row, f"{path}, row {i}", i, {"row": i, "path": str(path)}) for _, d in parts for i, row in enumerate(d, 1)]


def check_data(path: str | Path, perturb: bool = False, seed: int = 0, limit: int | None = None) -> dict:
    """Verify the calculator annotations of every gold step in a data file (the first ``limit`` problems).

    Returns ``{"steps", "verified", "failed", "unannotated", "examples"}``: ``steps`` counts steps
    with at least one annotation (verified + failed); ``unannotated`` counts other non-final steps;
    final ``####`` lines are not counted. ``examples``: up to 10 failures as {"line", "step", "reason"}.
    With ``perturb``, every annotation's value (and its copy written right after it) first gets one
    digit changed, chosen with random.Random(seed), so that a sound verifier rejects nearly all steps.
    """
    rng = random.Random(seed)
    problems = load_gsm8k(path)
    if limit is not None:
        problems = problems[:limit]
    out = {"steps": 0, "verified": 0, "failed": 0, "unannotated": 0, "examples": []}
    for prob in problems:
        for step in prob.gold_steps:
            if final_answer(step) is not None:
                continue
            if perturb:
                step = perturb_step(step, rng)
            if not calc_annotations(step):
                out["unannotated"] += 1
                continue
            out["steps"] += 1
            ok, reason = verify_step_annotations(step)
            if ok:
                out["verified"] += 1
            else:
                out["failed"] += 1
                if len(out["examples"]) < 10:
                    out["examples"].append({"line": prob.meta.get("line"), "step": step, "reason": reason})
    return out


def _change_digit(value: str, rng: random.Random) -> str:
    positions = [i for i, c in enumerate(value) if c.isdigit()]
    if not positions:
        return value
    i = rng.choice(positions)
    new = rng.choice([d for d in "0123456789" if d != value[i]])
    return value[:i] + new + value[i + 1 :]


def perturb_step(step: str, rng: random.Random) -> str:
    """Change one digit of every annotation's value, and the same in a verbatim copy right after it."""
    out, pos = [], 0
    for start, end, body in annotation_spans(step):
        out.append(step[pos:start])
        pos = end
        if "=" not in body:
            out.append(step[start:end])
            continue
        expr, value = body.rsplit("=", 1)
        new = _change_digit(value, rng)
        out.append(f"<<{expr}={new}>>")
        if value.strip() and step.startswith(value.strip(), pos):
            out.append(new.strip())
            pos += len(value.strip())
    out.append(step[pos:])
    return "".join(out)


# ---- the task ---------------------------------------------------------------------------------


class GSM8KTask:
    name = "gsm8k"
    test_fraction = 10  # one question in this many (by hash) is in the "test" split

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._problems: list[Problem] = load_gsm8k(self.path)

    # ---- problems ---------------------------------------------------------------------------
    def split_of(self, question: str) -> str:
        return hash_split(question, self.test_fraction)

    def all_problems(self, split: str = "any") -> list[Problem]:
        if split not in ("train", "test", "any"):
            raise ValueError(f"split must be train, test or any, got {split!r}")
        return [p for p in self._problems if split == "any" or self.split_of(p.question) == split]

    def problems(self, n: int | None, seed: int, split: str = "test") -> list[Problem]:
        """``n`` problems of ``split`` in a seeded order (None: all of them)."""
        return sample_problems(self.all_problems(split), n, f"gsm8k:{seed}:{split}")

    # ---- format -----------------------------------------------------------------------------
    def question(self, text: str) -> str:
        """Any non-empty text: a word problem is for the model to read."""
        if not text or not text.strip():
            raise TaskError("empty question")
        return text.strip()

    def prompt(self, question: str) -> str:
        return f"Question: {question.strip()}\nAnswer:\n"

    # ---- critic -----------------------------------------------------------------------------
    def reference_step(self, problem: Problem, prefix: Sequence[str]) -> str:
        i = len(prefix)
        return problem.gold_steps[i] if i < len(problem.gold_steps) else f"#### {problem.answer}"

    def judge(self, problem: Problem, prefix: Sequence[str], step: str) -> Judgement:
        ref = self.reference_step(problem, prefix)
        ans = final_answer(step)
        if ans is not None:
            if answers_match(ans, problem.answer):
                return Judgement(True, ref, "final answer correct")
            return Judgement(False, ref, f"final answer {ans!r}, expected {problem.answer!r}")
        ok, why = verify_step_annotations(step)
        if not ok:
            return Judgement(False, ref, f"calculator annotation: {why}")
        got, want = step_result(step), step_result(ref)
        if got is not None and want is not None:
            if got != want:
                return Judgement(False, ref, f"result {got}, reference step gives {want}")
            return Judgement(True, ref, f"result {got} matches the reference step ({why})")
        return Judgement(True, ref, f"no result to compare with the reference step ({why})")

    def answer_correct(self, problem: Problem, answer: str | None) -> bool:
        return answers_match(answer, problem.answer)

    def error_kind(self, reason: str) -> str:
        if reason.startswith("calculator annotation"):
            return "arithmetic"
        if reason.startswith("result "):
            return "wrong result"
        if reason.startswith("final answer"):
            return "wrong final answer"
        return reason
