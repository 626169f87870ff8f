"""caspo.core.siblings on sibling sets whose answers are known by construction."""

import pytest

from caspo.core.siblings import Sibling, divergence, sibling_report, top_choice


def sib(text, correct, ents, lps, reason=""):
    return Sibling(text, correct, tuple(ents), tuple(lps), reason or ("correct" if correct else "arithmetic slip"))


# Set A: the audit's case. Both siblings share the context up to the last digit, so every token entropy
# is identical; only the log-prob of the chosen last digit differs (right: -0.1, wrong: -2.3).
RIGHT_A = sib("16+31=47", True, [0.1, 0.0, 0.2, 0.0, 0.3, 0.0, 0.4, 0.9], [-0.1] * 7 + [-0.1])
WRONG_A = sib("16+31=49", False, [0.1, 0.0, 0.2, 0.0, 0.3, 0.0, 0.4, 0.9], [-0.1] * 7 + [-2.3])
# Set B: entropy tells them apart (the wrong one is uncertain from its first token), log-prob does too.
RIGHT_B = sib("8*7=56", True, [0.0] * 6, [-0.01] * 6)
WRONG_B = sib("8*6=48", False, [0.0, 0.0, 1.2, 0.5, 0.5, 0.5], [-0.01, -0.01, -1.5, -0.4, -0.4, -0.4], "wrong operands")
# Set C: only right steps (not mixed); a duplicate sample of RIGHT_B counts once.
SETS = [[RIGHT_A, WRONG_A, RIGHT_A], [WRONG_B, RIGHT_B, RIGHT_B], [RIGHT_B, RIGHT_B]]


def test_entropy_ties_on_the_late_divergence_and_log_prob_does_not():
    p, tie, all_tied = top_choice([RIGHT_A, WRONG_A], "entropy")
    assert (p, tie, all_tied) == (0.5, True, True)
    p, tie, all_tied = top_choice([RIGHT_A, WRONG_A], "logprob")
    assert (p, tie, all_tied) == (1.0, False, False)


def test_report_counts_sets_ties_and_ranking_per_scoring():
    rep = sibling_report(SETS, scorings=("entropy", "logprob"), error_kind=lambda r: {"arithmetic slip": "arithmetic"}.get(r, "wrong operation"))
    assert rep["sets"] == 3 and rep["mixed_sets"] == 2
    assert rep["siblings"] == 8 and rep["distinct_siblings"] == 5 and rep["distinct_correct"] == 3
    # entropy: set A is a coin flip (0.5), set B is right (1.0)
    assert rep["sibling_ranking"]["entropy"] == pytest.approx(0.75)
    assert rep["ties"]["entropy"] == 1 and rep["all_tied"]["entropy"] == 1
    assert rep["sibling_ranking"]["logprob"] == pytest.approx(1.0)
    assert rep["ties"]["logprob"] == 0
    assert rep["chance"] == pytest.approx(0.5)
    # step AUROC over the 5 distinct siblings (3 right, 2 wrong), entropy: the right ones score
    # -0.2375 (A), 0 (B) x2; the wrong ones -0.2375 (A, tied with its right sibling) and -0.45 (B)
    # pairs (right > wrong): A-right vs A-wrong 0.5, A-right vs B-wrong 1, B-right vs both 1 -> 5.5 / 6
    assert rep["step_auroc"]["entropy"] == pytest.approx(5.5 / 6)
    assert rep["errors"] == {"arithmetic slip": 1, "wrong operands": 1}
    assert rep["error_kinds"] == {"arithmetic": 1, "wrong operation": 1}


def test_entropy_gap_of_distinct_siblings():
    rep = sibling_report(SETS, scorings=("entropy",))
    right = (0.2375 + 0 + 0) / 3
    wrong = (0.2375 + 0.45) / 2
    assert rep["entropy"]["correct"] == pytest.approx(right)
    assert rep["entropy"]["incorrect"] == pytest.approx(wrong)
    assert rep["entropy"]["gap"] == pytest.approx(wrong - right)


def test_divergence_finds_the_last_digit_and_one_character_differences():
    d = divergence("16+31=49", ["16+31=47"])
    assert d.position == 7 and d.relative == pytest.approx(7 / 8) and d.one_character
    d = divergence("8*6=48", ["8*7=56"])
    assert d.position == 2 and not d.one_character
    rep = sibling_report(SETS, scorings=("entropy",))
    assert rep["divergence"]["wrong_siblings"] == 2 and rep["divergence"]["one_character"] == 1
    assert rep["divergence"]["histogram"][8] == 1 and rep["divergence"]["histogram"][3] == 1


def test_uncertainty_auroc_by_hand():
    from caspo.core.siblings import Sibling, sibling_report

    # right steps: first-token H 0.1 and 0.3, largest 0.1 and 0.9; wrong: first 0.2, largest 0.8
    sets = [[
        Sibling("a", True, (0.1, 0.05), (0.0, 0.0)),
        Sibling("b", True, (0.3, 0.9), (0.0, 0.0)),
        Sibling("c", False, (0.2, 0.8), (0.0, 0.0)),
    ]]
    u = sibling_report(sets)["uncertainty_auroc"]
    # first: -u right {-0.1, -0.3} vs wrong -0.2: one of two pairs ordered -> 0.5
    # max: right {-0.1, -0.9} vs wrong -0.8: one of two -> 0.5; mean: right {-0.075, -0.6} vs wrong -0.5 -> 0.5
    assert u == {"first_entropy": 0.5, "mean_entropy": 0.5, "max_entropy": 0.5}
    sets[0][1] = Sibling("b", True, (0.15, 0.1), (0.0, 0.0))  # now every right step is surer than the wrong one
    assert sibling_report(sets)["uncertainty_auroc"] == {"first_entropy": 1.0, "mean_entropy": 1.0, "max_entropy": 1.0}
