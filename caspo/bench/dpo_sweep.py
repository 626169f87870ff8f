"""One round of DPO under several settings, each judged on the held-out set (why the loop's lr is small).

    python -m caspo.bench.dpo_sweep --out runs/bench/dpo_sweep.json \
        '{"learning_rate": 2e-6}' '{"learning_rate": 1e-5}' '{"learning_rate": 1e-5, "cases": ["incorrect"]}'

The pairs are made once, exactly as round 1 of ``caspo loop`` makes them (the same seeded questions, a
mesh started for the purpose, the three-case rule), and kept in ``<out dir>/pairs_q<N>.json``. Each
setting is a JSON object of fields of the config's ``dpo`` section (``DPOTrainConfig``; the others
come from ``--config``), plus ``cases``: train only on those pair cases. Each trains the base policy
on one Ray Train worker and is evaluated greedily (and with CaT@4 entropy)
on the loop's fixed held-out set. It prints one JSON line per setting, the base first, with accuracy
and calibration and their change against the base, and writes them all to ``--out``.
"""

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import ray

from caspo.config import load_config
from caspo.core.cat import SearchConfig, derive_seed
from caspo.core.pairs import Pair
from caspo.evaluation import evaluate
from caspo.mesh.client import MeshClient
from caspo.mesh.runner import MeshRunner
from caspo.models.hf import HFBackend, resolve_model_path
from caspo.tasks import get_task
from caspo.trainer.collect import collect_round
from caspo.trainer.collect import make_pairs as three_cases
from caspo.trainer.dpo import train_dpo
from caspo.trainer.loop import temperature_for


def make_pairs(cfg, task, n: int, path: Path) -> list[Pair]:
    if path.exists():
        return [Pair(**row) for row in json.loads(path.read_text())]
    runner = MeshRunner(cfg)
    runner.start(progress=True)
    try:
        pcfg = dataclasses.replace(cfg.pairs, temperature=temperature_for(cfg, 1))  # as round 1
        problems = task.problems(n, seed=derive_seed("loop", pcfg.seed, 1) % (2**31), split="train")
        rep = asyncio.run(collect_round(MeshClient(runner.registry_address), task, problems, pcfg, 0, store=False, desc="pairs"))
        _, pairs, _ = three_cases(rep.records, pcfg)
    finally:
        runner.stop()
    path.write_text(json.dumps([dataclasses.asdict(p) for _, p in pairs]))
    return [p for _, p in pairs]


def judge(path: str, task, problems, cfg) -> dict:
    backend = HFBackend(path)
    g = evaluate(backend, task, problems, SearchConfig(method="greedy", seed=cfg.loop.eval_seed), batch=32, progress=False).summary()
    cat = SearchConfig(method="cat", k=cfg.loop.cat_k, tau=cfg.loop.cat_tau, temperature=0.7, scoring="entropy", seed=cfg.loop.eval_seed)
    c = evaluate(backend, task, problems, cat, batch=16, progress=False)
    return {"accuracy": g["accuracy"], "step_accuracy": g["step_accuracy"], "ece": g["ece"], "entropy_gap": g["entropy_gap"], "auroc": g["auroc"], "cat_accuracy": c.accuracy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+", help="JSON objects of dpo config fields (+ cases)")
    ap.add_argument("--out", default="runs/bench/dpo_sweep.json")
    ap.add_argument("--config", default="configs/tiny-cpu.yaml")
    ap.add_argument("-n", type=int, default=200, help="training questions (default 200, as a loop round)")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, [f"mesh.run_dir={out.parent}/dpo_sweep_mesh", "mesh.namespace=caspo-dpo-sweep"])
    task = get_task(cfg.task.name, cfg.task.data, cfg.task)
    pairs = make_pairs(cfg, task, args.n, out.parent / f"pairs_q{args.n}.json")
    problems = task.problems(cfg.loop.eval_n, seed=cfg.loop.eval_seed, split="test")
    base_path = resolve_model_path(cfg.model.policy)
    base = {"setting": "base", "pairs": 0, **judge(base_path, task, problems, cfg)}
    print(json.dumps(base), flush=True)
    rows = [base]

    ray.init(num_cpus=cfg.mesh.num_cpus, include_dashboard=False, logging_level="WARNING")
    for i, raw in enumerate(args.settings):
        over = json.loads(raw)
        cases = over.pop("cases", None)
        chosen = [p for p in pairs if cases is None or p.case in cases]
        dpo = dataclasses.replace(cfg.dpo, **{"num_workers": 1, "cpus_per_worker": 1.0, **over})
        model_dir = out.parent / f"dpo_sweep_{int(time.time())}_{i}"
        metrics = train_dpo(chosen, base_path, base_path, str(model_dir), dpo, progress=False)
        row = {"setting": raw, "pairs": len(chosen), "train_s": round(metrics["seconds"], 1), "margin_end": metrics.get("reward_margin_end"), **judge(str(model_dir), task, problems, cfg)}
        row["accuracy_change"] = row["accuracy"] - base["accuracy"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    out.write_text(json.dumps({"eval_n": len(problems), "train_pairs": len(pairs), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
