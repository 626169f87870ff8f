"""Steps, and the standard-precedence arithmetic task: parsing, its domain, the exact critic, data files."""

import json
import random
from decimal import Decimal

import pytest

from caspo.core.steps import answers_match, final_answer, is_final, parse_number, split_steps, step_result
from caspo.tasks import get_task
from caspo.tasks.arith import (
    ArithDomain,
    ArithTask,
    ExprError,
    allowed,
    extract_expression,
    judge_step,
    parse,
    sample_expression,
    solve,
    state_after,
    to_text,
    value,
)
from caspo.tasks.base import TaskError


def test_split_steps_drops_empty_lines():
    assert split_steps("a=1\n\n  b=2  \n#### 3\n") == ["a=1", "b=2", "#### 3"]
    assert split_steps("x; y", delimiter=";") == ["x", "y"]


def test_final_answer_markers():
    assert final_answer("#### 52") == "52"
    assert final_answer("so the answer is \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert final_answer("7*3=21; 12+21") is None
    assert is_final("#### -3") and not is_final("3*4=12")


def test_numbers_as_written():
    assert parse_number("$1,200.50") == Decimal("1200.50")
    assert parse_number("15%") == Decimal(15)
    assert parse_number("7 apples") == Decimal(7)
    assert parse_number("none") is None
    assert step_result("12+7=19") == Decimal(19)
    assert step_result("7*3=21; 12+21") == Decimal(21)  # the result, not the rewritten expression
    assert step_result("She has <<3*4=12>>12 eggs left") == Decimal(12)
    assert step_result("#### 1,000") == Decimal(1000)
    assert answers_match("1,000", "1000.0") and not answers_match("999", "1000") and not answers_match(None, "1")


# ---- what the expressions mean ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "question, answer",
    [
        ("12+7*3-5", 28),  # * before + and -
        ("(41+35)*2-94", 58),  # parentheses first
        ("8*(12-5)+3", 59),
        ("50-8-2", 40),  # left to right within a level: (50-8)-2, not 50-(8-2)
        ("50-(8-2)", 44),
        ("2*3*4", 24),
        (" 12 + 7 * 3 - 5 ", 28),  # spaces anywhere
        ("(2+3*4)*5", 70),
    ],
)
def test_standard_precedence(question, answer):
    assert value(parse(question)) == answer
    assert solve(question)[-1] == f"#### {answer}"


def test_the_gold_solution_of_the_issue_example():
    assert solve("12+7*3-5") == ["7*3=21; 12+21-5", "12+21=33; 33-5", "33-5=28", "#### 28"]
    assert solve("8*(12-5)+3") == ["12-5=7; 8*7+3", "8*7=56; 56+3", "56+3=59", "#### 59"]
    # a parenthesis around a single number is dropped; the fewest parentheses that keep the tree stay
    assert solve("(2+3*4)*5") == ["3*4=12; (2+12)*5", "2+12=14; 14*5", "14*5=70", "#### 70"]
    assert to_text(parse("((2*3))+4")) == "2*3+4" and to_text(parse("50-(8-2)")) == "50-(8-2)"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty question"),
        ("   ", "empty question"),
        ("(1+2", "unbalanced parentheses: the '(' at character 1 is never closed"),
        ("1+2)", "unbalanced parentheses: the ')' at character 4 has no '('"),
        ("12/3", "division"),
        ("12^2", "unknown symbol '^' at character 3"),
        ("x+1", "unknown symbol 'x'"),
        ("12+", "ends where a number was expected"),
        ("1 2", "unexpected '2' at character 3"),
    ],
)
def test_bad_expressions_name_the_problem(text, message):
    with pytest.raises(ExprError, match=message.replace("(", r"\(").replace(")", r"\)").replace("^", r"\^")):
        parse(text)


@pytest.mark.parametrize(
    "text, message",
    [
        ("100+1", "the number 100 is out of range: numbers are 0..99"),
        ("20*20", "20\\*20: one factor of every product must be at most 9"),
        ("99+99+99", "every intermediate value must be in 0..199"),
        ("5-9", "5-9 = -4: every intermediate value must be in 0..199"),
        ("1+2+3+4+5+6", "5 operations: the task takes 1 to 4"),
        ("7", "0 operations"),
    ],
)
def test_values_out_of_the_domain_name_the_limit(text, message):
    with pytest.raises(ExprError, match=message):
        ArithDomain().check(parse(text))


def test_questions_people_type():
    t = ArithTask()
    assert t.question("12+7*3-5") == "12+7*3-5"
    assert t.question("What is 12+7*3-5?") == "12+7*3-5"
    assert t.question("compute: (41 + 35) * 2 - 94 =") == "(41+35)*2-94"
    assert extract_expression("Calculate 8*(12-5)+3.") == "8*(12-5)+3"
    with pytest.raises(TaskError, match="unknown symbol 'H'.*the task takes whole numbers"):
        t.question("How many apples does Tom have?")
    with pytest.raises(TaskError, match="division"):
        t.question("What is 12/4?")


# ---- the critic -------------------------------------------------------------------------------------
def judged(question, prefix, step):
    return judge_step(state_after(question, prefix), step)


@pytest.mark.parametrize(
    "question, prefix, step, correct, reason",
    [
        # ties of *: both products are allowed first, in either order
        ("2*3+4*5", [], "2*3=6; 6+4*5", True, "correct"),
        ("2*3+4*5", [], "4*5=20; 2*3+20", True, "correct"),
        ("2*3+4*5", ["4*5=20; 2*3+20"], "2*3=6; 6+20", True, "correct"),
        # a step that jumps precedence: + before the * it waits for
        ("12+7*3-5", [], "12+7=19; 19*3-5", False, "operation not allowed yet"),
        ("2*3+4*5", [], "3+4=7; 2*7*5", False, "operation not allowed yet"),
        # left to right within a level: 7+5 is not allowed in 12+7+5
        ("12+7+5", [], "7+5=12; 12+12", False, "operation not allowed yet"),
        # nested parentheses: the innermost allowed operation first
        ("(2+3*4)*5", [], "3*4=12; (2+12)*5", True, "correct"),
        ("(2+3*4)*5", [], "2+3=5; 5*4*5", False, "operation not allowed yet"),
        ("(2+3*4)*5", ["3*4=12; (2+12)*5"], "2+12=14; 14*5", True, "correct"),
        ("8*(12-5)+3", [], "8*12=96; 96-5+3", False, "operation not allowed yet"),
        # the right operation computed wrong
        ("12+7*3-5", [], "7*3=24; 12+24-5", False, "arithmetic slip"),
        # operands that are not in the expression (lost track of it)
        ("12+7*3-5", ["7*3=21; 12+21-5"], "7*3=21; 12+21-5", False, "wrong operands"),
        # right operation and result, the rest copied wrong or not at all
        ("12+7*3-5", [], "7*3=21; 12+21-6", False, "rewrite does not match"),
        ("12+7*3-5", [], "7*3=21", False, "missing rewrite"),
        # redundant parentheses in a rewrite are accepted (same tree)
        ("12+7*3-5", [], "7*3=21; (12+21)-5", True, "correct"),
        # stopping: early, late, and the final answer
        ("12+7*3-5", ["7*3=21; 12+21-5"], "#### 33", False, "stops early"),
        ("12+7*3-5", ["7*3=21; 12+21-5", "12+21=33; 33-5", "33-5=28"], "28+1=29", False, "an operation after the last one"),
        ("12+7*3-5", ["7*3=21; 12+21-5", "12+21=33; 33-5", "33-5=28"], "#### 29", False, "wrong final answer"),
        ("12+7*3-5", ["7*3=21; 12+21-5", "12+21=33; 33-5", "33-5=28"], "#### 28", True, "final answer"),
        ("12+7*3-5", [], "twenty-one", False, "not a step"),
        # spaces do not matter
        ("12+7*3-5", [], "7 * 3 = 21 ; 12 + 21 - 5", True, "correct"),
        # local semantics: after a copy error, the written expression is what the next step works on
        ("12+7*3-5", ["7*3=21; 12+21-6"], "12+21=33; 33-6", True, "correct"),
    ],
)
def test_critic_hand_worked(question, prefix, step, correct, reason):
    assert judged(question, prefix, step) == (correct, reason)


def test_reference_step_and_judgement_through_the_task():
    t = ArithTask()
    p = t.make_problem("12+7*3-5")
    assert p.answer == "28" and p.gold_steps[-1] == "#### 28"
    j = t.judge(p, [], "12+7=19; 19*3-5")
    assert not j.correct and j.reference == "7*3=21; 12+21-5" and t.error_kind(j.reason) == "wrong operation"
    assert t.judge(p, ["7*3=21; 12+21-5"], "12+21=33; 33-5").correct
    assert t.reference_step(p, ["7*3=21; 12+21-5", "12+21=33; 33-5", "33-5=28"]) == "#### 28"
    assert t.answer_correct(p, "28") and t.answer_correct(p, " 28 ") and not t.answer_correct(p, "29")
    assert not t.answer_correct(p, None) and not t.answer_correct(p, "twenty-eight")


def _perturb(step: str, rng: random.Random) -> str:
    digits = [i for i, c in enumerate(step) if c.isdigit()]
    i = rng.choice(digits)
    return step[:i] + rng.choice([d for d in "0123456789" if d != step[i]]) + step[i + 1 :]


def test_ten_thousand_gold_solutions_verify_and_perturbed_copies_do_not():
    t = ArithTask()
    rng = random.Random(7)
    problems = t.problems(10_000, seed=11, split="any")
    assert len({p.question for p in problems}) > 9_000
    for p in problems:
        for j, step in enumerate(p.gold_steps):
            judgement = t.judge(p, list(p.gold_steps[:j]), step)
            assert judgement.correct, (p.question, j, step, judgement.reason)
            assert judgement.reference == step or len(allowed(state_after(p.question, p.gold_steps[:j]))) > 1
            # the reference step is always accepted
            assert t.judge(p, list(p.gold_steps[:j]), judgement.reference).correct
        j = rng.randrange(len(p.gold_steps))
        bad = _perturb(p.gold_steps[j], rng)
        assert not t.judge(p, list(p.gold_steps[:j]), bad).correct, (p.question, p.gold_steps[j], bad)


def test_every_allowed_order_verifies():
    # random allowed orders (not the reference's leftmost) are judged correct step by step
    t = ArithTask()
    for i, p in enumerate(t.problems(500, seed=2, split="any")):
        steps = solve(p.question, random.Random(i))
        assert steps[-1] == p.gold_steps[-1]
        for j, step in enumerate(steps):
            assert t.judge(p, steps[:j], step).correct, (p.question, steps, j)


def test_generated_problems_stay_in_the_domain_and_splits_are_disjoint():
    t = ArithTask()
    assert [p.question for p in t.problems(50, seed=3)] == [p.question for p in t.problems(50, seed=3)]
    test_q = {p.question for p in t.problems(300, seed=1, split="test")}
    train_q = {p.question for p in t.problems(300, seed=1, split="train")}
    assert not test_q & train_q
    ops = set()
    for p in t.problems(2000, seed=0, split="any"):
        node = parse(p.question)
        ArithDomain().check(node)  # raises if outside
        ops.add(len(p.gold_steps) - 1)
        assert to_text(node) == p.question
    assert ops == {2, 3, 4}
    share_parens = sum("(" in p.question for p in t.problems(2000, seed=0, split="any")) / 2000
    assert 0.2 < share_parens < 0.8


def test_sample_expression_respects_a_smaller_domain():
    d = ArithDomain(max_number=20, max_value=50, max_multiplier=5)
    rng = random.Random(0)
    for _ in range(200):
        d.check(sample_expression(rng, 3, d))


# ---- data files ---------------------------------------------------------------------------------------
def _write(tmp_path, lines):
    f = tmp_path / "problems.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return str(f)


def test_a_hand_written_file_is_read_in_order(tmp_path):
    path = _write(tmp_path, [json.dumps({"question": "12+7*3-5", "answer": 28}), "", json.dumps({"question": "What is (41+35)*2-94?", "answer": "58"})])
    t = get_task("arith", path)
    ps = t.problems(None, seed=0)
    assert [(p.question, p.answer, p.meta["line"]) for p in ps] == [("12+7*3-5", "28", 1), ("(41+35)*2-94", "58", 3)]
    assert [p.question for p in t.problems(1, seed=5, split="train")] == ["12+7*3-5"]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"question": "12+7*3-5", "answer": 28', "line 2: malformed JSON"),
        ('["12+7*3-5", 28]', "line 2: expected a JSON object"),
        ('{"question": "12+7*3-5"}', "line 2: missing field 'answer'"),
        ('{"question": 12, "answer": 12}', "line 2: question must be a string"),
        ('{"question": "12+(7*3", "answer": 33}', "line 2: question '12\\+\\(7\\*3': unbalanced parentheses"),
        ('{"question": "12/4", "answer": 3}', "line 2: question '12/4': division"),
        ('{"question": "150+1", "answer": 151}', "line 2: question '150\\+1': the number 150 is out of range"),
        ('{"question": "12+7*3-5", "answer": 52}', "line 2: answer 52 does not match the question: 12\\+7\\*3-5 = 28"),
        ('{"question": "12+7*3-5", "answer": 28.5}', "line 2: answer must be a whole number"),
    ],
)
def test_bad_lines_name_the_line_and_the_problem(tmp_path, bad_line, message):
    path = _write(tmp_path, [json.dumps({"question": "1+2*3", "answer": 7}), bad_line])
    with pytest.raises(TaskError, match=message):
        get_task("arith", path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(TaskError, match="data file not found"):
        get_task("arith", str(tmp_path / "nope.jsonl"))
    with pytest.raises(TaskError, match="no problems in the file"):
        get_task("arith", _write(tmp_path, [""]))
