"""Arithmetic with standard precedence: seeded problems, an exact step critic, user questions and files.

A question is an expression of whole numbers with ``+``, ``-``, ``*`` and parentheses, meaning what it
means in mathematics: ``*`` before ``+``/``-``, left to right within a level, parentheses first, so
``12+7*3-5`` is 28. A solution does one operation per step: the operation with its result, then the
expression rewritten with that result in place (omitted once it is a single number), and a final
answer line::

    Q:12+7*3-5
    7*3=21; 12+21-5
    12+21=33; 33-5
    33-5=28
    #### 28

The critic is exact and local (it reads the expression the previous step wrote, or the question): a
step is correct when its operation is one that precedence allows next — both ``2*3`` and ``4*5`` are
allowed first in ``2*3+4*5``, ``7+5`` is not allowed in ``12+7+5`` — its result is right, and its
rewrite is the expression with that operation replaced by its result (parentheses around a single
number dropped; redundant parentheses are accepted). The reference step takes the leftmost allowed
operation. Once the expression is a number, the correct step is ``#### value``.

The domain (:class:`ArithDomain`) keeps the built-in model's problems small: numbers 0..99, the smaller
factor of every product at most 9, every intermediate value in 0..199, 1 to 4 operations (generated
problems have 2 to 4). A question outside it is refused with a message that names the limit.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from caspo.tasks.base import Judgement, Problem, TaskError, read_jsonl

# ---- expressions ------------------------------------------------------------------------------------


class ExprError(ValueError):
    """An expression the task cannot take; the message names the problem and what is accepted."""


@dataclass(frozen=True)
class Num:
    value: int


@dataclass(frozen=True)
class Op:
    op: str
    left: "Expr"
    right: "Expr"


Expr = Union[Num, Op]

PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_SYMBOLS = {"×": "*", "·": "*", "−": "-", "–": "-"}  # what people type for * and -
ACCEPTS = "whole numbers with + - * and parentheses, e.g. 12+7*3-5"


def apply(op: str, a: int, b: int) -> int:
    return _APPLY[op](a, b)


def _tokens(text: str) -> list[tuple[str, int]]:
    out = []
    for m in re.finditer(r"\d+|\S", text):
        t = _SYMBOLS.get(m.group(0), m.group(0))
        if not (t.isdigit() or t in "+-*()"):
            if t in "/÷:":
                raise ExprError(f"division ({m.group(0)!r} at character {m.start() + 1}) is not supported: the task takes {ACCEPTS}")
            raise ExprError(f"unknown symbol {m.group(0)!r} at character {m.start() + 1}: the task takes {ACCEPTS}")
        out.append((t, m.start() + 1))
    return out


def parse(text: str) -> Expr:
    """The expression tree of ``text`` (spaces allowed); ExprError names what is wrong and where."""
    if not text or not text.strip():
        raise ExprError(f"empty question: the task takes {ACCEPTS}")
    toks = _tokens(text)
    i = 0

    def peek() -> str | None:
        return toks[i][0] if i < len(toks) else None

    def atom() -> Expr:
        nonlocal i
        if i >= len(toks):
            raise ExprError("the expression ends where a number was expected")
        t, pos = toks[i]
        i += 1
        if t.isdigit():
            return Num(int(t))
        if t == "(":
            node = expr()
            if peek() != ")":
                raise ExprError(f"unbalanced parentheses: the '(' at character {pos} is never closed")
            i += 1
            return node
        raise ExprError(f"a number was expected at character {pos}, got {t!r}")

    def term() -> Expr:
        nonlocal i
        node = atom()
        while peek() == "*":
            i += 1
            node = Op("*", node, atom())
        return node

    def expr() -> Expr:
        nonlocal i
        node = term()
        while peek() in ("+", "-"):
            op = toks[i][0]
            i += 1
            node = Op(op, node, term())
        return node

    node = expr()
    if i < len(toks):
        t, pos = toks[i]
        if t == ")":
            raise ExprError(f"unbalanced parentheses: the ')' at character {pos} has no '('")
        raise ExprError(f"unexpected {t!r} at character {pos}")
    return node


def value(node: Expr) -> int:
    return node.value if isinstance(node, Num) else apply(node.op, value(node.left), value(node.right))


def operations(node: Expr) -> int:
    return 0 if isinstance(node, Num) else 1 + operations(node.left) + operations(node.right)


def to_text(node: Expr) -> str:
    """The expression with the fewest parentheses that keep its tree: a child of lower precedence, or a
    right child of equal precedence (``a-(b+c)``), is parenthesised."""
    if isinstance(node, Num):
        return str(node.value)
    p = PRECEDENCE[node.op]
    left, right = to_text(node.left), to_text(node.right)
    if isinstance(node.left, Op) and PRECEDENCE[node.left.op] < p:
        left = f"({left})"
    if isinstance(node.right, Op) and PRECEDENCE[node.right.op] <= p:
        right = f"({right})"
    return f"{left}{node.op}{right}"


NodePath = tuple[int, ...]  # a node's position: 0 = left child, 1 = right child, from the root


def allowed(node: Expr, path: NodePath = ()) -> list[NodePath]:
    """The operations precedence allows next (both operands are numbers), left to right."""
    if isinstance(node, Num):
        return []
    if isinstance(node.left, Num) and isinstance(node.right, Num):
        return [path]
    return allowed(node.left, path + (0,)) + allowed(node.right, path + (1,))


def subtree(node: Expr, path: NodePath) -> Expr:
    for p in path:
        node = node.left if p == 0 else node.right
    return node


def replace(node: Expr, path: NodePath, new: Expr) -> Expr:
    if not path:
        return new
    if path[0] == 0:
        return Op(node.op, replace(node.left, path[1:], new), node.right)
    return Op(node.op, node.left, replace(node.right, path[1:], new))


def do_step(node: Expr, path: NodePath) -> tuple[str, Expr]:
    """The step text of doing the operation at ``path``, and the expression after it."""
    o = subtree(node, path)
    r = apply(o.op, o.left.value, o.right.value)
    after = replace(node, path, Num(r))
    text = f"{o.left.value}{o.op}{o.right.value}={r}"
    return (text + f"; {to_text(after)}" if isinstance(after, Op) else text), after


def solve(question: str, rng: random.Random | None = None) -> list[str]:
    """Gold steps: the leftmost allowed operation each time (a random allowed one with ``rng``)."""
    node = parse(question)
    steps = []
    while isinstance(node, Op):
        paths = allowed(node)
        text, node = do_step(node, rng.choice(paths) if rng else paths[0])
        steps.append(text)
    return steps + [f"#### {node.value}"]


# ---- the domain ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArithDomain:
    max_number: int = 99  # every number written in a question
    max_multiplier: int = 9  # the smaller factor of every product
    max_value: int = 199  # every intermediate value is in 0..max_value
    min_ops: int = 1  # what a question may have ...
    max_ops: int = 4
    gen_min_ops: int = 2  # ... and what generated problems have
    gen_max_ops: int = 4

    def check(self, node: Expr) -> None:
        k = operations(node)
        if not self.min_ops <= k <= self.max_ops:
            raise ExprError(f"{k} operations: the task takes {self.min_ops} to {self.max_ops}")

        def walk(n: Expr) -> int:
            if isinstance(n, Num):
                if n.value > self.max_number:
                    raise ExprError(f"the number {n.value} is out of range: numbers are 0..{self.max_number}")
                return n.value
            a, b = walk(n.left), walk(n.right)
            v = apply(n.op, a, b)
            if n.op == "*" and min(a, b) > self.max_multiplier:
                raise ExprError(f"{a}*{b}: one factor of every product must be at most {self.max_multiplier}")
            if not 0 <= v <= self.max_value:
                raise ExprError(f"{to_text(n)} = {v}: every intermediate value must be in 0..{self.max_value}")
            return v

        walk(node)


def sample_expression(rng: random.Random, ops: int, domain: ArithDomain = ArithDomain()) -> Expr:
    """A random expression with ``ops`` operations inside the domain (rejection sampling)."""
    while True:
        node: Expr = Num(0)
        for _ in range(ops):  # grow a random tree: a leaf becomes an operation
            leaves = _leaves(node)
            node = replace(node, rng.choice(leaves), Op(rng.choice("+-*"), Num(0), Num(0)))
        node = _fill(rng, node, domain)
        try:
            domain.check(node)
        except ExprError:
            continue
        return node


def _leaves(node: Expr, path: NodePath = ()) -> list[NodePath]:
    if isinstance(node, Num):
        return [path]
    return _leaves(node.left, path + (0,)) + _leaves(node.right, path + (1,))


def _fill(rng: random.Random, node: Expr, d: ArithDomain, parent: str = "") -> Expr:
    """Random numbers: a factor of a product is a small multiplier unless its sibling already is one."""
    if isinstance(node, Num):
        return Num(rng.randint(2, d.max_multiplier) if parent == "*" else rng.randint(1, d.max_number))
    left, right = _fill(rng, node.left, d, node.op), _fill(rng, node.right, d, node.op)
    if node.op == "*" and isinstance(left, Num) and isinstance(right, Num) and rng.random() < 0.5:
        left = Num(rng.randint(2, max(2, min(d.max_number, d.max_value // right.value))))
    return Op(node.op, left, right)


# ---- the critic --------------------------------------------------------------------------------------

_STEP = re.compile(r"^(\d+)([+\-*])(\d+)=(-?\d+)(?:;(.*))?$")
_FINAL = re.compile(r"^####(-?\d+)$")

# what went wrong, by the critic's reason (the taxonomy `caspo diagnose` reports)
ERROR_KINDS = {
    "operation not allowed yet": "wrong operation",
    "wrong operands": "wrong operation",
    "arithmetic slip": "arithmetic",
    "rewrite does not match": "copy",
    "missing rewrite": "copy",
    "not a step": "format",
    "stops early": "stopped early",
    "an operation after the last one": "stopped late",
    "wrong final answer": "arithmetic",
}


def state_after(question: str, prefix: Sequence[str]) -> Expr:
    """The expression the last step of ``prefix`` wrote (a step that does not parse changes nothing)."""
    node = parse(question)
    for s in prefix:
        m = _STEP.match(s.replace(" ", ""))
        if not m:
            continue
        if m.group(5) is None:
            node = Num(int(m.group(4)))
        else:
            try:
                node = parse(m.group(5))
            except ExprError:
                pass
    return node


def reference_step(node: Expr) -> str:
    return f"#### {node.value}" if isinstance(node, Num) else do_step(node, allowed(node)[0])[0]


def judge_step(node: Expr, step: str) -> tuple[bool, str]:
    """(correct, reason) of ``step`` done on the expression ``node``."""
    s = step.replace(" ", "")
    final = _FINAL.match(s)
    if isinstance(node, Num):
        if final:
            return (True, "final answer") if int(final.group(1)) == node.value else (False, "wrong final answer")
        return False, "an operation after the last one" if _STEP.match(s) else "not a step"
    if s.startswith("####"):
        return False, "stops early"
    m = _STEP.match(s)
    if not m:
        return False, "not a step"
    a, op, b, r, rest = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4)), m.group(5)
    paths = [p for p in allowed(node) if (lambda o: (o.left.value, o.op, o.right.value))(subtree(node, p)) == (a, op, b)]
    if not paths:
        return False, "operation not allowed yet" if _adjacent(node, a, op, b) else "wrong operands"
    if apply(op, a, b) != r:
        return False, "arithmetic slip"
    if rest is None:
        return (True, "correct") if any(isinstance(do_step(node, p)[1], Num) for p in paths) else (False, "missing rewrite")
    try:
        written = parse(rest)
    except ExprError:
        return False, "rewrite does not match"
    if any(do_step(node, p)[1] == written for p in paths):
        return True, "correct"
    return False, "rewrite does not match"


def _adjacent(node: Expr, a: int, op: str, b: int) -> bool:
    """Do ``a op b`` stand next to each other in the written expression, parentheses aside (so only
    precedence forbids them)?"""
    toks = [t for t, _ in _tokens(to_text(node)) if t not in "()"]
    return any(toks[i : i + 3] == [str(a), op, str(b)] for i in range(len(toks) - 2))


# ---- questions people type, and files they write ---------------------------------------------------

_LEAD = re.compile(r"^\s*(?:what\s+is|what's|how\s+much\s+is|compute|calculate|evaluate|solve)\s*:?\s*", re.I)
_TRAIL = re.compile(r"\s*(?:=\s*\??|\?|\.)\s*$")


def extract_expression(text: str) -> str:
    """The expression in a question such as ``What is 12+7*3-5?`` (a leading what is / compute /
    calculate / evaluate, a trailing ``?``, ``=`` or ``.`` are dropped); anything else must be the
    expression itself."""
    return _TRAIL.sub("", _LEAD.sub("", text or "", count=1), count=1)


def load_jsonl(path: str | Path, domain: ArithDomain = ArithDomain()) -> list[tuple[int, str, int]]:
    """``(line, canonical question, answer)`` for every line of a JSONL file of
    ``{"question": "12+7*3-5", "answer": 28}`` objects (answer a whole number or its text); TaskError
    names the line and what is wrong with it."""
    out = []
    for lineno, where, obj in read_jsonl(path):
        for key in ("question", "answer"):
            if key not in obj:
                raise TaskError(f"{where}: missing field {key!r}")
        q, a = obj["question"], obj["answer"]
        if not isinstance(q, str):
            raise TaskError(f"{where}: question must be a string, got {type(q).__name__}")
        try:
            node = parse(extract_expression(q))
            domain.check(node)
        except ExprError as e:
            raise TaskError(f"{where}: question {q!r}: {e}") from None
        if isinstance(a, bool) or not isinstance(a, (int, str)) or not re.fullmatch(r"\s*-?\d+\s*", str(a)):
            raise TaskError(f"{where}: answer must be a whole number, got {a!r}")
        if int(a) != value(node):
            raise TaskError(f"{where}: answer {int(a)} does not match the question: {to_text(node)} = {value(node)}")
        out.append((lineno, to_text(node), int(a)))
    if not out:
        raise TaskError(f"{path}: no problems in the file")
    return out


# ---- the task ----------------------------------------------------------------------------------------


class ArithTask:
    """Generated problems (2 to 4 operations, split train/val/test by a hash of the question), or the
    problems of a JSONL file; the prompt ``Q:<expression>``; the exact critic above.

    The test split is one question in ``test_fraction`` (by hash). The validation split is another
    one in ``test_fraction``, part of the train split (CASPO rounds may ask it) but held out from base
    training, for choosing the base model's checkpoints (``caspo train-base --eval-every``) without
    looking at the test split."""

    name = "arith"
    test_fraction = 10  # one question in this many (by hash) is held out for test, another for validation

    def __init__(self, data: str | None = None, domain: ArithDomain | None = None):
        self.domain = domain or ArithDomain()
        self.data = data
        self._file = load_jsonl(data, self.domain) if data else None

    # ---- questions -------------------------------------------------------------------------------
    def question(self, text: str) -> str:
        """The canonical expression of a question a person typed; TaskError names what the task takes."""
        try:
            node = parse(extract_expression(text))
            self.domain.check(node)
        except ExprError as e:
            raise TaskError(str(e)) from None
        return to_text(node)

    def split_of(self, question: str) -> str:
        return "test" if self._bucket(question) == 0 else "train"

    def _bucket(self, question: str) -> int:
        return int(hashlib.sha1(question.encode()).hexdigest(), 16) % self.test_fraction

    def is_validation(self, question: str) -> bool:
        """In the validation split: a train-split question that base training never sees."""
        return self._bucket(question) == 1

    def _in_split(self, question: str, split: str) -> bool:
        if split == "val":
            return self.is_validation(question)
        return split == "any" or self.split_of(question) == split

    def make_problem(self, question: str, meta: dict | None = None) -> Problem:
        steps = solve(question)
        pid = hashlib.sha1(question.encode()).hexdigest()[:12]
        return Problem(id=f"arith-{pid}", question=question, answer=steps[-1][5:], gold_steps=tuple(steps), meta=meta or {})

    def problems(self, n: int | None, seed: int, split: str = "test") -> list[Problem]:
        """``n`` problems (None: all of a data file); generated ones are reproducible from ``seed`` and
        drawn from ``split``; a data file's come in file order (seed and split do not apply)."""
        if split not in ("train", "val", "test", "any"):
            raise ValueError(f"split must be train, val, test or any, got {split!r}")
        if self._file is not None:
            rows = self._file if n is None else self._file[:n]
            return [self.make_problem(q, {"line": line, "path": self.data}) for line, q, _ in rows]
        if n is None:
            raise ValueError("n is required for generated problems")
        rng = random.Random(f"arith:{seed}:{split}")
        out = []
        while len(out) < n:
            q = to_text(sample_expression(rng, rng.randint(self.domain.gen_min_ops, self.domain.gen_max_ops), self.domain))
            if self._in_split(q, split):
                out.append(self.make_problem(q))
        return out

    def iter_train_text(self, seed: int, random_order: float = 0.0):
        """Endless (prompt, solution) pairs from the train split less the validation split, for base training; with
        ``random_order`` > 0, that share of solutions take a random allowed operation at each step."""
        rng = random.Random(f"arith-train-stream:{seed}")
        while True:
            q = to_text(sample_expression(rng, rng.randint(self.domain.gen_min_ops, self.domain.gen_max_ops), self.domain))
            if self.split_of(q) == "train" and not self.is_validation(q):
                order = rng if random_order and rng.random() < random_order else None
                yield self.prompt(q), "".join(s + "\n" for s in solve(q, order))

    # ---- format ----------------------------------------------------------------------------------
    def prompt(self, question: str) -> str:
        """``Q:<expression>``, the expression as the model was trained on it: ``(41+35)*2-94``. A person
        types ``(41 + 35) * 2 - 94`` or ``What is 12+7*3-5?`` (with the spaces the shipped model answered
        the first 38), so the question's words and spaces are taken out first."""
        return f"Q:{''.join(extract_expression(question).split())}\n"

    # ---- critic ----------------------------------------------------------------------------------
    def reference_step(self, problem: Problem, prefix: Sequence[str]) -> str:
        return reference_step(state_after(problem.question, prefix))

    def judge(self, problem: Problem, prefix: Sequence[str], step: str) -> Judgement:
        node = state_after(problem.question, prefix)
        ok, reason = judge_step(node, step)
        return Judgement(ok, reference_step(node), reason)

    def error_kind(self, reason: str) -> str:
        return ERROR_KINDS.get(reason, "other")

    def answer_correct(self, problem: Problem, answer: str | None) -> bool:
        if answer is None:
            return False
        try:
            return int(answer.strip()) == int(problem.answer)
        except ValueError:
            return False
