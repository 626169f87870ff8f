"""Intervals on evaluation reports and the paired comparison of two reports, on hand-made records."""

import pytest

from caspo.core.search import SearchConfig
from caspo.core.stats import wilson_interval
from caspo.evaluation import ProblemRecord, compare, read_records, report_of, write_records


def record(i: int, correct: bool, confidence: float, steps=((True, 0.05), (True, 0.05))) -> ProblemRecord:
    return ProblemRecord(
        id=f"p{i}", question=f"{i}+1", gold=str(i + 1), answer=str(i + 1) if correct else "0", correct=correct,
        confidence=confidence, search_confidence=confidence, steps=[f"s{j}" for j in range(len(steps))],
        step_correct=[ok for ok, _ in steps], step_mean_entropy=[h for _, h in steps], tokens=10, reason="",
    )


def records_with(accuracy_hits: int, n: int = 100, offset: int = 0) -> list[ProblemRecord]:
    out = []
    for i in range(n):
        ok = i < accuracy_hits
        steps = ((True, 0.02), (ok, 0.02 if ok else 0.3))
        out.append(record(i + offset, ok, 0.9 if ok else 0.6, steps))
    return out


def test_report_carries_wilson_and_bootstrap_intervals():
    rep = report_of(SearchConfig(method="greedy"), records_with(60), seconds=1.0)
    assert rep.accuracy == pytest.approx(0.6)
    assert rep.accuracy_ci == pytest.approx(list(wilson_interval(60, 100)))
    for name in ("step_accuracy", "ece", "brier", "auroc", "entropy_gap"):
        lo, hi = getattr(rep, f"{name}_ci")
        assert lo <= getattr(rep, name) <= hi, name
    # every wrong step has entropy 0.3 and every right one 0.02: AUROC is 1 in every resample
    assert rep.auroc == 1.0 and rep.auroc_ci == [1.0, 1.0]
    assert rep.entropy_gap == pytest.approx(0.28) and rep.entropy_gap_ci == pytest.approx([0.28, 0.28])
    s = rep.summary()
    assert s["accuracy_ci"] == rep.accuracy_ci and "records" not in s


def test_compare_pairs_problems_and_tests_accuracy_with_mcnemar():
    a = report_of(SearchConfig(method="greedy"), records_with(60), 1.0)
    b = report_of(SearchConfig(method="greedy"), records_with(70), 1.0)  # fixes 10 of A's errors, breaks none
    d = compare(a, b)
    assert d["n"] == 100
    assert d["accuracy"] == pytest.approx(0.1)
    assert 0 < d["accuracy_ci"][0] <= 0.1 <= d["accuracy_ci"][1]
    assert (d["only_a_correct"], d["only_b_correct"]) == (0, 10)
    assert d["accuracy_mcnemar_p"] == pytest.approx(2 / 1024)
    same = compare(a, a)
    assert same["accuracy"] == 0 and same["accuracy_ci"] == [0.0, 0.0] and same["accuracy_mcnemar_p"] == 1.0


def test_compare_refuses_different_problems():
    a = report_of(SearchConfig(method="greedy"), records_with(60), 1.0)
    b = report_of(SearchConfig(method="greedy"), records_with(60, offset=1), 1.0)
    with pytest.raises(ValueError, match="same problems"):
        compare(a, b)


def test_records_round_trip(tmp_path):
    recs = records_with(3, n=5)
    path = write_records(tmp_path / "eval" / "r.jsonl", recs)
    assert read_records(path) == recs
