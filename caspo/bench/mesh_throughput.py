"""Suite ``mesh``: pairs per minute through the mesh with 1 and 2 generator replicas, and DPO speed.

For each replica count: a fresh mesh (Ray, redis-server, the four services), then one data round
over gRPC on ``n`` training questions (rollouts, exact confidence, critic, three-case rule, pair
store). Then DPO on those pairs with Ray Train (2 CPU workers): samples per second over the training
loop. The time from publishing a policy to Serve answering with it is in the ``serve`` suite.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from pathlib import Path

from caspo.bench.common import SuiteResult, model_overrides
from caspo.config import load_config
from caspo.core.contract import derive_seed
from caspo.mesh.client import MeshClient
from caspo.mesh.runner import MeshRunner
from caspo.models.hf import resolve_model_path
from caspo.tasks import get_task
from caspo.trainer.collect import collect_round, make_pairs
from caspo.trainer.dpo import train_dpo

COLUMNS = ["what", "replicas", "seconds", "questions_per_min", "steps_per_min", "pairs", "pairs_per_min", "x_1_replica"]


def run(n: int, replicas=(1, 2), seed: int = 0, model: str = "tiny", engine: str = "hf", progress: bool = True) -> SuiteResult:
    tmp = Path(tempfile.mkdtemp(prefix="caspo-bench-mesh-"))
    task = get_task("arith")
    problems = task.problems(n, seed=derive_seed("bench-mesh", seed) % (2**31), split="train")
    rows: list[dict] = []
    dpo_row = None
    for r in replicas:
        cfg = load_config(None, [f"mesh.run_dir={tmp}/mesh{r}", f"mesh.namespace=caspo-bench-mesh{r}", f"generator.replicas={r}", *model_overrides(model, engine)])
        runner = MeshRunner(cfg)
        runner.start(progress=False)
        try:
            client = MeshClient(runner.registry_address)
            t0 = time.perf_counter()
            rep = asyncio.run(collect_round(client, task, problems, cfg.pairs, 1, progress=progress, store=True, desc=f"pairs ({r} replica{'s' if r > 1 else ''})"))
            sec = time.perf_counter() - t0
            pairs = sum(rep.pairs.values())
            rows.append({"what": "data round", "replicas": r, "seconds": sec, "questions_per_min": 60 * n / sec, "steps_per_min": 60 * rep.steps_judged / sec, "pairs": pairs, "pairs_per_min": 60 * pairs / sec})
            if dpo_row is None and pairs:
                rows_ = [p for _, p in make_pairs(rep.records, cfg.pairs)[1]]
                base = resolve_model_path(cfg.model.policy)
                dpo = dataclasses.replace(cfg.dpo, num_workers=2, cpus_per_worker=0.5, epochs=1)
                m = train_dpo(rows_, base, base, str(tmp / "dpo"), dpo, progress=progress)
                dpo_row = {"what": "DPO (2 Ray Train workers)", "replicas": None, "seconds": m["seconds"], "pairs": len(rows_), "samples_per_s": m.get("samples_per_s")}
        finally:
            runner.stop()
    for row in rows:
        row["x_1_replica"] = row["pairs_per_min"] / rows[0]["pairs_per_min"] if rows[0]["pairs_per_min"] else None
    notes = []
    if dpo_row:
        notes.append(f"DPO: {dpo_row['pairs']} pairs, {dpo_row['samples_per_s']:.1f} samples/s over the training loop, {dpo_row['seconds']:.1f} s in all (model loading and reference log-probs included).")
    return SuiteResult(
        suite="mesh",
        title=f"Mesh throughput ({n} training questions per data round, tiny reasoner)",
        command=f"caspo bench --suite mesh -n {n}",
        rows=rows,
        columns=COLUMNS,
        notes=notes,
        extra={"dpo": dpo_row},
    )


def plot(plt, res: SuiteResult):
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([str(r["replicas"]) for r in res.rows], [r["pairs_per_min"] for r in res.rows])
    ax.set(xlabel="generator replicas", ylabel="pairs / minute")
    fig.suptitle(res.title, fontsize=9)
    return fig
