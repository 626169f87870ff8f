"""``Mesh.Health`` for any caspo service: is it up, and on which policy version.

The ``Mesh.Registry`` rpc belongs to the registry actor (``caspo.actors.registry``); a plain service
answers it UNIMPLEMENTED.
"""

from __future__ import annotations

import inspect
from typing import Callable

import grpc

from caspo.protos.v1 import mesh_pb2, mesh_pb2_grpc
from caspo.services.grpc_util import rpc


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


def add_to_server(server: grpc.aio.Server, servicer: HealthServicer) -> None:
    mesh_pb2_grpc.add_MeshServicer_to_server(servicer, server)
