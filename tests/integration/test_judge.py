"""critic.kind judge: a real model verifies steps through the Critic service over real gRPC on loopback.

P(yes) is checked against the model's own teacher-forced log-probabilities of the two answers, the
threshold against both ends, the reference step against what the model writes greedily, and the cache
against the backend's call count.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from caspo.config import CriticConfig
from caspo.core.confidence import verdict_probability
from caspo.models.hf import HFBackend
from caspo.models.prompting import prompter_for_backend
from caspo.models.worker import ModelWorker
from caspo.protos.v1 import critic_pb2, critic_pb2_grpc
from caspo.services import critic_servicer as critic_service
from caspo.tasks import get_task
from caspo.tasks.critic import JUDGE_SYSTEM, JudgeCritic, JudgeItem, judge_question
from tests.integration.test_services import CountingBackend, serving

ITEMS = [("", "12+7*3", [], "7*3=21; 12+21"), ("", "12+7*3", [], "7*3=20; 12+20"), ("", "12+7*3", ["7*3=21; 12+21"], "12+21=33")]


@pytest.fixture(scope="module")
def backend():
    return CountingBackend(HFBackend("tiny"))


def _request(items, scope=""):
    return critic_pb2.JudgeRequest(
        items=[critic_pb2.JudgeItem(problem_id=pid, question=q, prefix=list(p), step=s) for pid, q, p, s in items], scope=scope
    )


def _critic(backend, threshold):
    prompter = prompter_for_backend(backend, get_task("arith"))
    return JudgeCritic(ModelWorker(backend), prompter.chat, prompter, threshold), prompter


def test_p_yes_is_the_models_renormalised_yes_probability_and_cache_is_per_scope(backend):
    critic, prompter = _critic(backend, 0.5)

    async def main():
        servicer = critic_service.CriticServicer(critic, CriticConfig())
        async with serving((critic_service.add_to_server, servicer)) as ch:
            stub = critic_pb2_grpc.CriticStub(ch)
            r = await stub.Judge(_request(ITEMS, scope="round:1"))
            calls = backend.answer_calls + backend.sample_calls
            again = await stub.Judge(_request(ITEMS, scope="round:1"))
            assert backend.answer_calls + backend.sample_calls == calls  # all three from the cache
            assert [v.p_correct for v in again.verdicts] == [v.p_correct for v in r.verdicts]
            before = backend.answer_calls
            await stub.Judge(_request(ITEMS[:1], scope="round:2"))
            assert backend.answer_calls == before + 1  # a new round judges afresh
            assert backend.score_calls == 0  # nothing but the answer position is scored
            return r

    r = asyncio.run(main())
    assert r.critic == f"judge:{backend.path}"
    prompts = [prompter.chat(JUDGE_SYSTEM, judge_question(q, p, s)) for _, q, p, s in ITEMS]
    # the judge's one-position request equals the full teacher-forced scoring of prompt + answer it replaced
    scores = backend.inner.score_steps(prompts * 2, ["Yes"] * 3 + ["No"] * 3)
    for i, v in enumerate(r.verdicts):
        want = verdict_probability(scores[i].token_logprobs[0], scores[3 + i].token_logprobs[0])
        assert 0.0 < want < 1.0 and math.isclose(v.p_correct, want, rel_tol=1e-4)
        assert v.correct == (want >= 0.5)
        assert f"{want:.3f}" in v.reason


def test_threshold_decides_and_wrong_steps_get_the_judges_reference(backend):
    items = [JudgeItem(pid, q, tuple(p), s) for pid, q, p, s in ITEMS]
    everything, _ = _critic(backend, 0.0)
    nothing, prompter = _critic(backend, 1.0)
    ok = asyncio.run(everything.judge_many(items))
    bad = asyncio.run(nothing.judge_many(items))
    assert all(v.correct and v.reference == it.step for v, it in zip(ok, items))
    assert not any(v.correct for v in bad)
    greedy = backend.inner.sample_steps([prompter.text(it.question, it.prefix) for it in items], 1, 0.0)
    assert [v.reference for v in bad] == [g[0].text for g in greedy]
    assert all(v.reference for v in bad)


def test_a_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="critic.threshold must be in"):
        JudgeCritic(None, None, None, 1.5)
