"""Suite ``serve``: concurrent gRPC CaT clients against a real Ray Serve, and the policy reload time.

Starts a local Ray and the CaT application (as ``caspo serve`` does, on free ports), then for each
concurrency N runs N client threads that call ``caspo.v1.CaT/Solve`` back to back for ``duration``
seconds on held-out questions: requests per second, p50/p99 latency, errors. Then publishes a policy
(rewrites the policy file) and times until ``/healthz`` reports the new version: the time from
publishing a policy to Serve answering with it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import ray
from ray import serve

from caspo.bench.common import SuiteResult, model_overrides, percentile
from caspo.config import load_config
from caspo.models.hf import resolve_model_path
from caspo.netutil import free_port
from caspo.protos.v1 import cat_pb2, cat_pb2_grpc
from caspo.serve.cat_client import replica_lost
from caspo.serve.deployment import build_app, serve_options
from caspo.services.security import auth_metadata
from caspo.services.server import limit_proxy_messages
from caspo.tasks import get_task

COLUMNS = ["clients", "requests", "errors", "rps", "rps_x_1client", "p50_s", "p99_s", "p99_x_p50"]



def grpc_load(address: str, questions: list[str], clients: int, duration: float, k: int = 4, max_steps: int | None = None, retries: int = 0, timeout: float = 120.0) -> dict:
    """``clients`` threads call ``caspo.v1.CaT/Solve`` back to back for ``duration`` seconds, each on its
    own channel. A request whose replica was lost (``cat_client.replica_lost``: UNAVAILABLE, or the
    replica died under it) is retried up to ``retries`` times, as caspo's clients do. Returns requests, errors (by status), retried, rps and latency
    percentiles (seconds, over successful requests, retries included in their latency)."""
    lock = threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    details: dict[str, str] = {}  # the first message seen per status
    retried = [0]

    def client(stop: float, offset: int):
        with grpc.insecure_channel(address) as ch:
            stub = cat_pb2_grpc.CaTStub(ch)
            i = offset
            while time.perf_counter() < stop:
                q = questions[i % len(questions)]
                i += 1
                req = cat_pb2.SolveRequest(question=q, method="cat", k=k, seed=i, **({"max_steps": max_steps} if max_steps else {}))
                t0 = time.perf_counter()
                for attempt in range(retries + 1):
                    try:
                        stub.Solve(req, timeout=timeout, metadata=auth_metadata())
                        with lock:
                            latencies.append(time.perf_counter() - t0)
                        break
                    except grpc.RpcError as e:
                        if attempt < retries and replica_lost(e.code().name, e.details()):
                            with lock:
                                retried[0] += 1
                            time.sleep(0.2)
                            continue
                        with lock:
                            errors[e.code().name] = errors.get(e.code().name, 0) + 1
                            details.setdefault(e.code().name, e.details())
                        break

    stop = time.perf_counter() + duration
    threads = [threading.Thread(target=client, args=(stop, j * 1000)) for j in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "errors_by_status": errors,
        "error_details": details,
        "retried": retried[0],
        "seconds": wall,
        "rps": len(latencies) / wall,
        "p50_s": percentile(latencies, 0.5) if latencies else None,
        "p90_s": percentile(latencies, 0.9) if latencies else None,
        "p99_s": percentile(latencies, 0.99) if latencies else None,
        "max_s": max(latencies) if latencies else None,
    }


def run(n: int, clients=(1, 8, 32), duration: float = 20.0, k: int = 4, seed: int = 0, model: str = "tiny", engine: str = "hf", progress: bool = True) -> SuiteResult:
    tmp = Path(tempfile.mkdtemp(prefix="caspo-bench-serve-"))
    cfg = load_config(None, [f"serve.http_port={free_port()}", f"serve.grpc_port={free_port()}", f"serve.policy_file={tmp}/policy.json", "serve.watch_interval_s=0.1", *model_overrides(model, engine)])
    questions = [p.question for p in get_task("arith").problems(max(n, 1), seed=seed, split="test")]
    rows: list[dict] = []
    started_ray = not ray.is_initialized()
    if started_ray:
        limit_proxy_messages()
        ray.init(include_dashboard=False, logging_level="ERROR")
    try:
        serve.start(**serve_options(cfg))
        serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
        address = f"127.0.0.1:{cfg.serve.grpc_port}"

        for c in clients:
            rows.append(grpc_load(address, questions, c, duration, k))
            if progress:
                print(f"  serve load: { {key: rows[-1][key] for key in ('clients', 'requests', 'errors', 'rps', 'p50_s', 'p99_s')} }", flush=True)
        for r in rows:
            r["rps_x_1client"] = r["rps"] / rows[0]["rps"] if rows[0]["rps"] else None
            r["p99_x_p50"] = r["p99_s"] / r["p50_s"] if r["p50_s"] else None

        v1 = resolve_model_path(model)  # the same weights under a new version: what is timed is the swap
        health = f"http://127.0.0.1:{cfg.serve.http_port}/healthz"
        t0 = time.perf_counter()
        (tmp / "policy.json").write_text(json.dumps({"version": 1, "path": v1}))
        reload_s = None
        while time.perf_counter() - t0 < 120:
            with urllib.request.urlopen(health, timeout=30) as resp:
                if json.loads(resp.read())["policy_version"] == 1:
                    reload_s = time.perf_counter() - t0
                    break
            time.sleep(0.05)
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return SuiteResult(
        suite="serve",
        title=f"Serve load: gRPC CaT@{k} clients for {duration:.0f} s each (tiny reasoner, 1 replica)",
        command=f"caspo bench --suite serve -n {n}",
        rows=rows,
        columns=COLUMNS,
        notes=[f"Publish → Serve answering with the new policy: {reload_s:.2f} s (policy file watched every 0.1 s)." if reload_s is not None else "The reload did not finish within 120 s."],
        extra={"reload_s": reload_s},
    )


def plot(plt, res: SuiteResult):
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    c = [r["clients"] for r in res.rows]
    ax[0].plot(c, [r["rps"] for r in res.rows], marker="o")
    ax[0].set(xlabel="concurrent clients", ylabel="requests / s", xscale="log")
    ax[1].plot(c, [r["p50_s"] for r in res.rows], marker="o", label="p50")
    ax[1].plot(c, [r["p99_s"] for r in res.rows], marker="o", label="p99")
    ax[1].set(xlabel="concurrent clients", ylabel="latency (s)", xscale="log")
    ax[1].legend()
    fig.suptitle(res.title, fontsize=9)
    return fig
