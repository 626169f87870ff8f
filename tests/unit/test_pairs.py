"""Unit tests for caspo.core.pairs: the three-case rule of Algorithm 1 (docs/design.md §5)."""

from __future__ import annotations

import dataclasses

import pytest

from caspo.core.pairs import (
    CASE_INCORRECT,
    CASE_UNSURE_CORRECT,
    SKIP_CONFIDENT,
    SKIP_NO_COMPETITOR,
    Candidate,
    Pair,
    Skip,
    build_pair,
    pair_key,
    resolve_tau,
    tau_from_quantile,
)
from caspo.services.pair_store_servicer import pair_from_proto, pair_to_proto
from caspo.store.pair_store import pair_from_redis, pair_to_redis

PROMPT = "Q: 2 + 3 * 4 = ?\n"
STEP = "3 * 4 = 12"
REFERENCE = "3 * 4 = 12"
TAU = -0.2  # eq. 2 scale: -mean entropy, <= 0


def _build(step=STEP, correct=True, confidence=-0.5, competitors=(), reference=REFERENCE, tau=TAU):
    return build_pair(PROMPT, step, correct, confidence, list(competitors), reference, tau)


# ---------------------------------------------------------------- case 1: correct and confident


def test_correct_and_confident_is_skipped():
    out = _build(confidence=-0.1, competitors=[Candidate("3 * 4 = 7", False, -1.0)])
    assert out == Skip(reason=SKIP_CONFIDENT)


# ---------------------------------------------------------------- case 2: correct but unsure


def test_correct_unsure_picks_most_likely_incorrect_competitor():
    competitors = [
        Candidate("3 * 4 = 7", False, -5.0),
        Candidate("3 * 4 = 13", False, -1.5),  # most likely incorrect one
        Candidate("4 * 3 = 12", True, -0.1),  # more likely, but correct: not a rejected step
        Candidate("3 * 4 = 11", False, -3.0),
    ]
    out = _build(confidence=-0.5, competitors=competitors)
    assert out == Pair(
        prompt=PROMPT,
        chosen=STEP,
        rejected="3 * 4 = 13",
        case=CASE_UNSURE_CORRECT,
        confidence=-0.5,
        tau=TAU,
    )


def test_correct_unsure_ties_go_to_first_occurrence():
    competitors = [Candidate("first", False, -2.0), Candidate("second", False, -2.0)]
    out = _build(competitors=competitors)
    assert isinstance(out, Pair) and out.rejected == "first"


def test_correct_unsure_without_incorrect_competitor_is_skipped():
    competitors = [Candidate("4 * 3 = 12", True, -0.3), Candidate("12 = 3 * 4", True, -0.9)]
    assert _build(competitors=competitors) == Skip(reason=SKIP_NO_COMPETITOR)
    assert _build(competitors=[]) == Skip(reason=SKIP_NO_COMPETITOR)


def test_competitor_identical_to_step_is_ignored():
    # the most likely "incorrect" competitor is the step itself (also with extra whitespace): never rejected
    competitors = [
        Candidate(STEP, False, -0.01),
        Candidate("  " + STEP + "\n", False, -0.02),
        Candidate("3 * 4 = 10", False, -4.0),
    ]
    out = _build(competitors=competitors)
    assert isinstance(out, Pair) and out.rejected == "3 * 4 = 10"
    # and with only the step itself on offer there is nothing to reject
    assert _build(competitors=competitors[:2]) == Skip(reason=SKIP_NO_COMPETITOR)


def test_confidence_equal_to_tau_is_case_two():
    out = _build(confidence=TAU, competitors=[Candidate("3 * 4 = 7", False, -1.0)])
    assert isinstance(out, Pair)
    assert out.case == CASE_UNSURE_CORRECT and out.confidence == TAU and out.tau == TAU
    # just above tau: confident -> skip
    assert _build(confidence=TAU + 1e-9, competitors=[Candidate("x", False, -1.0)]) == Skip(SKIP_CONFIDENT)


# ---------------------------------------------------------------- case 3: incorrect step


def test_incorrect_step_is_rejected_against_reference():
    wrong = "3 * 4 = 7"
    # confidence high (above tau) and competitors present: neither matters for an incorrect step
    out = _build(step=wrong, correct=False, confidence=-0.01, competitors=[Candidate("z", False, 0.0)])
    assert out == Pair(
        prompt=PROMPT, chosen=REFERENCE, rejected=wrong, case=CASE_INCORRECT, confidence=-0.01, tau=TAU
    )


def test_incorrect_step_equal_to_reference_raises():
    with pytest.raises(ValueError, match="reference"):
        _build(step=" 3 * 4 = 12 ", correct=False, reference="3 * 4 = 12\n")


def test_incorrect_step_with_empty_reference_raises():
    with pytest.raises(ValueError, match="empty"):
        _build(step="3 * 4 = 7", correct=False, reference="  ")


def test_nan_confidence_or_tau_raises():
    with pytest.raises(ValueError, match="confidence"):
        _build(confidence=float("nan"))
    with pytest.raises(ValueError, match="tau"):
        _build(tau=float("nan"))


def test_dataclasses_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Skip(SKIP_CONFIDENT).reason = "other"  # type: ignore[misc]


# ---------------------------------------------------------------- tau


def test_tau_from_quantile_linear_interpolation():
    confs = [-0.1, -0.4, -0.2, -0.3]  # sorted: -0.4 -0.3 -0.2 -0.1
    # q=0.5 -> position 0.5*3 = 1.5 -> -0.3 + 0.5*(-0.2 - -0.3) = -0.25
    assert tau_from_quantile(confs, 0.5) == pytest.approx(-0.25)
    assert tau_from_quantile(confs, 0.0) == pytest.approx(-0.4)
    assert tau_from_quantile(confs, 1.0) == pytest.approx(-0.1)
    # q=0.25 -> position 0.75 -> -0.4 + 0.75*0.1 = -0.325
    assert tau_from_quantile(confs, 0.25) == pytest.approx(-0.325)


@pytest.mark.parametrize("q", [-0.1, 1.5, float("nan")])
def test_tau_from_quantile_rejects_bad_q(q):
    with pytest.raises(ValueError, match=r"\[0, 1\]") as err:
        tau_from_quantile([-0.1, -0.2], q)
    assert repr(q) in str(err.value)


def test_tau_from_quantile_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        tau_from_quantile([], 0.5)


def test_resolve_tau():
    confs = [-0.4, -0.3, -0.2, -0.1]
    assert resolve_tau(confs, -0.05, 0.5) == -0.05  # explicit tau wins
    assert resolve_tau(confs, None, 0.5) == pytest.approx(-0.25)
    assert resolve_tau([], -0.05, 0.5) == -0.05  # no confidences needed when tau is given


def test_quantile_tau_drives_the_rule():
    confs = [-0.4, -0.3, -0.2, -0.1]
    tau = resolve_tau(confs, None, 0.5)  # -0.25
    comp = [Candidate("3 * 4 = 7", False, -1.0)]
    assert _build(confidence=-0.2, competitors=comp, tau=tau) == Skip(SKIP_CONFIDENT)
    assert isinstance(_build(confidence=-0.3, competitors=comp, tau=tau), Pair)


# ---------------------------------------------------------------- pair_key


def _pair(**kw):
    base = dict(prompt=PROMPT, chosen="a", rejected="b", case=CASE_INCORRECT, confidence=-0.3, tau=TAU)
    base.update(kw)
    return Pair(**base)


def test_pair_key_stable():
    key = pair_key(_pair())
    assert key == pair_key(_pair())
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)
    # only prompt/chosen/rejected are content: metadata does not change the key
    assert key == pair_key(_pair(case=CASE_UNSURE_CORRECT, confidence=-0.9, tau=-0.5))


def test_pair_key_known_value():
    # canonical JSON: sorted keys, no spaces, ASCII-escaped
    import hashlib

    expected = hashlib.sha256(b'{"chosen":"a","prompt":"p","rejected":"b"}').hexdigest()
    assert pair_key(_pair(prompt="p")) == expected


def test_pair_key_sensitive_to_content():
    key = pair_key(_pair())
    assert key != pair_key(_pair(prompt=PROMPT + " "))
    assert key != pair_key(_pair(chosen="a "))
    assert key != pair_key(_pair(rejected="c"))
    # swapping chosen and rejected is a different pair
    assert key != pair_key(_pair(chosen="b", rejected="a"))
    # no ambiguity from concatenation
    assert pair_key(_pair(chosen="ab", rejected="c")) != pair_key(_pair(chosen="a", rejected="bc"))
    # non-ASCII text hashes fine
    assert pair_key(_pair(chosen="√2 ≈ 1.41")) != pair_key(_pair(chosen="√2 ≈ 1.42"))


def test_a_pair_crosses_the_grpc_and_redis_boundaries_unchanged():
    # values a proto float (32 bits) holds exactly, so the round trip can be compared with ==
    pair = Pair("Q: 3+4\n", "3+4=7", "3+4=8", CASE_INCORRECT, -0.25, -0.5, policy_version=3, question_id="q7", critic="exact:arith")
    assert pair_from_redis(pair_to_redis(pair)) == pair
    assert pair_from_proto(pair_to_proto(pair)) == pair
    assert pair_to_proto(pair).key == pair_to_redis(pair)["key"] == pair.key == pair_key(pair)
    # the key is the content's: lineage and scores do not change it
    assert dataclasses.replace(pair, policy_version=9, confidence=0.0, critic="llm").key == pair.key


def test_a_step_over_the_context_length_is_counted_and_never_paired():
    from caspo.config import PairsConfig
    from caspo.trainer.collect import StepRecord, make_pairs

    rec = dict(problem_id="p", prompt="Q", competitors=[], reference="")
    records = [StepRecord(step="a", correct=True, confidence=-0.1, **rec), StepRecord(step="", correct=False, confidence=0.0, over_context=True, **rec)]
    _, pairs, skipped = make_pairs(records, PairsConfig())
    assert skipped["over_context"] == 1 and all(r.step == "a" for r, _ in pairs)
