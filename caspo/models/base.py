"""The model backend interface every engine implements, and its adapter to CaT's StepProposer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from caspo.core.contract import Prefix, ProposedStep
from caspo.core.steps import DEFAULT_DELIMITER, join_steps


class ModelLoadError(ValueError):
    """A model path or id that holds no loadable model. The message names the path."""


# config.json keys that hold a model's context length in tokens, in the order they are trusted
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_seq_len")


def context_length(model_config: dict) -> int | None:
    """A model's context length in tokens from its ``config.json`` (a multimodal model's ``text_config``
    first); None when it names none."""
    for cfg in (model_config.get("text_config") or {}, model_config):
        for key in CONTEXT_KEYS:
            v = cfg.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


class ContextLengthError(ValueError):
    """An item longer than the model's context length (the message names the limit)."""

    def __init__(self, need: int, limit: int, what: str = "prompt"):
        super().__init__(f"{what} needs {need} tokens; the model's context length (model.max_model_len) is {limit}")
        self.need, self.limit = need, limit


@dataclass(frozen=True)
class StepScore:
    """Teacher-forced scores of a given step's tokens (step text plus its delimiter)."""

    token_entropies: tuple[float, ...]
    token_logprobs: tuple[float, ...]
    over_context: bool = False  # prompt + step exceed the model's context length: not scored (empty)

    @property
    def tokens(self) -> int:
        return len(self.token_logprobs)


class Backend(Protocol):
    name: str
    path: str
    version: int

    def sample_steps(
        self,
        prompts: Sequence[str],
        n: int,
        temperature: float,
        seeds: Sequence[int | None] | None = None,
    ) -> list[list[ProposedStep]]:
        """For each prompt, n sampled next steps ending at the step delimiter, with per-token
        entropies and log-probs from the logits the sampler used (before temperature)."""

    def score_steps(self, prompts: Sequence[str], steps: Sequence[str]) -> list[StepScore]:
        """Exact per-token entropies and log-probs of ``steps[i]`` after ``prompts[i]`` in one
        batched teacher-forced pass."""

    def answer_logprobs(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list[float]]:
        """For each prompt, the exact log-prob of each answer's first token at the one position after the prompt
        (a judge's Yes/No verdict reads nothing else): one request per prompt, no other position scored."""

    def reload(self, path: str, version: int) -> None:
        """Swap weights; requests already running finish on the weights they started with."""

    def load_weights(self, weights, version: int, path: str) -> None:
        """Swap to weights given as ``(name, tensor)`` pairs (a publish over caspo.models.transport), once
        all of them have arrived; requests already running finish on the weights they started with."""

    # context length in tokens (prompt + step; None: unknown, nothing is checked); with ``tokenizer``,
    # ``add_special_tokens``, ``delimiter`` and ``max_step_tokens`` what item_tokens counts with
    max_model_len: int | None


def item_tokens(backend, prompt: str, step: str | None = None, new_tokens: int | None = None) -> int:
    """Tokens an item needs in the model's context: the prompt's as the backend encodes it, plus the given
    step's with its delimiter (scoring) or room for ``new_tokens`` new ones (sampling: default
    ``max_step_tokens``; a judge's answer: 1)."""
    tok = backend.tokenizer
    need = len(tok.encode(prompt, add_special_tokens=backend.add_special_tokens))
    if step is None:
        return need + (backend.max_step_tokens if new_tokens is None else new_tokens)
    return need + len(tok.encode(step.strip() + backend.delimiter, add_special_tokens=False))


def prefix_text(prompt: Callable[[str], str], question: str, steps: Sequence[str], delimiter: str | None = None) -> str:
    """What a policy continues: the prompt for the question plus the steps so far, each ended by the
    delimiter (default: the prompt's own, a :class:`caspo.models.prompting.Prompter`'s
    ``model.step_delimiter``, else ``\n``). Every proposer, the data round and the benchmarks build
    model input with this."""
    if delimiter is None:
        delimiter = getattr(prompt, "delimiter", DEFAULT_DELIMITER)
    return prompt(question) + join_steps(steps, delimiter)


class PromptedProposer:
    """Turns a backend into CaT's StepProposer: a Prefix becomes prompt(question) + steps so far."""

    def __init__(self, backend: Backend, prompt: Callable[[str], str], delimiter: str | None = None):
        self.backend = backend
        self.prompt = prompt
        # the prompt's delimiter (a Prompter), else the backend's: the one it stops steps at
        self.delimiter = delimiter or getattr(prompt, "delimiter", None) or getattr(backend, "delimiter", DEFAULT_DELIMITER)

    def text(self, prefix: Prefix) -> str:
        return prefix_text(self.prompt, prefix.question, prefix.steps, self.delimiter)

    def propose(self, prefixes: Sequence[Prefix], n: int, temperature: float) -> list[list[ProposedStep]]:
        return self.backend.sample_steps([self.text(p) for p in prefixes], n, temperature, [p.seed for p in prefixes])
