"""What a policy is conditioned on: a question in the model's prompt format, then the steps so far.

``model.prompt_format`` chooses the format. ``plain`` is the task's own prompt (``Q: 12+7*3-5`` for the
built-in tiny reasoner, which was trained on it). ``chat`` is the model's chat template
(``tokenizer.apply_chat_template``) with ``model.system_prompt`` as the system message (the Qwen-Math
evaluation prompt: reason step by step, final answer in ``\\boxed{}``) and the question as the user
message, opened for the assistant's reply. Steps follow, each ended by ``model.step_delimiter``.

A model whose tokenizer has no chat template cannot take the chat format: :func:`Prompter` refuses it
with one line naming the model and the key to change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from transformers import AutoTokenizer

from caspo.config import SYSTEM_PROMPT, ModelConfig
from caspo.core.steps import join_steps
from caspo.models.base import ModelLoadError
from caspo.models.hf import resolve_model_path


class Prompter:
    """``prompt(question)``: model input before the first step; ``text(question, steps)``: with the steps
    so far. Callable as ``prompt`` so it goes wherever a task's ``prompt`` went."""

    def __init__(
        self,
        task_prompt: Callable[[str], str],
        prompt_format: str = "plain",
        delimiter: str = "\n",
        tokenizer=None,
        system_prompt: str = SYSTEM_PROMPT,
        model: str = "",
    ):
        if prompt_format not in ("plain", "chat"):
            raise ValueError(f"model.prompt_format must be plain or chat, got {prompt_format!r}")
        if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(
                f"model {model or '?'} has no chat template (tokenizer_config.json has no chat_template): "
                "set model.prompt_format: plain"
            )
        self.task_prompt = task_prompt
        self.prompt_format = prompt_format
        self.delimiter = delimiter
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    def prompt(self, question: str) -> str:
        if self.prompt_format == "plain":
            return self.task_prompt(question)
        messages = [{"role": "user", "content": question.strip()}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    __call__ = prompt

    def chat(self, system: str, user: str) -> str:
        """A one-turn conversation opened for the reply (a judge's question): the chat template, or under
        the plain format the two messages as text followed by ``Answer:``."""
        if self.prompt_format == "plain":
            return f"{system}\n\n{user}\nAnswer:"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def text(self, question: str, steps: Sequence[str]) -> str:
        return self.prompt(question) + join_steps(list(steps), self.delimiter)


def detect_format(name_or_path: str) -> tuple[str, str]:
    """``(prompt_format, step_delimiter)`` a model was made for, when nobody said: a local model whose
    tokenizer has a chat template is a chat model (blank-line steps), one without is a plain one (a
    step a line, as the tiny reasoner and checkpoints trained from it); the built-in ``tiny`` is plain
    and a hub id is taken for a chat model."""
    if name_or_path == "tiny":
        return "plain", "\n"
    p = Path(resolve_model_path(name_or_path))
    if not p.is_dir():
        return "chat", "\n\n"
    cfg_file = p / "tokenizer_config.json"
    try:
        has = (p / "chat_template.jinja").exists() or bool(json.loads(cfg_file.read_text()).get("chat_template"))
    except (OSError, ValueError):
        has = False
    return ("chat", "\n\n") if has else ("plain", "\n")


def prompter_for_backend(backend, task, system_prompt: str | None = None) -> Prompter:
    """The prompter of a loaded backend: its format, delimiter and tokenizer."""
    return Prompter(
        task.prompt,
        getattr(backend, "prompt_format", "plain"),
        getattr(backend, "delimiter", "\n"),
        getattr(backend, "tokenizer", None),
        system_prompt if system_prompt is not None else getattr(backend, "system_prompt", SYSTEM_PROMPT),
        getattr(backend, "path", ""),
    )


def load_prompter(model: ModelConfig, task, path: str | None = None) -> Prompter:
    """The prompter for ``path`` (default ``model.policy``) without loading its weights: under the chat
    format only its tokenizer is read (what a mesh client needs to build the prompts it sends)."""
    path = path or model.policy
    tok = None
    if model.prompt_format == "chat":
        resolved = resolve_model_path(path)
        try:
            tok = AutoTokenizer.from_pretrained(resolved)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load a tokenizer from {resolved}: {str(e).splitlines()[0]}") from e
    return Prompter(task.prompt, model.prompt_format, model.step_delimiter, tok, model.system_prompt, path)
