"""Real parts for integration tests (docs/design.md §6): a redis-server child process per test module."""

from __future__ import annotations

import shutil

import pytest

from caspo.store.redis_server import LocalRedis


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """URL of a real redis-server (AOF, appendfsync always) started for this module and stopped after it."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server); integration tests need a real Redis")
    server = LocalRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()
