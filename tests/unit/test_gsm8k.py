"""GSM8K task: safe calculator, annotation verifier, data loading, critic and splits."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caspo.tasks.base import Problem, TaskError
from caspo.tasks.gsm8k import (
    MAX_STEP_CHARS,
    GSM8KTask,
    annotation_spans,
    calc_annotations,
    check_data,
    load_gsm8k,
    load_jsonl,
    eval_fraction,
    verify_step_annotations,
)

# the first 300 lines of GSM8K's train split, shipped with the tests (tests/data/gsm8k/README.md)
DATA = Path(__file__).resolve().parents[1] / "data" / "gsm8k" / "train_sample.jsonl"

GOLD = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)
QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    rows = [{"question": f"Q{i}: {QUESTION}", "answer": GOLD.replace("#### 72", f"#### {i},000")} for i in range(200)]
    return _write(tmp_path / "small.jsonl", [json.dumps(r) for r in rows])


# ---- the gold data ----------------------------------------------------------------------------


def test_gold_annotations_verify():
    # Every calculator annotation of the sample's 300 gold solutions evaluates exactly (rational
    # arithmetic) to its value, and the number written after it is that value (some written with
    # thousands commas, e.g. <<4500*5=22500>>22,500). No known data errors: failed must be 0.
    r = check_data(DATA)
    assert r["failed"] == 0, r["examples"]
    assert r["steps"] == r["verified"] == 1012
    assert r["unannotated"] == 113  # GSM8K has some prose-only steps
    assert check_data(DATA, limit=100)["steps"] < 1012  # limit: the first 100 problems only


def test_perturbed_annotations_fail():
    r = check_data(DATA, perturb=True, seed=3)
    assert r["steps"] == 1012
    assert r["verified"] <= 0.01 * r["steps"]
    assert r["failed"] == r["steps"] - r["verified"]
    assert len(r["examples"]) == 10
    assert all({"line", "step", "reason"} <= set(e) for e in r["examples"])


def test_perturbation_is_caught_by_arithmetic():
    # The copy after the annotation is perturbed too, so the failure is the arithmetic, not the copy.
    r = check_data(DATA, perturb=True, seed=0, limit=20)
    assert r["examples"][0]["line"] == 1
    assert "is wrong" in r["examples"][0]["reason"]


# ---- eval_fraction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr,value",
    [
        ("48/2", "24"),
        ("5*12+3", "63"),
        ("(1/2)*30", "15"),
        ("2**3", "8"),
        ("-4+10", "6"),
        ("1,200*3", "3600"),
        ("$1,200.50*2", "2401"),
        ("15%*200", "30"),
        ("50%", "0.5"),
        ("10%3", "1"),
        ("0.1*3", "0.3"),
        ("20000*.8", "16000"),
        ("560//10", "56"),
        ("2**-2", "0.25"),
        ("+(3-5)", "-2"),
        ("100-50-30-15", "5"),
    ],
)
def test_eval_fraction_values(expr, value):
    assert eval_fraction(expr) == Decimal(value)


def test_eval_fraction_is_exact():
    assert eval_fraction("0.1*3") == Decimal("0.3")
    assert eval_fraction("0.1+0.2") == Decimal("0.3")
    assert eval_fraction("1/3*3") == 1


@pytest.mark.parametrize(
    "expr,msg",
    [
        ("__import__('os')", "function calls"),
        ("abs(-3)", "function calls"),
        ("a+1", "names"),
        ("(1).real", "attribute"),
        ("2**10000", "exponent"),
        ("9**9**9", "exponent"),
        ("10**99*10**99", "too large"),
        ("1/0", "division by zero"),
        ("True+1", "only numbers"),
        ("'1'+'2'", "only numbers"),
        ("[1]", "not allowed"),
        ("1,2", "comma"),
        ("1 +", "not an arithmetic expression"),
        ("", "empty"),
        ("1+" * 400 + "1", "too long"),
    ],
)
def test_eval_fraction_rejects(expr, msg):
    with pytest.raises(ValueError, match=msg):
        eval_fraction(expr)


# ---- annotations ------------------------------------------------------------------------------


def test_calc_annotations():
    assert calc_annotations("a <<48/2=24>>24 and <<24+1=25>>25") == [("48/2", "24"), ("24+1", "25")]
    assert calc_annotations("no annotation") == []


def test_verify_step_annotations():
    assert verify_step_annotations("48/2 = <<48/2=24>>24 clips")[0]
    assert verify_step_annotations("<<4500*5=22500>>22,500 and $<<2*3=6>>6")[0]
    ok, why = verify_step_annotations("48/2 = <<48/2=25>>25 clips")
    assert not ok and "48/2 = 24" in why
    ok, why = verify_step_annotations("48/2 = <<48/2=24>>25 clips")  # right annotation, wrong text
    assert not ok and "writes 25" in why
    assert not verify_step_annotations("<<48/2=2 4>>")[0]
    assert not verify_step_annotations("<<48/2>>24")[0]
    # rounded to the decimals written: accepted; wrong last digit or rounded to an integer: not
    assert verify_step_annotations("<<10/3=3.33>>3.33")[0]
    assert not verify_step_annotations("<<10/3=3.34>>3.34")[0]
    assert not verify_step_annotations("<<10/3=3>>3")[0]
    assert verify_step_annotations("no annotation here") == (True, "no calculator annotation")


def test_a_fraction_written_after_an_annotation_is_read_whole():
    # the text after an annotation was read only up to the slash ("3"), so right steps were rejected
    assert verify_step_annotations("<<3/4=3/4>>3/4")[0]
    assert verify_step_annotations("She adds <<1/2=1/2>>1/2 cup of milk")[0]
    ok, why = verify_step_annotations("<<3/4=3/4>>3/5")
    assert not ok and "writes 3/5" in why


@pytest.mark.parametrize("literal", ["1_000", "0x10", "0b11", "0o7"])
def test_only_decimal_numbers_are_numbers(literal):
    # Python's other literal forms are not calculator notation: 1_000 became 10, 0x10 became 16
    with pytest.raises(ValueError, match="not a decimal number"):
        eval_fraction(literal)
    assert not verify_step_annotations(f"<<{literal}+0={literal}>>")[0]
    assert not verify_step_annotations("<<1_000=10>>10")[0]
    assert not verify_step_annotations("<<8+8=0x10>>16")[0]


def test_a_step_past_the_verifier_limit_is_refused_by_its_length():
    # a step of '<<' without '>>' made the annotation regex quadratic (74 s at 80 kB)
    ok, why = verify_step_annotations("<<" * 40_000)
    assert not ok and f"at most {MAX_STEP_CHARS} characters" in why
    assert verify_step_annotations("x" * (MAX_STEP_CHARS - 12) + " <<1+1=2>>2")[0]


@given(st.text(alphabet="<>=1+\n a", max_size=40))
def test_the_annotation_scanner_finds_what_the_old_regex_found(text):
    old = [(m.start(), m.end(), m.group(1)) for m in re.finditer(r"<<(.*?)>>", text)]
    assert annotation_spans(text) == old


# ---- load_jsonl -------------------------------------------------------------------------------


def test_load_jsonl(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [json.dumps({"question": QUESTION, "answer": GOLD}), "", json.dumps({"question": "q", "answer": "x\n#### 1,500"})],
    )
    probs = load_jsonl(path)
    assert [p.id for p in probs] == ["gsm8k-1", "gsm8k-3"]
    assert probs[0].answer == "72" and probs[1].answer == "1500"
    assert probs[0].gold_steps == tuple(GOLD.split("\n"))
    assert probs[0].question == QUESTION


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(TaskError, match="data file not found"):
        load_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "bad,msg",
    [
        ('{"question": "q", "answer": ', "malformed JSON"),
        ('["q", "a"]', "JSON object"),
        ('{"question": "q"}', "'answer'"),
        ('{"question": 3, "answer": "#### 3"}', "'question' must be a string"),
        ('{"question": "q", "answer": "no final line"}', "####"),
    ],
)
def test_load_jsonl_bad_line(tmp_path, bad, msg):
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"question": "q", "answer": GOLD}), "", bad])
    with pytest.raises(TaskError, match=msg) as e:
        load_jsonl(path)
    assert "line 3" in str(e.value) and str(path) in str(e.value)


# ---- the task ---------------------------------------------------------------------------------


def _problem() -> Problem:
    return Problem(id="gsm8k-1", question=QUESTION, answer="72", gold_steps=tuple(GOLD.split("\n")))


def test_judge(small_file):
    task = GSM8KTask(small_file)
    p = _problem()
    gold = list(p.gold_steps)
    assert task.judge(p, [], gold[0]).correct
    assert task.judge(p, gold[:1], gold[1]).correct
    assert task.judge(p, [], "Half of 48 is 48/2 = <<48/2=24>>24.").correct  # other words, same result
    j = task.judge(p, [], "Natalia sold 48/2 = <<48/2=25>>25 clips in May.")  # arithmetic slip
    assert not j.correct and j.reference == gold[0] and "annotation" in j.reason
    j = task.judge(p, [], "Natalia sold 48/3 = <<48/3=16>>16 clips in May.")  # right arithmetic, wrong step
    assert not j.correct and "16" in j.reason
    assert not task.judge(p, [], "Natalia sold 25 clips in May.").correct  # unannotated, wrong result
    assert task.judge(p, gold[:2], "#### 72").correct
    assert task.judge(p, gold[:2], "#### 72.0").correct
    j = task.judge(p, gold[:2], "#### 73")
    assert not j.correct and j.reference == "#### 72"
    assert task.judge(p, gold, "x").reference == "#### 72"  # past the gold solution
    assert task.answer_correct(p, "72") and task.answer_correct(p, "$72")
    assert not task.answer_correct(p, "71") and not task.answer_correct(p, None)


def test_prompt(small_file):
    assert GSM8KTask(small_file).prompt("  How many?  ") == "Question: How many?\nAnswer:\n"
    assert GSM8KTask.name == "gsm8k"


def test_problems_deterministic_and_disjoint(small_file):
    task = GSM8KTask(small_file)
    a = task.problems(5, seed=1, split="train")
    assert [p.id for p in a] == [p.id for p in GSM8KTask(small_file).problems(5, seed=1, split="train")]
    assert [p.id for p in a] != [p.id for p in task.problems(5, seed=2, split="train")]
    test = task.problems(1000, seed=0, split="test")
    train = task.problems(1000, seed=0, split="train")
    assert 0 < len(test) < len(train) and len(test) + len(train) == 200  # fewer than asked: all of them
    assert not {p.question for p in test} & {p.question for p in train}
    assert len(task.problems(1000, seed=0, split="any")) == 200
    assert task.problems(0, seed=0) == []
    with pytest.raises(ValueError):
        task.problems(3, seed=0, split="dev")


def test_problems_real_data():
    task = GSM8KTask(DATA)
    assert len(task.all_problems("test")) == 34 and len(task.all_problems("train")) == 266
    test = task.problems(30, seed=7)
    assert len(test) == 30 and test == task.problems(30, seed=7)
    assert all(task.split_of(p.question) == "test" for p in test)
    assert all(task.judge(p, [], p.gold_steps[0]).correct for p in test)
    assert all(task.judge(p, p.gold_steps[:-1], p.gold_steps[-1]).correct for p in test)


def test_a_save_to_disk_directory_reads_as_its_jsonl(tmp_path):
    # the hub's openai/gsm8k saves a DatasetDict (train, test): its train split is read, with the ids the
    # same rows have as lines of the train JSONL
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()[:40]]
    cols = {k: [r[k] for r in rows] for k in ("question", "answer")}
    DatasetDict({"train": Dataset.from_dict(cols), "test": Dataset.from_dict({k: v[:3] for k, v in cols.items()})}).save_to_disk(tmp_path / "dd")
    Dataset.from_dict(cols).save_to_disk(tmp_path / "one")
    want = load_jsonl(DATA)[:40]
    for d in ("dd", "one"):
        got = load_gsm8k(tmp_path / d)
        assert [(p.id, p.question, p.answer, p.gold_steps) for p in got] == [(p.id, p.question, p.answer, p.gold_steps) for p in want]
    assert check_data(tmp_path / "dd")["failed"] == 0
    DatasetDict({"test": Dataset.from_dict(cols)}).save_to_disk(tmp_path / "notrain")
    with pytest.raises(TaskError, match="no split 'train'; it has test"):
        load_gsm8k(tmp_path / "notrain")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskError, match="not a dataset saved with save_to_disk"):
        load_gsm8k(tmp_path / "empty")
    Dataset.from_dict({"question": ["q"], "answer": ["no final line"]}).save_to_disk(tmp_path / "bad")
    with pytest.raises(TaskError, match="row 1: answer does not end"):
        GSM8KTask(tmp_path / "bad")
