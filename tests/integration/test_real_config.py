"""The real-model config end to end on CPU: `caspo loop --config configs/qwen2.5-math-7b-instruct.yaml`
for one round with tiny-chat as policy and judge — a chat template, blank-line steps, boxed answers,
task math from a save_to_disk directory, the judge critic over gRPC, DPO on Ray Train — through the
real command in its own process (its own local Ray with 2 CPUs, its own redis-server)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

ROOT = Path(__file__).resolve().parents[2]
MATH = ROOT / "tests" / "data" / "math_small.jsonl"


def test_one_round_of_the_qwen_math_config_with_tiny_chat_and_the_judge(tmp_path):
    rows = [json.loads(line) for line in MATH.read_text().splitlines()]
    DatasetDict({"train": Dataset.from_list(rows[:6]), "test": Dataset.from_list(rows[6:])}).save_to_disk(str(tmp_path / "math"))
    sets = [
        "model.policy=tiny-chat", "model.backend=hf", "model.device=cpu", "critic.model=tiny-chat", f"task.data={tmp_path / 'math'}",
        "mesh.placement={}", "dpo.use_gpu=false", "dpo.fsdp=false", "dpo.resources={}", "dpo.cpus_per_worker=0.5", "dpo.num_workers=1",
        "dpo.per_device_batch_size=4", "dpo.gradient_accumulation_steps=1", "dpo.max_length=512", "dpo.gradient_checkpointing=false",
        f"mesh.run_dir={tmp_path / 'mesh'}", "mesh.host=127.0.0.1", "mesh.num_cpus=2", "mesh.namespace=caspo-real-config-test",
        f"loop.runs_dir={tmp_path}", "loop.questions=4", "loop.eval_n=2", "loop.cat_k=2", "loop.eval_batch=2",
        "pairs.candidates=2", "pairs.max_steps=3", "pairs.batch=4", "model.max_step_tokens=24",
    ]
    argv = [sys.executable, "-m", "caspo.cli", "loop", "--config", str(ROOT / "configs" / "qwen2.5-math-7b-instruct.yaml"), "--rounds", "1", "--run", "real", "--json"]
    for s in sets:
        argv += ["--set", s]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert [r["round"] for r in out["rounds"]] == [0, 1]
    run = tmp_path / "real"
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["model"]["prompt_format"], cfg["model"]["step_delimiter"], cfg["critic"]["kind"], cfg["task"]["name"]) == ("chat", "\n\n", "judge", "math")
    r1 = out["rounds"][1]
    assert r1["policy_version"] == 1 and sum(r1["pairs"].values()) > 0
    assert (run / "policies" / "v1" / "model.safetensors").exists()
    # the pairs were made from chat prompts and judged by the judge critic
    train = json.loads((run / "round1_train.json").read_text())
    assert train["pairs_read"] == sum(r1["pairs"].values())
    pairs = json.loads((run / "round1_pairs.json").read_text())
    assert pairs["critic"].startswith("judge:")  # the judge critic judged the round's steps
    greedy = [json.loads(line) for line in (run / "eval" / "round1_greedy.jsonl").read_text().splitlines()]
    assert len(greedy) == 2 and all("\n\n" not in s for r in greedy for s in r["steps"])


def test_serve_the_real_config_with_tiny_chat_and_stream_with_openai(tmp_path):
    """CaT on a real Ray Serve from the real config (chat prompts, blank-line steps, task math), with
    tiny-chat as the policy; the openai client streams the answer."""
    import openai
    import ray
    from ray import serve

    from caspo.config import load_config
    from caspo.core.search import SearchConfig, search
    from caspo.models.base import PromptedProposer
    from caspo.models.hf import HFBackend
    from caspo.models.prompting import prompter_for_backend
    from caspo.netutil import free_port
    from caspo.serve.deployment import build_app, serve_options
    from caspo.tasks import get_task

    cfg = load_config(
        ROOT / "configs" / "qwen2.5-math-7b-instruct.yaml",
        [
            "model.policy=tiny-chat", "model.backend=hf", "model.device=cpu", "critic.model=tiny-chat", f"task.data={MATH}", "model.max_step_tokens=24",
            "serve.host=127.0.0.1", f"serve.http_port={free_port()}", f"serve.grpc_port={free_port()}", f"serve.policy_file={tmp_path}/policy.json",
            "serve.num_cpus=0.5", "serve.num_gpus=0", "serve.max_replicas=1",
        ],
    )
    question = "Tom has 3 apples and buys 5 more. How many apples does he have?"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        serve.start(**serve_options(cfg))
        serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.serve.http_port}/v1", api_key="unused")
        assert client.models.list().data[0].id == "caspo-math"
        search_fields = {"method": "cat", "k": 3, "tau": 0.2, "max_steps": 4, "seed": 5}
        chunks = list(client.chat.completions.create(model="caspo-math", messages=[{"role": "user", "content": question}], stream=True, extra_body=search_fields))
        whole = client.chat.completions.create(model="caspo-math", messages=[{"role": "user", "content": question}], extra_body=search_fields)
        greedy = client.chat.completions.create(model="caspo-math", messages=[{"role": "user", "content": question}], extra_body={"method": "greedy", "max_steps": 4})
    finally:
        serve.shutdown()
        ray.shutdown()
    assert chunks[-1].choices[0].finish_reason == "stop" and "caspo" in chunks[-1].model_extra
    steps = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert steps and all(s.startswith("\n\n") for s in steps[1:])  # the model's step delimiter
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    # the replica prompts with the chat template: the same search here gives the same steps
    backend = HFBackend("tiny-chat", prompt_format="chat", delimiter="\n\n", max_step_tokens=24)
    local = search(question, PromptedProposer(backend, prompter_for_backend(backend, get_task("math", str(MATH)))), SearchConfig(method="greedy", max_steps=4))
    assert [s["text"] for s in greedy.model_extra["caspo"]["steps"]] == list(local.steps)
