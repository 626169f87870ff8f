"""The real-model configs load, and say what the paper and the k8s gpu overlay say."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from caspo.config import SYSTEM_PROMPT, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GPU_OVERLAY = Path(__file__).resolve().parents[2] / "k8s" / "overlays" / "gpu" / "caspo.yaml"


@pytest.mark.parametrize("name, policy", [("qwen2.5-math-7b-instruct", "Qwen/Qwen2.5-Math-7B-Instruct"), ("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct")])
def test_real_model_config_loads_with_the_papers_settings(name, policy):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    m = cfg.model
    assert (m.policy, m.backend, m.prompt_format, m.step_delimiter, m.tensor_parallel_size) == (policy, "vllm", "chat", "\n\n", 1)
    assert m.system_prompt == SYSTEM_PROMPT and "\\boxed{}" in m.system_prompt
    assert cfg.dpo.delimiter == "\n\n"  # DPO appends the model's step delimiter
    assert (cfg.critic.kind, cfg.critic.model) == ("judge", "Qwen/Qwen2.5-Math-7B-Instruct")
    assert cfg.task.name == "math"
    d = cfg.dpo
    assert (d.learning_rate, d.beta, d.max_length, d.loss_type) == (5e-7, 0.1, 2048, "sigmoid")
    assert d.per_device_batch_size * d.gradient_accumulation_steps * d.num_workers == 64
    assert d.fsdp and d.fsdp_config == {"activation_checkpointing": True}  # a 7B policy's training state is sharded
    assert cfg.loop.temperatures == [0.7, 0.7, 0.7, 1.0, 1.0, 1.2] and cfg.loop.rounds == 6
    # the resources of the gpu overlay's worker groups
    overlay = yaml.safe_load(GPU_OVERLAY.read_text())
    assert cfg.mesh.placement == overlay["mesh"]["placement"]
    assert (d.num_workers, d.cpus_per_worker, d.use_gpu, d.resources) == (
        overlay["dpo"]["num_workers"], overlay["dpo"]["cpus_per_worker"], True, overlay["dpo"]["resources"])
    assert overlay["dpo"]["fsdp"] is True
    assert cfg.generator.replicas == overlay["generator"]["replicas"]
    assert (cfg.serve.num_gpus, cfg.serve.num_cpus, cfg.serve.max_replicas) == (1, 4, 8)


def test_the_cpu_override_of_the_real_config_is_valid():
    cfg = load_config(
        CONFIGS / "qwen2.5-math-7b-instruct.yaml",
        ["model.policy=tiny-chat", "model.backend=hf", "model.device=cpu", "critic.model=tiny-chat", "mesh.placement={}", "dpo.use_gpu=false", "dpo.fsdp=false", "dpo.resources={}"],
    )
    assert (cfg.model.policy, cfg.model.prompt_format, cfg.model.step_delimiter) == ("tiny-chat", "chat", "\n\n")
    assert cfg.mesh.placement == {} and not cfg.dpo.use_gpu
