"""The mesh registry: a Ray actor that knows every service's address, policy version and health, and
serves that over gRPC (``Mesh.Registry``) so any client — the CLI, the trainer, Serve — can find them.

Services heartbeat into it (``register``) every few seconds, so a restarted service (new port) or a
restarted registry is back in the registry within one heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import ray
import ray.util

from caspo.protos.v1 import mesh_pb2, mesh_pb2_grpc
from caspo.services import mesh_servicer
from caspo.services.channel import channel
from caspo.services.server import add_port, new_server

log = logging.getLogger(__name__)

REGISTRY_NAME = "caspo-registry"
HEARTBEAT_S = 2.0


def advertised_address(host: str, port: int) -> str:
    """The address other processes dial: ``host:port``, or this node's IP when bound to every
    interface (``0.0.0.0`` in a cluster, where 127.0.0.1 would mean the caller's own pod)."""
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = ray.util.get_node_ip_address()
    return f"{host}:{port}"


async def probe(address: str, timeout: float = 1.0) -> tuple[bool, int]:
    """Ask a service's Mesh.Health; (healthy, policy_version)."""
    try:
        async with channel(address) as ch:
            r = await mesh_pb2_grpc.MeshStub(ch).Health(mesh_pb2.HealthRequest(), timeout=timeout)
            return bool(r.ok), int(r.policy_version)
    except grpc.aio.AioRpcError:
        return False, -1


class RegistryState:
    """Who registered where and when; ``snapshot(check=True)`` also asks each service's health."""

    def __init__(self):
        self.services: dict[str, dict] = {}

    def register(self, name: str, address: str, policy_version: int) -> None:
        now = time.time()
        cur = self.services.get(name)
        if cur is None or cur["address"] != address:
            restarts = 0 if cur is None else cur["restarts"] + 1
            if cur is not None:
                log.warning("service %s moved from %s to %s (restart %d)", name, cur["address"], address, restarts)
            self.services[name] = {"name": name, "address": address, "registered_at": now, "restarts": restarts}
        self.services[name]["policy_version"] = int(policy_version)
        self.services[name]["last_seen"] = now

    async def snapshot(self, check: bool = False) -> list[dict]:
        out = []
        items = sorted(self.services.values(), key=lambda s: s["name"])
        probes = await asyncio.gather(*(probe(s["address"]) for s in items)) if check else [(True, None)] * len(items)
        for s, (ok, version) in zip(items, probes):
            fresh = time.time() - s["last_seen"] < 3 * HEARTBEAT_S
            out.append(
                {
                    "name": s["name"],
                    "address": s["address"],
                    "policy_version": version if (check and ok) else s["policy_version"],
                    "healthy": bool(ok and fresh),
                    "registered_at": s["registered_at"],
                    "restarts": s["restarts"],
                }
            )
        return out


class RegistryActor:
    """The registry's Ray actor (async); ``registry_actor()`` is the class decorated for Ray."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.state = RegistryState()
        self.host = host
        self.port = port
        self.address: str | None = None
        self._ready = asyncio.Event()
        asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self):
        self.server = new_server()
        mesh_servicer.add_to_server(self.server, mesh_servicer.RegistryServicer(self.state))
        port = add_port(self.server, f"{self.host}:{self.port}")
        await self.server.start()
        self.address = advertised_address(self.host, port)
        self._ready.set()

    async def ready(self) -> str:
        await self._ready.wait()
        return self.address

    async def register(self, name: str, address: str, policy_version: int) -> None:
        self.state.register(name, address, policy_version)

    async def services(self, check: bool = False) -> list[dict]:
        return await self.state.snapshot(check=check)


def registry_actor():
    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(RegistryActor)
