"""The ``caspo.v1.Mesh`` service: ``Health`` on every caspo service, ``Registry`` on the registry.

* ``HealthServicer`` — is a service up, and on which policy version; a plain service answers
  ``Registry`` UNIMPLEMENTED.
* ``RegistryServicer`` — the registry actor's (caspo/mesh/registry.py): every service's address,
  policy version and health.
"""

from __future__ import annotations

import inspect
from typing import Callable

import grpc

from caspo.protos.v1 import mesh_pb2, mesh_pb2_grpc
from caspo.services.server import rpc


class HealthServicer(mesh_pb2_grpc.MeshServicer):
    def __init__(self, name: str, version_fn: Callable[[], int] | None = None):
        self.name = name
        self.version_fn = version_fn or (lambda: 0)

    @rpc
    async def Health(self, request, context):
        version = self.version_fn()
        if inspect.isawaitable(version):
            version = await version
        return mesh_pb2.HealthResponse(ok=True, service=self.name, policy_version=int(version))

    @rpc
    async def Registry(self, request, context):
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"service {self.name!r} is not the registry; ask the mesh registry"
        )


class RegistryServicer(mesh_pb2_grpc.MeshServicer):
    def __init__(self, registry):
        self.registry = registry  # a RegistryState: async snapshot(check) -> [service dicts]

    @rpc
    async def Health(self, request, context):
        return mesh_pb2.HealthResponse(ok=True, service="registry", policy_version=0)

    @rpc
    async def Registry(self, request, context):
        services = await self.registry.snapshot(check=True)
        return mesh_pb2.RegistryResponse(services=[mesh_pb2.ServiceInfo(**s) for s in services])


def add_to_server(server: grpc.aio.Server, servicer: HealthServicer | RegistryServicer) -> None:
    mesh_pb2_grpc.add_MeshServicer_to_server(servicer, server)
