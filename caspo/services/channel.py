"""The channel every caspo client dials a mesh service with: the mesh's message limits, TLS when
``$CASPO_TLS_CA`` is set, the bearer token when ``$CASPO_AUTH_TOKEN`` is set (services/security.py)."""

from __future__ import annotations

import grpc

from caspo.services.security import auth_metadata, tls_channel_credentials, tls_target_name
from caspo.services.server import MESSAGE_OPTIONS


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
    name = tls_target_name()
    return MESSAGE_OPTIONS + ([("grpc.ssl_target_name_override", name)] if name else [])


def channel(address: str) -> grpc.aio.Channel:
    """An async channel to a mesh service at ``address`` (``host:port``)."""
    md = auth_metadata()
    interceptors = [_AuthInterceptor(md)] if md else None
    creds = tls_channel_credentials()
    if creds is not None:
        return grpc.aio.secure_channel(address, creds, options=channel_options(), interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=channel_options(), interceptors=interceptors)
