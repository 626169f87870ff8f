"""``caspo serve``, ``caspo solve``, ``caspo promote`` and ``caspo rollback``: CaT on Ray Serve, a client that
asks it, and the operator's choice of which trained version of a loop run it serves."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray
from ray import serve

from caspo.cli.shared import wait_until_set, command, stop_on_signals, config_of
from caspo.core.confidence import SCORINGS
from caspo.core.search import BRANCHINGS, METHODS
from caspo.errors import UsageError
from caspo.mesh.state import running_mesh
from caspo.serve.cat_client import FIELDS as SOLVE_FIELDS
from caspo.serve.cat_client import SolveError, solve_grpc, solve_http
from caspo.serve.deployment import build_app, serve_options
from caspo.services.security import auth_token
from caspo.services.server import limit_proxy_messages
from caspo.trainer.serving import RunError, promote, rollback


def cmd_serve(args) -> int:
    """CaT on Ray Serve: HTTP and gRPC, until Ctrl-C."""


    cfg = config_of(args)
    sv = cfg.serve
    st = running_mesh(cfg)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING")
        where = f"the Ray cluster at {os.environ['RAY_ADDRESS']}"
    elif st:
        ray.init(address=st["ray_address"], logging_level="WARNING")  # beside the running mesh and loop
        where = "the running mesh's Ray"
    else:
        limit_proxy_messages()
        port = {"_metrics_export_port": cfg.mesh.metrics_export_port} if cfg.mesh.metrics_export_port else {}
        ray.init(num_cpus=cfg.mesh.num_cpus, include_dashboard=False, logging_level="WARNING", **port)
        where = "a local Ray"
    stop = stop_on_signals()
    print(f"starting CaT on Ray Serve in {where} ...", flush=True)
    try:
        serve.start(**serve_options(cfg))
        serve.run(build_app(cfg), name=sv.app_name, route_prefix="/")
        print(f"  HTTP  http://{sv.host}:{sv.http_port}  (POST /v1/solve, /v1/solve/stream, /v1/chat/completions; GET /v1/models, /healthz)")
        print(f"  gRPC  {sv.host if sv.host != '0.0.0.0' else '127.0.0.1'}:{sv.grpc_port}  (caspo.v1.CaT/Solve, /SolveStream)")
        print(f"  policy: hot-reloads from {sv.policy_file}" if sv.policy_file else "  policy: fixed (no serve.policy_file)")
        print("  auth: bearer token required ($CASPO_AUTH_TOKEN)" if auth_token() else "  auth: off (set $CASPO_AUTH_TOKEN to require a bearer token)")
        print("serving; Ctrl-C to stop", flush=True)
        wait_until_set(stop)
    finally:
        print("stopping Serve ...", flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0


def _paint(c: float, tty: bool) -> str:
    text = f"{c:.3f}"
    if not tty:
        return text
    colour = "32" if c >= 0.8 else "33" if c >= 0.5 else "31"  # green, yellow, red
    return f"\033[{colour}m{text}\033[0m"


def cmd_solve(args) -> int:
    """Ask a running CaT service; print each step with its confidence, then the answer."""
    params = {k: getattr(args, k) for k in SOLVE_FIELDS}
    tty = sys.stdout.isatty()
    try:
        if args.http:
            result = solve_http(args.http, args.question, timeout=args.timeout, **params)
            steps = result["steps"]
        else:
            steps, result = [], None
            for ev in solve_grpc(args.grpc, args.question, timeout=args.timeout, **params):
                if "step" in ev:
                    steps.append(ev["step"])
                    if not args.json:
                        s = ev["step"]
                        print(f"  {_paint(s['confidence'], tty)}  {s['text']}", flush=True)
                else:
                    result = ev["result"]
    except SolveError as e:
        raise UsageError(str(e)) from e
    if args.json:
        print(json.dumps(result))
        return 0
    if args.http:
        for s in steps:
            print(f"  {_paint(s['confidence'], tty)}  {s['text']}")
    answer = result.get("answer") if result.get("has_answer") else None
    print(f"answer: {answer if answer is not None else '(' + result.get('reason', 'no answer') + ')'}  "
          f"confidence {result.get('confidence', 0.0):.3f}  [{result.get('method')}/{result.get('scoring')} "
          f"k={result.get('k')} tau={result.get('tau', 0.0):.2f}, policy v{result.get('policy_version', 0)}, {result.get('seconds', 0.0):.2f} s]")
    return 0


def _version(text: str) -> int:
    v = text[1:] if text[:1] in ("v", "V") else text
    if not v.isdigit():
        raise UsageError(f"VERSION must be a policy version like 3 or v3, got {text!r}")
    return int(v)


def cmd_promote(args) -> int:
    """Serve a trained version of a loop run now, whatever the gate said."""
    try:
        info = promote(Path(args.run_dir), _version(args.version))
    except RunError as e:
        raise UsageError(str(e)) from None
    print(f"serving v{info['version']} ({info['path']}); Serve's replicas reload it within serve.watch_interval_s")
    return 0


def cmd_rollback(args) -> int:
    """Serve the version a loop run served before the current one."""
    try:
        info = rollback(Path(args.run_dir))
    except RunError as e:
        raise UsageError(str(e)) from None
    print(f"{info['decision']['reason']}: serving v{info['version']} ({info['path']})")
    return 0


def add_parser(sub) -> None:
    """The serve, solve, promote, rollback subcommands."""
    p = command(sub, "serve", help="CaT inference on Ray Serve: HTTP :8000 and gRPC :9000, hot-reloading published policies", func=cmd_serve, config=True)

    p = command(sub, "solve", help="ask a running CaT service; prints each step with its confidence, then the answer", func=cmd_solve)
    p.add_argument("question")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--grpc", default="127.0.0.1:9000", metavar="HOST:PORT", help="gRPC address (default 127.0.0.1:9000; steps stream as they are committed)")
    where.add_argument("--http", metavar="URL", help="HTTP base URL instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--method", choices=list(METHODS), help="default: the server's (cat)")
    p.add_argument("--k", type=int)
    p.add_argument("--tau", type=float)
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--scoring", choices=[x for x in SCORINGS if x != "critic"])
    p.add_argument("--seed", type=int)
    p.add_argument("--branching", choices=list(BRANCHINGS), help="cat: adaptive | always (default: the server's cat section)")
    p.add_argument("--branch-threshold", type=float, help="adaptive cat: nats (default: the server's calibration)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    p.add_argument("--json", action="store_true")

    p = command(sub, "promote", help="serve a trained version of a loop run now (Serve hot-reloads it), whatever the gate said", func=cmd_promote)
    p.add_argument("run_dir", metavar="RUN", help="the run directory (runs/NAME)")
    p.add_argument("version", metavar="VERSION", help="the policy version, e.g. 2 or v2 (0: the base policy)")

    p = command(sub, "rollback", help="serve the version a loop run served before the current one", func=cmd_rollback)
    p.add_argument("run_dir", metavar="RUN", help="the run directory (runs/NAME)")
