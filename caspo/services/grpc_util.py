"""What every caspo gRPC service shares: error mapping, input limits, channel options.

Servicer methods raise the exceptions below; ``@rpc`` turns them into statuses whose message names the
field and the limit, so the service keeps serving. Anything unexpected becomes INTERNAL and is logged.
A request that does not even parse (e.g. a string field that is not UTF-8) is caught by
``DecodeGuard`` and answered INVALID_ARGUMENT before it reaches the servicer.

Security (read from the environment of every process, so a Ray cluster sets it once per pod):

* ``CASPO_AUTH_TOKEN`` — when set, every server made by :func:`new_server` answers UNAUTHENTICATED
  unless the call carries ``authorization: Bearer <token>``; every channel made by :func:`channel`
  sends it. Compared in constant time; never logged.
* ``CASPO_TLS_CERT`` + ``CASPO_TLS_KEY`` — servers listen with TLS (:func:`add_port`);
  ``CASPO_TLS_CA`` — channels dial with TLS and verify against this root; ``CASPO_TLS_SERVER_NAME``
  — the name the certificate is checked for when services are dialled by IP (pods move, names stay).
"""

from __future__ import annotations

import functools
import hmac
import logging
import os

import grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # mesh services (a batch of 512 prompts of 8k characters fits)
SERVE_MAX_MESSAGE_BYTES = 1 << 20  # the public CaT endpoint (a question is at most 2000 characters)
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


# ---- security: bearer token and TLS ---------------------------------------------------------------
AUTH_TOKEN_ENV = "CASPO_AUTH_TOKEN"
TLS_CERT_ENV, TLS_KEY_ENV, TLS_CA_ENV, TLS_SERVER_NAME_ENV = (
    "CASPO_TLS_CERT",
    "CASPO_TLS_KEY",
    "CASPO_TLS_CA",
    "CASPO_TLS_SERVER_NAME",
)


def auth_token() -> str | None:
    """The shared bearer token (``$CASPO_AUTH_TOKEN``), or None when auth is off."""
    return os.environ.get(AUTH_TOKEN_ENV) or None


def auth_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata that authenticates a call (empty when auth is off)."""
    token = auth_token()
    return (("authorization", f"Bearer {token}"),) if token else ()


def authorized(header: str | None, token: str | None = None) -> bool:
    """Whether an ``authorization`` header/metadata value carries the token (constant-time compare)."""
    token = auth_token() if token is None else token
    if not token:
        return True
    return hmac.compare_digest((header or "").encode(), f"Bearer {token}".encode())


UNAUTHENTICATED_MESSAGE = f"missing or wrong bearer token: send 'authorization: Bearer <token>' (${AUTH_TOKEN_ENV})"


class AuthGuard(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for a call without the bearer token; the request is not even parsed."""

    def __init__(self, token: str):
        self.token = token

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if handler is None or authorized(metadata.get("authorization"), self.token):
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        )
        for kind, make in kinds:
            if getattr(handler, kind) is not None:
                return make(deny, request_deserializer=None, response_serializer=None)
        return handler


def _read(path_env: str) -> bytes:
    path = os.environ[path_env]
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise RuntimeError(f"${path_env} names {path}, which cannot be read: {e.strerror}") from None


def tls_server_credentials() -> grpc.ServerCredentials | None:
    cert, key = os.environ.get(TLS_CERT_ENV), os.environ.get(TLS_KEY_ENV)
    if not cert and not key:
        return None
    if not (cert and key):
        raise RuntimeError(f"TLS needs both ${TLS_CERT_ENV} and ${TLS_KEY_ENV} (PEM files); only one is set")
    return grpc.ssl_server_credentials([(_read(TLS_KEY_ENV), _read(TLS_CERT_ENV))])


def limit_proxy_messages() -> None:
    """Cap the gRPC message size of Ray Serve's proxies at ``SERVE_MAX_MESSAGE_BYTES`` (Ray's default is
    2 GiB). Ray reads it from the environment of the processes it starts: call before ``ray.init``
    starts a local Ray; on a cluster set ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`` in the pods."""
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(SERVE_MAX_MESSAGE_BYTES))


def new_server() -> grpc.aio.Server:
    """A grpc.aio server with the mesh's limits, decode guard and (when configured) token check."""
    token = auth_token()
    interceptors = ([AuthGuard(token)] if token else []) + [DecodeGuard()]
    return grpc.aio.server(interceptors=interceptors, options=CHANNEL_OPTIONS)


def add_port(server: grpc.aio.Server, address: str) -> int:
    """Listen on ``address`` (``host:port``; port 0 picks one), with TLS when configured; the port."""
    creds = tls_server_credentials()
    return server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)


class _AuthInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, metadata):
        self.metadata = metadata

    def _details(self, d):
        md = grpc.aio.Metadata(*(d.metadata or ()), *self.metadata)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def channel_options() -> list[tuple[str, object]]:
    name = os.environ.get(TLS_SERVER_NAME_ENV)
    return CHANNEL_OPTIONS + ([("grpc.ssl_target_name_override", name)] if name and os.environ.get(TLS_CA_ENV) else [])


def channel(address: str) -> grpc.aio.Channel:
    """An async channel to a mesh service: TLS when ``$CASPO_TLS_CA`` is set, the bearer token when
    ``$CASPO_AUTH_TOKEN`` is set, the mesh's message limits always."""
    md = auth_metadata()
    interceptors = [_AuthInterceptor(md)] if md else None
    if os.environ.get(TLS_CA_ENV):
        creds = grpc.ssl_channel_credentials(root_certificates=_read(TLS_CA_ENV))
        return grpc.aio.secure_channel(address, creds, options=channel_options(), interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=channel_options(), interceptors=interceptors)


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
