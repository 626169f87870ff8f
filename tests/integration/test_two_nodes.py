"""The mesh over two Ray nodes on this machine (Ray's ``cluster_utils.Cluster``: a head and a second
node, each its own raylet with its own custom resources, as the k8s worker groups are started with
``rayStartParams.resources``), services placed by ``mesh.placement``.

A data round completes with the generator's replica on the second node and the scorer and critic on
the head. Then the second node is removed mid-round (its raylet and workers killed, not drained): no
node has the ``generator`` resource, so the replica waits; a new node with that resource joins, Ray
restarts the replica there, and the round completes. Redis still holds every pair acknowledged before
the failure, and the interrupted round's pairs exactly once each.

GPUs are Ray's logical ones (``num_gpus`` of a node; no CUDA here): the Qwen config's placement with two
generator replicas on the second node, each asking for one GPU (``mesh.gpus``), and the scorer asking for
one on the head. Each GPU service holds the GPU ids it asked for, distinct on its node, and its process
sees only those in ``CUDA_VISIBLE_DEVICES``; the services that hold no model hold no GPU."""

from __future__ import annotations

import asyncio
import shutil
import threading
import warnings
from pathlib import Path

import psutil
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from caspo.config import load_config
from caspo.core.pairs import pair_key
from caspo.mesh.client import MeshClient
from caspo.mesh.runner import MeshRunner
from caspo.store.pair_store import PairStore
from caspo.tasks import get_task
from caspo.trainer.collect import collect_round, make_pairs

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

ROOT = Path(__file__).resolve().parents[2]
# the real config's placement, two replicas on one node, every model actor asking for a GPU
PLACEMENT = load_config(ROOT / "configs" / "qwen2.5-math-7b-instruct.yaml", ["model.device=cpu", "model.backend=hf"]).mesh.placement
GPUS = ["generator.replicas=2", "mesh.gpus={generator: 1, scorer: 1, critic: 1}"]
HEAD = {"num_cpus": 1, "num_gpus": 1, "resources": {"scorer": 1, "critic": 1}}
GENERATOR_NODE = {"num_cpus": 1, "num_gpus": 2, "resources": {"generator": 2}}


def _descendants(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _add_node(cluster: Cluster, attempts: int = 3, **node_args):
    """``cluster.add_node``, tried again when Ray's startup wait runs out.

    Ray gives a new raylet a fixed 30 s to register with the GCS (``ray/_private/node.py``, not
    configurable); on a loaded 2-core CI machine that wait once ran out for the head. A failed start
    is cleaned up -- the processes it spawned (this process's new direct children: GCS, raylet,
    monitors) and theirs are killed, never a worker of a node already up -- and tried again; any
    other error, or the last attempt's, is raised."""
    me = psutil.Process()
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in me.children()}
        try:
            return cluster.add_node(**node_args)
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            started = [p for p in me.children() if p.pid not in before]
            stray = started + [c for p in started for c in _descendants(p)]
            for p in stray:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(stray, timeout=10)
            warnings.warn(f"Ray node start timed out (attempt {attempt} of {attempts}); killed its {len(stray)} processes, trying again")


def _nodes_of(class_name: str) -> list[str]:
    return [a.node_id for a in list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])]


def _node_of(class_name: str) -> str:
    alive = _nodes_of(class_name)
    assert len(alive) == 1, alive
    return alive[0]


def _assert_replica_gpus(runner: MeshRunner, node_id: str) -> None:
    """Both replicas on ``node_id``, one GPU each, distinct, and each sees only its own."""
    devs = ray.get(runner.actors["generator"].replica_devices.remote())
    assert [d["node_id"] for d in devs] == [node_id, node_id]
    assert all(len(d["gpu_ids"]) == 1 and d["cuda_visible_devices"] == d["gpu_ids"][0] for d in devs), devs
    assert sorted(d["gpu_ids"][0] for d in devs) == ["0", "1"]


class NodeKillingClient(MeshClient):
    """Removes ``node`` from the cluster just before the round's ``at``-th generator call. On one machine
    ``Cluster.remove_node`` kills the node's raylet but its actor processes linger until they notice, and a
    call in that window is still answered; a lost machine takes its processes with it, so the replicas on
    the node (this test's own actors) are killed with it."""

    def __init__(self, registry_address, cluster, node, at: int):
        super().__init__(registry_address)
        self.cluster, self.node, self.at = cluster, node, at
        self.generator_calls = 0
        self.removed = threading.Event()

    def _lose_node(self) -> None:
        replicas = [a.pid for a in list_actors(filters=[("class_name", "=", "ReplicaActor"), ("state", "=", "ALIVE")]) if a.node_id == self.node.node_id]
        self.cluster.remove_node(self.node, False)
        procs = []
        for pid in replicas:
            try:
                procs.append(psutil.Process(pid))
                procs[-1].kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)

    async def call(self, service, stub_cls, method, request, timeout: float = 600.0):
        if service == "generator":
            self.generator_calls += 1
            if self.generator_calls == self.at:
                await asyncio.to_thread(self._lose_node)
                self.removed.set()
        return await super().call(service, stub_cls, method, request, timeout)


def test_services_placed_by_group_and_the_generator_comes_back_on_a_new_node(tmp_path):
    cluster = Cluster()
    runner = None
    try:
        _add_node(cluster, **HEAD)
        gen_node = _add_node(cluster, **GENERATOR_NODE)
        cluster.wait_for_nodes(timeout=120)  # a retried start may leave a dead node for the GCS to notice
        ray.init(address=cluster.address, namespace="caspo-two-nodes", include_dashboard=False, logging_level="WARNING")
        cfg = load_config(None, [f"mesh.run_dir={tmp_path / 'mesh'}", "mesh.namespace=caspo-two-nodes", f"mesh.placement={PLACEMENT}", *GPUS, "pairs.batch=4", "pairs.max_steps=6"])
        assert cfg.mesh.placement == {"generator": {"generator": 1}, "scorer": {"scorer": 1}, "critic": {"critic": 1}}
        runner = MeshRunner(cfg)
        runner.start(progress=False)
        head_id = ray.get_runtime_context().get_node_id()  # the driver runs on the head
        assert _nodes_of("ReplicaActor") == [gen_node.node_id] * 2
        assert _node_of("ScorerActor") == head_id and _node_of("CriticActor") == head_id
        # what placement does not pin stays on the head, not on a worker group's node that may go away
        assert _node_of("RegistryActor") == head_id and _node_of("PairStoreActor") == head_id and _node_of("GeneratorActor") == head_id
        # every GPU service holds the GPUs it asked for and sees only those; the head's model-less services hold none
        _assert_replica_gpus(runner, gen_node.node_id)
        scorer = ray.get(runner.actors["scorer"].devices.remote())
        assert (scorer["gpu_ids"], scorer["cuda_visible_devices"]) == (["0"], "0")
        for name in ("critic", "pair_store", "generator"):  # the exact critic and the pool's front hold no model
            assert ray.get(runner.actors[name].devices.remote())["gpu_ids"] == [], name

        task = get_task("arith")

        async def round_(client, k, problems):
            try:
                return await collect_round(client, task, problems, cfg.pairs, k, progress=False)
            finally:
                await client.close()

        first = asyncio.run(round_(MeshClient(runner.registry_address), 1, task.problems(8, seed=3, split="train")))
        assert first.added > 0
        store = PairStore(runner.redis_url)
        acked_first = {f["key"] for _, f in store.client.xrange(store.stream_key(1))}
        assert len(acked_first) == first.added

        # round 2: the generator's node goes away at its 3rd call; a node with the resource joins later
        client = NodeKillingClient(runner.registry_address, cluster, gen_node, at=3)
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=asyncio.run(round_(client, 2, task.problems(8, seed=4, split="train")))), daemon=True)
        t.start()
        assert client.removed.wait(300), "the round never reached its 3rd generator call"
        t.join(20)
        assert t.is_alive(), "the round finished without any node holding the generator resource"
        new_node = _add_node(cluster, **GENERATOR_NODE)
        t.join(600)
        assert not t.is_alive() and "r" in result, "the round did not complete after the new node joined"
        second = result["r"]
        assert _nodes_of("ReplicaActor") == [new_node.node_id] * 2  # restarted where the resource is
        _assert_replica_gpus(runner, new_node.node_id)

        # nothing acknowledged was lost; the interrupted round's pairs are there exactly once
        assert acked_first <= {f["key"] for _, f in store.client.xrange(store.stream_key(1))}
        keys2 = [f["key"] for _, f in store.client.xrange(store.stream_key(2))]
        expected2 = {pair_key(p) for _, p in make_pairs(second.records, cfg.pairs)[1]}
        assert len(keys2) == len(set(keys2)) and set(keys2) == expected2 and second.duplicates == 0
        store.close()
    finally:
        if runner is not None:
            runner.stop()
        ray.shutdown()
        cluster.shutdown()
