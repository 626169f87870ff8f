"""What every caspo gRPC service shares: error mapping, input limits, channel options.

Servicer methods raise the exceptions below; ``@rpc`` turns them into statuses whose message names the
field and the limit, so the service keeps serving. Anything unexpected becomes INTERNAL and is logged.
A request that does not even parse (e.g. a string field that is not UTF-8) is caught by
``DecodeGuard`` and answered INVALID_ARGUMENT before it reaches the servicer.
"""

from __future__ import annotations

import functools
import logging

import grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class BadRequest(ValueError):
    """INVALID_ARGUMENT: the message names the field and the limit."""


class NotFound(LookupError):
    """NOT_FOUND: e.g. a policy version that is not loaded."""


class Unavailable(RuntimeError):
    """UNAVAILABLE: a dependency (Redis, a replica) cannot be reached; the client may retry."""


_STATUS = (
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


class _Undecodable:
    """Stands in for a request that could not be parsed."""

    def __init__(self, error: Exception):
        self.error = error


def rpc(method):
    """Decorator for async servicer methods: exceptions → gRPC statuses, the server keeps serving."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {request.error}")
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure must become a status
            for exc_type, code in _STATUS:
                if isinstance(e, exc_type):
                    await context.abort(code, str(e))
            log.exception("%s failed", method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

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


def advertised_address(host: str, port: int) -> str:
    """The address other processes dial: ``host:port``, or this node's IP when bound to every
    interface (``0.0.0.0`` in a cluster, where 127.0.0.1 would mean the caller's own pod)."""
    if host in ("0.0.0.0", "::", "[::]", ""):
        import ray.util

        host = ray.util.get_node_ip_address()
    return f"{host}:{port}"


def new_server() -> grpc.aio.Server:
    return grpc.aio.server(interceptors=[DecodeGuard()], options=CHANNEL_OPTIONS)


def check_text(field: str, value: str, max_chars: int, allow_empty: bool = False) -> str:
    """A required text field within its limit, else BadRequest naming both."""
    if not value and not allow_empty:
        raise BadRequest(f"{field} is empty")
    if len(value) > max_chars:
        raise BadRequest(f"{field} is {len(value)} characters; the limit is {max_chars}")
    return value


def check_range(field: str, value, lo, hi):
    if not lo <= value <= hi:
        raise BadRequest(f"{field} must be in [{lo}, {hi}], got {value}")
    return value
