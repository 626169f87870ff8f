"""What Serve's gRPC proxy loads: the registration of ``caspo.v1.CaT`` (``grpc_options.grpc_servicer_functions``),
kept in a module of its own, like the errors a replica raises back through the proxy
(request_errors.py), so that the proxy does not load the model stack (torch, transformers).

The registration uses the same handlers as the generated ``cat_pb2_grpc.add_CaTServicer_to_server``,
with one difference: a request that does not parse (truncated bytes, a string field that is not
UTF-8) becomes an :class:`UndecodableRequest` instead of an exception inside the proxy, which gRPC
would answer with UNKNOWN. The replica answers it INVALID_ARGUMENT, like every other bad request.
"""

from __future__ import annotations

import grpc

from caspo.protos.v1 import cat_pb2
from caspo.serve.request_errors import UndecodableRequest

SERVICE = "caspo.v1.CaT"


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
