"""The caspo command: a trained-from-scratch model end to end, and every bad input path."""

import json
import subprocess
import sys

import pytest

from caspo.cli.main import main
from caspo.core.search import METHODS


@pytest.fixture(scope="module")
def fresh_model(tmp_path_factory):
    """A tiny model trained for a few seconds (it need not be good, only real)."""
    from caspo.models.tiny import TinyTrainConfig, train_tiny

    out = tmp_path_factory.mktemp("tiny")
    train_tiny(TinyTrainConfig(steps=8, batch_size=4, seq_len=128, checkpoint_every=4), out, progress=False)
    return out


def test_trained_model_loads_with_auto_classes(fresh_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(fresh_model)
    tok = AutoTokenizer.from_pretrained(fresh_model)
    assert model.config.model_type == "llama"
    assert (fresh_model / "model.safetensors").exists() and (fresh_model / "tokenizer.json").exists()
    assert tok.decode(tok.encode("Q:12+7*3\n", add_special_tokens=False)) == "Q:12+7*3\n"
    assert tok.encode("1", add_special_tokens=True)[0] == tok.bos_token_id


@pytest.mark.parametrize("method", METHODS)
def test_eval_each_method_on_five_problems(fresh_model, method, capsys):
    rc = main(["eval", "--model", str(fresh_model), "--method", method, "--k", "2", "-n", "5", "--max-steps", "4", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 5 and out["method"] == method
    for key in ("accuracy", "step_accuracy", "ece", "brier"):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["tokens"] > 0 and out["latency_s"] > 0
    assert out["auroc"] is None or 0.0 <= out["auroc"] <= 1.0


def test_resume_gives_the_same_model_as_an_unbroken_run(tmp_path):
    import torch
    from safetensors.torch import load_file

    from caspo.models.tiny import TinyTrainConfig, train_tiny

    cfg = TinyTrainConfig(steps=6, batch_size=2, seq_len=64, checkpoint_every=3)
    train_tiny(cfg, tmp_path / "whole", progress=False)
    # a run stopped after its first checkpoint, then resumed, must end where the unbroken run did
    assert train_tiny(cfg, tmp_path / "broken", progress=False, stop_at=3) is None
    assert (tmp_path / "broken" / "_resume" / "state.pt").exists()
    train_tiny(cfg, tmp_path / "broken", progress=False)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "broken" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["eval", "--task", "chess"], "unknown task 'chess'"),
        (["eval", "--method", "beam"], "method must be one of"),
        (["eval", "--k", "0"], "k must be an integer >= 1"),
        (["eval", "--tau", "1.5"], "tau must be in [0, 1]"),
        (["eval", "--task", "gsm8k"], "needs a data file"),
        (["eval", "--task", "gsm8k", "--data", "/nonexistent.jsonl"], "data file not found"),
        (["eval", "--model", "/nonexistent/model"], "no model at /nonexistent/model"),
        (["eval", "-n", "0"], "-n must be >= 1"),
        (["eval", "--method", "cat", "--branching", "sometimes"], "branching must be one of always, adaptive"),
        (["eval", "--method", "cat", "--branch-threshold", "-1"], "branch_threshold must be a number >= 0"),
        (["eval", "--method", "cat", "--scoring", "nope"], "scoring must be one of entropy, logprob, product, crew, gmean, group, critic"),
        (["eval", "--method", "cat", "--uncertainty", "vibes"], "uncertainty must be one of first_entropy"),
        (["eval", "--method", "cat", "--calibration", "/nonexistent/calibration.json"], "calibration file /nonexistent/calibration.json does not exist"),
        (["eval", "--method", "cat", "--set", "cat.tau=2"], "cat.tau must be in [0, 1]"),
        (["calibrate", "-n", "0"], "-n must be >= 1"),
        (["calibrate", "--taus", "0", "2"], "--taus must each be in [0, 1], got 2.0"),
        (["calibrate", "--max-tokens-x", "0"], "--max-tokens-x must be > 0"),
        (["publish", "/nonexistent/model", "--version", "1"], "path '/nonexistent/model' is not a model directory"),
        (["publish", "tiny", "--version", "-1"], "--version must be >= 0"),
        (["publish", "tiny", "--version", "1", "--set", "publish.transport=pigeon"], "publish.transport must be collective or disk"),
        # the shipped real-model config names a hub id: refused before any mesh or round work
        (["loop", "--config", "configs/qwen2.5-math-7b-instruct.yaml", "--rounds", "1"], "model.policy: 'Qwen/Qwen2.5-Math-7B-Instruct' is a hub id, not a local model directory"),
        (["loop", "--set", "model.policy=/nonexistent/model", "--rounds", "1"], "model.policy: no model at /nonexistent/model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_malformed_calibration_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "calibration.json"
    bad.write_text('{"tau": 0.1, "branch_threshold": "high", "uncertainty": "max_entropy"}')
    assert main(["eval", "--method", "cat", "--calibration", str(bad), "-n", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"calibration file {bad}: branch_threshold must be a number >= 0" in err and "\n" not in err


def test_malformed_data_names_the_line(tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "q", "answer": "1+1=<<1+1=2>>2\\n#### 2"}\n{not json\n')
    assert main(["eval", "--task", "gsm8k", "--data", str(f)]) == 2
    assert "line 2" in capsys.readouterr().err


def test_model_dir_without_model(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_real_process_exit_code_and_no_traceback():
    p = subprocess.run([sys.executable, "-m", "caspo.cli", "eval", "--tau", "-1"], capture_output=True, text=True)
    assert p.returncode == 2 and "tau must be in [0, 1]" in p.stderr and "Traceback" not in p.stderr


def test_check_data_cli(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "q", "answer": "She has 2+3=<<2+3=5>>5.\\nThen <<5*2=10>>10\\n#### 10"}\n')
    assert main(["check-data", "--data", str(f), "--json"]) == 0
    good = json.loads(capsys.readouterr().out)
    assert good["steps"] == 2 and good["verified"] == 2 and good["failed"] == 0
    assert main(["check-data", "--data", str(f), "--perturb", "--json"]) == 0
    bad = json.loads(capsys.readouterr().out)
    assert bad["verified"] == 0 and bad["failed"] == 2 and bad["examples"]


def test_redact_url_hides_passwords_only():
    from caspo.netutil import redact_url

    assert redact_url("redis://:s3cr3t@caspo-redis:6379/0") == "redis://:***@caspo-redis:6379/0"
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url(None) is None


@pytest.mark.parametrize(
    "argv, run, questions, eval_n",
    [
        (["demo"], "demo", 2000, 1000),  # the full demo: configs/tiny-cpu.yaml's sizes
        (["demo", "--quick"], "demo-quick", 500, 200),  # a run directory of its own, never mixed with the full one
        (["demo", "--quick", "--set", "loop.eval_n=100"], "demo-quick", 500, 100),  # the user's --set wins
        (["demo", "--quick", "--run", "mine"], "mine", 500, 200),
    ],
)
def test_demo_quick_look_sizes_and_run_directory(argv, run, questions, eval_n):
    from caspo.cli.cmd_loop import demo_settings
    from caspo.cli.main import build_parser
    from caspo.cli.shared import config_of

    args = build_parser().parse_args(argv)
    args.set = demo_settings(args)
    cfg = config_of(args)
    assert (cfg.loop.run, cfg.loop.questions, cfg.loop.eval_n, cfg.loop.rounds) == (run, questions, eval_n, 1)
