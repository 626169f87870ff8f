"""caspo.report: rounds.jsonl → reliability.png, curves.png, summary.md (and the `caspo report` command)."""

import json
import math

import pytest

from caspo.cli.main import main
from caspo.core.metrics import reliability_bins
from caspo.report import format_markdown_table, load_rounds, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(k, acc, mode="step", pairs=None, **extra):
    conf = [0.05, 0.3, 0.35, 0.62, 0.7, 0.81, 0.88, 0.93, 0.97, 1.0]
    correct = [False, False, True, False, True, True, True, True, True, k > 0]
    row = {
        "round": k,
        "policy_version": k,
        "accuracy": acc,
        "step_accuracy": acc + 0.1,
        "ece": 0.2 - 0.03 * k,
        "brier": 0.25 - 0.02 * k,
        "auroc": 0.6 + 0.05 * k,
        "entropy_gap": 0.1 * k,
        "cat_accuracy": acc + 0.05,
        "cat_recommended_accuracy": acc + 0.02,
        "cat_k": 4,
        "cat_tau": 0.5,
        "pairs": pairs if pairs is not None else ({} if k == 0 else {"correct_unsure": 10 + k, "incorrect": 15 - k}),
        "temperature": None if k == 0 else 0.7,
        "mode": mode,
        "reliability": reliability_bins(conf, correct),  # empty bins carry nan
        "finished_at": 1.0 + k,
    }
    row.update(extra)
    return row


def _write(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    # json.dumps writes nan as NaN, as the loop does
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    main_run = _write(
        tmp_path / "runs" / "caspo-step",
        [
            _row(0, 0.4),
            _row(1, 0.111),  # superseded by the resumed row below
            _row(1, 0.45),
            _row(2, 0.5125, auroc=None, entropy_gap=float("nan")),  # nulls and nan must not break anything
        ],
    )
    control = _write(
        tmp_path / "runs" / "control-trajectory",
        [_row(0, 0.4, mode="trajectory"), _row(1, 0.42, mode="trajectory", pairs={"trajectory": 40}), _row(2, 0.43, mode="trajectory", pairs={"trajectory": 38})],
    )
    return main_run, control


def test_load_rounds_keeps_the_last_row_of_a_repeated_round(runs):
    rows = load_rounds(runs[0])
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["accuracy"] == 0.45
    assert math.isnan(rows[2]["entropy_gap"]) and rows[2]["auroc"] is None


def test_load_rounds_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="rounds.jsonl"):
        load_rounds(tmp_path / "nope")


def test_load_rounds_malformed_line_names_the_line(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "rounds.jsonl").write_text(json.dumps(_row(0, 0.4)) + "\n\n" + '{"round": 1, "accuracy": \n')
    with pytest.raises(ValueError, match="line 3"):
        load_rounds(d)
    (d / "rounds.jsonl").write_text(json.dumps(_row(0, 0.4)) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match="line 2"):
        load_rounds(d)


def test_write_report_with_a_compared_control(runs, tmp_path):
    main_run, control = runs
    res = write_report(main_run, compare=[str(control)])
    assert res["rounds"] == 3
    out = main_run / "report"
    for key, name in (("summary", "summary.md"), ("reliability", "reliability.png"), ("curves", "curves.png")):
        assert res[key] == str(out / name)
        assert (out / name).is_file()
    for key in ("reliability", "curves"):
        data = open(res[key], "rb").read()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 10_000
    md = (out / "summary.md").read_text()
    for acc in ("0.400", "0.450", "0.512"):  # 0.5125 → 3 decimals
        assert acc in md
    assert "0.111" not in md  # the superseded row of round 1
    assert "control-trajectory" in md and "caspo-step" in md
    assert "(reliability.png)" in md and "(curves.png)" in md
    assert "+0.112" in md  # accuracy, round 0 → round 2
    assert "trajectory 40" in md and "correct_unsure 11" in md


def test_write_report_single_run_and_custom_out(runs, tmp_path):
    res = write_report(runs[1], out_dir=tmp_path / "elsewhere")
    assert res["summary"] == str(tmp_path / "elsewhere" / "summary.md")
    assert open(res["curves"], "rb").read().startswith(PNG_SIGNATURE)


def test_format_markdown_table():
    t = format_markdown_table([{"round": 0, "accuracy": 0.5, "ece": None, "pairs": {"b": 2, "a": 1}}])
    lines = t.strip().splitlines()
    assert lines[0].startswith("| round | accuracy | step acc |")
    assert lines[2] == "| 0 | 0.500 | - | - | - | - | - | - | - | a 1, b 2 |"
    assert format_markdown_table([{"x": float("nan"), "y": 1.23456}], ["x", ("y", "Y")]).splitlines()[2] == "| - | 1.235 |"


def test_cli_report(runs, tmp_path, capsys):
    main_run, control = runs
    assert main(["report", str(main_run), "--out", str(tmp_path / "r"), "--compare", str(control)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "r" / "summary.md") in out and str(tmp_path / "r" / "curves.png") in out


def test_cli_report_missing_dir_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rounds.jsonl" in err


def _records(path, correct, conf):
    from caspo.evaluation import ProblemRecord, write_records

    recs = [ProblemRecord(f"p{i}", f"{i}+1", str(i + 1), str(i + 1) if c else "0", c, f, f, ["s"], [c], [0.1 if c else 0.3], 3, "")
            for i, (c, f) in enumerate(zip(correct, conf))]
    write_records(path, recs)


def test_change_table_pairs_the_first_and_last_rounds_problems(tmp_path):
    """With the loop's per-problem greedy records, the change column carries a paired interval and
    McNemar's p, and a change whose interval holds zero is not called better."""
    from caspo.report import paired_change

    run = _write(tmp_path / "run", [_row(0, 0.5), _row(1, 0.8)])
    n = 200
    before = [i % 2 == 0 for i in range(n)]            # 100 of 200 right
    after = [b or i % 10 == 1 for i, b in enumerate(before)]  # 20 more right, none lost
    _records(run / "eval" / "round0_greedy.jsonl", before, [0.7] * n)
    _records(run / "eval" / "round1_greedy.jsonl", after, [0.7] * n)
    paired = paired_change(run, {"round": 0}, {"round": 1})
    assert paired["n"] == n and paired["accuracy"] == pytest.approx(0.1)
    lo, hi = paired["accuracy_ci"]
    assert 0 < lo < 0.1 < hi < 0.2
    assert paired["accuracy_mcnemar_p"] == pytest.approx(2 * 0.5 ** 20)  # 20 discordant problems, all one way
    text = open(write_report(run)["summary"]).read()
    assert "change [paired 95% CI]" in text
    acc_line = next(line for line in text.splitlines() if line.startswith("| accuracy |"))
    assert f"[{lo:+.3f}, {hi:+.3f}]" in acc_line and "better" in acc_line

    # the same outcomes in both rounds: the interval holds 0, and the verdict says so
    _records(run / "eval" / "round1_greedy.jsonl", before, [0.7] * n)
    write_report(run)
    acc_line = next(line for line in (run / "report" / "summary.md").read_text().splitlines() if line.startswith("| accuracy |"))
    assert "no change shown" in acc_line

    # records of other problems are not paired: the table falls back to the plain difference
    (run / "eval" / "round1_greedy.jsonl").write_text((run / "eval" / "round1_greedy.jsonl").read_text().replace('"p3"', '"q3"'))
    assert paired_change(run, {"round": 0}, {"round": 1}) is None


def test_compared_runs_are_paired_at_their_last_rounds(tmp_path):
    """Two runs judged on the same held-out problems: the side-by-side section gives the second run's
    last round minus the first's with paired intervals and McNemar's p."""
    from caspo.report import paired_change

    caspo_run = _write(tmp_path / "caspo", [_row(0, 0.5), _row(1, 0.6)])
    control = _write(tmp_path / "control", [_row(0, 0.5, mode="trajectory"), _row(1, 0.5, mode="trajectory")])
    n = 200
    base = [i % 2 == 0 for i in range(n)]
    caspo_right = [b or i % 10 == 1 for i, b in enumerate(base)]  # 20 more right than the control
    for run, last in ((caspo_run, caspo_right), (control, base)):
        _records(run / "eval" / "round0_greedy.jsonl", base, [0.7] * n)
        _records(run / "eval" / "round1_greedy.jsonl", last, [0.7] * n)
    paired = paired_change(caspo_run, {"round": 1}, {"round": 1}, last_dir=control)
    assert paired["n"] == n and paired["accuracy"] == pytest.approx(-0.1)
    assert paired["accuracy_mcnemar_p"] == pytest.approx(2 * 0.5 ** 20)
    lo, hi = paired["accuracy_ci"]
    text = open(write_report(caspo_run, compare=[str(control)])["summary"]).read()
    section = text[text.index("control round 1 − caspo round 1"):]
    acc_line = next(line for line in section.splitlines() if line.startswith("| accuracy |"))
    assert f"-0.100 [{lo:+.3f}, {hi:+.3f}]" in acc_line and "worse" in acc_line
    assert "paired bootstrap over the 200 held-out problems both runs" in section
    # the CaT columns have no per-problem records: their difference gets a direction, not a verdict
    cat_line = next(line for line in section.splitlines() if line.startswith("| CaT entropy |"))
    assert cat_line.endswith("| -0.100 | lower, not judged (no interval) (higher is better) |")
