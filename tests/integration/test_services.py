"""Generator, ConfidenceScorer and Critic over real gRPC (grpc.aio on loopback) with the real tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import math
from pathlib import Path

import grpc
import pytest

from caspo.tasks.critic import ExactCritic, LLMCritic, agrees
from caspo.models.worker import ModelWorker
from caspo.config import CriticConfig, GeneratorConfig, ScorerConfig
from caspo.core.steps import final_answer
from caspo.models.hf import HFBackend
from caspo.protos.v1 import (
    common_pb2,
    critic_pb2,
    critic_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    mesh_pb2,
    mesh_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
)
from caspo.services import critic_servicer as critic_service
from caspo.services import generator_servicer as generator_service
from caspo.services import mesh_servicer as health_service
from caspo.services import scorer_servicer as scorer_service
from caspo.services.server import MESSAGE_OPTIONS, new_server
from caspo.tasks import get_task
from caspo.tasks.arith import ArithTask

GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k" / "train_sample.jsonl"  # shipped with the tests
PROMPT = "Q:12+7*3\n"
GEN_CFG = GeneratorConfig(max_k=8, max_prompts=16, max_prompt_chars=64, max_steps=8)


@pytest.fixture(scope="module")
def backend():
    return HFBackend("tiny")


class CountingBackend:
    """The real backend, counting how often it is called."""

    def __init__(self, inner):
        self.inner = inner
        self.sample_calls = 0
        self.score_calls = 0
        self.answer_calls = 0

    def sample_steps(self, *args, **kwargs):
        self.sample_calls += 1
        return self.inner.sample_steps(*args, **kwargs)

    def score_steps(self, *args, **kwargs):
        self.score_calls += 1
        return self.inner.score_steps(*args, **kwargs)

    def answer_logprobs(self, *args, **kwargs):
        self.answer_calls += 1
        return self.inner.answer_logprobs(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@contextlib.asynccontextmanager
async def serving(*services):
    """A grpc.aio server on loopback hosting (add_to_server, servicer) pairs; yields a client channel."""
    server = new_server()
    for add, servicer in services:
        add(server, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=MESSAGE_OPTIONS)
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(None)


def propose(prompts, n=1, temperature=0.0, seeds=None, **kw):
    seeds = seeds or [None] * len(prompts)
    return generator_pb2.ProposeStepsRequest(
        prompts=[common_pb2.Prompt(text=p, seed=s) if s is not None else common_pb2.Prompt(text=p) for p, s in zip(prompts, seeds)],
        n=n,
        temperature=temperature,
        **kw,
    )


def test_propose_rollout_health(backend):
    async def main():
        worker = ModelWorker(backend)
        gen = generator_service.GeneratorServicer([worker], GEN_CFG)
        health = health_service.HealthServicer("generator", lambda: gen.version)
        async with serving((generator_service.add_to_server, gen), (health_service.add_to_server, health)) as ch:
            stub = generator_pb2_grpc.GeneratorStub(ch)
            r = await stub.ProposeSteps(propose([PROMPT, "Q:5+4-3\n"], n=3, temperature=0.8, seeds=[11, None]))
            assert r.policy_version == backend.version
            assert len(r.candidates) == 2
            for c in r.candidates:
                assert len(c.steps) == 3
                for s in c.steps:
                    assert s.tokens == len(s.token_entropies) == len(s.token_logprobs) > 0
                    assert all(h >= 0 for h in s.token_entropies) and all(lp <= 0 for lp in s.token_logprobs)
                    assert s.policy_version == backend.version and not s.entropy_estimate
            again = await stub.ProposeSteps(propose([PROMPT], n=3, temperature=0.8, seeds=[11]))
            assert [s.text for s in again.candidates[0].steps] == [s.text for s in r.candidates[0].steps]
            # the numbers agree up to float noise from the different batch padding
            assert list(again.candidates[0].steps[0].token_entropies) == pytest.approx(
                list(r.candidates[0].steps[0].token_entropies), abs=1e-4
            )

            ro = await stub.Rollout(generator_pb2.RolloutRequest(prompts=[common_pb2.Prompt(text=PROMPT)], temperature=0, max_steps=6))
            (traj,) = ro.trajectories
            assert 1 <= len(traj.steps) <= 6
            assert traj.finished == (final_answer(traj.steps[-1].text) is not None)
            assert all(s.policy_version == ro.policy_version == backend.version for s in traj.steps)

            mesh = mesh_pb2_grpc.MeshStub(ch)
            h = await mesh.Health(mesh_pb2.HealthRequest())
            assert h.ok and h.service == "generator" and h.policy_version == backend.version
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await mesh.Registry(mesh_pb2.RegistryRequest())
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED

    asyncio.run(main())


def test_micro_batcher_merges_concurrent_requests(backend):
    async def main():
        counting = CountingBackend(backend)
        worker = ModelWorker(counting, batch_wait_ms=50)
        gen = generator_service.GeneratorServicer([worker], GEN_CFG)
        scorer = scorer_service.ScorerServicer(worker, ScorerConfig())
        async with serving((generator_service.add_to_server, gen), (scorer_service.add_to_server, scorer)) as ch:
            stub = generator_pb2_grpc.GeneratorStub(ch)
            prompts = [f"Q:{10 + i}+{i + 2}*2\n" for i in range(6)]
            rs = await asyncio.gather(
                *(stub.ProposeSteps(propose([p], n=2, temperature=0.7, seeds=[100 + i])) for i, p in enumerate(prompts))
            )
            assert counting.sample_calls < len(prompts)
            for r in rs:
                assert len(r.candidates) == 1 and len(r.candidates[0].steps) == 2
            # a seeded prompt samples the same alone as it did merged with the others
            alone = await stub.ProposeSteps(propose([prompts[3]], n=2, temperature=0.7, seeds=[103]))
            assert [s.text for s in alone.candidates[0].steps] == [s.text for s in rs[3].candidates[0].steps]

            sstub = scorer_pb2_grpc.ConfidenceScorerStub(ch)
            items = [scorer_pb2.ScoreItem(prompt=p, step="7*3=21; 12+21") for p in prompts[:4]]
            srs = await asyncio.gather(*(sstub.Score(scorer_pb2.ScoreRequest(items=[it])) for it in items))
            assert counting.score_calls < len(items)
            assert all(len(s.scores) == 1 and len(s.scores[0].token_entropies) > 0 for s in srs)
        assert worker.in_flight == 0

    asyncio.run(main())


def test_an_over_long_item_in_a_merged_batch_is_refused_alone(backend):
    """The tiny model has 512 positions: a prompt of 600 characters (tokens) does not fit. Merged with
    short ones into one backend call, it is refused alone (marked over_context) and they are served."""
    long_prompt = "Q:" + "1+" * 300 + "1\n"
    assert backend.max_model_len == 512 and len(backend.tokenizer.encode(long_prompt)) > 512

    async def main():
        counting = CountingBackend(backend)
        worker = ModelWorker(counting, batch_wait_ms=200)
        gen = generator_service.GeneratorServicer([worker], GeneratorConfig(max_prompt_chars=1000))
        scorer = scorer_service.ScorerServicer(worker, ScorerConfig())
        async with serving((generator_service.add_to_server, gen), (scorer_service.add_to_server, scorer)) as ch:
            stub = generator_pb2_grpc.GeneratorStub(ch)
            short = [f"Q:{10 + i}+{i + 2}*2\n" for i in range(3)]
            rs = await asyncio.gather(
                *(stub.ProposeSteps(propose([p], n=2, temperature=0.7, seeds=[i])) for i, p in enumerate(short)),
                stub.ProposeSteps(propose([long_prompt], n=2, temperature=0.7, seeds=[9])),
                stub.ProposeSteps(propose([short[0], long_prompt], n=2, temperature=0.7, seeds=[0, 9])),
            )
            assert counting.sample_calls == 1  # one merged call, without the long prompt
            for r in rs[:3]:
                assert all(s.text and not s.over_context for s in r.candidates[0].steps)
            assert [(s.text, s.ended, s.over_context, s.tokens) for s in rs[3].candidates[0].steps] == [("", True, True, 0)] * 2
            mixed = rs[4].candidates
            assert [s.text for s in mixed[0].steps] == [s.text for s in rs[0].candidates[0].steps]  # same seed, same steps
            assert all(s.over_context for s in mixed[1].steps)

            sstub = scorer_pb2_grpc.ConfidenceScorerStub(ch)
            items = [scorer_pb2.ScoreItem(prompt=p, step="7*3=21; 12+21") for p in (*short, long_prompt)]
            srs = await asyncio.gather(*(sstub.Score(scorer_pb2.ScoreRequest(items=[it])) for it in items))
            assert counting.score_calls == 1
            assert all(len(s.scores[0].token_entropies) > 0 and not s.scores[0].over_context for s in srs[:3])
            assert srs[3].scores[0].over_context and len(srs[3].scores[0].token_entropies) == 0

            # a judge's answer log-probs (one token after the prompt): the long prompt gets an empty row
            rows = await asyncio.gather(*(worker.answer_logprobs([p], ("Yes", "No")) for p in (*short, long_prompt)))
            assert counting.answer_calls == 1 and [len(r[0]) for r in rows] == [2, 2, 2, 0]
        assert worker.refused == 4 and worker.in_flight == 0

    asyncio.run(main())


def test_reload_while_requests_in_flight(backend):
    async def main():
        worker = ModelWorker(backend)
        gen = generator_service.GeneratorServicer([worker], GEN_CFG)
        old, new = backend.version, backend.version + 2
        async with serving((generator_service.add_to_server, gen)) as ch:
            stub = generator_pb2_grpc.GeneratorStub(ch)
            calls = [
                asyncio.ensure_future(stub.ProposeSteps(propose([PROMPT, f"Q:{i}+3*2\n"], n=4, temperature=0.7)))
                for i in range(8)
            ]
            for _ in range(2000):  # until the server has accepted a request
                if worker.in_flight:
                    break
                await asyncio.sleep(0.005)
            assert worker.in_flight > 0
            rr = await stub.Reload(generator_pb2.ReloadRequest(path="tiny", version=new))
            assert rr.policy_version == new and rr.replicas == 1
            rs = await asyncio.gather(*calls)  # none fails
            for r in rs:
                assert r.policy_version in (old, new)
                assert all(s.policy_version == r.policy_version for c in r.candidates for s in c.steps)
            later = await stub.ProposeSteps(propose([PROMPT]))
            assert later.policy_version == new and later.candidates[0].steps[0].policy_version == new
            pinned = await stub.ProposeSteps(propose([PROMPT], policy_version=new))
            assert pinned.policy_version == new

    asyncio.run(main())


def test_scorer_reload_swaps_the_policy_it_scores_with(backend):
    async def main():
        worker = ModelWorker(backend)
        scorer = scorer_service.ScorerServicer(worker, ScorerConfig())
        old, new = backend.version, backend.version + 3
        async with serving((scorer_service.add_to_server, scorer)) as ch:
            stub = scorer_pb2_grpc.ConfidenceScorerStub(ch)
            item = scorer_pb2.ScoreItem(prompt=PROMPT, step="7*3=21; 12+21")
            assert (await stub.Score(scorer_pb2.ScoreRequest(items=[item]))).policy_version == old
            rr = await stub.Reload(generator_pb2.ReloadRequest(path="tiny", version=new))
            assert rr.policy_version == new and rr.replicas == 1
            after = await stub.Score(scorer_pb2.ScoreRequest(items=[item], policy_version=new))
            assert after.policy_version == new and len(after.scores[0].token_entropies) > 0
            await stub.Reload(generator_pb2.ReloadRequest(path="tiny", version=old))  # the module's backend is shared

    asyncio.run(main())


def test_scorer_matches_sampler_entropies(backend):
    async def main():
        worker = ModelWorker(backend)
        gen = generator_service.GeneratorServicer([worker], GEN_CFG)
        scorer = scorer_service.ScorerServicer(worker, ScorerConfig())
        async with serving((generator_service.add_to_server, gen), (scorer_service.add_to_server, scorer)) as ch:
            r = await generator_pb2_grpc.GeneratorStub(ch).ProposeSteps(propose([PROMPT], n=1, temperature=0))
            step = r.candidates[0].steps[0]
            assert step.text and not step.ended
            s = await scorer_pb2_grpc.ConfidenceScorerStub(ch).Score(
                scorer_pb2.ScoreRequest(items=[scorer_pb2.ScoreItem(prompt=PROMPT, step=step.text)])
            )
            (score,) = s.scores
            assert s.policy_version == backend.version
            assert len(score.token_entropies) == len(step.token_entropies)
            for a, b in zip(score.token_entropies, step.token_entropies):
                assert abs(a - b) < 1e-4
            for a, b in zip(score.token_logprobs, step.token_logprobs):
                assert abs(a - b) < 1e-4
            mean = sum(score.token_entropies) / len(score.token_entropies)
            assert score.mean_entropy == pytest.approx(mean, abs=1e-5)
            assert score.confidence == pytest.approx(-mean, abs=1e-5)
            assert score.multiplier == pytest.approx(math.exp(-mean), abs=1e-5)

    asyncio.run(main())


def judge_request(*items):
    return critic_pb2.JudgeRequest(
        items=[critic_pb2.JudgeItem(problem_id=pid, question=q, prefix=list(prefix), step=step) for pid, q, prefix, step in items]
    )


def test_exact_critic(backend):
    async def main():
        servicer = critic_service.CriticServicer(ExactCritic(ArithTask()), CriticConfig())
        async with serving((critic_service.add_to_server, servicer)) as ch:
            stub = critic_pb2_grpc.CriticStub(ch)
            r = await stub.Judge(
                judge_request(
                    ("", "12+7*3", [], "7*3=21; 12+21"),
                    ("", "12+7*3", [], "7*3=22; 12+22"),
                    ("", "12+7*3", ["7*3=21; 12+21"], "12+21=33"),
                    ("", "12+7*3", ["7*3=21; 12+21", "12+21=33"], "#### 33"),
                )
            )
            assert r.critic == "exact:arith"
            assert [v.correct for v in r.verdicts] == [True, False, True, True]
            assert r.verdicts[1].reference == "7*3=21; 12+21" and r.verdicts[1].reason

    asyncio.run(main())


def test_exact_critic_gsm8k_problem_ids():
    task = get_task("gsm8k", str(GSM8K))
    problem = task.all_problems("any")[0]

    async def main():
        servicer = critic_service.CriticServicer(ExactCritic(task), CriticConfig())
        async with serving((critic_service.add_to_server, servicer)) as ch:
            stub = critic_pb2_grpc.CriticStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Judge(judge_request(("gsm8k-99999999", "How many?", [], "#### 3")))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert "problem_id" in e.value.details() and "gsm8k-99999999" in e.value.details()
            r = await stub.Judge(judge_request((problem.id, problem.question, [], problem.gold_steps[0])))
            assert r.critic == "exact:gsm8k" and r.verdicts[0].correct

    asyncio.run(main())


def test_llm_critic_with_tiny_model(backend):
    async def main():
        worker = ModelWorker(backend)
        critic = LLMCritic(worker, ArithTask().prompt)
        servicer = critic_service.CriticServicer(critic, CriticConfig())
        async with serving((critic_service.add_to_server, servicer)) as ch:
            items = [("", "12+7*3", [], "7*3=21; 12+21"), ("", "12+7*3", [], "7*3=20; 12+20"), ("", "12+7*3", ["7*3=21; 12+21"], "12+21=33")]
            r = await critic_pb2_grpc.CriticStub(ch).Judge(judge_request(*items))
            assert r.critic == f"llm:{backend.path}"
            assert len(r.verdicts) == 3
            for (_, _, _, step), v in zip(items, r.verdicts):
                assert v.reference and v.reason
                assert v.correct == agrees(step, v.reference)[0]
            assert not (r.verdicts[0].correct and r.verdicts[1].correct)  # 19 and 20 cannot both match

    asyncio.run(main())


def test_error_paths_name_the_field_and_service_keeps_serving(backend):
    async def main():
        worker = ModelWorker(backend)
        gen = generator_service.GeneratorServicer([worker], GEN_CFG)
        scorer = scorer_service.ScorerServicer(worker, ScorerConfig())
        critic = critic_service.CriticServicer(ExactCritic(ArithTask()), CriticConfig())
        async with serving(
            (generator_service.add_to_server, gen),
            (scorer_service.add_to_server, scorer),
            (critic_service.add_to_server, critic),
        ) as ch:
            g = generator_pb2_grpc.GeneratorStub(ch)
            s = scorer_pb2_grpc.ConfidenceScorerStub(ch)
            c = critic_pb2_grpc.CriticStub(ch)
            v = backend.version
            bad = common_pb2.Prompt
            invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
            cases = [
                (g.ProposeSteps, generator_pb2.ProposeStepsRequest(n=1), invalid, "prompts"),
                (g.ProposeSteps, propose([PROMPT], n=0, temperature=0.7), invalid, "n must be in"),
                (g.ProposeSteps, propose([PROMPT], n=GEN_CFG.max_k + 1, temperature=0.7), invalid, f"n must be in [1, {GEN_CFG.max_k}]"),
                (g.ProposeSteps, propose([PROMPT], n=1, temperature=-0.5), invalid, "temperature"),
                (g.ProposeSteps, propose([PROMPT], n=2, temperature=0), invalid, "n must be 1 when temperature is 0"),
                (g.ProposeSteps, propose(["x" * (GEN_CFG.max_prompt_chars + 1)]), invalid, f"prompts[0].text is {GEN_CFG.max_prompt_chars + 1} characters"),
                (g.ProposeSteps, propose([PROMPT], policy_version=v + 7), not_found, f"policy_version {v + 7} is not loaded (current: {v})"),
                (g.Rollout, generator_pb2.RolloutRequest(prompts=[bad(text=PROMPT)], max_steps=0), invalid, "max_steps"),
                (g.Reload, generator_pb2.ReloadRequest(path="", version=1), invalid, "path"),
                (g.Reload, generator_pb2.ReloadRequest(path="/nonexistent/model-dir", version=1), invalid, "/nonexistent/model-dir"),
                # a hub id is refused before any download attempt (found by the long fuzz run: it hung)
                (g.Reload, generator_pb2.ReloadRequest(path="some-org/some-model", version=1), invalid, "not a model directory"),
                (s.Score, scorer_pb2.ScoreRequest(), invalid, "items"),
                (s.Score, scorer_pb2.ScoreRequest(items=[scorer_pb2.ScoreItem(prompt=PROMPT, step="")]), invalid, "items[0].step"),
                (s.Score, scorer_pb2.ScoreRequest(items=[scorer_pb2.ScoreItem(prompt=PROMPT, step="1+1=2")], policy_version=v + 7), not_found, "policy_version"),
                (s.Reload, generator_pb2.ReloadRequest(path="", version=1), invalid, "path"),
                (s.Reload, generator_pb2.ReloadRequest(path="/nonexistent/model-dir", version=1), invalid, "not a model directory on the scorer's node"),
                (c.Judge, judge_request(("", "12+7*3", [], "")), invalid, "items[0].step"),
                (c.Judge, judge_request(("", "", [], "1+1=2")), invalid, "items[0].question"),
                (c.Judge, judge_request(("", "twelve plus seven", [], "1+1=2")), invalid, "items[0].question"),
            ]
            for method, request, code, field in cases:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await method(request)
                assert e.value.code() == code, (field, e.value.details())
                assert field in e.value.details(), (field, e.value.details())
            assert worker.version == v  # the failed reload left the policy alone
            r = await g.ProposeSteps(propose([PROMPT]))
            assert r.candidates[0].steps[0].text and r.policy_version == v
            sr = await s.Score(scorer_pb2.ScoreRequest(items=[scorer_pb2.ScoreItem(prompt=PROMPT, step="7*3=21; 12+21")]))
            assert len(sr.scores[0].token_entropies) > 0
            cr = await c.Judge(judge_request(("", "12+7*3", [], "7*3=21; 12+21")))
            assert cr.verdicts[0].correct

    asyncio.run(main())
