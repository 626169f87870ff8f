"""The one place a model backend is built (``model.backend``: hf or vllm), for the mesh, Serve, the
benchmarks and the commands that load a model themselves (``caspo eval``, ``diagnose``, ``calibrate``)."""

from __future__ import annotations

from caspo.config import Config, ModelConfig, model_defaults
from caspo.models.base import Backend
from caspo.models.hf import HFBackend
from caspo.models.prompting import detect_format
from caspo.models.vllm import VLLMBackend


def make_backend(cfg: Config | ModelConfig, path: str | None = None, version: int = 0, engine: str | None = None) -> Backend:
    """A backend for ``path`` (default ``model.policy``) labelled ``version``, with the model section's
    prompt format and step delimiter (``cfg`` is a whole config or its model section), on ``engine``
    (default ``model.backend``; the scorer's is ``caspo.config.scorer_backend``); vLLM needs the gpu extra."""
    m = cfg.model if isinstance(cfg, Config) else cfg
    common = dict(
        version=version, delimiter=m.step_delimiter, max_step_tokens=m.max_step_tokens, prompt_format=m.prompt_format,
        system_prompt=m.system_prompt, max_model_len=m.max_model_len,
    )
    if (engine or m.backend) == "vllm":
        return VLLMBackend(path or m.policy, tensor_parallel_size=m.tensor_parallel_size, **common)
    # model.device, not whatever CUDA this process happens to see: an actor that asked Ray for no GPU may
    # still see every GPU of its node
    return HFBackend(path or m.policy, max_batch_rows=m.max_batch_rows, device=m.device, **common)


def named_model(model: str, prompt_format: str | None = None) -> ModelConfig:
    """The model section for a model named on the command line, on HF: its prompt format and step
    delimiter as given, else what the model was made for (``detect_format``: chat and blank-line steps
    when its tokenizer has a chat template); steps of up to 32 tokens for the built-in ``tiny``, 256
    for any other model."""
    if prompt_format is None:
        fmt, delim = detect_format(model)
    else:
        fmt, delim = model_defaults(model, prompt_format)
    return ModelConfig(policy=model, prompt_format=fmt, step_delimiter=delim, max_step_tokens=32 if model == "tiny" else 256)
