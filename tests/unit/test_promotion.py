"""The promotion gate (caspo/core/gate.py), the served-policy file and `caspo promote` / `caspo rollback`
on a run directory laid out as the loop writes it."""

from __future__ import annotations

import json

import pytest

from caspo.cli.main import main
from caspo.config import ConfigError, load_config
from caspo.core.gate import DIRECTIONS, decide, verdict
from caspo.evaluation import PAIRED, ProblemRecord, write_records
from caspo.policy_file import read_policy_info
from caspo.trainer.serving import ensure_serving, eval_records_path, gate_round, promote, rollback


def test_gate_metrics_are_the_paired_metrics():
    assert set(DIRECTIONS) == set(PAIRED)


def test_verdict_needs_an_interval_that_excludes_zero():
    assert verdict(0.05, [0.01, 0.09], "higher") == "better"
    assert verdict(-0.05, [-0.09, -0.01], "higher") == "worse"
    assert verdict(-0.05, [-0.09, -0.01], "lower") == "better"  # ECE fell
    assert verdict(0.05, [-0.01, 0.09], "higher") == "no change shown"
    assert verdict(0.05, None, "higher") is None


CMP_WORSE = {"n": 100, "accuracy": -0.2, "accuracy_ci": [-0.3, -0.1], "ece": 0.01, "ece_ci": [-0.02, 0.04]}
CMP_SAME = {"n": 100, "accuracy": 0.01, "accuracy_ci": [-0.03, 0.05], "ece": -0.01, "ece_ci": [-0.03, 0.01]}
CMP_BETTER = {"n": 100, "accuracy": 0.1, "accuracy_ci": [0.05, 0.15], "ece": -0.01, "ece_ci": [-0.03, 0.01]}


@pytest.mark.parametrize(
    "policy, cmp, promote",
    [
        ("not_worse", CMP_WORSE, False), ("not_worse", CMP_SAME, True), ("not_worse", CMP_BETTER, True),
        ("better", CMP_WORSE, False), ("better", CMP_SAME, False), ("better", CMP_BETTER, True),
        ("always", CMP_WORSE, True), ("not_worse", None, False),
    ],
)
def test_decide(policy, cmp, promote):
    d = decide(policy, ["accuracy", "ece"], cmp)
    assert d["promote"] is promote
    if cmp is CMP_WORSE and policy != "always":
        assert "accuracy -0.200 [-0.300, -0.100]" in d["reason"] and d["figures"]["accuracy"]["verdict"] == "worse"
        assert d["figures"]["ece"]["verdict"] == "no change shown"


def test_a_gate_metric_that_does_not_exist_is_refused_at_config_load():
    with pytest.raises(ConfigError, match="serve.promotion_metrics: 'acuracy' is not a gate metric"):
        load_config(None, ["serve.promotion_metrics=[accuracy, acuracy]"])
    with pytest.raises(ConfigError, match="serve.promotion must be one of always, not_worse, better"):
        load_config(None, ["serve.promotion=sometimes"])
    assert load_config(None, []).serve.promotion == "not_worse"


# ---- a run directory as the loop leaves it ---------------------------------------------------------
def _records(correct: list[bool]) -> list[ProblemRecord]:
    return [ProblemRecord(id=f"p{i}", question="q", gold="1", answer="1" if ok else "2", correct=ok, confidence=0.9,
                          search_confidence=0.9, steps=["1"], step_correct=[ok], step_mean_entropy=[0.1], tokens=3, reason="answer",
                          branch_points=0) for i, ok in enumerate(correct)]


def _policy(root, name):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x")
    return str(d)


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    base = _policy(tmp_path, "base")
    v1, v2 = _policy(run / "policies", "v1"), _policy(run / "policies", "v2")
    (run / "policies" / "v3").mkdir()  # a checkpoint the trainer never finished
    state = {"done": {"1": {"train": {}}, "2": {"train": {}}, "3": {"train": {}}}, "policies": {"0": base, "1": v1, "2": v2, "3": str(run / "policies" / "v3")}}
    (run / "state.json").write_text(json.dumps(state))
    write_records(eval_records_path(run, 0), _records([True] * 30 + [False] * 10))
    write_records(eval_records_path(run, 1), _records([True] * 35 + [False] * 5))
    write_records(eval_records_path(run, 2), _records([False] * 40))  # collapsed
    ensure_serving(run, 0, base)
    return run


def test_the_gate_serves_a_good_round_and_keeps_serving_through_a_collapsed_one(run):
    sv = load_config(None, []).serve
    d1 = gate_round(run, "r", 1, str(run / "policies" / "v1"), sv)
    assert d1["promote"] and d1["serving"] == 1 and d1["compared_with"] == 0
    d2 = gate_round(run, "r", 2, str(run / "policies" / "v2"), sv)
    assert not d2["promote"] and d2["serving"] == 1 and d2["figures"]["accuracy"]["verdict"] == "worse"
    info = read_policy_info(run / "policy.json")
    assert info["version"] == 1 and info["decision"]["reason"].startswith("worse than serving on 40 held-out problems: accuracy -0.875")
    log = [json.loads(x) for x in (run / "promotions.jsonl").read_text().splitlines()]
    assert [(e["candidate"], e["promote"], e["serving"]) for e in log] == [(1, True, 1), (2, False, 1)]


def test_promote_and_rollback_by_hand(run, capsys):
    assert main(["promote", str(run), "v2"]) == 0
    assert read_policy_info(run / "policy.json")["version"] == 2
    assert main(["promote", str(run), "1"]) == 0
    assert main(["rollback", str(run)]) == 0
    out = capsys.readouterr().out
    assert "rolled back by hand from v1 to v2: serving v2" in out
    assert main(["rollback", str(run)]) == 0
    assert read_policy_info(run / "policy.json")["version"] == 0
    # back at the first served version: nothing earlier
    assert main(["rollback", str(run)]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["promote", "{run}", "7"], "has no policy version 7 (versions: v0, v1, v2, v3)"),
        (["promote", "{run}", "3"], "policy v3 of {run} is incomplete: {run}/policies/v3 has no config.json"),
        (["promote", "{run}", "latest"], "VERSION must be a policy version like 3 or v3, got 'latest'"),
        (["promote", "{run}/policies", "1"], "is not a loop run (no state.json"),
        (["rollback", "{run}/nowhere"], "is not a directory"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(run, capsys, argv, message):
    before = (run / "policy.json").read_text()
    assert main([a.format(run=run) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.format(run=run) in err and err.count("\n") == 1
    assert (run / "policy.json").read_text() == before


def test_promote_refuses_a_checkpoint_whose_weights_are_gone(run, capsys):
    (run / "policies" / "v2" / "model.safetensors").unlink()
    assert main(["promote", str(run), "2"]) == 2
    assert "has no weights (model.safetensors)" in capsys.readouterr().err
    main(["promote", str(run), "1"])
    assert main(["promote", str(run), "0"]) == 0
    (run / "policies" / "v1" / "model.safetensors").unlink()
    assert main(["rollback", str(run)]) == 2  # v1 was served before, but its weights are gone
    assert read_policy_info(run / "policy.json")["version"] == 0


def test_status_says_what_is_served_and_why(run, tmp_path, capsys):
    sv = load_config(None, []).serve
    gate_round(run, "r", 2, str(run / "policies" / "v2"), sv)  # collapsed: kept on v0
    # no mesh runs from this run dir: the served policy is shown all the same, then the error
    assert main(["status", "--run", str(run), "--set", f"mesh.run_dir={tmp_path}/mesh"]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"run {run}: serving v0 (")
    assert "latest decision (gate): worse than serving on 40 held-out problems: accuracy -0.750 [" in out


def test_report_to_names_only_installed_trackers():
    import importlib.util

    assert load_config(None, []).dpo.report_to == ["tensorboard"]
    for name in ("wandb", "mlflow"):
        if importlib.util.find_spec(name) is None:
            with pytest.raises(ConfigError, match=f"dpo.report_to names {name} but it is not installed"):
                load_config(None, [f"dpo.report_to=[tensorboard, {name}]"])
    with pytest.raises(ConfigError, match="dpo.report_to must list some of tensorboard, wandb, mlflow"):
        load_config(None, ["dpo.report_to=[comet]"])
