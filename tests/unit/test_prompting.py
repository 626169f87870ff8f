"""model.prompt_format and model.step_delimiter: one source of truth from the config to every prompt."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoTokenizer

from caspo.config import ConfigError, config_from_dict, load_config
from caspo.core.contract import Prefix
from caspo.models.base import ModelLoadError, PromptedProposer, prefix_text
from caspo.models.prompting import Prompter, load_prompter
from caspo.models.tiny import SHIPPED_DIR
from caspo.tasks import get_task

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_defaults_follow_the_model_and_dpo_takes_the_models_delimiter():
    tiny = load_config(None)
    assert (tiny.model.prompt_format, tiny.model.step_delimiter, tiny.dpo.delimiter) == ("plain", "\n", "\n")
    real = load_config(None, ["model.policy=Qwen/Qwen2.5-Math-7B-Instruct"])
    assert (real.model.prompt_format, real.model.step_delimiter, real.dpo.delimiter) == ("chat", "\n\n", "\n\n")
    mixed = load_config(None, ["model.prompt_format=plain", "model.step_delimiter=' ;'"])
    assert (mixed.model.prompt_format, mixed.dpo.delimiter) == ("plain", " ;")
    # what actors receive rebuilds the same config
    assert config_from_dict(real.to_dict()) == real


@pytest.mark.parametrize(
    "override, needle",
    [
        ("dpo.delimiter=x", "dpo.delimiter is not a key: DPO uses model.step_delimiter"),
        ("model.prompt_format=markdown", "model.prompt_format must be plain or chat"),
        ("model.tensor_parallel_size=0", "model.tensor_parallel_size must be >= 1"),
    ],
)
def test_bad_model_keys_are_one_line(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_plain_prompt_is_the_tasks_and_steps_end_with_the_delimiter():
    task = get_task("arith")
    p = Prompter(task.prompt, "plain", "\n\n")
    assert p("1+2") == task.prompt("1+2")
    assert p.text("1+2", ["1+2=3", "#### 3"]) == task.prompt("1+2") + "1+2=3\n\n#### 3\n\n"
    assert prefix_text(p, "1+2", ["a"]) == task.prompt("1+2") + "a\n\n"  # the prompter's delimiter by default


def test_chat_prompt_uses_the_template_with_the_system_prompt(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(SHIPPED_DIR, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model)
    cfg = load_config(None, [f"model.policy={model}"])
    p = load_prompter(cfg.model, get_task("arith"))
    text = p("12+7")
    assert text == (
        "<|system|>Please reason step by step, and put your final answer within \\boxed{}.<|end|>\n"
        "<|user|>12+7<|end|>\n<|assistant|>"
    )
    assert p.text("12+7", ["12+7=19"]) == text + "12+7=19\n\n"


def test_a_model_without_a_chat_template_under_chat_is_one_line():
    cfg = load_config(None, [f"model.policy={SHIPPED_DIR}"])  # the tiny reasoner has no chat template
    with pytest.raises(ModelLoadError) as e:
        load_prompter(cfg.model, get_task("arith"))
    assert "has no chat template" in str(e.value) and "model.prompt_format: plain" in str(e.value)
    assert "\n" not in str(e.value)


class _Backend:
    delimiter = "\n\n"

    def __init__(self):
        self.seen = []

    def sample_steps(self, prompts, n, temperature, seeds):
        self.seen += prompts
        return [[] for _ in prompts]


def test_proposer_joins_steps_with_the_backends_delimiter():
    b = _Backend()
    PromptedProposer(b, lambda q: f"Q:{q}\n").propose([Prefix("1+2", ("s1", "s2"), 0)], 1, 0.0)
    assert b.seen == ["Q:1+2\ns1\n\ns2\n\n"]


def test_detect_format_follows_the_tokenizer(tmp_path):
    from caspo.models.prompting import detect_format

    assert detect_format("tiny") == ("plain", "\n")
    assert detect_format(str(SHIPPED_DIR)) == ("plain", "\n")  # a tiny checkpoint: no chat template
    assert detect_format("tiny-chat") == ("chat", "\n\n")
    assert detect_format("Qwen/Qwen2.5-Math-7B-Instruct") == ("chat", "\n\n")  # a hub id is not read here
