"""The contract between the search and every model backend: what a search asks for (``Prefix``), what a
backend answers (``ProposedStep``), the ``StepProposer`` protocol that joins them, and ``derive_seed``,
the one way a sample's seed is derived from its parts. Backends (hf, vllm, the worker), the generator
service and the mesh client import this module, not the search (``caspo.core.search``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Prefix:
    """A question plus the steps taken so far. ``seed`` (when set) makes the proposer's sampling for
    this prefix reproducible whatever else shares its batch."""

    question: str
    steps: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class ProposedStep:
    text: str  # the step, without its delimiter; "" when the model produced no step
    token_entropies: tuple[float, ...]
    token_logprobs: tuple[float, ...]
    ended: bool = False  # the model ended its output (EOS / length) instead of a delimiter
    entropy_estimate: bool = False  # entropies are a top-k estimate, not the full vocabulary
    verdict: float | None = None  # a critic's probability that the step is right (``critic`` scoring only)
    # the prompt left no room for a step within the model's context length: nothing was sampled (text "", ended)
    over_context: bool = False

    @property
    def tokens(self) -> int:
        return len(self.token_logprobs)


class StepProposer(Protocol):
    def propose(self, prefixes: Sequence[Prefix], n: int, temperature: float) -> list[list[ProposedStep]]:
        """For each prefix, n sampled next steps (temperature 0: greedy, n must be 1)."""


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, stable across processes (unlike hash())."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1
