"""Start, find and stop the mesh; one gRPC client for all of its services.

``MeshRunner.start()`` brings up Ray (local unless ``RAY_ADDRESS`` is set), Redis (``CASPO_REDIS_URL``
or a redis-server child with AOF in the run directory), the registry and the service actors, and
writes ``RUN_DIR/mesh.json`` so ``caspo status``/``caspo down``/clients in other processes find it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

import grpc

from caspo.config import Config
from caspo.protos.v1 import (
    common_pb2,
    critic_pb2,
    critic_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    mesh_pb2,
    mesh_pb2_grpc,
    pair_store_pb2,
    pair_store_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
)
from caspo.services.grpc_util import channel, limit_proxy_messages

log = logging.getLogger(__name__)

STATE_FILE = "mesh.json"
SERVICES = ("generator", "scorer", "critic", "pair_store")


class MeshError(RuntimeError):
    pass


def state_path(cfg: Config) -> Path:
    return Path(cfg.mesh.run_dir) / STATE_FILE


def read_state(cfg: Config) -> dict | None:
    p = state_path(cfg)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


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
        import ray

        from caspo.actors import hosts
        from caspo.actors.redis_server import redis_url_or_start
        from caspo.actors.registry import REGISTRY_NAME, registry_actor

        cfg = self.cfg
        run_dir = Path(cfg.mesh.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        old = read_state(cfg)
        if old and _alive(int(old.get("pid", -1))) and old.get("pid") != os.getpid():
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
                ray.init(num_cpus=cfg.mesh.num_cpus, **kwargs)
            self._started_ray = True
        ns = cfg.mesh.namespace
        cd = cfg.to_dict()
        self.registry = registry_actor().options(name=REGISTRY_NAME, namespace=ns).remote(cfg.mesh.host)
        self.registry_address = ray.get(self.registry.ready.remote())

        def remote(cls, name, **opts):
            # the generator pool's models live in its replica actors, which take its placement themselves
            if cfg.mesh.placement.get(name) and name != "generator":
                opts["resources"] = dict(cfg.mesh.placement[name])
            return ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0, **opts)(cls).options(
                name=hosts.ACTOR_NAMES[name], namespace=ns
            )

        self.actors = {
            "pair_store": remote(hosts.PairStoreService, "pair_store").remote(cd, self.redis_url, REGISTRY_NAME),
            "critic": remote(hosts.Critic, "critic").remote(cd, REGISTRY_NAME),
            "scorer": remote(hosts.ConfidenceScorer, "scorer").remote(cd, REGISTRY_NAME),
            "generator": remote(hosts.GeneratorPool, "generator").remote(cd, REGISTRY_NAME),
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
        # the Redis URL may carry a password: the state file is readable by its owner only
        fd = os.open(state_path(cfg), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(state, indent=2) + "\n")
        return state

    def stop(self) -> None:
        import ray

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
    if pid > 0 and _alive(pid):
        os.kill(pid, signal.SIGINT)  # `caspo up` stops cleanly on it (Ray prints a backtrace on SIGTERM)
        deadline = time.time() + timeout
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    state_path(cfg).unlink(missing_ok=True)
    return True


class MeshClient:
    """Async gRPC client for every mesh service. Addresses come from the registry; a call that finds
    its service UNAVAILABLE (killed, restarting on a new port, Redis down behind the pair store)
    re-resolves the address and retries with backoff for up to ``retry_for_s`` seconds.

    Retrying is safe for every mesh RPC: proposals are seeded, scoring and judging are pure, ``Put`` is
    keyed by pair content, ``Read`` re-delivers the consumer's pending entries, ``Ack`` is idempotent.
    """

    def __init__(self, registry_address: str, retry_for_s: float = 180.0, retry_wait_s: float = 0.2, max_wait_s: float = 2.0):
        self.registry_address = registry_address
        self.retry_for_s = retry_for_s
        self.retry_wait_s = retry_wait_s
        self.max_wait_s = max_wait_s
        self.retries_done = 0  # calls repeated after UNAVAILABLE, over this client's life
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}

    @classmethod
    def from_state(cls, cfg: Config) -> "MeshClient":
        st = read_state(cfg)
        if not st:
            raise MeshError(f"no mesh is running from {cfg.mesh.run_dir} (start one with `caspo up`)")
        return cls(st["registry"])

    async def registry(self, timeout: float = 5.0) -> list[dict]:
        async with channel(self.registry_address) as ch:
            r = await mesh_pb2_grpc.MeshStub(ch).Registry(mesh_pb2.RegistryRequest(), timeout=timeout)
        return [
            {
                "name": s.name,
                "address": s.address,
                "policy_version": s.policy_version,
                "healthy": s.healthy,
                "restarts": s.restarts,
                "registered_at": s.registered_at,
            }
            for s in r.services
        ]

    async def _channel(self, service: str, refresh: bool = False) -> grpc.aio.Channel:
        if refresh or service not in self._channels:
            services = {s["name"]: s for s in await self.registry()}
            if service not in services:
                raise MeshError(f"service {service!r} is not registered")
            addr = services[service]["address"]
            old = self._channels.get(service)
            if old is None or old[0] != addr:
                if old is not None:
                    await old[1].close()
                self._channels[service] = (addr, channel(addr))
        return self._channels[service][1]

    async def call(self, service: str, stub_cls, method: str, request, timeout: float = 600.0):
        deadline = time.monotonic() + self.retry_for_s
        wait, refresh = self.retry_wait_s, False
        while True:
            try:
                ch = await self._channel(service, refresh=refresh)
                return await getattr(stub_cls(ch), method)(request, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                # the registry itself may be restarting too: its UNAVAILABLE is retried the same way
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() + wait > deadline:
                    raise
                log.info("%s.%s unavailable (%s); retrying in %.1f s", service, method, e.details(), wait)
                self.retries_done += 1
                refresh = True
                await asyncio.sleep(wait)
                wait = min(self.max_wait_s, wait * 2)

    async def close(self) -> None:
        for _, ch in self._channels.values():
            await ch.close()
        self._channels = {}

    # ---- typed helpers ---------------------------------------------------------------------------
    async def propose(self, prompts, n, temperature, seeds=None):
        req = generator_pb2.ProposeStepsRequest(
            prompts=[common_pb2.Prompt(text=p, seed=s) if s is not None else common_pb2.Prompt(text=p) for p, s in zip(prompts, seeds or [None] * len(prompts))],
            n=n,
            temperature=temperature,
        )
        return await self.call("generator", generator_pb2_grpc.GeneratorStub, "ProposeSteps", req)

    async def reload(self, version: int, path: str):
        req = generator_pb2.ReloadRequest(version=version, path=path)
        return await self.call("generator", generator_pb2_grpc.GeneratorStub, "Reload", req)

    async def score(self, prompts, steps):
        req = scorer_pb2.ScoreRequest(items=[scorer_pb2.ScoreItem(prompt=p, step=s) for p, s in zip(prompts, steps)])
        return await self.call("scorer", scorer_pb2_grpc.ConfidenceScorerStub, "Score", req)

    async def judge(self, items):
        """items: (problem_id, question, prefix steps, step)."""
        req = critic_pb2.JudgeRequest(
            items=[critic_pb2.JudgeItem(problem_id=i, question=q, prefix=list(p), step=s) for i, q, p, s in items]
        )
        return await self.call("critic", critic_pb2_grpc.CriticStub, "Judge", req)

    async def put_pairs(self, round_: int, pairs: list[dict]):
        req = pair_store_pb2.PutRequest(round=round_, pairs=[pair_store_pb2.Pair(**p) for p in pairs])
        return await self.call("pair_store", pair_store_pb2_grpc.PairStoreStub, "Put", req)

    async def stats(self, round_: int | None = None):
        req = pair_store_pb2.StatsRequest(round=round_) if round_ is not None else pair_store_pb2.StatsRequest()
        return await self.call("pair_store", pair_store_pb2_grpc.PairStoreStub, "Stats", req)


class MeshProposer:
    """CaT's StepProposer over the generator service: search and evaluation run through the mesh."""

    def __init__(self, client: MeshClient, prompt, delimiter: str = "\n"):
        self.client = client
        self.prompt = prompt
        self.delimiter = delimiter

    async def propose(self, prefixes, n: int, temperature: float):
        from caspo.core.cat import ProposedStep
        from caspo.models.base import prefix_text

        texts = [prefix_text(self.prompt, p.question, p.steps, self.delimiter) for p in prefixes]
        resp = await self.client.propose(texts, n, temperature, [p.seed for p in prefixes])
        return [
            [
                ProposedStep(s.text, tuple(s.token_entropies), tuple(s.token_logprobs), s.ended, s.entropy_estimate)
                for s in c.steps
            ]
            for c in resp.candidates
        ]
