"""``make gpu-check``: the GPU path on first contact, one command, no network, a JSON report of each check.

Checks (each in its own process, so one engine's GPU memory is gone before the next starts, and a crash is
one failed check, not a lost report):

* ``vllm_backends``: the vLLM backend loads the shipped ``tiny`` and ``tiny-chat`` weights, samples, scores and
  answers a judge's Yes/No;
* ``entropy``: on the same ``tiny-chat`` steps, vLLM's scored entropies (top-20 estimates) and log-probs against the
  HF scorer's teacher-forced pass on the GPU: the estimate must equal the one computed from HF's full logits, the
  log-probs must agree, and the exact values' gap to the estimate is reported;
* ``serve_cat``: a CaT request through Ray Serve with ``model.backend=vllm`` (one GPU replica), over HTTP;
* ``dpo_fsdp``: one DPO round of the tiny model with ``dpo.fsdp`` on one GPU worker (Ray Train, accelerate FSDP2);
* ``mesh``: the mesh with a GPU generator and a GPU scorer (``mesh.placement``), one Generate and one Score call.

Exit status: 0 every check passed; 1 a check failed; 3 no CUDA GPU is visible (nothing is run; the report says so);
2 bad arguments. ``--dry-run`` runs every check's CPU part instead (the HF side of each comparison, the configs the
GPU parts load, the DPO trainer's FSDP settings), in this process, and is what ``make test`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import ray
import torch
from ray import serve
from trl import DPOConfig

from caspo.config import DPOTrainConfig, load_config
from caspo.core.pairs import CASE_INCORRECT, Pair
from caspo.core.steps import join_steps
from caspo.mesh.client import MeshClient
from caspo.mesh.runner import MeshRunner
from caspo.models.hf import HFBackend, teacher_forced
from caspo.models.prompting import prompter_for_backend
from caspo.models.tiny import resolve_tiny
from caspo.models.vllm import VLLMBackend
from caspo.netutil import free_port
from caspo.serve.cat_client import solve_http
from caspo.serve.deployment import build_app, serve_options
from caspo.tasks import get_task
from caspo.trainer.dpo import _sharding, train_dpo

EXIT_FAILED = 1
EXIT_NO_GPU = 3
CHECKS = ("vllm_backends", "entropy", "serve_cat", "dpo_fsdp", "mesh")
TIMEOUT_S = {"vllm_backends": 150, "entropy": 120, "serve_cat": 150, "dpo_fsdp": 150, "mesh": 150}  # 12 min at most, ~8 expected
VLLM_ARGS = {"gpu_memory_utilization": 0.3, "enforce_eager": True, "dtype": "float32", "seed": 0}


def _prompts(backend, n: int = 4) -> list[str]:
    task = get_task("arith")
    prompter = prompter_for_backend(backend, task)
    out = []
    for p in task.problems(n, seed=11, split="test"):
        out.append(prompter(p.question))
        out.append(prompter(p.question) + join_steps(p.gold_steps[:1], prompter.delimiter))
    return out


def _hf(model: str, device: str) -> HFBackend:
    cfg = load_config(None, [f"model.policy={model}"])
    m = cfg.model
    return HFBackend(model, delimiter=m.step_delimiter, max_step_tokens=m.max_step_tokens, prompt_format=m.prompt_format, system_prompt=m.system_prompt, device=device)


def _vllm(model: str):

    cfg = load_config(None, [f"model.policy={model}"])
    m = cfg.model
    return VLLMBackend(model, delimiter=m.step_delimiter, max_step_tokens=m.max_step_tokens, prompt_format=m.prompt_format, system_prompt=m.system_prompt, **VLLM_ARGS)


# ---- the checks: (gpu part, CPU part); each returns a dict of details or raises ---------------------------
def vllm_backends(dry: bool) -> dict:
    out = {}
    for model in ("tiny", "tiny-chat"):
        b = _hf(model, "cpu") if dry else _vllm(model)
        prompts = _prompts(b, 2)
        steps = b.sample_steps(prompts, 2, 1.0, seeds=list(range(len(prompts))))
        texts = [g[0].text or "x" for g in steps]
        scores = b.score_steps(prompts, texts)
        yes_no = b.answer_logprobs(prompts, ["Yes", "No"])
        assert all(len(g) == 2 and g[0].tokens >= 1 for g in steps), "every prompt gets two sampled steps"
        assert all(s.tokens >= 1 and all(lp <= 1e-4 for lp in s.token_logprobs) for s in scores), "scores are log-probs"
        assert all(len(r) == 2 and all(v <= 1e-4 for v in r) for r in yes_no), "answer log-probs"
        out[model] = {"engine": b.name, "steps": [t[:40] for t in texts[:2]], "estimate_flag": steps[0][0].entropy_estimate}
        del b
    return out


def entropy(dry: bool) -> dict:
    hf = _hf("tiny-chat", "cpu" if dry else "cuda")
    hf.model.float()  # float32 on both sides: the differences are kernels, not dtypes
    prompts = _prompts(hf, 4)
    texts = [g[0].text or "x" for g in hf.sample_steps(prompts, 1, 0.0)]
    seqs, spans = hf.step_sequences(prompts, texts)
    ref = teacher_forced(hf.model, seqs, spans, hf.tokenizer.pad_token_id, topk=20)
    exact = [x for h, _, _ in ref for x in h]
    est = [x for _, _, e in ref for x in e]
    out = {"tokens": len(exact), "exact_H_mean": sum(exact) / len(exact), "topk20_H_mean": sum(est) / len(est), "engine": "hf"}
    if not dry:
        v = _vllm("tiny-chat")
        got = v.score_steps(prompts, texts)
        v_est = [x for s in got for x in s.token_entropies]
        v_lp = [x for s in got for x in s.token_logprobs]
        hf_lp = [x for _, lp, _ in ref for x in lp]
        out.update(engine="vllm", vllm_vs_hf_estimate_max=max(abs(a - b) for a, b in zip(v_est, est)), vllm_vs_hf_logprob_max=max(abs(a - b) for a, b in zip(v_lp, hf_lp)),
                   vllm_estimate_minus_exact_mean=sum(a - b for a, b in zip(v_est, exact)) / len(exact))
        assert len(v_est) == len(est), "vLLM and HF score the same tokens"
        assert out["vllm_vs_hf_estimate_max"] < 0.05 and out["vllm_vs_hf_logprob_max"] < 0.05, out
    return out


def serve_cat(dry: bool) -> dict:

    overrides = ["model.backend=hf" if dry else "model.backend=vllm", f"serve.http_port={free_port()}", f"serve.grpc_port={free_port()}", "serve.request_timeout_s=120"]
    if not dry:
        overrides.append("serve.num_gpus=1")
    cfg = load_config(None, overrides)
    if dry:

        return {"config": "ok", "serve_options": sorted(serve_options(cfg)), "app": type(build_app(cfg)).__name__}


    ray.init(num_gpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        serve.start(**serve_options(cfg))
        serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
        ans = solve_http(f"http://127.0.0.1:{cfg.serve.http_port}", "12+7*3-5", method="cat", k=4, seed=1)
    finally:
        serve.shutdown()
        ray.shutdown()
    assert "answer" in ans, ans
    return {"answer": ans.get("answer"), "confidence": ans.get("confidence")}


def _pairs(n: int):

    task = get_task("arith")
    probs = task.problems(n + 1, seed=3, split="train")
    out = []
    for a, b in zip(probs, probs[1:]):
        out.append(Pair(task.prompt(a.question), a.gold_steps[0], b.gold_steps[0], CASE_INCORRECT, 0.0, 0.0))
    return out


def dpo_fsdp(dry: bool) -> dict:
    s = DPOTrainConfig(num_workers=1, per_device_batch_size=8, epochs=1, learning_rate=1e-4, use_gpu=True, fsdp=True, cpus_per_worker=1, checkpoint_steps=0)
    if dry:


        args = DPOConfig(output_dir="/tmp/caspo-gpu-check-dpo", use_cpu=True, report_to="none", **_sharding(s))
        assert args.fsdp_plugin_args["fsdp_version"] == 2
        return {"fsdp_plugin": {k: str(v) for k, v in args.fsdp_plugin_args.items() if k in ("fsdp_version", "state_dict_type", "auto_wrap_policy")}}



    ray.init(num_gpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            m = train_dpo(_pairs(8), str(resolve_tiny()), str(resolve_tiny()), str(Path(tmp) / "policy"), s, progress=False)
    finally:
        ray.shutdown()
    assert m["sharded"] and m["steps"] >= 1, m
    return {k: m[k] for k in ("steps", "loss_start", "loss_end", "sharded", "workers")}


def mesh(dry: bool) -> dict:
    overrides = ["model.backend=hf", "scorer.entropy=exact"]
    if not dry:
        overrides += ["model.backend=vllm", "mesh.placement={generator: {GPU: 0.4}, scorer: {GPU: 0.4}}"]
    cfg = load_config(None, overrides)
    if dry:
        return {"placement": cfg.mesh.placement, "scorer_entropy": cfg.scorer.entropy}


    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, overrides + [f"mesh.run_dir={tmp}"])
        runner = MeshRunner(cfg)
        st = runner.start()
        try:
            async def calls():
                client = MeshClient(st["registry"])
                try:
                    g = await client.propose(["Q: 12+7*3-5\n"], 2, 0.7)
                    sc = await client.score(["Q: 12+7*3-5\n"], ["7*3=21; 12+21-5"])
                finally:
                    await client.close()
                return g, sc

            g, sc = asyncio.run(calls())
        finally:
            runner.stop()
    return {"generated": str(g)[:200], "scored": str(sc)[:200]}


_FUNCS: dict[str, Callable[[bool], dict]] = {"vllm_backends": vllm_backends, "entropy": entropy, "serve_cat": serve_cat, "dpo_fsdp": dpo_fsdp, "mesh": mesh}


def _in_process(name: str, dry: bool) -> dict:
    try:
        return {"status": "ok", "details": _FUNCS[name](dry)}
    except Exception as e:  # noqa: BLE001 - the check failed: say how
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"[:1000]}


def _one(name: str, dry: bool) -> dict:
    """Run one check: on the GPU in a child process (its result is the child's last stdout line, JSON); the
    dry run's CPU parts hold no GPU memory and run here."""
    t0 = time.time()
    if dry:
        return {"name": name, **_in_process(name, dry), "seconds": round(time.time() - t0, 1)}
    cmd = [sys.executable, "-m", "caspo.bench.gpu_check", "--only", name] + (["--dry-run"] if dry else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S[name], env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "failed", "seconds": round(time.time() - t0, 1), "error": f"timed out after {TIMEOUT_S[name]} s"}
    last = (p.stdout.strip().splitlines() or [""])[-1]
    try:
        res = json.loads(last)
    except ValueError:
        res = {"status": "failed", "error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:500]}
    return {"name": name, **res, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check", description="the GPU path's checks, a JSON report (make gpu-check)")
    ap.add_argument("--out", default="runs/gpu-check/report.json")
    ap.add_argument("--dry-run", action="store_true", help="run each check's CPU part (no GPU needed)")
    ap.add_argument("--only", choices=CHECKS, help="run one check in this process and print its result as JSON")
    args = ap.parse_args(argv)
    if args.only:  # the child
        print(json.dumps(_in_process(args.only, args.dry_run), default=str))
        return 0
    gpu = torch.cuda.is_available()
    report = {"gpu": torch.cuda.get_device_name(0) if gpu else None, "dry_run": args.dry_run, "torch": torch.__version__, "checks": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not gpu and not args.dry_run:
        report["error"] = "no CUDA GPU is visible (torch.cuda.is_available() is False): nothing was run; --dry-run runs the CPU parts"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"gpu-check: {report['error']}", file=sys.stderr)
        return EXIT_NO_GPU
    for name in CHECKS:
        res = _one(name, args.dry_run)
        report["checks"].append(res)
        print(f"gpu-check {name}: {res['status']} ({res['seconds']} s){'' if res['status'] == 'ok' else ': ' + res.get('error', '')}", flush=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0 if all(c["status"] == "ok" for c in report["checks"]) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
