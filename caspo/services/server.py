"""What every caspo gRPC server shares: error mapping, the decode guard, message limits, listening.

Servicer methods raise the errors of ``caspo.errors``; ``@rpc`` turns them into statuses whose message
names the field and the limit, so the service keeps serving. Anything unexpected becomes INTERNAL and
is logged. A request that does not even parse (e.g. a string field that is not UTF-8) is caught by
``DecodeGuard`` and answered INVALID_ARGUMENT before it reaches the servicer. Servers made by
:func:`new_server` check the bearer token and listen with TLS when configured (services/security.py).
"""

from __future__ import annotations

import functools
import logging
import os
import time

import grpc

from caspo.errors import BadRequest, NotFound, Unavailable
from caspo.services.security import AuthGuard, auth_token, tls_server_credentials
from caspo.telemetry import grpc_request

log = logging.getLogger(__name__)

# Transport sizes, not request limits (those are in the config): what one message may weigh on the wire.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # mesh services (a batch of 512 prompts of 8k characters fits)
SERVE_MAX_MESSAGE_BYTES = 1 << 20  # the public CaT endpoint (a question is at most 2000 characters)
MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

_STATUS = (
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


class _Undecodable:
    """Stands in for a request that could not be parsed."""

    def __init__(self, error: Exception):
        self.error = error


def status_name(context) -> str:
    """The name of the status code a servicer set on its gRPC context (UNKNOWN when it set none)."""
    code = context.code() if hasattr(context, "code") else None
    return getattr(code, "name", None) or "UNKNOWN"


def rpc(method):
    """Decorator for async servicer methods: exceptions → gRPC statuses, the server keeps serving. Every
    call is counted with its latency and status (caspo_grpc_* metrics, caspo/telemetry.py)."""
    service = method.__qualname__.split(".")[0].removesuffix("Servicer")

    @functools.wraps(method)
    async def wrapper(self, request, context):
        t0, status = time.perf_counter(), "OK"
        try:
            if isinstance(request, _Undecodable):
                status = grpc.StatusCode.INVALID_ARGUMENT.name
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {request.error}")
            try:
                return await method(self, request, context)
            except grpc.aio.AbortError:
                if status == "OK":  # the servicer aborted with its own status
                    status = status_name(context)
                raise
            except Exception as e:  # noqa: BLE001 - every failure must become a status
                for exc_type, code in _STATUS:
                    if isinstance(e, exc_type):
                        status = code.name
                        await context.abort(code, str(e))
                log.exception("%s failed", method.__qualname__)
                status = grpc.StatusCode.INTERNAL.name
                await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            grpc_request(service, method.__name__, time.perf_counter() - t0, status)

    return wrapper


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Turns undecodable requests (invalid UTF-8 in a string, truncated bytes) into INVALID_ARGUMENT
    instead of the INTERNAL that grpc gives by default."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.unary_unary is None:
            return handler
        decode = handler.request_deserializer

        def safe_decode(data: bytes):
            try:
                return decode(data)
            except Exception as e:  # noqa: BLE001
                return _Undecodable(e)  # e.g. "... 'caspo.v1.JudgeItem': String field had bad UTF-8"

        return grpc.unary_unary_rpc_method_handler(
            handler.unary_unary, request_deserializer=safe_decode, response_serializer=handler.response_serializer
        )


def new_server() -> grpc.aio.Server:
    """A grpc.aio server with the mesh's limits, decode guard and (when configured) token check."""
    token = auth_token()
    interceptors = ([AuthGuard(token)] if token else []) + [DecodeGuard()]
    return grpc.aio.server(interceptors=interceptors, options=MESSAGE_OPTIONS)


def add_port(server: grpc.aio.Server, address: str) -> int:
    """Listen on ``address`` (``host:port``; port 0 picks one), with TLS when configured; the port."""
    creds = tls_server_credentials()
    return server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)


def limit_proxy_messages() -> None:
    """Cap the gRPC message size of Ray Serve's proxies at ``SERVE_MAX_MESSAGE_BYTES`` (Ray's default is
    2 GiB). Ray reads it from the environment of the processes it starts: call before ``ray.init``
    starts a local Ray; on a cluster set ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`` in the pods."""
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(SERVE_MAX_MESSAGE_BYTES))
