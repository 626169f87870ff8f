"""What crosses between Serve's proxies and a CaT replica, kept in a module of its own because the
proxy process loads it: the registration of ``caspo.v1.CaT`` with Serve's gRPC proxy
(``grpc_options.grpc_servicer_functions``), and the errors a replica raises back through the proxy.
Ray pickles those errors, and unpickling one imports the module that defines it: defined here, they
do not pull the model stack (torch, transformers) into the proxy.

The registration uses the same handlers as the generated ``cat_pb2_grpc.add_CaTServicer_to_server``,
with one difference: a request that does not parse (truncated bytes, a string field that is not
UTF-8) becomes an :class:`UndecodableRequest` instead of an exception inside the proxy, which gRPC
would answer with UNKNOWN. The replica answers it INVALID_ARGUMENT, like every other bad request.
"""

from __future__ import annotations

import grpc

from caspo.errors import BadRequest
from caspo.protos.v1 import cat_pb2

SERVICE = "caspo.v1.CaT"


class UndecodableRequest:
    """Stands in for a request the proxy could not parse; Serve pickles it to the replica."""

    def __init__(self, error: str):
        self.error = error


class ParamError(BadRequest):
    """A request field out of its limits; ``field`` names it (HTTP 422 ``loc``, gRPC details)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message

    def __reduce__(self):  # Ray pickles exceptions between the replica and the proxy
        return (ParamError, (self.field, self.message))


class Unauthenticated(PermissionError):
    """The call carried no or the wrong bearer token (gRPC UNAUTHENTICATED)."""

    def __reduce__(self):
        return (Unauthenticated, self.args)


def parse_request(data: bytes):
    try:
        return cat_pb2.SolveRequest.FromString(data)
    except Exception as e:  # noqa: BLE001 - DecodeError, or a RuntimeWarning-turned-error on bad UTF-8
        return UndecodableRequest(str(e))


def add_CaTServicer_to_server(servicer, server) -> None:  # noqa: N802 - the name Serve configs use
    handlers = {
        "Solve": grpc.unary_unary_rpc_method_handler(
            servicer.Solve, request_deserializer=parse_request, response_serializer=cat_pb2.SolveResponse.SerializeToString
        ),
        "SolveStream": grpc.unary_stream_rpc_method_handler(
            servicer.SolveStream, request_deserializer=parse_request, response_serializer=cat_pb2.SolveEvent.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
