"""The ConfidenceScorer gRPC service: exact step confidence by one batched teacher-forced pass.

Concurrent Score requests are merged by the worker's micro-batcher into one prefill pass.
"""

from __future__ import annotations

import grpc

from caspo.config import ScorerConfig
from caspo.core.confidence import mean_entropy, step_confidence, step_multiplier
from caspo.protos.v1 import scorer_pb2, scorer_pb2_grpc
from caspo.errors import BadRequest, check_text
from caspo.services.generator_servicer import check_version
from caspo.services.server import rpc


class ScorerServicer(scorer_pb2_grpc.ConfidenceScorerServicer):
    def __init__(self, worker, cfg: ScorerConfig | None = None):
        self.worker = worker  # ModelWorker-like: version, async score_steps_versioned(prompts, steps)
        self.cfg = cfg or ScorerConfig()

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
                )
                for s in scores
            ],
            policy_version=version,
        )


def add_to_server(server: grpc.aio.Server, servicer: ScorerServicer) -> None:
    scorer_pb2_grpc.add_ConfidenceScorerServicer_to_server(servicer, server)
