"""The built-in tiny-chat model: a real chat model (Qwen2, BPE, a chat template) made by the project."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from caspo.cli.main import main
from caspo.models.hf import HFBackend, resolve_model_path
from caspo.models.prompting import prompter_for_backend
from caspo.models.tiny_chat import SHIPPED_CHAT_DIR
from caspo.tasks import get_task

MATH = Path(__file__).resolve().parents[1] / "data" / "math_small.jsonl"
GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k" / "train_sample.jsonl"


def test_shipped_tiny_chat_is_a_small_qwen2_with_its_template_in_tokenizer_config():
    assert resolve_model_path("tiny-chat") in (str(SHIPPED_CHAT_DIR), str(Path.home() / ".cache" / "caspo" / "tiny-chat"))
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_CHAT_DIR)
    tok = AutoTokenizer.from_pretrained(SHIPPED_CHAT_DIR)
    assert model.config.model_type == "qwen2"
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    assert "chat_template" in json.loads((SHIPPED_CHAT_DIR / "tokenizer_config.json").read_text())
    text = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_tiny_chat_writes_blank_line_steps_and_stops_at_them():
    backend = HFBackend("tiny-chat", prompt_format="chat", delimiter="\n\n", max_step_tokens=48)
    prompter = prompter_for_backend(backend, get_task("arith"))
    prompt = prompter("Tom has 3 apples and buys 5 more. How many apples does he have?")
    steps = backend.sample_steps([prompt], 6, 0.8, [1])[0]
    stopped = [s for s in steps if not s.ended]  # stopped at "\n\n", not at <|im_end|> or the token limit
    assert stopped and all(s.text and "\n\n" not in s.text for s in stopped)
    greedy = backend.sample_steps([prompt], 1, 0.0)[0][0]
    assert "\\boxed{" in greedy.text  # it learnt the answer format


def test_eval_tiny_chat_on_math(capsys):
    rc = main(["eval", "--model", "tiny-chat", "--task", "math", "--data", str(MATH), "--split", "any", "--max-steps", "4", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 8 and out["task"] == "math" and 0.0 <= out["accuracy"] <= 1.0


def test_train_chat_command_writes_a_loadable_chat_model(tmp_path, capsys):
    assert main(["train-chat", "--data", str(GSM8K), "--out", str(tmp_path / "m"), "--steps", "2"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok.chat_template and not (tmp_path / "m" / "chat_template.jinja").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.model_type == "qwen2"
    assert main(["train-chat", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "data file not found" in capsys.readouterr().err
    meta = json.loads((tmp_path / "m" / "train_meta.json").read_text())
    # what it was trained on, by name and content, never by the path of the machine it ran on
    assert meta["data"] == {"name": "train_sample.jsonl", "sha256": hashlib.sha256(GSM8K.read_bytes()).hexdigest(), "problems": 300}


def test_train_chat_without_data_names_the_flag(tmp_path, capsys):
    # no default that names some machine's copy of GSM8K: one line, exit 2
    assert main(["train-chat", "--out", str(tmp_path / "m"), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err and not (tmp_path / "m").exists()
    assert main(["check-data"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err


def test_the_shipped_model_records_its_data_by_content():
    meta = json.loads((SHIPPED_CHAT_DIR / "train_meta.json").read_text())
    assert meta["data"]["name"] == "train.jsonl" and meta["data"]["problems"] == 7473 and len(meta["data"]["sha256"]) == 64
