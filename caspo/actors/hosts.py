"""The mesh's long-lived Ray actors. Each hosts one grpc.aio server in its own event loop and
heartbeats its address and policy version into the registry.

  * ``GeneratorPool`` — the Generator service over N ``ModelReplica`` actors (one backend each);
    requests go to the least busy replica and are micro-batched there.
  * ``ConfidenceScorer`` — exact step confidence by one batched teacher-forced pass.
  * ``Critic`` — the task's exact verifier, or an LLM critic over its own model.
  * ``PairStoreService`` — the Redis-backed pair store.

Ray restarts a dead actor (``max_restarts=-1``); ``__init__`` runs again, starts a new server (new
port) and the next heartbeat puts the new address in the registry.
"""

from __future__ import annotations

import asyncio
import logging
import os

from caspo.config import Config, config_from_dict
from caspo.services.grpc_util import add_port, advertised_address, new_server

log = logging.getLogger(__name__)

ACTOR_NAMES = {
    "generator": "caspo-generator",
    "scorer": "caspo-scorer",
    "critic": "caspo-critic",
    "pair_store": "caspo-pair-store",
}


def _torch_threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def make_backend(cfg: Config, path: str | None = None, version: int = 0):
    from caspo.models.hf import HFBackend

    if cfg.model.backend == "vllm":
        from caspo.models.vllm import VLLMBackend  # needs the gpu extra

        return VLLMBackend(path or cfg.model.policy, version=version, max_step_tokens=cfg.model.max_step_tokens)
    return HFBackend(
        path or cfg.model.policy,
        version=version,
        max_step_tokens=cfg.model.max_step_tokens,
        max_batch_rows=cfg.model.max_batch_rows,
    )


class ServiceHost:
    """Base of the service actors: build servicers, serve, heartbeat."""

    service = "service"

    def __init__(self, cfg_dict: dict, registry_name: str | None = None):
        self.cfg = config_from_dict(cfg_dict)
        self.registry_name = registry_name
        self.address: str | None = None
        self.error: str | None = None
        self._ready = asyncio.Event()
        asyncio.get_running_loop().create_task(self._run())

    async def build(self, server) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def policy_version(self) -> int:
        return 0

    async def _run(self):
        from caspo.services.health import HealthServicer, add_to_server

        try:
            self.server = new_server()
            await self.build(self.server)
            add_to_server(self.server, HealthServicer(self.service, self.policy_version))
            port = add_port(self.server, f"{self.cfg.mesh.host}:0")
            await self.server.start()
            self.address = advertised_address(self.cfg.mesh.host, port)
        except Exception as e:  # noqa: BLE001 - reported through ready()
            log.exception("%s failed to start", self.service)
            self.error = f"{type(e).__name__}: {e}"
            self._ready.set()
            return
        self._ready.set()
        log.info("%s serving on %s", self.service, self.address)
        await self._heartbeat()

    async def _heartbeat(self):
        import ray

        from caspo.actors.registry import HEARTBEAT_S

        if not self.registry_name:
            return
        while True:
            try:
                reg = ray.get_actor(self.registry_name, namespace=self.cfg.mesh.namespace)
                await reg.register.remote(self.service, self.address, self.policy_version())
            except Exception as e:  # noqa: BLE001 - the registry may be restarting; try again
                log.debug("heartbeat to registry failed: %s", e)
            await asyncio.sleep(HEARTBEAT_S)

    async def ready(self) -> str:
        await self._ready.wait()
        if self.error:
            raise RuntimeError(f"{self.service} failed to start: {self.error}")
        return self.address

    async def pid(self) -> int:
        return os.getpid()


class ModelReplica:
    """One policy replica (a model backend behind a micro-batching worker)."""

    def __init__(self, cfg_dict: dict, num_cpus: float = 1.0, path: str | None = None, version: int = 0):
        from caspo.actors.worker import ModelWorker

        cfg = config_from_dict(cfg_dict)
        _torch_threads(num_cpus)
        self.worker = ModelWorker(make_backend(cfg, path, version), batch_wait_ms=cfg.generator.batch_wait_ms)

    async def sample_steps_versioned(self, prompts, n, temperature, seeds):
        return await self.worker.sample_steps_versioned(prompts, n, temperature, seeds)

    async def score_steps_versioned(self, prompts, steps):
        return await self.worker.score_steps_versioned(prompts, steps)

    async def reload(self, path: str, version: int) -> int:
        await self.worker.reload(path, version)
        return self.worker.version

    async def version(self) -> int:
        return self.worker.version

    async def pid(self) -> int:
        return os.getpid()


class RayWorker:
    """A ModelReplica actor seen through ModelWorker's async interface (what the servicers expect)."""

    def __init__(self, handle, version: int = 0):
        self.handle = handle
        self.in_flight = 0
        self._version = version

    @property
    def version(self) -> int:
        return self._version

    async def _call(self, method: str, *args):
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        from caspo.services.grpc_util import Unavailable

        self.in_flight += 1
        try:
            return await getattr(self.handle, method).remote(*args)
        except (ActorDiedError, ActorUnavailableError) as e:
            raise Unavailable(f"generator replica is restarting: {type(e).__name__}") from e
        finally:
            self.in_flight -= 1

    async def sample_steps_versioned(self, prompts, n, temperature, seeds=None):
        out, version = await self._call("sample_steps_versioned", list(prompts), n, temperature, list(seeds) if seeds is not None else None)
        self._version = version
        return out, version

    async def score_steps_versioned(self, prompts, steps):
        out, version = await self._call("score_steps_versioned", list(prompts), list(steps))
        self._version = version
        return out, version

    async def reload(self, path: str, version: int) -> None:
        self._version = await self._call("reload", path, version)


class GeneratorPool(ServiceHost):
    service = "generator"

    def __init__(self, cfg_dict: dict, registry_name: str | None = None, replica_cpus: float = 0.5):
        self.replica_cpus = replica_cpus
        self.replicas = []
        self.workers: list[RayWorker] = []
        super().__init__(cfg_dict, registry_name)

    async def build(self, server):
        import ray

        from caspo.services.generator import GeneratorServicer, add_to_server

        opts = {"num_gpus": 1} if _cuda() else {"num_cpus": self.replica_cpus}
        if self.cfg.mesh.placement.get("generator"):  # the replicas hold the models: pin them to their group
            opts["resources"] = dict(self.cfg.mesh.placement["generator"])
        Replica = ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=64, **opts)(ModelReplica)
        self.replicas = [Replica.remote(self.cfg.to_dict(), self.replica_cpus) for _ in range(self.cfg.generator.replicas)]
        versions = await asyncio.gather(*(r.version.remote() for r in self.replicas))
        self.workers = [RayWorker(r, v) for r, v in zip(self.replicas, versions)]
        self.servicer = GeneratorServicer(self.workers, self.cfg.generator)
        add_to_server(server, self.servicer)

    def policy_version(self) -> int:
        return min((w.version for w in self.workers), default=0)

    async def replica_pids(self) -> list[int]:
        import ray

        return await asyncio.gather(*(r.pid.remote() for r in self.replicas)) if self.replicas else ray.get([])


class ConfidenceScorer(ServiceHost):
    service = "scorer"

    def __init__(self, cfg_dict: dict, registry_name: str | None = None, num_cpus: float = 0.5):
        self.num_cpus = num_cpus
        super().__init__(cfg_dict, registry_name)

    async def build(self, server):
        from caspo.actors.worker import ModelWorker
        from caspo.services.scorer import ScorerServicer, add_to_server

        _torch_threads(self.num_cpus)
        backend = await asyncio.to_thread(make_backend, self.cfg)
        self.worker = ModelWorker(backend, batch_wait_ms=self.cfg.generator.batch_wait_ms)
        add_to_server(server, ScorerServicer(self.worker, self.cfg.scorer))

    def policy_version(self) -> int:
        return self.worker.version if hasattr(self, "worker") else 0

    async def reload(self, path: str, version: int) -> int:
        await self.worker.reload(path, version)
        return self.worker.version


class Critic(ServiceHost):
    service = "critic"

    async def build(self, server):
        from caspo.actors.critic import ExactCritic, LLMCritic
        from caspo.services.critic import CriticServicer, add_to_server
        from caspo.tasks import get_task

        task = await asyncio.to_thread(get_task, self.cfg.task.name, self.cfg.task.data)
        if self.cfg.critic.kind == "llm":
            from caspo.actors.worker import ModelWorker

            backend = await asyncio.to_thread(make_backend, self.cfg, self.cfg.critic.model)
            critic = LLMCritic(ModelWorker(backend), task.prompt)
        else:
            critic = ExactCritic(task)
        add_to_server(server, CriticServicer(critic, self.cfg.critic))


class PairStoreService(ServiceHost):
    service = "pair_store"

    def __init__(self, cfg_dict: dict, redis_url: str, registry_name: str | None = None):
        self.redis_url = redis_url
        super().__init__(cfg_dict, registry_name)

    async def build(self, server):
        from caspo.actors.pair_store import PairStore
        from caspo.services.pair_store import add_to_server

        self.store = PairStore(self.redis_url)
        add_to_server(server, self.store)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False
