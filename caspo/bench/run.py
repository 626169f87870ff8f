"""``caspo bench``: run the suites, write JSON, markdown and PNG per suite and an index."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from caspo.bench import common, inference, mesh_throughput, overhead, serve_load, tau

# suite name -> its module (each has run() and plot())
_SUITES = {"inference": inference, "overhead": overhead, "tau": tau, "serve": serve_load, "mesh": mesh_throughput}
SUITES = tuple(_SUITES)


def run_suite(name: str, n: int, out: Path, smoke: bool = False, progress: bool = True, model: str = "tiny", engine: str = "hf") -> common.SuiteResult:
    mod = _SUITES[name]
    kwargs: dict = {"n": n, "progress": progress, "model": model, "engine": engine}
    if smoke:  # every code path, minimal sizes
        kwargs.update({"inference": {"ks": (2,)}, "overhead": {"repeats": 1}, "tau": {"taus": (0.0, 0.5), "warmup": 2, "scorings": ("entropy",)}, "serve": {"clients": (1, 2), "duration": 2.0}, "mesh": {"replicas": (1,)}}[name])
    res = mod.run(**kwargs)
    if smoke:
        res.command += " --smoke"
    common.write(res, out, plot=mod.plot)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="caspo bench", description="benchmarks: ratios measured side by side, JSON + markdown + PNG")
    ap.add_argument("--suite", default="all", choices=("all",) + SUITES)
    ap.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    ap.add_argument("-n", type=int, default=None, help="problems per suite (default: inference and tau 1000, accuracy needs them; overhead 200; mesh 100; serve 50)")
    ap.add_argument("--smoke", action="store_true", help="every suite on 3 problems with minimal settings (what the tests run)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--model", default="tiny", help="policy: tiny (default), a directory or a hub id")
    ap.add_argument("--backend", default="hf", choices=("hf", "vllm"), help="hf (default) or vllm (GPU, the gpu extra)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    names = SUITES if args.suite == "all" else (args.suite,)
    defaults = {"inference": 1000, "tau": 1000, "mesh": 100, "serve": 50}
    index = []
    for name in names:
        n = 3 if args.smoke else (args.n or defaults.get(name, 200))
        t0 = time.time()
        print(f"== {name} (n={n})", flush=True)
        res = run_suite(name, n, out, smoke=args.smoke, progress=not args.quiet, model=args.model, engine=args.backend)
        print(common.markdown(res), flush=True)
        index.append(f"- [{res.title}]({name}.md) — {time.time() - t0:.0f} s")
    (out / "index.md").write_text("# Benchmark results\n\n" + "\n".join(index) + "\n")
    print(f"wrote {out}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
