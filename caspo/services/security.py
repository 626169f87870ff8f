"""The bearer token and TLS of caspo's gRPC (and CaT's HTTP), read from each process's environment,
so a Ray cluster sets them once per pod:

* ``CASPO_AUTH_TOKEN`` — when set, every server answers UNAUTHENTICATED (HTTP 401) unless the call
  carries ``authorization: Bearer <token>``; every caspo client sends it. Compared in constant
  time; never logged.
* ``CASPO_TLS_CERT`` + ``CASPO_TLS_KEY`` — servers listen with TLS; ``CASPO_TLS_CA`` — channels dial
  with TLS and verify against this root; ``CASPO_TLS_SERVER_NAME`` — the name the certificate is
  checked for when services are dialled by IP (pods move, names stay).
"""

from __future__ import annotations

import hmac
import os

import grpc

AUTH_TOKEN_ENV = "CASPO_AUTH_TOKEN"
TLS_CERT_ENV, TLS_KEY_ENV, TLS_CA_ENV, TLS_SERVER_NAME_ENV = (
    "CASPO_TLS_CERT",
    "CASPO_TLS_KEY",
    "CASPO_TLS_CA",
    "CASPO_TLS_SERVER_NAME",
)
UNAUTHENTICATED_MESSAGE = f"missing or wrong bearer token: send 'authorization: Bearer <token>' (${AUTH_TOKEN_ENV})"


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
    """Server credentials from ``$CASPO_TLS_CERT``/``$CASPO_TLS_KEY``, or None when TLS is off."""
    cert, key = os.environ.get(TLS_CERT_ENV), os.environ.get(TLS_KEY_ENV)
    if not cert and not key:
        return None
    if not (cert and key):
        raise RuntimeError(f"TLS needs both ${TLS_CERT_ENV} and ${TLS_KEY_ENV} (PEM files); only one is set")
    return grpc.ssl_server_credentials([(_read(TLS_KEY_ENV), _read(TLS_CERT_ENV))])


def tls_channel_credentials() -> grpc.ChannelCredentials | None:
    """Channel credentials trusting ``$CASPO_TLS_CA``, or None when TLS is off."""
    if not os.environ.get(TLS_CA_ENV):
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(TLS_CA_ENV))


def tls_target_name() -> str | None:
    """The name a server certificate is checked for (``$CASPO_TLS_SERVER_NAME``), with TLS on."""
    name = os.environ.get(TLS_SERVER_NAME_ENV)
    return name if name and os.environ.get(TLS_CA_ENV) else None
