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
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench.common import SuiteResult, model_overrides, median, percentile

COLUMNS = ["clients", "requests", "errors", "rps", "rps_x_1client", "p50_s", "p99_s", "p99_x_p50"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, clients=(1, 8, 32), duration: float = 20.0, k: int = 4, seed: int = 0, model: str = "tiny", engine: str = "hf", progress: bool = True) -> SuiteResult:
    import grpc
    import ray
    from ray import serve

    from caspo.config import load_config
    from caspo.models.hf import resolve_model_path
    from caspo.protos.v1 import cat_pb2, cat_pb2_grpc
    from caspo.services.cat_serve import build_app, serve_options
    from caspo.tasks import get_task

    tmp = Path(tempfile.mkdtemp(prefix="caspo-bench-serve-"))
    cfg = load_config(None, [f"serve.http_port={_free_port()}", f"serve.grpc_port={_free_port()}", f"serve.policy_file={tmp}/policy.json", "serve.watch_interval_s=0.1", *model_overrides(model, engine)])
    questions = [p.question for p in get_task("arith").problems(max(n, 1), seed=seed, split="test")]
    rows: list[dict] = []
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, logging_level="ERROR")
    try:
        serve.start(**serve_options(cfg))
        serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
        address = f"127.0.0.1:{cfg.serve.grpc_port}"

        def client(stop: float, out: list, errors: list, offset: int):
            with grpc.insecure_channel(address) as ch:
                stub = cat_pb2_grpc.CaTStub(ch)
                i = offset
                while time.perf_counter() < stop:
                    q = questions[i % len(questions)]
                    i += 1
                    t0 = time.perf_counter()
                    try:
                        stub.Solve(cat_pb2.SolveRequest(question=q, method="cat", k=k, seed=i), timeout=120)
                        out.append(time.perf_counter() - t0)
                    except grpc.RpcError as e:
                        errors.append(e.code().name)

        for c in clients:
            lat: list[float] = []
            errs: list[str] = []
            stop = time.perf_counter() + duration
            threads = [threading.Thread(target=client, args=(stop, lat, errs, j * 1000)) for j in range(c)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            rows.append({"clients": c, "requests": len(lat), "errors": len(errs), "rps": len(lat) / wall, "p50_s": median(lat), "p99_s": percentile(lat, 0.99)})
            if progress:
                print(f"  serve load: {rows[-1]}", flush=True)
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
