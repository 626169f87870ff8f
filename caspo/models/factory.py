"""The model backend a config asks for (``model.backend``: hf or vllm), for the mesh and Serve alike."""

from __future__ import annotations

from caspo.config import Config
from caspo.models.base import Backend
from caspo.models.hf import HFBackend
from caspo.models.vllm import VLLMBackend


def scorer_engine(cfg: Config) -> str:
    """The engine the confidence scorer runs: ``scorer.entropy`` exact takes the HF backend (full-vocabulary
    entropies), topk the policy's ``model.backend`` (on vLLM: top-k estimates)."""
    return "hf" if cfg.scorer.entropy == "exact" else cfg.model.backend


def make_backend(cfg: Config, path: str | None = None, version: int = 0, engine: str | None = None) -> Backend:
    """A backend for ``path`` (default ``model.policy``) labelled ``version``, with the config's prompt
    format and step delimiter, on ``engine`` (default ``model.backend``); vLLM needs the gpu extra."""
    m = cfg.model
    common = dict(version=version, delimiter=m.step_delimiter, max_step_tokens=m.max_step_tokens, prompt_format=m.prompt_format, system_prompt=m.system_prompt)
    if (engine or m.backend) == "vllm":
        return VLLMBackend(path or m.policy, tensor_parallel_size=m.tensor_parallel_size, **common)
    return HFBackend(path or m.policy, max_batch_rows=m.max_batch_rows, **common)
