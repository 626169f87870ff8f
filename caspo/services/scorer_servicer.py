"""The ConfidenceScorer gRPC service: exact step confidence by one batched teacher-forced pass.

Concurrent Score requests are merged by the worker's micro-batcher into one prefill pass. ``Reload``
loads a published policy, as the generator's does.
"""

from __future__ import annotations

import asyncio

import grpc

from caspo.config import ScorerConfig
from caspo.core.confidence import mean_entropy, step_confidence, step_multiplier
from caspo.errors import BadRequest, check_text
from caspo.protos.v1 import generator_pb2, scorer_pb2, scorer_pb2_grpc
from caspo.services.policy import check_version, reload_path, reload_workers
from caspo.services.server import rpc


class ScorerServicer(scorer_pb2_grpc.ConfidenceScorerServicer):
    def __init__(self, worker, cfg: ScorerConfig | None = None):
        self.worker = worker  # ModelWorker-like: version, async score_steps_versioned(prompts, steps), reload
        self.cfg = cfg or ScorerConfig()
        self._reload_lock = asyncio.Lock()

    @property
    def version(self) -> int:
        return self.worker.version

    @rpc
    async def Score(self, request, context):
        items = request.items
        if not items:
            raise BadRequest("items is empty")
        if len(items) > self.cfg.max_items:
            raise BadRequest(f"items has {len(items)} entries; the limit is {self.cfg.max_items}")
        prompts, steps = [], []
        for i, it in enumerate(items):
            prompts.append(check_text(f"items[{i}].prompt", it.prompt, self.cfg.max_prompt_chars))
            steps.append(check_text(f"items[{i}].step", it.step, self.cfg.max_step_chars))
            if not it.step.strip():
                raise BadRequest(f"items[{i}].step is only whitespace")
        wanted = request.policy_version if request.HasField("policy_version") else None
        check_version(wanted, self.worker.version)
        scores, version = await self.worker.score_steps_versioned(prompts, steps)
        check_version(wanted, version)
        return scorer_pb2.ScoreResponse(
            scores=[
                scorer_pb2.StepScore(
                    token_entropies=s.token_entropies,
                    token_logprobs=s.token_logprobs,
                    mean_entropy=mean_entropy(s.token_entropies),
                    confidence=step_confidence(s.token_entropies),
                    multiplier=step_multiplier(s.token_entropies),
                    over_context=s.over_context,  # refused alone by the worker; its batch-mates were scored
                )
                for s in scores
            ],
            policy_version=version,
        )

    @rpc
    async def Reload(self, request, context):
        path = reload_path(request, "scorer", self.cfg.max_path_chars)
        async with self._reload_lock:
            await reload_workers([self.worker], path, request.version)
        return generator_pb2.ReloadResponse(policy_version=self.worker.version, replicas=1)


def add_to_server(server: grpc.aio.Server, servicer: ScorerServicer) -> None:
    scorer_pb2_grpc.add_ConfidenceScorerServicer_to_server(servicer, server)
