"""The CASPO loop over a real mesh (Ray with 2 CPUs, redis-server, gRPC) on a handful of problems."""

import asyncio
import json
import os
import shutil
import time

import pytest

from caspo.config import load_config
from caspo.mesh.client import MeshClient
from caspo.mesh.runner import MeshRunner
from caspo.netutil import free_port
from caspo.trainer.loop import ROW_KEYS, RoundController, store_round
from tests.prom import fast_metrics_export

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

SMALL = [
    "loop.questions=8",
    "loop.eval_n=8",
    "loop.cat_k=2",
    "pairs.batch=8",
    "dpo.epochs=1",
    "dpo.num_workers=2",
    "dpo.cpus_per_worker=0.5",
    "dpo.per_device_batch_size=8",
]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    port = free_port()
    cfg = load_config(None, [f"mesh.run_dir={root}/mesh", "mesh.num_cpus=2", "mesh.namespace=caspo-loop-test", f"loop.runs_dir={root}", f"mesh.metrics_export_port={port}", *SMALL])
    runner = MeshRunner(cfg)
    with fast_metrics_export():
        runner.start(progress=False)
    yield cfg, runner
    runner.stop()


def _cfg(mesh_cfg, run: str, *extra: str):
    over = [f"mesh.run_dir={mesh_cfg.mesh.run_dir}", "mesh.namespace=caspo-loop-test", f"loop.runs_dir={mesh_cfg.loop.runs_dir}", f"loop.run={run}", *SMALL, *extra]
    return load_config(None, over)


def _store_stats(redis_url, run, k):
    from caspo.store.pair_store import PairStore

    store = PairStore(redis_url)
    r = store_round(run, k)
    stats = {s["round"]: s for s in store.stats()}
    return stats.get(r, {"total": 0}), store.pending(r, "trainer")


def test_one_round_end_to_end_and_publication(mesh):
    mesh_cfg, runner = mesh
    cfg = _cfg(mesh_cfg, "one", "serve.promotion=always")
    ctl = RoundController(cfg.to_dict(), runner.registry_address, runner.redis_url)
    rows = asyncio.run(ctl.run(1, progress=False))
    assert rows[1]["promotion"]["promote"] and rows[1]["promotion"]["reason"] == "promotion: always"
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["cat_accuracy"] <= 1.0
    assert rows[1]["policy_version"] == 1 and sum(rows[1]["pairs"].values()) > 0
    run_dir = ctl.run_dir
    assert (run_dir / "policies" / "v1" / "model.safetensors").exists()
    assert json.loads((run_dir / "policy.json").read_text())["version"] == 1
    # published over the transport from what DPO's rank 0 handed the source: no checkpoint read on the path
    published = ctl.state.info(1, "publish")
    assert published["transport"] == "collective" and published["fallback"] == [], published
    import ray

    assert ray.get(ctl.source.stats.remote())["disk_reads"] == 0
    # every pair of the round was read by the trainer and acknowledged
    total, pending = _store_stats(runner.redis_url, "one", 1)
    train = json.loads((run_dir / "round1_train.json").read_text())
    assert train["pairs_read"] == total["total"] == sum(rows[1]["pairs"].values()) and pending == 0

    async def after(client):
        services = {s["name"]: s for s in await client.registry()}
        resp = await client.propose(["Q:12+7*3\n"], 1, 0.0)
        score = await client.score(["Q:12+7*3\n"], ["7*3=21; 12+21"])
        return services, resp, score

    client = MeshClient(runner.registry_address)
    services, resp, score = asyncio.run(_closing(client, after))
    assert services["generator"]["policy_version"] == 1 and services["scorer"]["policy_version"] == 1
    assert resp.policy_version == 1 and score.policy_version == 1
    # a second run of the same command has nothing left to do
    again = asyncio.run(RoundController(cfg.to_dict(), runner.registry_address, runner.redis_url).run(1, progress=False))
    assert again == rows


async def _closing(client, fn):
    try:
        return await fn(client)
    finally:
        await client.close()


def test_resume_after_the_controller_is_killed_mid_round(mesh):
    import ray

    mesh_cfg, runner = mesh
    cfg = _cfg(mesh_cfg, "killed")
    Ctl = ray.remote(num_cpus=0)(RoundController)
    actor = Ctl.remote(cfg.to_dict(), runner.registry_address, runner.redis_url)
    ref = actor.run.remote(1, False)
    state_file = os.path.join(cfg.loop.runs_dir, "killed", "state.json")
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until round 1's pairs are stored, then kill during training
        if os.path.exists(state_file) and "pairs" in json.load(open(state_file))["done"].get("1", {}):
            break
        time.sleep(0.2)
    else:
        pytest.fail("round 1 never finished its pairs stage")
    ray.kill(actor)
    with pytest.raises(Exception):
        ray.get(ref)
    stored_before, _ = _store_stats(runner.redis_url, "killed", 1)
    pairs_done = json.load(open(state_file))["done"]["1"]["pairs"]

    rows = asyncio.run(RoundController(cfg.to_dict(), runner.registry_address, runner.redis_url).run(1, progress=False))
    assert [r["round"] for r in rows] == [0, 1]
    stored_after, pending = _store_stats(runner.redis_url, "killed", 1)
    state = json.load(open(state_file))["done"]["1"]
    # no pair lost or added twice, every one trained on once and acknowledged
    assert stored_after["total"] == stored_before["total"] == sum(pairs_done["pairs"].values())
    assert state["pairs"] == pairs_done  # the pairs stage did not run again
    assert state["train"]["pairs_read"] == stored_after["total"] and pending == 0


def test_crew_pairs_one_round_end_to_end_with_drift(mesh):
    """``--pairs crew``: K whole solutions per question, the most answer-confident right one against the
    most answer-confident wrong one, stored, trained on, and the round's drift in its row."""
    from caspo.core.steps import final_answer, split_steps
    from caspo.tasks import get_task
    from caspo.trainer.collect import solution_pairs

    mesh_cfg, runner = mesh
    cfg = load_config(None, [f"mesh.run_dir={mesh_cfg.mesh.run_dir}", "mesh.namespace=caspo-loop-test", f"loop.runs_dir={mesh_cfg.loop.runs_dir}", "loop.run=crew", *SMALL, "loop.questions=16", "loop.pairs=crew", "loop.drift=true"])
    task = get_task("arith")
    problems = task.problems(16, seed=3, split="train")

    async def made(client):
        return await solution_pairs(client, task, problems, cfg.pairs, 1, "crew", progress=False)

    rows, skipped, _ = asyncio.run(_closing(MeshClient(runner.registry_address), made))
    assert len(rows) + sum(skipped.values()) == 16 and rows, (rows, skipped)
    by_id = {p.id: p for p in problems}
    for pair in rows:
        assert pair.case == "crew" and 0.0 < pair.confidence <= 1.0  # the rejected solution's answer confidence
        assert task.answer_correct(by_id[pair.question_id], final_answer(split_steps(pair.chosen)[-1]))
        assert not task.answer_correct(by_id[pair.question_id], final_answer(split_steps(pair.rejected)[-1]))

    ctl = RoundController(cfg.to_dict(), runner.registry_address, runner.redis_url)
    out = asyncio.run(ctl.run(1, progress=False))
    assert set(out[1]["pairs"]) == {"crew"} and out[1]["mode"] == "crew"
    drift = out[1]["drift"]
    assert drift["drift_pairs"] == out[1]["pairs"]["crew"]
    assert 0.0 < drift["weight_change"] < 1.0 and drift["kl_heldout"] >= 0.0
    assert 0.0 <= drift["chosen_fell"] <= 1.0
    assert out[0]["drift"] is None


def _tb_scalars(directory) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every TensorBoard event file under ``directory`` (TFRecord framing:
    length, its CRC, the Event proto, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def test_a_collapsed_round_keeps_serving_the_old_version_and_says_why(mesh):
    """A learning rate that wrecks the policy: the round trains and goes to the generators, but the gate
    (not_worse on accuracy and ECE) keeps Serve on v0 and writes why. The same round's metrics are found
    on Ray's real metrics endpoint with the values it caused, and its TensorBoard files under tb/."""
    from tests.prom import find, wait_for

    mesh_cfg, runner = mesh
    cfg = _cfg(mesh_cfg, "collapse", "loop.eval_n=16", "dpo.learning_rate=0.02", "dpo.epochs=2")
    assert cfg.serve.promotion == "not_worse"
    ctl = RoundController(cfg.to_dict(), runner.registry_address, runner.redis_url)
    rows = asyncio.run(ctl.run(1, progress=False))
    assert rows[0]["accuracy"] - rows[1]["accuracy"] >= 0.4, "the learning rate did not collapse the policy"
    gate = rows[1]["promotion"]
    assert not gate["promote"] and gate["serving"] == 0 and gate["compared_with"] == 0
    assert gate["figures"]["accuracy"]["verdict"] == "worse"
    assert gate["reason"].startswith("worse than serving on 16 held-out problems: accuracy ")
    run_dir = ctl.run_dir
    served = json.loads((run_dir / "policy.json").read_text())
    assert served["version"] == 0 and served["decision"]["reason"] == gate["reason"]
    logged = [json.loads(x) for x in (run_dir / "promotions.jsonl").read_text().splitlines()]
    assert [(e["candidate"], e["promote"]) for e in logged] == [(1, False)]
    train = json.loads((run_dir / "round1_train.json").read_text())

    # the generators got v1 all the same (the next round needs it)
    async def versions(client):
        return {s["name"]: s["policy_version"] for s in await client.registry()}

    assert asyncio.run(_closing(MeshClient(runner.registry_address), versions))["generator"] == 1

    # Prometheus: Ray's real endpoint
    pairs = rows[1]["pairs"]
    case = max(pairs, key=pairs.get)
    stage = json.loads((run_dir / "state.json").read_text())["done"]["1"]
    wanted = {
        "requests": ("ray_caspo_grpc_requests_total", {"service": "Generator", "method": "ProposeSteps"}, lambda v: v and max(v) >= 1),
        "scorer_version": ("ray_caspo_policy_version", {"service": "scorer"}, lambda v: 1 in v),  # the round's publish (over the transport: no Reload RPC)
        "latency": ("ray_caspo_grpc_latency_seconds_count", {"service": "Critic", "method": "Judge"}, lambda v: v and max(v) >= 1),
        "batches": ("ray_caspo_worker_batch_size_count", {"worker": "generator", "kind": "sample"}, lambda v: v and max(v) >= 1),
        "queue": ("ray_caspo_worker_queue_depth", {"worker": "generator"}, lambda v: bool(v)),
        "scorer": ("ray_caspo_worker_batch_size_count", {"worker": "scorer", "kind": "score"}, lambda v: v and max(v) >= 1),
        "pairs": ("ray_caspo_pairs_stored", {"run": "collapse", "round": 1, "case": case}, lambda v: v == [pairs[case]]),
        "stage": ("ray_caspo_round_stage_seconds", {"run": "collapse", "round": 1, "stage": "pairs"}, lambda v: v == [stage["pairs"]["seconds"]]),
        "train": ("ray_caspo_round_stage_seconds", {"run": "collapse", "round": 1, "stage": "train"}, lambda v: v == [train["stage_seconds"]]),
        "loss": ("ray_caspo_dpo_loss", {"run": "collapse", "round": 1}, lambda v: len(v) == 1 and abs(v[0] - train["train_loss"]) < 1e-6),
        "version": ("ray_caspo_policy_version", {"service": "generator"}, lambda v: 1 in v),
        "kept": ("ray_caspo_promotions_total", {"run": "collapse", "decision": "kept"}, lambda v: v == [1.0]),
        "serving": ("ray_caspo_serving_policy_version", {"run": "collapse"}, lambda v: v == [0.0]),
    }
    samples, missing = wait_for(mesh_cfg.mesh.metrics_export_port, wanted)
    assert not missing, {k: find(samples, wanted[k][0]) for k in missing}

    # TensorBoard: TRL's DPO curves and the loop's per-round figures with their intervals
    dpo = _tb_scalars(run_dir / "tb" / "dpo" / "round1")
    assert any(tag.endswith("loss") for tag in dpo), sorted(dpo)
    loop = _tb_scalars(run_dir / "tb" / "loop")
    for k in (0, 1):
        assert loop["eval/accuracy"][k] == pytest.approx(rows[k]["accuracy"])
        assert loop["eval/accuracy_ci_low"][k] == pytest.approx(rows[k]["accuracy_ci"][0])
        assert loop["eval/accuracy_ci_high"][k] == pytest.approx(rows[k]["accuracy_ci"][1])
    assert loop["serve/promoted"] == {1: 0.0} and loop["serve/serving_version"] == {1: 0.0}
