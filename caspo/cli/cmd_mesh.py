"""``caspo up``, ``caspo plan``, ``caspo status`` and ``caspo down``: the service mesh (and, in status, what
Serve serves from a loop run and why)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import yaml

from caspo.cli.shared import wait_until_set, command, stop_on_signals, print_table, config_of
from caspo.errors import UsageError
from caspo.mesh.client import MeshClient
from caspo.mesh.plan import PlanError, plan_json
from caspo.mesh.plan import plan as plan_services
from caspo.mesh.runner import MeshRunner, stop_running_mesh
from caspo.mesh.state import MeshError
from caspo.netutil import redact_url
from caspo.trainer.serving import serving, status_line


def cmd_up(args) -> int:

    cfg = config_of(args)
    runner = MeshRunner(cfg)
    stop = stop_on_signals()
    print(f"starting the mesh (run dir {cfg.mesh.run_dir}) ...", flush=True)
    try:
        st = runner.start(progress=True)
        print(f"  {'registry':10s} {st['registry']}\n  {'redis':10s} {redact_url(st['redis_url'])}", flush=True)
        print("mesh is up; `caspo status` to inspect, `caspo down` (or Ctrl-C) to stop", flush=True)
        wait_until_set(stop)
    finally:
        print("stopping the mesh ...", flush=True)
        runner.stop()
        print("mesh stopped", flush=True)
    return 0


def cmd_plan(args) -> int:
    """What every service will ask for; exit 2 (one line) when the config cannot be placed."""
    cfg = config_of(args)
    cluster = None
    if args.cluster:
        try:
            cluster = [d for d in yaml.safe_load_all(Path(args.cluster).read_text()) if d]
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"--cluster {args.cluster}: {str(e).splitlines()[0]}") from None
    try:
        plans = plan_services(cfg, args.gpu_memory_gb, cluster)
    except PlanError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(plan_json(plans)))
        return 0
    rows = [
        {
            "service": p.service, "actors": p.count, "GPUs": p.num_gpus, "CPUs": p.num_cpus,
            "resources": " ".join(f"{k}={v:g}" for k, v in p.resources.items()) or ("head" if p.on_head else "-"),
            "group": p.group or "-", "model": p.model or "-", "backend": p.backend or "-",
            "context": p.context_length or "-", "entropy": p.entropy or "-",
            "GiB": f"{p.memory_gib:.1f}" if p.memory_gib is not None else "-",
        }
        for p in plans
    ]
    print_table(rows, ["service", "actors", "GPUs", "CPUs", "resources", "group", "model", "backend", "context", "entropy", "GiB"])
    notes: dict[str, list[str]] = {}
    for p in plans:
        for note in p.notes:
            notes.setdefault(note, []).append(p.service)
    for note, services in notes.items():
        print(f"  {', '.join(services)}: {note}")
    return 0


def cmd_status(args) -> int:

    cfg = config_of(args)
    run_dir = Path(args.run) if args.run else Path(cfg.loop.runs_dir) / cfg.loop.run
    served = serving(run_dir)
    if not args.json and (served or args.run):
        print(f"run {run_dir}: {status_line(served)}", flush=True)
    try:
        client = MeshClient.from_state(cfg)
        services = asyncio.run(client.registry())
    except MeshError as e:
        raise UsageError(str(e)) from e
    except Exception as e:  # noqa: BLE001 - grpc errors: the registry is gone
        raise UsageError(f"the mesh registry at {client.registry_address} does not answer ({type(e).__name__}); is `caspo up` still running?") from e
    if args.json:
        print(json.dumps({"registry": client.registry_address, "services": services, "run": str(run_dir), "serving": served}))
    else:
        print(f"registry {client.registry_address}")
        print_table(services, ["name", "address", "policy_version", "healthy", "restarts"])
    return 0 if all(s["healthy"] for s in services) else 1


def cmd_down(args) -> int:
    cfg = config_of(args)
    if stop_running_mesh(cfg):
        print("mesh stopped")
    else:
        print(f"no mesh is running from {cfg.mesh.run_dir}")
    return 0


def add_parser(sub) -> None:
    """The up, plan, status, down subcommands."""
    p = command(sub, "up", help="start Ray, Redis and every mesh service; stay up until stopped", func=cmd_up, config=True)

    p = command(sub, "plan", help="what every service will ask Ray for (GPUs, CPUs, groups), its model, context and entropy; refuses what cannot be placed", func=cmd_plan, config=True)
    p.add_argument("--cluster", help="cluster manifests to place the services on (e.g. the output of kustomize build k8s/overlays/gpu)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--json", action="store_true")

    p = command(sub, "status", help="services, addresses, policy versions and health; what Serve serves and why", func=cmd_status, config=True)
    p.add_argument("--run", metavar="RUN_DIR", help="the loop run whose served policy to show (default loop.runs_dir/loop.run)")
    p.add_argument("--json", action="store_true")

    p = command(sub, "down", help="stop the running mesh", func=cmd_down, config=True)
