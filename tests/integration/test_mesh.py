"""The whole mesh on a real local Ray (2 CPUs), a real redis-server and real gRPC, with the tiny model."""

import asyncio
import json
import os
import time

import pytest

from caspo.config import load_config
from caspo.core.pairs import CASE_INCORRECT, CASE_UNSURE_CORRECT
from caspo.mesh.client import MeshClient
from caspo.mesh.runner import MeshRunner
from caspo.mesh.state import SERVICES
from caspo.tasks import get_task
from caspo.trainer.collect import collect_round

pytestmark = pytest.mark.skipif(not any(os.access(os.path.join(p, "redis-server"), os.X_OK) for p in os.environ["PATH"].split(":")), reason="redis-server is not installed")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mesh")
    cfg = load_config(None, [f"mesh.run_dir={run_dir}", "mesh.num_cpus=2", "mesh.namespace=caspo-test", "pairs.batch=4"])
    runner = MeshRunner(cfg)
    runner.start(progress=False)
    yield cfg, runner
    runner.stop()


def run(coro):
    return asyncio.run(coro)


async def _with_client(cfg, fn):
    client = MeshClient.from_state(cfg)
    try:
        return await fn(client)
    finally:
        await client.close()


def test_registry_lists_every_service_healthy(mesh):
    cfg, runner = mesh
    services = run(_with_client(cfg, lambda c: c.registry()))
    assert sorted(s["name"] for s in services) == sorted(SERVICES)
    assert all(s["healthy"] for s in services), services
    assert {s["name"]: s["address"] for s in services} == runner.addresses


def test_one_round_end_to_end_and_idempotent_reput(mesh):
    cfg, _ = mesh
    task = get_task("arith")
    problems = task.problems(6, seed=11, split="train")

    async def go(client):
        first = await collect_round(client, task, problems, cfg.pairs, round_=0, progress=False)
        again = await collect_round(client, task, problems, cfg.pairs, round_=0, progress=False)
        stats = await client.stats(0)
        return first, again, stats

    first, again, stats = run(_with_client(cfg, go))
    assert first.steps_judged >= len(problems) * 3  # every problem has >= 2 operations plus the answer
    assert first.critic == "exact:arith" and first.policy_version == 0
    total = sum(first.pairs.values())
    assert set(first.pairs) <= {CASE_UNSURE_CORRECT, CASE_INCORRECT}
    # every step is either a pair or a counted skip
    assert total + sum(first.skipped.values()) == first.steps_judged
    assert first.added == total and first.duplicates == 0
    # seeded sampling + exact scoring: the same round again yields the same pairs, stored once
    assert again.pairs == first.pairs and again.added == 0 and again.duplicates == total
    (r0,) = [r for r in stats.rounds if r.round == 0]
    assert r0.total == total and dict(r0.per_case) == first.pairs
    # incorrect steps always become pairs (chosen = the critic's reference)
    wrong = [r for r in first.records if not r.correct and r.step.strip()]
    assert first.pairs.get(CASE_INCORRECT, 0) == len(wrong)


def test_publish_while_requests_are_in_flight(mesh, tmp_path):
    cfg, _ = mesh
    from caspo.models.tiny import resolve_tiny

    prompts = ["Q:12+7*3-5\n", "Q:40-3*2\n"]

    async def go(client):
        calls = [client.propose(prompts, 4, 0.7) for _ in range(10)]
        reload = asyncio.sleep(0.05)

        async def do_reload():
            await reload
            return await client.publish(1, str(resolve_tiny()), tmp_path / "policy.json")

        results = await asyncio.gather(*calls, do_reload())
        after = await client.propose(prompts, 1, 0.0)
        return results, after

    results, after = run(_with_client(cfg, go))
    proposals, published = results[:-1], results[-1]
    assert published == {"generator": 1, "scorer": 1}
    assert json.loads((tmp_path / "policy.json").read_text())["version"] == 1  # what Serve watches
    assert all(len(r.candidates) == 2 and all(len(c.steps) == 4 for c in r.candidates) for r in proposals)
    assert {r.policy_version for r in proposals} <= {0, 1}
    assert after.policy_version == 1
    # back to version 0 for the other tests
    assert run(_with_client(cfg, lambda c: c.publish(0, str(resolve_tiny()), None))) == {"generator": 0, "scorer": 0}


def test_registry_after_a_service_restarts(mesh):
    import ray

    cfg, runner = mesh
    actor = runner.actors["critic"]
    old_pid = ray.get(actor.pid.remote())
    old_addr = runner.addresses["critic"]
    os.kill(old_pid, 9)
    deadline = time.time() + 90
    services = {}
    while time.time() < deadline:
        try:
            services = {s["name"]: s for s in run(_with_client(cfg, lambda c: c.registry()))}
            if services["critic"]["address"] != old_addr and services["critic"]["healthy"]:
                break
        except Exception:  # noqa: BLE001 - the registry may be mid-update
            pass
        time.sleep(0.5)
    assert services["critic"]["address"] != old_addr and services["critic"]["healthy"]
    assert services["critic"]["restarts"] == 1
    # a client resolves the new address and the service answers
    verdicts = run(_with_client(cfg, lambda c: c.judge([("", "12+7*3", [], "7*3=21; 12+21")])))
    assert verdicts.verdicts[0].correct
