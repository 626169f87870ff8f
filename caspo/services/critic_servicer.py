"""The Critic gRPC service: verdicts on steps, with the critic's reference step for each prefix."""

from __future__ import annotations

import grpc

from caspo.config import CriticConfig
from caspo.errors import BadRequest
from caspo.protos.v1 import critic_pb2, critic_pb2_grpc
from caspo.services.server import rpc
from caspo.tasks.critic import JudgeItem


class CriticServicer(critic_pb2_grpc.CriticServicer):
    def __init__(self, critic, cfg: CriticConfig | None = None):
        self.critic = critic  # ExactCritic, LLMCritic or JudgeCritic: .name, async judge_many(items, scope)
        self.cfg = cfg or CriticConfig()

    @rpc
    async def Judge(self, request, context):
        items = request.items
        if not items:
            raise BadRequest("items is empty")
        if len(items) > self.cfg.max_items:
            raise BadRequest(f"items has {len(items)} entries; the limit is {self.cfg.max_items}")
        judge_items = []
        for i, it in enumerate(items):
            for name in ("question", "step"):
                if not getattr(it, name).strip():
                    raise BadRequest(f"items[{i}].{name} is empty")
            judge_items.append(JudgeItem(it.problem_id, it.question, tuple(it.prefix), it.step))
        verdicts = await self.critic.judge_many(judge_items, scope=request.scope)
        return critic_pb2.JudgeResponse(
            verdicts=[
                critic_pb2.Verdict(
                    correct=v.correct,
                    reference=v.reference,
                    reason=v.reason,
                    p_correct=float(v.correct) if v.p_correct is None else v.p_correct,
                )
                for v in verdicts
            ],
            critic=self.critic.name,
        )


def add_to_server(server: grpc.aio.Server, servicer: CriticServicer) -> None:
    critic_pb2_grpc.add_CriticServicer_to_server(servicer, server)
