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
        "model.policy=tiny-chat", "model.backend=hf", "critic.model=tiny-chat", f"task.data={tmp_path / 'math'}",
        "mesh.placement={}", "dpo.use_gpu=false", "dpo.resources={}", "dpo.cpus_per_worker=0.5", "dpo.num_workers=1",
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
