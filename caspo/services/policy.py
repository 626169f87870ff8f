"""What every servicer that holds a policy shares: the ``policy_version`` a request may pin, and
``Reload`` (the generator's replicas and the scorer load a published checkpoint the same way)."""

from __future__ import annotations

import asyncio
import os
from typing import Sequence

from caspo.errors import BadRequest, NotFound, check_range, check_text
from caspo.models.base import ModelLoadError
from caspo.protos.v1 import generator_pb2


def check_version(requested: int | None, loaded: int) -> None:
    if requested is not None and requested != loaded:
        raise NotFound(f"policy_version {requested} is not loaded (current: {loaded})")


def reload_path(request: generator_pb2.ReloadRequest, service: str, max_path_chars: int) -> str:
    """The checkpoint a Reload request names, checked: a local model directory or ``tiny``."""
    path = check_text("path", request.path, max_path_chars)
    check_range("version", request.version, 0, 2**63 - 1)
    # a local checkpoint (as `caspo loop` publishes) or the built-in "tiny"; never a hub id: without a
    # reachable hub the download retries would hold the reload lock for minutes
    if path != "tiny" and not os.path.isdir(path):
        raise BadRequest(f"path {path[:200]!r} is not a model directory on the {service}'s node (Reload takes a local checkpoint or 'tiny')")
    return path


async def reload_workers(workers: Sequence, path: str, version: int) -> None:
    """Every worker loads ``path`` as ``version``; a directory without a loadable model is BadRequest."""
    results = await asyncio.gather(*(w.reload(path, version) for w in workers), return_exceptions=True)
    for r in results:
        if isinstance(r, ModelLoadError):
            raise BadRequest(f"path {path!r} holds no loadable model: {r}")
        if isinstance(r, BaseException):
            raise r
