"""Cluster placement knobs: the config checks them, services advertise a reachable address."""

import pytest

from caspo.config import ConfigError, load_config
from caspo.mesh.registry import advertised_address


def test_placement_and_dpo_resources_are_checked():
    cfg = load_config(None, ["mesh.placement={generator: {generator: 1}, scorer: {scorer: 0.5}}", "dpo.resources={trainer: 1}"])
    assert cfg.mesh.placement == {"generator": {"generator": 1}, "scorer": {"scorer": 0.5}}
    with pytest.raises(ConfigError, match="mesh.placement keys must be among"):
        load_config(None, ["mesh.placement={gpu: {a: 1}}"])
    with pytest.raises(ConfigError, match="must map resource names to amounts > 0"):
        load_config(None, ["mesh.placement={critic: {critic: 0}}"])
    with pytest.raises(ConfigError, match="dpo.resources must map"):
        load_config(None, ["dpo.resources={trainer: many}"])


def test_a_service_bound_to_every_interface_advertises_its_node_ip():
    assert advertised_address("127.0.0.1", 5001) == "127.0.0.1:5001"
    host, port = advertised_address("0.0.0.0", 5001).rsplit(":", 1)
    assert port == "5001" and host not in ("0.0.0.0", "") and host.count(".") == 3


def test_every_gpu_service_asks_ray_for_its_gpus_from_the_config():
    from pathlib import Path

    from caspo.config import service_resources

    qwen = Path(__file__).resolve().parents[2] / "configs" / "qwen2.5-math-7b-instruct.yaml"
    res = service_resources(load_config(qwen))
    for name in ("generator", "scorer", "critic", "serve", "dpo"):  # model.device cuda: each model actor holds its GPUs
        assert res[name].num_gpus == 1 and not res[name].on_head, name
    assert res["generator"].count == 2 and res["generator"].resources == {"generator": 1}
    assert (res["pair_store"].num_gpus, res["pair_store"].on_head) == (0, True)
    tp2 = service_resources(load_config(qwen, ["model.tensor_parallel_size=2", "serve.num_gpus=null"]))
    assert (tp2["generator"].num_gpus, tp2["serve"].num_gpus, tp2["dpo"].num_gpus) == (2, 2, 1)  # one engine over 2 GPUs
    cpu = service_resources(load_config(None))
    assert all(r.num_gpus == 0 for r in cpu.values())
    packed = service_resources(load_config(None, ["mesh.gpus={scorer: 0.5, generator: 1}"]))
    assert (packed["scorer"].num_gpus, packed["generator"].num_gpus, packed["critic"].num_gpus) == (0.5, 1, 0)
    with pytest.raises(ConfigError, match="model.backend vllm needs model.device: cuda"):
        load_config(qwen, ["model.device=cpu"])
    with pytest.raises(ConfigError, match=r"mesh.gpus.generator must be >= model.tensor_parallel_size=2"):
        load_config(qwen, ["model.tensor_parallel_size=2", "mesh.gpus={generator: 1}"])
    with pytest.raises(ConfigError, match="mesh.gpus keys must be among"):
        load_config(None, ["mesh.gpus={pair_store: 1}"])


def test_caspo_plan_of_the_qwen_config_shows_a_gpu_for_every_gpu_service(capsys):
    import json

    from caspo.cli.main import main

    assert main(["plan", "--config", "configs/qwen2.5-math-7b-instruct.yaml", "--json"]) == 0
    plans = {p["service"]: p for p in json.loads(capsys.readouterr().out)["services"]}
    for name in ("generator", "scorer", "critic", "serve", "dpo"):
        assert plans[name]["num_gpus"] == 1 and plans[name]["model"] == "Qwen/Qwen2.5-Math-7B-Instruct", name
    assert plans["generator"]["count"] == 2 and plans["generator"]["resources"] == {"generator": 1}
    assert plans["generator"]["params_billion"] == 7 and plans["dpo"]["entropy"] == "exact"
    assert plans["pair_store"]["num_gpus"] == 0 and plans["pair_store"]["on_head"]
    # scorer.entropy exact (the default) runs the scorer on the HF backend, on its own GPU, whatever model.backend is
    assert (plans["scorer"]["backend"], plans["scorer"]["entropy"]) == ("hf", "exact")
    assert (plans["generator"]["backend"], plans["generator"]["entropy"]) == ("vllm", "top-k estimate")
    assert main(["plan", "--config", "configs/qwen2.5-math-7b-instruct.yaml", "--set", "scorer.entropy=topk", "--json"]) == 0
    topk = {p["service"]: p for p in json.loads(capsys.readouterr().out)["services"]}
    assert (topk["scorer"]["backend"], topk["scorer"]["entropy"], topk["scorer"]["num_gpus"]) == ("vllm", "top-k estimate", 1)
    # the built-in model: read from its directory (safetensors headers, config.json)
    assert main(["plan", "--config", "configs/tiny-cpu.yaml", "--json"]) == 0
    tiny = {p["service"]: p for p in json.loads(capsys.readouterr().out)["services"]}
    assert tiny["generator"]["context_length"] == 512 and 0 < tiny["generator"]["params_billion"] < 0.01
    assert all(p["num_gpus"] == 0 for p in tiny.values())
    assert main(["plan", "--config", "configs/tiny-cpu.yaml", "--set", "model.max_model_len=300", "--json"]) == 0
    assert {p["context_length"] for p in json.loads(capsys.readouterr().out)["services"] if p["model"]} == {300}
