"""The small rules the security and retry behaviour rest on (the suite in tests/reliability runs them for real)."""

from __future__ import annotations

import pytest

from caspo.netutil import redact_url
from caspo.store.redis_server import LocalRedis
from caspo.serve.cat_client import replica_lost
from caspo.services.security import auth_metadata, authorized


def test_authorized_needs_the_exact_bearer_header_only_when_a_token_is_set(monkeypatch):
    monkeypatch.delenv("CASPO_AUTH_TOKEN", raising=False)
    assert authorized(None) and authorized("anything") and auth_metadata() == ()
    monkeypatch.setenv("CASPO_AUTH_TOKEN", "t0k")
    assert auth_metadata() == (("authorization", "Bearer t0k"),)
    assert authorized("Bearer t0k")
    for bad in (None, "", "t0k", "Bearer t0", "Bearer t0k ", "bearer t0k", "Basic t0k"):
        assert not authorized(bad), bad
    monkeypatch.setenv("CASPO_AUTH_TOKEN", "")  # empty: auth off, like unset
    assert authorized(None)


def test_replica_lost_is_only_what_is_safe_to_resend():
    died = "The actor died unexpectedly before finishing this task.\n\tclass_name: ServeReplica:caspo:CaT"
    assert replica_lost("UNAVAILABLE", "") and replica_lost("503", "")
    assert replica_lost("INTERNAL", died) and replica_lost("500", f'{{"detail": "{died}"}}')
    assert not replica_lost("INTERNAL", "ZeroDivisionError: division by zero")
    assert not replica_lost("INVALID_ARGUMENT", died) and not replica_lost("422", died)
    assert not replica_lost("UNAUTHENTICATED", "") and not replica_lost("DEADLINE_EXCEEDED", "")


def test_redact_url_hides_passwords_of_acl_users_too(tmp_path):
    assert redact_url("redis://caspo:s3cr3t@h:6379/0") == "redis://caspo:***@h:6379/0"
    r = LocalRedis(tmp_path, port=6399, username="caspo", password="p/w")
    r.port = 6399
    assert r.url == "redis://caspo:p%2Fw@127.0.0.1:6399/0"
    assert "p%2Fw" not in redact_url(r.url)
    cmd = r._command("redis-server", 6399)
    assert cmd[cmd.index("--user") : cmd.index("--user") + 3] == ["--user", "default", "off"]
    assert ">p/w" in cmd and "~caspo:*" in cmd and "--requirepass" not in cmd
    with pytest.raises(ValueError, match="needs a password"):
        LocalRedis(tmp_path, username="caspo")


def test_a_path_the_filesystem_cannot_even_stat_is_a_model_load_error():
    """Found by the long fuzz run: Generator.Reload with a 4000-character path raised OSError (INTERNAL)."""
    from caspo.models.base import ModelLoadError
    from caspo.models.hf import resolve_model_path

    with pytest.raises(ModelLoadError, match="File name too long"):
        resolve_model_path("9" * 4000)
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path("/no/such/model")
