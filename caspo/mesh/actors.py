"""The mesh's long-lived Ray actors. Each service actor hosts one grpc.aio server (its servicer from
caspo/services/) in its own event loop and heartbeats its address and policy version into the
registry (caspo/mesh/registry.py).

  * ``GeneratorActor``  — the Generator service over N ``ReplicaActor`` actors (one model each);
    requests go to the least busy replica and are micro-batched there.
  * ``ScorerActor``     — the ConfidenceScorer service: exact step confidence, one batched pass.
  * ``CriticActor``     — the Critic service: the task's exact verifier, or an LLM critic.
  * ``PairStoreActor``  — the PairStore service over Redis.
  * ``ReplicaActor``    — one policy replica (a ``ModelWorker``); ``ReplicaClient`` is how the
    generator's servicer sees it.

Ray restarts a dead actor (``max_restarts=-1``); ``__init__`` runs again, starts a new server (new
port) and the next heartbeat puts the new address in the registry.
"""

from __future__ import annotations

import asyncio
import logging
import os

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError

from caspo import telemetry
from caspo.config import ActorResources, Config, config_from_dict, scorer_backend, service_resources
from caspo.errors import Unavailable
from caspo.mesh.registry import HEARTBEAT_S, advertised_address
from caspo.models.factory import make_backend
from caspo.models.prompting import prompter_for_backend
from caspo.models.worker import ModelWorker
from caspo.policy_file import read_policy_file
from caspo.services import critic_servicer, generator_servicer, mesh_servicer, pair_store_servicer, scorer_servicer
from caspo.services.server import add_port, new_server
from caspo.store.pair_store import PairStore
from caspo.tasks import get_task
from caspo.tasks.critic import ExactCritic, JudgeCritic, LLMCritic

log = logging.getLogger(__name__)

ACTOR_NAMES = {
    "generator": "caspo-generator",
    "scorer": "caspo-scorer",
    "critic": "caspo-critic",
    "pair_store": "caspo-pair-store",
}


def _torch_threads(num_cpus: float) -> None:
    torch.set_num_threads(max(1, int(num_cpus)))


# the custom resource every Ray head node has (and no other node): asking for a sliver of it pins an actor there
ON_HEAD = {"node:__internal_head__": 0.001}


def actor_options(r: ActorResources) -> dict:
    """``ray.remote`` options of an actor kind from ``caspo.config.service_resources``: its CPUs, GPUs and
    custom resources, plus the head pin when it is neither placed on a group nor asking for a GPU."""
    opts = r.ray_options()
    if r.on_head:
        opts["resources"] = {**opts["resources"], **ON_HEAD}
    return opts


class ServiceActor:
    """Base of the service actors: build servicers, serve, heartbeat."""

    service = "service"

    def __init__(self, cfg_dict: dict, registry_name: str | None = None):
        self.cfg: Config = config_from_dict(cfg_dict)
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
        try:
            self.server = new_server()
            await self.build(self.server)
            mesh_servicer.add_to_server(self.server, mesh_servicer.HealthServicer(self.service, self.policy_version))
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
        while True:
            telemetry.policy_version(self.service, self.policy_version())  # caspo_policy_version
            if not self.registry_name:
                await asyncio.sleep(HEARTBEAT_S)
                continue
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

    async def devices(self) -> dict:
        return devices()


def devices() -> dict:
    """The GPUs Ray reserved for the calling actor and what its process sees (``caspo plan``'s claims, checked)."""
    return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "node_id": ray.get_runtime_context().get_node_id()}


def published_or(cfg: Config, path: str | None, version: int) -> tuple[str | None, int]:
    """What a starting (or restarted) policy holder loads: the policy the record (``serve.policy_file``)
    names when there is one, so a replica that missed a publish comes back on it; else ``path``."""
    published = read_policy_file(cfg.serve.policy_file) if cfg.serve.policy_file else None
    return (published[1], published[0]) if published is not None else (path, version)


class ReplicaActor:
    """One policy replica: a model backend behind a micro-batching ``ModelWorker``."""

    def __init__(self, cfg_dict: dict, num_cpus: float = 1.0, path: str | None = None, version: int = 0):
        cfg = config_from_dict(cfg_dict)
        _torch_threads(num_cpus)
        path, version = published_or(cfg, path, version)
        self.worker = ModelWorker(make_backend(cfg, path, version), batch_wait_ms=cfg.generator.batch_wait_ms, name="generator")

    async def receive_policy(self, plan: dict, rank: int) -> dict:
        """Join a publish (caspo/mesh/publisher.py) and switch to its version once all of it is here."""
        return await self.worker.receive(plan, rank)

    async def state(self, meta: list | None = None) -> dict:
        return self.worker.state(meta)

    async def sample_steps_versioned(self, prompts, n, temperature, seeds):
        return await self.worker.sample_steps_versioned(prompts, n, temperature, seeds)

    async def score_steps_versioned(self, prompts, steps):
        return await self.worker.score_steps_versioned(prompts, steps)

    async def reload(self, path: str, version: int) -> int:
        if (path, version) != (self.worker.path, self.worker.version):  # not when the broadcast got here
            await self.worker.reload(path, version)
        return self.worker.version

    async def version(self) -> int:
        return self.worker.version

    async def pid(self) -> int:
        return os.getpid()

    async def devices(self) -> dict:
        return devices()


class ReplicaClient:
    """A ``ReplicaActor`` seen through ModelWorker's async interface (what the servicers expect)."""

    def __init__(self, handle, version: int = 0):
        self.handle = handle
        self.in_flight = 0
        self._version = version

    @property
    def version(self) -> int:
        return self._version

    async def _call(self, method: str, *args):
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


class GeneratorActor(ServiceActor):
    service = "generator"

    def __init__(self, cfg_dict: dict, registry_name: str | None = None):
        self.replicas = []
        self.workers: list[ReplicaClient] = []
        super().__init__(cfg_dict, registry_name)

    async def build(self, server):
        # a replica holds one model and asks for what the config says it needs (its GPUs on model.device
        # cuda: tensor_parallel_size for vLLM), on the group mesh.placement names; never what this actor,
        # pinned to the head, happens to see
        r = service_resources(self.cfg)["generator"]
        Replica = ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=64, **actor_options(r))(ReplicaActor)
        self.replicas = [Replica.remote(self.cfg.to_dict(), r.num_cpus) for _ in range(r.count)]
        versions = await asyncio.gather(*(r.version.remote() for r in self.replicas))
        self.workers = [ReplicaClient(r, v) for r, v in zip(self.replicas, versions)]
        self.servicer = generator_servicer.GeneratorServicer(self.workers, self.cfg.generator)
        generator_servicer.add_to_server(server, self.servicer)

    def policy_version(self) -> int:
        return min((w.version for w in self.workers), default=0)

    async def replica_handles(self) -> list:
        return list(self.replicas)

    async def refresh_versions(self) -> int:
        """Ask every replica its version (after a publish that went to them directly)."""
        versions = await asyncio.gather(*(r.version.remote() for r in self.replicas))
        for w, v in zip(self.workers, versions):
            w._version = v
        return self.policy_version()

    async def replica_devices(self) -> list[dict]:
        return list(await asyncio.gather(*(r.devices.remote() for r in self.replicas)))


class ScorerActor(ServiceActor):
    service = "scorer"

    def __init__(self, cfg_dict: dict, registry_name: str | None = None, num_cpus: float = 0.5):
        self.num_cpus = num_cpus
        super().__init__(cfg_dict, registry_name)

    async def build(self, server):
        _torch_threads(self.num_cpus)
        path, version = published_or(self.cfg, None, 0)
        backend = await asyncio.to_thread(make_backend, self.cfg, path, version, scorer_backend(self.cfg))
        self.worker = ModelWorker(backend, batch_wait_ms=self.cfg.generator.batch_wait_ms, name="scorer")
        scorer_servicer.add_to_server(server, scorer_servicer.ScorerServicer(self.worker, self.cfg.scorer))

    def policy_version(self) -> int:
        return self.worker.version if hasattr(self, "worker") else 0

    async def receive_policy(self, plan: dict, rank: int) -> dict:
        await self._ready.wait()
        return await self.worker.receive(plan, rank)

    async def state(self, meta: list | None = None) -> dict:
        await self._ready.wait()
        return self.worker.state(meta)


class CriticActor(ServiceActor):
    service = "critic"

    async def build(self, server):
        task = await asyncio.to_thread(get_task, self.cfg.task.name, self.cfg.task.data, self.cfg.task)
        if self.cfg.critic.kind in ("llm", "judge"):
            _torch_threads(0.5)
            backend = await asyncio.to_thread(make_backend, self.cfg, self.cfg.critic.model)
            prompter = prompter_for_backend(backend, task)
            worker = self.worker = ModelWorker(backend, batch_wait_ms=self.cfg.generator.batch_wait_ms, name="critic")
            if self.cfg.critic.kind == "judge":
                critic = JudgeCritic(worker, prompter.chat, prompter, self.cfg.critic.threshold)
            else:
                critic = LLMCritic(worker, prompter)
        else:
            critic = ExactCritic(task)
        critic_servicer.add_to_server(server, critic_servicer.CriticServicer(critic, self.cfg.critic))


    async def receive_policy(self, plan: dict, rank: int) -> dict:
        """When the critic's model is the policy (caspo/mesh/publisher.py subscribes it then)."""
        await self._ready.wait()
        return await self.worker.receive(plan, rank)


class PairStoreActor(ServiceActor):
    service = "pair_store"

    def __init__(self, cfg_dict: dict, redis_url: str, registry_name: str | None = None):
        self.redis_url = redis_url
        super().__init__(cfg_dict, registry_name)

    async def build(self, server):
        self.store = PairStore(self.redis_url, self.cfg.pair_store)
        pair_store_servicer.add_to_server(server, self.store)
