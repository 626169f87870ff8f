"""Two small network helpers: a free local port, and a URL fit for logs (no password)."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit, urlunsplit


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (someone may take it before the caller binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redact_url(url: str | None) -> str | None:
    """A URL fit for logs and error messages: its password (``redis://user:secret@host``) as ``***``."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, f"{parts.username or ''}:***@{host}", parts.path, parts.query, parts.fragment))
    except ValueError:
        return "(unparsable url)"
