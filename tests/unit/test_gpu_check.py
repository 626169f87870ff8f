"""``make gpu-check``'s wiring on a CPU: without a GPU it runs nothing and exits with its own code; ``--dry-run``
runs every check's CPU part (the HF side of each comparison, the configs the GPU parts load, the FSDP settings)
in child processes and writes a JSON report naming each check."""

import json
import subprocess
import sys

import pytest
import torch

from caspo.bench import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the real check would run")
def test_without_a_gpu_it_says_so_and_exits_with_its_own_code(tmp_path):
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "caspo.bench.gpu_check", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == gpu_check.EXIT_NO_GPU == 3
    assert "no CUDA GPU" in p.stderr
    report = json.loads(out.read_text())
    assert report["gpu"] is None and report["checks"] == []


def test_dry_run_runs_every_checks_cpu_part(tmp_path):
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "caspo.bench.gpu_check", "--dry-run", "--out", str(out)], capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert [c["name"] for c in report["checks"]] == list(gpu_check.CHECKS)
    assert all(c["status"] == "ok" for c in report["checks"]), report
    assert p.returncode == 0
    checks = {c["name"]: c["details"] for c in report["checks"]}
    assert set(checks["vllm_backends"]) == {"tiny", "tiny-chat"}
    ent = checks["entropy"]
    assert ent["tokens"] > 0 and ent["topk20_H_mean"] >= ent["exact_H_mean"]  # the estimate is an upper bound
    assert checks["dpo_fsdp"]["fsdp_plugin"]["fsdp_version"] == "2"
