"""The model backend a config asks for (``model.backend``: hf or vllm), for the mesh and Serve alike."""

from __future__ import annotations

from caspo.config import Config
from caspo.models.base import Backend
from caspo.models.hf import HFBackend
from caspo.models.vllm import VLLMBackend


def make_backend(cfg: Config, path: str | None = None, version: int = 0) -> Backend:
    """A backend for ``path`` (default ``model.policy``) labelled ``version``, with the config's prompt
    format and step delimiter; vLLM needs the gpu extra."""
    m = cfg.model
    common = dict(
        version=version, delimiter=m.step_delimiter, max_step_tokens=m.max_step_tokens, prompt_format=m.prompt_format,
        system_prompt=m.system_prompt, max_model_len=m.max_model_len,
    )
    if m.backend == "vllm":
        return VLLMBackend(path or m.policy, tensor_parallel_size=m.tensor_parallel_size, **common)
    # model.device, not whatever CUDA this process happens to see: an actor that asked Ray for no GPU may
    # still see every GPU of its node
    return HFBackend(path or m.policy, max_batch_rows=m.max_batch_rows, device=m.device, **common)
