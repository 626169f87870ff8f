"""Registers ``caspo.v1.CaT`` with Ray Serve's gRPC proxy (``grpc_options.grpc_servicer_functions``).

The same handlers as the generated ``cat_pb2_grpc.add_CaTServicer_to_server``, with one difference:
a request that does not parse (truncated bytes, a string field that is not UTF-8) becomes an
:class:`UndecodableRequest` instead of an exception inside the proxy, which gRPC would answer with
UNKNOWN. The replica answers it INVALID_ARGUMENT, like every other bad request. Kept small: the
proxy process imports this module (and caspo/serve/__init__.py, which stays empty for that reason).
"""

from __future__ import annotations

import grpc

from caspo.protos.v1 import cat_pb2

SERVICE = "caspo.v1.CaT"


class UndecodableRequest:
    """Stands in for a request the proxy could not parse; Serve pickles it to the replica."""

    def __init__(self, error: str):
        self.error = error


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
