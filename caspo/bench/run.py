"""``caspo bench``: run the suites, write JSON, markdown and PNG per suite and an index."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from caspo.bench import common, entropy_bias, inference, mesh_throughput, overhead, pareto, publish, serve_load, tau
from caspo.config import ConfigError
from caspo.models.calibration_file import CalibrationError
from caspo.models.base import ModelLoadError
from caspo.tasks.base import TaskError

# suite name -> its module (each has run() and plot())
_SUITES = {"inference": inference, "overhead": overhead, "tau": tau, "serve": serve_load, "mesh": mesh_throughput, "pareto": pareto, "publish": publish, "entropy": entropy_bias}
SUITES = tuple(_SUITES)
# `caspo bench --suite all` runs these; pareto (issue 16) and publish (issue 25: builds a 0.5 B model) run when named
ALL = ("inference", "overhead", "tau", "serve", "mesh")


def run_suite(name: str, n: int, out: Path, smoke: bool = False, progress: bool = True, model: str = "tiny", engine: str = "hf", options: dict | None = None) -> common.SuiteResult:
    mod = _SUITES[name]
    kwargs: dict = {"n": n, "progress": progress, "model": model, "engine": engine, **(options or {})}
    if smoke:  # every code path, minimal sizes
        kwargs.update({"inference": {"ks": (2,)}, "overhead": {"repeats": 1, "k": 2}, "tau": {"taus": (0.0, 0.5), "warmup": 2, "scorings": ("entropy",)}, "serve": {"clients": (1, 2), "duration": 2.0}, "mesh": {"replicas": (1,)},
                       "pareto": {"ks": (2,), "taus": (0.5,), "batch": 4}, "publish": {"sizes": ("tiny",)}, "entropy": {"k": 2}}[name])
    res = mod.run(**kwargs)
    if smoke:
        res.command += " --smoke"
    common.write(res, out, plot=mod.plot)
    return res


def _usage(message: str) -> int:
    print(f"caspo bench: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="caspo bench", description="benchmarks: ratios measured side by side, JSON + markdown + PNG")
    ap.add_argument("--suite", default="all", choices=("all",) + SUITES)
    ap.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    ap.add_argument("-n", type=int, default=None, help="problems per suite (default: inference and tau 1000, accuracy needs them; overhead and pareto 200; mesh 100; serve 50)")
    ap.add_argument("--smoke", action="store_true", help="every suite on 3 problems with minimal settings (what the tests run)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--json", action="store_true", help="print the suites' results as one JSON object (what <out>/<suite>.json hold) instead of markdown")
    ap.add_argument("--model", default="tiny", help="policy: tiny (default), a directory or a hub id")
    ap.add_argument("--backend", default="hf", choices=("hf", "vllm"), help="hf (default) or vllm (GPU, the gpu extra)")
    g = ap.add_argument_group("pareto suite")
    g.add_argument("--ks", type=int, nargs="+", default=[4, 8], help="budgets K (default 4 8)")
    g.add_argument("--taus", type=float, nargs="+", default=[0.0, 0.5], help="Algorithm 2's tau values (default 0 0.5)")
    g.add_argument("--thresholds", type=float, nargs="*", default=[], help="extra adaptive branching thresholds (nats) beside the recommended one")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--no-critic", action="store_true", help="leave out the verifier-guided ceiling")
    g.add_argument("--task", default="arith", help="arith (default) or gsm8k")
    g.add_argument("--data", help="a JSONL file of problems instead of generated ones")
    g.add_argument("--calibration", help="calibration.json (default: cat.calibration, else the one next to the policy)")
    g.add_argument("--config", help="the config whose cat section is the recommended CaT (default configs/tiny-cpu.yaml)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch", type=int, default=16, help="questions per batched model call (default 16)")
    args = ap.parse_args(argv)
    if args.n is not None and args.n < 1:
        return _usage(f"-n must be >= 1, got {args.n}")
    if any(k < 1 for k in args.ks):
        return _usage(f"--ks must each be >= 1, got {args.ks}")
    if any(not 0.0 <= t <= 1.0 for t in args.taus):
        return _usage(f"--taus must each be in [0, 1], got {args.taus}")
    if any(not th >= 0 for th in args.thresholds):
        return _usage(f"--thresholds must each be >= 0, got {args.thresholds}")
    if not args.temperature > 0:
        return _usage(f"--temperature must be > 0, got {args.temperature}")
    out = Path(args.out)
    names = ALL if args.suite == "all" else (args.suite,)
    options = {"pareto": {"ks": tuple(args.ks), "taus": tuple(args.taus), "thresholds": tuple(args.thresholds), "temperature": args.temperature,
                          "critic": not args.no_critic, "task": args.task, "data": args.data, "calibration": args.calibration,
                          "config": args.config, "seed": args.seed, "batch": args.batch}}
    defaults = {"inference": 1000, "tau": 1000, "mesh": 100, "serve": 50}
    index, results = [], {}
    say = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    for name in names:
        n = 3 if args.smoke else (args.n or defaults.get(name, 200))
        t0 = time.time()
        say(f"== {name} (n={n})", flush=True)
        try:
            res = run_suite(name, n, out, smoke=args.smoke, progress=not args.quiet and not args.json, model=args.model, engine=args.backend, options=options.get(name))
        except (ConfigError, CalibrationError, TaskError, ModelLoadError) as e:
            return _usage(str(e))
        say(common.markdown(res), flush=True)
        results[name] = json.loads((out / f"{name}.json").read_text())
        index.append(f"- [{res.title}]({name}.md) — {time.time() - t0:.0f} s")
    (out / "index.md").write_text("# Benchmark results\n\n" + "\n".join(index) + "\n")
    say(f"wrote {out}/", flush=True)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
