"""CaT on a real Ray Serve (local Ray, 2 CPUs, 2 replicas of the tiny reasoner, bearer token on) under
load and under a replica kill.

* load: 64 concurrent gRPC clients calling Solve back to back (15 s; 60 s with ``--long``): zero errors;
  the latency percentiles go to ``runs/reliability/serve_load_{fast,long}.json`` (or
  ``$CASPO_RELIABILITY_OUT``) and are printed.
* a replica SIGKILLed under load: no request fails beyond the documented client retry (UNAVAILABLE is
  retried, Solve is idempotent); Serve brings the replica count back to 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from caspo.bench.serve_load import grpc_load
from caspo.netutil import free_port
from caspo.config import load_config
from caspo.tasks import get_task
from tests.ray_actors import alive_actor_pids

TOKEN = "reliability-token-7f3a"



@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    from caspo.serve.deployment import build_app, serve_options
    from caspo.services.server import limit_proxy_messages

    env = pytest.MonkeyPatch()
    env.setenv("CASPO_AUTH_TOKEN", TOKEN)  # before ray.init: the replicas inherit it, as pods get it from a Secret
    root = tmp_path_factory.mktemp("serve-faults")
    cfg = load_config(
        None,
        [
            f"serve.http_port={free_port()}",
            f"serve.grpc_port={free_port()}",
            f"serve.policy_file={root}/policy.json",
            "serve.min_replicas=2",
            "serve.max_replicas=2",
            "serve.num_cpus=0.5",
            "serve.request_timeout_s=120",
        ],
    )
    limit_proxy_messages()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        serve.start(**serve_options(cfg))
        serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
        yield cfg
    finally:
        serve.shutdown()
        ray.shutdown()
        env.undo()


def _questions(n: int = 50) -> list[str]:
    return [p.question for p in get_task("arith").problems(n, seed=5, split="test")]


def _replica_pids() -> list[int]:
    """PIDs of this test's live CaT replicas (actor class ``ServeReplica:APP:DEPLOYMENT``), not those of
    another Ray on the machine: a ``caspo serve`` running beside the test titles its processes alike."""
    return alive_actor_pids("ServeReplica:caspo:CaT")


def _record(name: str, data: dict) -> Path:
    out = Path(os.environ.get("CASPO_RELIABILITY_OUT", "runs/reliability"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def test_only_the_replicas_of_this_ray_are_counted(served):
    # a process titled like a replica, as another `caspo serve` on the machine has them
    impostor = subprocess.Popen(["bash", "-c", 'exec -a "ray::ServeReplica:caspo:CaT" sleep 300'])
    try:
        deadline = time.time() + 10
        while b"ServeReplica" not in Path(f"/proc/{impostor.pid}/cmdline").read_bytes():
            assert time.time() < deadline, "the impostor never took its title"
            time.sleep(0.05)
        pids = _replica_pids()
        assert len(pids) == 2 and impostor.pid not in pids, (pids, impostor.pid)
    finally:
        impostor.kill()
        impostor.wait()


def test_64_concurrent_grpc_clients_see_no_errors(served, long_mode):
    cfg = served
    duration = 60.0 if long_mode else 15.0
    res = grpc_load(f"127.0.0.1:{cfg.serve.grpc_port}", _questions(), clients=64, duration=duration, k=4)
    res.update(mode="long" if long_mode else "fast", replicas=2, method="cat", k=4)
    path = _record(f"serve_load_{res['mode']}", res)
    print(f"\n64 clients x {duration:.0f} s: {res['requests']} requests, {res['errors']} errors, "
          f"p50 {res['p50_s']:.2f} s, p90 {res['p90_s']:.2f} s, p99 {res['p99_s']:.2f} s, max {res['max_s']:.2f} s -> {path}")
    assert res["errors"] == 0, res["errors_by_status"]
    assert res["requests"] >= 64  # every client finished at least one request
    assert res["retried"] == 0  # nothing died here: no request needed the retry


def test_a_replica_killed_under_load_fails_no_request_beyond_the_retry(served, long_mode):
    cfg = served
    before = _replica_pids()
    assert len(before) == 2, before
    result: dict = {}
    duration = 45.0 if long_mode else 25.0
    load = threading.Thread(
        target=lambda: result.update(grpc_load(f"127.0.0.1:{cfg.serve.grpc_port}", _questions(), clients=16, duration=duration, k=4, retries=3))
    )
    load.start()
    time.sleep(6.0)  # the clients are mid-request on both replicas
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    load.join()
    _record("serve_replica_kill_" + ("long" if long_mode else "fast"), {**result, "killed_pid": victim})
    print(f"\nreplica {victim} killed under 16 clients: {result['requests']} requests, {result['errors']} errors, {result['retried']} retried")
    assert result["errors"] == 0, result["error_details"]
    assert result["requests"] > 16
    deadline = time.time() + 120
    while time.time() < deadline:  # Serve replaces the dead replica
        after = _replica_pids()
        if len(after) == 2 and victim not in after:
            break
        time.sleep(1.0)
    assert len(after) == 2 and victim not in after, after
