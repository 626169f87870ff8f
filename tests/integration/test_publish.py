"""Publishing over the tensor transport (caspo/mesh/publisher.py) on a real local Ray: the mesh (two
generator replicas, the scorer) and a running Serve app get a new policy from the source's memory, with
the checkpoint unreadable meanwhile; a replica killed mid-broadcast and a Serve replica added later come
back on the published version from the file."""

import asyncio
import os
import shutil
import time

import pytest
import torch

from caspo.config import load_config
from caspo.mesh.client import MeshClient
from caspo.mesh.publisher import SERVE_NAMESPACE, policy_source, publish_policy, subscribers
from caspo.mesh.runner import MeshRunner
from caspo.models.hf import load_model
from caspo.models.tiny import resolve_tiny
from caspo.models.transport import plan_meta, state_checksum, weights_meta
from caspo.models.worker import replica_state
from caspo.netutil import free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import ray
    from ray import serve

    from caspo.serve.deployment import build_app, serve_options

    root = tmp_path_factory.mktemp("publish")
    overrides = [
        f"mesh.run_dir={root}/mesh", "mesh.num_cpus=2", "mesh.namespace=caspo-publish-test", "generator.replicas=2",
        "generator.batch_wait_ms=0", f"serve.policy_file={root}/policy.json", "serve.watch_interval_s=0.2",
        f"serve.http_port={free_port()}", f"serve.grpc_port={free_port()}", "serve.num_cpus=0.25",
        "publish.bucket_mb=0.5", "publish.timeout_s=10",
    ]
    cfg = load_config(None, overrides)
    ray.init(address="local", num_cpus=2, namespace=cfg.mesh.namespace, include_dashboard=False, logging_level="WARNING")
    runner = MeshRunner(cfg)
    try:
        runner.start(progress=False)
        serve.start(**serve_options(cfg))
        serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
        yield cfg, root, overrides
    finally:
        serve.shutdown()
        runner.stop()
        ray.shutdown()


def _checkpoint(root, name: str, seed: int):
    """A policy different from tiny (tiny's weights moved by seeded noise), saved as a checkpoint; its state."""
    model, tok = load_model(str(resolve_tiny()), "cpu", torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    path = root / name
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return str(path), {k: v.clone() for k, v in model.state_dict().items()}


def _states(cfg, meta=None) -> dict:
    """label -> state (version, path, disk loads, checksum) of every subscriber, asked through Ray."""
    import ray

    async def go():
        out = {}
        for label, handle, kind in await subscribers(cfg):
            ref = handle.__ray_call__.remote(replica_state, meta) if kind == "serve" else handle.state.remote(meta)
            out[label] = await ref
        return out

    return asyncio.run(go()) if ray.is_initialized() else {}


def _publish(cfg, version, path, policy_file, source, on_bucket=None):
    async def go():
        client = MeshClient.from_state(cfg)
        try:
            return await publish_policy(client, cfg, version, path, policy_file, source=source, on_bucket=on_bucket)
        finally:
            await client.close()

    return asyncio.run(go())


def test_publish_reaches_every_replica_without_reading_the_checkpoint(world):
    import ray

    cfg, root, _ = world
    path, state = _checkpoint(root, "v1", seed=1)
    source = policy_source(cfg)
    ray.get(source.hold.remote(path, state))  # what DPO's rank 0 does before it writes the checkpoint
    before = _states(cfg)
    assert set(before) == {"generator/0", "generator/1", "scorer", *[k for k in before if k.startswith("serve/")]}
    assert sum(k.startswith("serve/") for k in before) == 1
    weights = os.path.join(path, "model.safetensors")
    os.chmod(weights, 0)  # nobody can read the checkpoint while it is published
    try:
        out = _publish(cfg, 1, path, root / "policy.json", source)
    finally:
        os.chmod(weights, 0o644)
    assert out["transport"] == "collective" and out["fallback"] == [], out
    assert out["versions"] == {"generator": 1, "scorer": 1}
    assert all(r["ok"] and r["version"] == 1 for r in out["broadcast"]["subscribers"].values())
    assert ray.get(source.stats.remote())["disk_reads"] == 0
    meta = [[m.name, list(m.shape), m.dtype] for m in weights_meta(state)]
    assert out["broadcast"]["checksum"] == state_checksum(state, plan_meta({"meta": meta}))
    after = _states(cfg, meta)
    for label, s in after.items():
        assert s["version"] == 1, label
        assert s["disk_loads"] == before[label]["disk_loads"], f"{label} read a checkpoint from disk"
        assert s["checksum"] == out["broadcast"]["checksum"], label  # what it serves is what the trainer had
    # the record for replicas that missed it
    assert (root / "policy.json").read_text().count('"version": 1') == 1


def test_a_replica_killed_mid_broadcast_and_a_later_serve_replica_come_back_on_it(world):
    import ray
    from ray import serve

    from caspo.config import load_config as load
    from caspo.serve.deployment import build_app

    cfg, root, overrides = world
    path, state = _checkpoint(root, "v2", seed=2)
    source = policy_source(cfg)
    ray.get(source.hold.remote(path, state))
    victim = ray.get(ray.get_actor("caspo-generator", namespace=cfg.mesh.namespace).replica_handles.remote())[0]
    old_pid = ray.get(victim.pid.remote())

    def kill_after_first_bucket(b, victim=victim):
        if b == 0:
            ray.kill(victim, no_restart=False)  # Ray restarts it: it must come back on v2

    out = _publish(cfg, 2, path, root / "policy.json", source, on_bucket=kill_after_first_bucket)
    assert out["broadcast"]["error"] or not out["broadcast"]["subscribers"]["generator/0"]["ok"], out
    assert "generator/0" in out["fallback"]
    assert out["versions"]["generator"] == 2 and out["versions"]["scorer"] == 2, out
    assert ray.get(victim.pid.remote()) != old_pid
    # Serve replicas whose broadcast failed take v2 from the file they watch; then one more replica
    cfg2 = load(None, [*overrides, "serve.min_replicas=2", "serve.max_replicas=2"])
    serve.run(build_app(cfg2), name=cfg2.serve.app_name, route_prefix="/")
    deadline = time.time() + 120
    states = {}
    while time.time() < deadline:
        states = _states(cfg2)
        if sum(k.startswith("serve/") for k in states) == 2 and all(s["version"] == 2 for s in states.values()):
            break
        time.sleep(0.5)
    assert sum(k.startswith("serve/") for k in states) == 2, states
    assert {k: s["version"] for k, s in states.items()} == {k: 2 for k in states}
    assert ray.util.list_named_actors(all_namespaces=True)  # Serve's replicas are where the publisher looks
    assert any(a["namespace"] == SERVE_NAMESPACE for a in ray.util.list_named_actors(all_namespaces=True))


def test_transport_buckets_convert_on_the_receiving_side_and_refuse_a_wrong_checksum():
    """Two subscribers on threads of this process (their own gloo ranks): bucket by bucket, a bf16 tensor
    arrives bit-exact and converts to the receiver's float32; a plan whose checksum is not the data's
    makes the receiver raise after the last bucket, so a backend never switches to it."""
    import threading

    from caspo.models.transport import TransportError, make_plan, open_store, plan_buckets, send_weights

    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(1000, generator=g), "b": torch.randn(300, 30, generator=g).to(torch.bfloat16), "c": torch.arange(7)}
    state["tied"] = state["a"]  # a tied tensor goes once
    plan = make_plan(state, 3, "ckpt", bucket_bytes=4096, timeout_s=30)
    assert [m[0] for m in plan["meta"]] == ["a", "b", "c"]
    assert len(plan["buckets"]) == len(plan_buckets(weights_meta(state), 4096)) >= 3

    def broadcast(plan):
        from caspo.models.transport import receive_weights

        store = open_store("127.0.0.1", 3, 30)
        plan = {**plan, "host": "127.0.0.1", "port": store.port, "world": 3, "group": f"t{plan['checksum'][:6]}"}
        got, errors = {}, {}

        def sub(rank):
            into = {"a": torch.zeros(1000), "b": torch.zeros(300, 30), "c": torch.zeros(7, dtype=torch.int64)}
            try:
                for name, t in receive_weights(plan, rank):
                    into[name].copy_(t)  # the receiver's dtype
                got[rank] = into
            except TransportError as e:
                errors[rank] = str(e)

        threads = [threading.Thread(target=sub, args=(r,)) for r in (1, 2)]
        [t.start() for t in threads]
        send_weights(state, plan, store)
        [t.join() for t in threads]
        return got, errors

    got, errors = broadcast(plan)
    assert not errors and set(got) == {1, 2}
    for into in got.values():
        assert torch.equal(into["a"], state["a"]) and torch.equal(into["c"], state["c"])
        assert into["b"].dtype == torch.float32 and torch.equal(into["b"], state["b"].float())
    got, errors = broadcast({**plan, "checksum": "0" * 64})
    assert not got and set(errors) == {1, 2} and all("checksum" in e for e in errors.values())
