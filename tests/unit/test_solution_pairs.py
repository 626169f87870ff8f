"""Whole-solution pairs (the trajectory control and CRew-DPO), answer confidence, and drift formulas."""

import math

import pytest
import torch

from caspo.core.drift import logprob_change, mean_token_kl, relative_change
from caspo.core.confidence import StepSignal, answer_confidence, log_path_score
from caspo.core.pairs import SKIP_ALL_CORRECT, SKIP_ALL_WRONG, Skip, Solution, solution_pair
from caspo.core.steps import answer_span


def test_the_most_confident_right_solution_against_the_most_confident_wrong_one():
    sols = [
        Solution("a", True, 0.5),
        Solution("b", False, 0.9),
        Solution("c", True, 0.8),
        Solution("d", False, 0.2),
        Solution("e", True, 0.8),  # a tie goes to the first
        Solution("  ", False, 5.0),  # no text: not a solution
    ]
    chosen, rejected = solution_pair(sols)
    assert (chosen.text, rejected.text) == ("c", "b")


def test_a_question_with_only_right_or_only_wrong_solutions_makes_no_pair():
    assert solution_pair([Solution("a", True, 0.1), Solution("b", True, 0.2)]) == Skip(SKIP_ALL_CORRECT)
    assert solution_pair([Solution("a", False, 0.1)]) == Skip(SKIP_ALL_WRONG)
    assert solution_pair([]) == Skip(SKIP_ALL_WRONG)
    with pytest.raises(ValueError, match="solution score"):
        solution_pair([Solution("a", True, float("nan"))])


def test_answer_span_finds_the_answer_after_the_marker_and_in_a_box():
    assert answer_span("#### 28") == (5, 7)
    assert answer_span("so x = \\boxed{\\frac{1}{2}}.") == (14, 25)
    assert answer_span("7*3=21; 12+21-5") is None and answer_span("#### ") is None


def test_answer_confidence_is_the_mean_probability_of_the_answer_tokens():
    # one token per character (the built-in tokenizer), then the token that ended the step (the delimiter):
    # "#### 28\n" -> tokens 5 and 6 write "28"
    end = math.log(0.99)
    lps = [0.0, 0.0, 0.0, 0.0, 0.0, math.log(0.5), math.log(0.25), end]
    assert answer_confidence("#### 28", lps) == pytest.approx(0.375)
    # a confident marker does not dilute it: the same answer tokens after a longer preamble
    assert answer_confidence("so #### 28", [0.0] * 8 + lps[-3:]) == pytest.approx(0.375)
    # a step that states no answer yet (an unfinished path): all its tokens
    assert answer_confidence("12+7=19", [0.0] * 6 + [math.log(0.3)]) == pytest.approx(0.9)
    assert answer_confidence("#### 28", []) == 1.0


def test_the_answer_window_is_the_answers_tokens_without_the_end_token():
    # CRew on "#### 33": answer tokens with p = 0.5 and 0.6 give 0.55; the delimiter that ended the step
    # (p = 0.99) is not the answer (counting it gave 0.697)
    lps = [math.log(1.0)] * 5 + [math.log(0.5), math.log(0.6), math.log(0.99)]
    assert answer_confidence("#### 33", lps) == pytest.approx(0.55)
    assert math.exp(log_path_score("crew", [StepSignal((0.0,) * 8, tuple(lps), True, None, "#### 33")])) == pytest.approx(0.55)


def test_relative_weight_change_and_token_kl_against_hand_values():
    old = [torch.tensor([3.0, 4.0]), torch.tensor([0.0])]
    new = [torch.tensor([3.0, 4.0]), torch.tensor([5.0 * 0.1])]
    assert relative_change(old, new) == pytest.approx(0.1)
    assert relative_change(old, old) == 0.0
    # KL between [0.5, 0.5] and [0.25, 0.75] = 0.5 ln 2 + 0.5 ln(2/3)
    p = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    q = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9]]]))
    mask = torch.tensor([[True, False]])
    assert mean_token_kl(p, q, mask) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert mean_token_kl(p, p, torch.tensor([[True, True]])) == pytest.approx(0.0, abs=1e-12)
    assert logprob_change([-1.0, -2.0], [-1.5, -1.0]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        logprob_change([1.0], [])
