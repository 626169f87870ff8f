from decimal import Decimal

import pytest

from caspo.core.steps import answers_match, final_answer, is_final, parse_number, split_steps, step_result
from caspo.tasks.arith import ArithTask, solve


def test_split_steps_drops_empty_lines():
    assert split_steps("a=1\n\n  b=2  \n#### 3\n") == ["a=1", "b=2", "#### 3"]
    assert split_steps("x; y", delimiter=";") == ["x", "y"]


def test_final_answer_markers():
    assert final_answer("#### 52") == "52"
    assert final_answer("so the answer is \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert final_answer("12+7=19") is None
    assert is_final("#### -3") and not is_final("3*4=12")


def test_numbers_as_written():
    assert parse_number("$1,200.50") == Decimal("1200.50")
    assert parse_number("15%") == Decimal(15)
    assert parse_number("7 apples") == Decimal(7)
    assert parse_number("none") is None
    assert step_result("12+7=19") == Decimal(19)
    assert step_result("She has <<3*4=12>>12 eggs left") == Decimal(12)
    assert step_result("#### 1,000") == Decimal(1000)
    assert answers_match("1,000", "1000.0") and not answers_match("999", "1000") and not answers_match(None, "1")


def test_solve_left_to_right():
    assert solve("12+7*3-5") == ["12+7=19", "19*3=57", "57-5=52", "#### 52"]


def test_problems_seeded_and_splits_disjoint():
    t = ArithTask()
    a, b = t.problems(50, seed=3), t.problems(50, seed=3)
    assert [p.question for p in a] == [p.question for p in b]
    test_q = {p.question for p in t.problems(300, seed=1, split="test")}
    train_q = {p.question for p in t.problems(300, seed=1, split="train")}
    assert not test_q & train_q
    for p in t.problems(200, seed=0):
        steps = list(p.gold_steps)
        assert 3 <= len(steps) <= 5
        for s in steps[:-1]:
            v = int(s.split("=")[1])
            assert 0 <= v <= 199


def test_critic_reference_and_reasons():
    t = ArithTask()
    p = t.make_problem("12+7*3-5")
    ok = t.judge(p, [], "12+7=19")
    assert ok.correct and ok.reference == "12+7=19"
    slip = t.judge(p, [], "12+7=18")
    assert not slip.correct and slip.reference == "12+7=19" and slip.reason == "arithmetic slip"
    # local semantics: after a slip, carrying the written value forward is the correct next step
    assert t.judge(p, ["12+7=18"], "18*3=54").correct
    assert t.judge(p, ["12+7=18"], "18*3=54").reference == "18*3=54"
    assert not t.judge(p, ["12+7=19"], "19*4=76").correct
    early = t.judge(p, ["12+7=19"], "#### 19")
    assert not early.correct and early.reason == "stops early"
    extra = t.judge(p, ["12+7=19", "19*3=57", "57-5=52"], "52+1=53")
    assert not extra.correct and extra.reference == "#### 52"
    assert t.judge(p, ["12+7=19", "19*3=57", "57-5=52"], "#### 52").correct
    assert t.answer_correct(p, "52") and not t.answer_correct(p, "53") and not t.answer_correct(p, None)


def test_bad_question():
    with pytest.raises(ValueError, match="arithmetic chain"):
        solve("12+")
