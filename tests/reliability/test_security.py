"""Security of the mesh, end to end: a data round over TLS with the bearer token on and Redis behind an
ACL user, on a real local Ray, redis-server and gRPC; then no secret in any log; weights only from
safetensors.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import stat
from pathlib import Path

import grpc
import pytest

from caspo.netutil import free_port
from caspo.store.redis_server import LocalRedis
from caspo.config import load_config
from caspo.protos.v1 import mesh_pb2, mesh_pb2_grpc

pytestmark = pytest.mark.skipif(
    not any(os.access(os.path.join(p, "redis-server"), os.X_OK) for p in os.environ["PATH"].split(":")),
    reason="redis-server is not installed",
)

TOKEN = "sec-token-5b2e8d"
REDIS_PASSWORD = "redis-pw-91c4aa"
SERVER_NAME = "caspo-mesh.test"


def _certificates(d: Path) -> dict[str, Path]:
    """A CA and a server certificate for SERVER_NAME (and 127.0.0.1) signed by it, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, key, issuer, issuer_key, ca: bool):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("caspo test CA", ca_key, "caspo test CA", ca_key, ca=True)
    server = cert(SERVER_NAME, key, "caspo test CA", ca_key, ca=False)
    files = {"ca": d / "ca.crt", "cert": d / "tls.crt", "key": d / "tls.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


@pytest.fixture(scope="module")
def secure_mesh(tmp_path_factory):
    import ray

    from caspo.mesh.runner import MeshRunner

    root = tmp_path_factory.mktemp("secure")
    certs = _certificates(root)
    # Redis as the k8s manifests run it: the default user off, one ACL user limited to caspo: keys
    redis = LocalRedis(root / "redis", username="caspo", password=REDIS_PASSWORD).start()
    url = redis.url
    assert url == f"redis://caspo:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0"
    env = pytest.MonkeyPatch()
    for name, value in {
        "CASPO_AUTH_TOKEN": TOKEN,
        "CASPO_TLS_CERT": str(certs["cert"]),
        "CASPO_TLS_KEY": str(certs["key"]),
        "CASPO_TLS_CA": str(certs["ca"]),
        "CASPO_TLS_SERVER_NAME": SERVER_NAME,
    }.items():
        env.setenv(name, value)
    cfg = load_config(None, [f"mesh.run_dir={root}/mesh", "mesh.num_cpus=2", "mesh.namespace=caspo-sec", f"mesh.redis_url={url}", "pairs.batch=4"])
    runner = MeshRunner(cfg)
    try:
        runner.start(progress=False)
        session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        yield {"cfg": cfg, "runner": runner, "root": root, "certs": certs, "logs": session_logs, "redis": redis}
    finally:
        runner.stop()
        redis.stop()
        env.undo()


def test_a_round_runs_over_tls_with_the_token_and_the_redis_acl_user(secure_mesh):
    import redis

    from caspo.store.pair_store import PairStore
    from caspo.mesh.client import MeshClient
    from caspo.tasks import get_task
    from caspo.trainer.collect import collect_round

    cfg, runner = secure_mesh["cfg"], secure_mesh["runner"]
    task = get_task("arith")

    async def go():
        client = MeshClient(runner.registry_address)
        try:
            rep = await collect_round(client, task, task.problems(6, seed=4, split="train"), cfg.pairs, 3, progress=False)
            return rep, await client.registry()
        finally:
            await client.close()

    report, services = asyncio.run(go())
    assert report.added > 0 and report.steps_judged >= 18
    assert all(s["healthy"] for s in services)  # the registry's own probes went over TLS with the token
    store = PairStore(runner.redis_url)
    try:
        assert store.stats(3)[0]["total"] == report.added
        with pytest.raises(redis.exceptions.NoPermissionError):  # the ACL user sees only caspo: keys
            store.client.set("elsewhere", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):  # and runs no admin command
            store.client.flushall()
        default = redis.Redis(host="127.0.0.1", port=secure_mesh["redis"].port)
        with pytest.raises(redis.exceptions.AuthenticationError):  # the default user is off
            default.ping()
    finally:
        store.close()


def _health(address: str, channel: grpc.Channel, metadata=()) -> grpc.StatusCode:
    try:
        mesh_pb2_grpc.MeshStub(channel).Health(mesh_pb2.HealthRequest(), timeout=5, metadata=metadata)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def test_tls_and_token_are_enforced(secure_mesh):
    runner, certs = secure_mesh["runner"], secure_mesh["certs"]
    auth = (("authorization", f"Bearer {TOKEN}"),)
    opts = [("grpc.ssl_target_name_override", SERVER_NAME)]
    creds = grpc.ssl_channel_credentials(root_certificates=certs["ca"].read_bytes())
    for address in [runner.registry_address, *runner.addresses.values()]:
        with grpc.secure_channel(address, creds, options=opts) as ch:
            assert _health(address, ch, auth) == grpc.StatusCode.OK
            assert _health(address, ch) == grpc.StatusCode.UNAUTHENTICATED
            assert _health(address, ch, (("authorization", "Bearer x" + TOKEN),)) == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(address) as ch:  # plaintext to a TLS port: no connection
            assert _health(address, ch, auth) == grpc.StatusCode.UNAVAILABLE
    (secure_mesh["root"] / "other").mkdir()
    other = _certificates(secure_mesh["root"] / "other")
    with grpc.secure_channel(runner.registry_address, grpc.ssl_channel_credentials(root_certificates=other["ca"].read_bytes()), options=opts) as ch:
        assert _health(runner.registry_address, ch, auth) == grpc.StatusCode.UNAVAILABLE  # a CA it does not trust


def test_state_file_is_private_and_no_secret_is_in_any_log(secure_mesh, capfd):
    from caspo.store.pair_store import PairStore
    from caspo.errors import Unavailable

    runner, root = secure_mesh["runner"], secure_mesh["root"]
    state = Path(runner.cfg.mesh.run_dir) / "mesh.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600  # it holds the Redis URL
    # an error about Redis names the URL without its password
    with pytest.raises(Unavailable) as e:
        PairStore(f"redis://caspo:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0", connect_timeout_s=0.2).ping()
    assert REDIS_PASSWORD not in str(e.value) and "caspo:***@" in str(e.value)
    # a refused call is logged nowhere with the token it lacked or carried
    with grpc.insecure_channel(runner.registry_address) as ch:
        _health(runner.registry_address, ch, (("authorization", f"Bearer {TOKEN}-wrong"),))
    out, err = capfd.readouterr()
    texts = {"captured output": out + err}
    for d in (secure_mesh["logs"], root):
        for f in d.rglob("*"):
            if f.is_file() and f != state and f.suffix not in (".crt", ".key", ".aof", ".rdb", ".manifest") and f.stat().st_size < 50 * 2**20:
                texts[str(f)] = f.read_text(errors="replace")
    assert len(texts) > 10, sorted(texts)  # the Ray session's logs were found
    for name, text in texts.items():
        for secret in (TOKEN, REDIS_PASSWORD):
            assert secret not in text, f"{secret!r} is in {name}"


def test_weights_are_loaded_only_from_safetensors(tmp_path):
    """A checkpoint whose weights are a pickle is refused, and the pickle never runs."""
    import pickle
    import shutil

    from caspo.models.base import ModelLoadError
    from caspo.models.hf import HFBackend
    from caspo.models.tiny import resolve_tiny

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    model = tmp_path / "model"
    shutil.copytree(resolve_tiny(), model)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelLoadError, match="cannot load a model"):
        HFBackend(str(model))
    assert not marker.exists()
