"""task math: its data formats and errors, and final-answer equivalence by math-verify against a
hand-judged file (tests/data/answer_pairs.jsonl: 60 pairs, each judged by hand in its ``human`` field)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from caspo.cli.main import main
from caspo.config import ConfigError, load_config
from caspo.tasks import TaskError, get_task
from caspo.tasks.answers import AnswerChecker

PAIRS = Path(__file__).resolve().parents[1] / "data" / "answer_pairs.jsonl"
ROWS = [
    {"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "answer": "\\frac{3}{4}", "solution": "Add.\n\nThe sum is $\\boxed{\\frac34}$."},
    {"problem": "Simplify $\\sqrt{8}$.", "answer": "2\\sqrt{2}"},
    {"problem": "Solve $x^2=4$, $x>0$.", "solution": "So $x = \\boxed{2}$."},  # the answer from the box
]


def test_check_answers_agrees_with_the_hand_judgement(capsys):
    human = [json.loads(line)["human"] for line in PAIRS.read_text().splitlines()]
    assert len(human) == 60 and 20 <= sum(human) <= 40  # a mixed file
    assert main(["check-answers", "--data", str(PAIRS), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == 60 and out["equivalent"] == sum(human)
    disagree = [(r["gold"], r["candidate"]) for r, h in zip(out["results"], human) if r["equivalent"] != h]
    assert not disagree
    assert not [r for r in out["results"] if "error" in r]
    assert set(out["results"][0]) == {"gold", "candidate", "equivalent"}


def test_unparsable_and_timed_out_comparisons_are_marked_not_passed():
    c = AnswerChecker(timeout_s=10)
    try:
        v = c.check("3", "\\frac{")
        assert not v.equivalent and "cannot parse the candidate" in v.error
        assert c.check("3", "3.0").equivalent  # the worker is up and answers
        c.timeout_s = 1e-4  # no real comparison answers this fast: it is cut off and the worker replaced
        v = c.check("(x+1)^2", "x^2+2x+1")
        assert not v.equivalent and "timed out" in v.error and c.timeouts == 1
        c.timeout_s = 10
        assert c.check("(x+1)^2", "x^2+2x+1").equivalent  # a fresh worker takes the next one
    finally:
        c.close()


def test_check_answers_bad_input_is_one_line(tmp_path, capsys):
    f = tmp_path / "a.jsonl"
    f.write_text('{"gold": "1", "candidate": "1"}\n{"gold": "1"}\n')
    assert main(["check-answers", "--data", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert "line 2: missing field 'candidate'" in err and "\n" not in err


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_parquet_and_dataset_dir_give_the_same_problems(tmp_path):
    by_jsonl = get_task("math", str(_jsonl(tmp_path / "m.jsonl", ROWS))).all_problems()
    pq.write_table(pa.Table.from_pylist([{**r, "answer": r.get("answer"), "solution": r.get("solution")} for r in ROWS]), tmp_path / "m.parquet")
    by_parquet = get_task("math", str(tmp_path / "m.parquet")).all_problems()
    Dataset.from_list([{**r, "answer": r.get("answer"), "solution": r.get("solution")} for r in ROWS]).save_to_disk(str(tmp_path / "ds"))
    by_dir = get_task("math", str(tmp_path / "ds")).all_problems()
    for probs in (by_jsonl, by_parquet, by_dir):
        assert [p.answer for p in probs] == ["\\frac{3}{4}", "2\\sqrt{2}", "2"]
        assert probs[0].gold_steps == ("Add.", "The sum is $\\boxed{\\frac34}$.")


def test_dataset_dict_splits_and_configured_field_names(tmp_path):
    rows = [{"q": r["problem"], "a": r.get("answer") or "2"} for r in ROWS]
    DatasetDict({"train": Dataset.from_list(rows[:2]), "test": Dataset.from_list(rows[2:])}).save_to_disk(str(tmp_path / "dd"))
    cfg = load_config(None, ["task.problem_field=q", "task.answer_field=a"])
    task = get_task("math", str(tmp_path / "dd"), cfg.task)
    assert len(task.all_problems("train")) == 2 and len(task.all_problems("test")) == 1
    only = get_task("math", str(tmp_path / "dd"), load_config(None, ["task.problem_field=q", "task.answer_field=a", "task.split=test"]).task)
    assert len(only.all_problems("any")) == 1
    with pytest.raises(TaskError, match="no split 'dev' \\(task.split\\); it has train, test"):
        get_task("math", str(tmp_path / "dd"), load_config(None, ["task.problem_field=q", "task.split=dev"]).task)


@pytest.mark.parametrize(
    "lines, needle",
    [
        (['{"problem": "p", "answer": "1"}', '{"question": "p", "answer": "1"}'], "line 2: missing field 'problem' (task.problem_field)"),
        (['{"problem": "p"}'], "line 1: missing field 'answer' (task.answer_field) and no \\boxed{} answer in 'solution'"),
        (['{"problem": "", "answer": "1"}'], "line 1: field 'problem' must be a non-empty string"),
        (['{"problem": "p", "answer": [1]}'], "line 1: field 'answer' must be a string or a number"),
        (['{"problem": "p", "answer": "1"}', "{oops"], "line 2: malformed JSON"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, lines, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskError) as e:
        get_task("math", str(f))
    assert needle in str(e.value) and str(f) in str(e.value)


def test_judge_checks_final_answers_and_leaves_other_steps_unchecked(tmp_path):
    task = get_task("math", str(_jsonl(tmp_path / "m.jsonl", ROWS)))
    p = task.all_problems()[0]
    assert task.judge(p, [], "The answer is $\\boxed{0.75}$.").correct
    wrong = task.judge(p, [], "The answer is $\\boxed{\\frac{2}{3}}$.")
    assert not wrong.correct and wrong.checked
    mid = task.judge(p, [], "First add the fractions.")
    assert not mid.checked
    assert task.answer_correct(p, "\\dfrac{3}{4}") and not task.answer_correct(p, None)
    assert not task.answer_correct(p, "\\frac{") and not task.judge(p, [], "So $\\boxed{@@}$.").correct
    assert sum(task.answer_errors.values()) >= 1 and all("cannot parse" in e for e in task.answer_errors)
    task.checker.close()


def test_math_needs_a_step_critic_and_data():
    with pytest.raises(ConfigError, match="task math has no exact step verifier"):
        load_config(None, ["task.name=math", "task.data=x.jsonl"])
    with pytest.raises(TaskError, match="task math needs data"):
        get_task("math")
