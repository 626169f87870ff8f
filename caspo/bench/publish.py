"""``caspo bench --suite publish``: publish-to-serving time, disk path vs tensor transport, side by side.

For each model (the tiny reasoner, and a randomly initialised ~0.5 B-parameter Llama built from a config
in a temporary directory, never saved anywhere else) two policy replicas (the mesh's ``ReplicaActor``, on
a real local Ray) serve version 0, then version 1 is published to them both ways:

* disk: the trainer writes the checkpoint (``save_pretrained``), then every replica reloads it (what
  ``publish.transport: disk`` does); timed from the start of the write to the last replica serving v1.
* transport: the source (caspo/mesh/publisher.py) holds the weights in memory and broadcasts them, in
  buckets, over a gloo group; timed from the publish call to the last replica serving v2. The hand-off
  from the trainer to the source (one in-memory copy on the trainer's node) is timed on its own.

On one machine the disk path reads a file the page cache still holds; docs/benchmarks.md says what that
means and what is expected elsewhere.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import ray
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from caspo.bench.common import SuiteResult
from caspo.config import load_config
from caspo.mesh.actors import ReplicaActor
from caspo.mesh.publisher import PolicySource
from caspo.models.hf import load_model
from caspo.models.tiny import resolve_tiny

LLAMA_05B = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=18, num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512)

def _each(seconds: list[float]) -> str:
    """Each replica's seconds, "a / b" (a list in a table cell would read as an interval)."""
    return " / ".join(f"{x:.3f}" for x in seconds)


COLUMNS = ["model", "params_M", "path", "seconds", "per_replica_s", "MB_moved", "s_per_GB", "note"]


def _models(tmp: Path, sizes) -> list[tuple[str, Path, dict]]:
    """(name, checkpoint dir of version 0, the state dict of version 1)."""
    out = []
    for name in sizes:
        if name == "tiny":
            model, tok = load_model(str(resolve_tiny()), "cpu", torch.float32)
        else:
            tok = AutoTokenizer.from_pretrained(str(resolve_tiny()))
            cfg = LlamaConfig(vocab_size=len(tok), **LLAMA_05B, tie_word_embeddings=False)
            torch.manual_seed(0)
            prev = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)  # built in bf16: what a GPU trainer publishes
            try:
                model = LlamaForCausalLM(cfg)
            finally:
                torch.set_default_dtype(prev)
        d = tmp / f"{name}-v0"
        model.save_pretrained(str(d), safe_serialization=True)
        tok.save_pretrained(str(d))
        out.append((name, d, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        del model
    return out


async def _timed(ref, t0: float) -> float:
    await ref
    return time.perf_counter() - t0


async def _disk(replicas, state, model_dir: Path, tmp: Path, version: int) -> dict:
    t0 = time.perf_counter()
    model, tok = load_model(str(model_dir), "cpu", next(iter(state.values())).dtype)
    model.load_state_dict(state)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = tmp / f"v{version}"
    model.save_pretrained(str(path), safe_serialization=True)  # the trainer's write
    tok.save_pretrained(str(path))
    write = time.perf_counter() - t0
    per = await asyncio.gather(*(_timed(r.reload.remote(str(path), version), t0) for r in replicas))
    versions = await asyncio.gather(*(r.version.remote() for r in replicas))
    assert versions == [version] * len(replicas), versions
    return {"seconds": time.perf_counter() - t0, "replica_s": [round(p - write, 3) for p in per], "write_s": write, "setup_s": setup}


async def _transport(source, replicas, state, path: str, version: int) -> dict:
    t0 = time.perf_counter()
    await source.hold.remote(path, state)
    handoff = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = await source.publish.remote(version, path, [(f"replica/{i}", r, "actor") for i, r in enumerate(replicas)])
    seconds = time.perf_counter() - t0
    bad = {k: v for k, v in rep["subscribers"].items() if not v["ok"] or v["version"] != version}
    assert not bad and rep["error"] is None, rep
    subs = rep["subscribers"].values()
    return {"seconds": seconds, "replica_s": [round(v["seconds"], 3) for v in subs], "wire_s": [round(v["wire_s"], 3) for v in subs],
            "send_s": rep["send_seconds"], "handoff_s": handoff, "bytes": rep["bytes"], "buckets": rep["buckets"]}


def run(n: int = 1, sizes=("tiny", "llama-0.5b"), replicas: int = 2, bucket_mb: float = 256.0, model: str = "tiny", engine: str = "hf", progress: bool = True) -> SuiteResult:
    """``n`` is unused (one publish per path and model); ``model``/``engine`` are fixed (HF on CPU here)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="caspo-bench-publish-") as tmpd:
            tmp = Path(tmpd)
            for name, v0, state in _models(tmp, sizes):
                params = sum(t.numel() for t in state.values())
                nbytes = sum(t.numel() * t.element_size() for t in state.values())
                cfg = load_config(None, [f"model.policy={v0}", "serve.policy_file=null", f"publish.bucket_mb={bucket_mb}", "publish.timeout_s=600"])
                Replica = ray.remote(num_cpus=0, max_concurrency=8)(ReplicaActor)
                reps = [Replica.remote(cfg.to_dict(), 1.0) for _ in range(replicas)]
                ray.get([r.version.remote() for r in reps])
                source = ray.remote(num_cpus=0, max_concurrency=8)(PolicySource).remote(cfg.to_dict())
                ray.get(source.stats.remote())  # started: its start-up is not the hand-off's
                if progress:
                    print(f"  {name}: {params / 1e6:.1f} M parameters, {nbytes / 1e6:.0f} MB, {replicas} replicas", flush=True)
                d = asyncio.run(_disk(reps, state, v0, tmp, 1))
                t = asyncio.run(_transport(source, reps, state, str(tmp / "v1"), 2))
                gb = nbytes / 1e9
                rows.append({"model": name, "params_M": round(params / 1e6, 1), "path": "disk", "seconds": d["seconds"], "replica_s": d["replica_s"], "per_replica_s": _each(d["replica_s"]),
                             "MB_moved": round(nbytes * (1 + replicas) / 1e6, 1), "s_per_GB": d["seconds"] / gb,
                             "note": f"write {d['write_s']:.2f} s, then {replicas} reads (page cache warm)", "write_s": d["write_s"]})
                rows.append({"model": name, "params_M": round(params / 1e6, 1), "path": "transport", "seconds": t["seconds"], "replica_s": t["replica_s"], "per_replica_s": _each(t["replica_s"]),
                             "MB_moved": round(nbytes * replicas / 1e6, 1), "s_per_GB": t["seconds"] / gb,
                             "note": f"gloo, {t['buckets']} buckets; on the wire {max(t['wire_s']):.2f} s, the rest is filling the replica's copy; hand-off to the source {t['handoff_s']:.2f} s",
                             "handoff_s": t["handoff_s"], "wire_s": t["wire_s"], "send_s": t["send_s"]})
                for a in [*reps, source]:
                    ray.kill(a)
                del state
    finally:
        if started:
            ray.shutdown()
    return SuiteResult(
        suite="publish",
        title="Publish to serving: disk round trip vs tensor transport (2 replicas, CPU)",
        command="nice -n 19 caspo bench --suite publish",
        rows=rows,
        columns=COLUMNS,
        notes=[
            "seconds: from the start of the publish to the last replica serving the new version; per_replica_s (replica_s in JSON): each replica's own time "
            "(disk: its reload after the write; transport: joining the group, receiving, converting to its dtype, switching).",
            "MB_moved: disk = one write + one read per replica; transport = one copy over the wire per replica.",
            "One machine: the disk path reads what the page cache holds, and the transport is loopback TCP.",
        ],
    )


def plot(plt, res: SuiteResult):
    models = list(dict.fromkeys(r["model"] for r in res.rows))
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    width = 0.38
    for j, path in enumerate(("disk", "transport")):
        vals = [next(r["seconds"] for r in res.rows if r["model"] == m and r["path"] == path) for m in models]
        ax.bar([i + (j - 0.5) * width for i in range(len(models))], vals, width, label=path)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models)
    ax.set_yscale("log")
    ax.set_ylabel("publish to serving (s)")
    ax.legend()
    ax.set_title("disk round trip vs transport")
    return fig
