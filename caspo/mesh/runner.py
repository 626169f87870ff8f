"""Start, attach to and stop the mesh.

``MeshRunner.start()`` brings up Ray (local unless ``RAY_ADDRESS`` is set), Redis (``CASPO_REDIS_URL``
or a redis-server child with AOF in the run directory), the registry and the service actors
(caspo/mesh/actors.py), and writes ``RUN_DIR/mesh.json`` (caspo/mesh/state.py). ``ensure_mesh`` is
how a command gets a mesh: the running one, or one started for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

import ray

from caspo.config import Config, service_resources
from caspo.mesh import actors
from caspo.mesh.actors import ON_HEAD, actor_options
from caspo.mesh.registry import REGISTRY_NAME, registry_actor
from caspo.mesh.state import MeshError, pid_alive, read_state, running_mesh, state_path, write_state
from caspo.services.server import limit_proxy_messages
from caspo.store.redis_server import redis_url_or_start

log = logging.getLogger(__name__)


class MeshRunner:
    """Owns a mesh: what it started, it stops."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.redis = None
        self.redis_url: str | None = None
        self.actors: dict[str, object] = {}
        self.registry = None
        self.registry_address: str | None = None
        self.addresses: dict[str, str] = {}
        self._started_ray = False

    def start(self, progress: bool = True) -> dict:
        cfg = self.cfg
        run_dir = Path(cfg.mesh.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        old = read_state(cfg)
        if old and pid_alive(int(old.get("pid", -1))) and old.get("pid") != os.getpid():
            raise MeshError(f"a mesh is already running from {run_dir} (pid {old['pid']}); stop it with `caspo down`")

        url = cfg.mesh.redis_url or os.environ.get("CASPO_REDIS_URL")
        if url:
            self.redis_url = url
        else:
            self.redis_url, self.redis = redis_url_or_start(run_dir)
        if not ray.is_initialized():
            limit_proxy_messages()  # `caspo serve` may later run Serve on this Ray
            address = os.environ.get("RAY_ADDRESS")
            kwargs = {"namespace": cfg.mesh.namespace, "include_dashboard": False, "logging_level": "WARNING"}
            if address:
                ray.init(address=address, **kwargs)
            else:
                if cfg.mesh.metrics_export_port is not None:  # where Prometheus scrapes this node
                    kwargs["_metrics_export_port"] = cfg.mesh.metrics_export_port
                ray.init(num_cpus=cfg.mesh.num_cpus, **kwargs)
            self._started_ray = True
        ns = cfg.mesh.namespace
        cd = cfg.to_dict()
        # what mesh.placement does not pin stays on the head: on a cluster, an actor asking for no resource
        # could otherwise land on a worker group's node and die with it
        self.registry = registry_actor().options(name=REGISTRY_NAME, namespace=ns, resources=dict(ON_HEAD)).remote(cfg.mesh.host)
        self.registry_address = ray.get(self.registry.ready.remote())

        wants = service_resources(cfg)

        def remote(cls, name):
            # each service asks for what caspo.config.service_resources says (its GPUs, its group); the
            # generator's pool front holds no model and stays on the head: its replicas ask for theirs
            opts = {"num_cpus": 0, "resources": dict(ON_HEAD)} if name == "generator" else actor_options(wants[name])
            return ray.remote(max_restarts=-1, max_task_retries=-1, **opts)(cls).options(
                name=actors.ACTOR_NAMES[name], namespace=ns
            )

        self.actors = {
            "pair_store": remote(actors.PairStoreActor, "pair_store").remote(cd, self.redis_url, REGISTRY_NAME),
            "critic": remote(actors.CriticActor, "critic").remote(cd, REGISTRY_NAME),
            "scorer": remote(actors.ScorerActor, "scorer").remote(cd, REGISTRY_NAME),
            "generator": remote(actors.GeneratorActor, "generator").remote(cd, REGISTRY_NAME),
        }
        for name, actor in self.actors.items():
            self.addresses[name] = ray.get(actor.ready.remote(), timeout=600)
            if progress:
                print(f"  {name:10s} {self.addresses[name]}", flush=True)
        # one heartbeat so the registry is complete before anyone asks
        for name, addr in self.addresses.items():
            ray.get(self.registry.register.remote(name, addr, 0))
        state = {
            "pid": os.getpid(),
            "registry": self.registry_address,
            "services": self.addresses,
            "redis_url": self.redis_url,
            "ray_address": ray.get_runtime_context().gcs_address,
            "namespace": ns,
            "started_at": time.time(),
        }
        write_state(cfg, state)
        return state

    def stop(self) -> None:
        for actor in list(self.actors.values()) + ([self.registry] if self.registry else []):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = {}
        self.registry = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
        st = read_state(self.cfg)
        if st and st.get("pid") == os.getpid():
            state_path(self.cfg).unlink(missing_ok=True)

    def __enter__(self):
        self.start(progress=False)
        return self

    def __exit__(self, *exc):
        self.stop()


def stop_running_mesh(cfg: Config, timeout: float = 60.0) -> bool:
    """``caspo down``: signal the process that runs the mesh and wait for it to clean up."""
    st = read_state(cfg)
    if not st:
        return False
    pid = int(st.get("pid", -1))
    if pid > 0 and pid_alive(pid):
        os.kill(pid, signal.SIGINT)  # `caspo up` stops cleanly on it (Ray prints a backtrace on SIGTERM)
        deadline = time.time() + timeout
        while pid_alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    state_path(cfg).unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def ensure_mesh(
    cfg: Config, *, join_ray: bool = False, progress: bool = False, on_start: Callable[[], None] | None = None
) -> Iterator[dict]:
    """The mesh for a block of work: the one running from ``cfg.mesh.run_dir`` (left running), else one
    started now (``on_start`` is called first) and stopped after the block. Yields its state
    (``registry``, ``redis_url``, ``ray_address``, ...). ``join_ray`` also connects this process to a
    running mesh's Ray, for work that starts Ray actors; a mesh started here is in this process's Ray.
    """
    st = running_mesh(cfg)
    if st is not None:
        if not join_ray:
            yield st
            return
        ray.init(address=st["ray_address"], namespace=cfg.mesh.namespace, logging_level="WARNING")
        try:
            yield st
        finally:
            ray.shutdown()
        return
    if on_start is not None:
        on_start()
    runner = MeshRunner(cfg)
    try:
        yield runner.start(progress=progress)
    finally:
        runner.stop()


