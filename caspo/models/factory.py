"""The model backend a config asks for (``model.backend``: hf or vllm), for the mesh and Serve alike."""

from __future__ import annotations

from caspo.config import Config
from caspo.models.base import Backend
from caspo.models.hf import HFBackend
from caspo.models.vllm import VLLMBackend


def make_backend(cfg: Config, path: str | None = None, version: int = 0) -> Backend:
    """A backend for ``path`` (default ``model.policy``) labelled ``version``; vLLM needs the gpu extra."""
    if cfg.model.backend == "vllm":
        return VLLMBackend(path or cfg.model.policy, version=version, max_step_tokens=cfg.model.max_step_tokens)
    return HFBackend(
        path or cfg.model.policy,
        version=version,
        max_step_tokens=cfg.model.max_step_tokens,
        max_batch_rows=cfg.model.max_batch_rows,
    )
