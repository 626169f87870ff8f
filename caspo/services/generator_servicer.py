"""The Generator gRPC service: a pool of policy replicas behind one address.

Each request goes to the replica with the fewest calls in flight (ties round-robin); the replica's
micro-batcher merges it with concurrent requests. Every returned step carries the policy version that
produced it. A replica is anything ModelWorker-like: ``in_flight``, ``version``, async
``sample_steps_versioned(prompts, n, temperature, seeds)`` and async ``reload(path, version)``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Sequence

import grpc

from caspo.config import GeneratorConfig
from caspo.core.contract import ProposedStep, derive_seed
from caspo.core.steps import DEFAULT_DELIMITER, final_answer, join_steps
from caspo.errors import BadRequest, check_range, check_text
from caspo.protos.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from caspo.services.policy import check_version, reload_path, reload_workers
from caspo.services.server import rpc


def step_message(step: ProposedStep, version: int) -> common_pb2.Step:
    return common_pb2.Step(
        text=step.text,
        token_entropies=step.token_entropies,
        token_logprobs=step.token_logprobs,
        tokens=step.tokens,
        entropy_estimate=step.entropy_estimate,
        ended=step.ended,
        policy_version=version,
        over_context=step.over_context,
    )


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    def __init__(self, workers: Sequence, cfg: GeneratorConfig | None = None):
        if not workers:
            raise ValueError("a generator needs at least one worker")
        self.workers = list(workers)
        self.cfg = cfg or GeneratorConfig()
        self._next = 0
        self._reload_lock = asyncio.Lock()

    @property
    def version(self) -> int:
        """The policy version every replica has (the oldest one while a reload is under way)."""
        return min(w.version for w in self.workers)

    def pick(self):
        """The replica with the fewest calls in flight; among equals, the next in round-robin order."""
        n = len(self.workers)
        start, self._next = self._next, (self._next + 1) % n
        return min((self.workers[(start + k) % n] for k in range(n)), key=lambda w: w.in_flight)

    # ---- validation ----------------------------------------------------------------------------
    def _prompts(self, prompts) -> tuple[list[str], list[int | None]]:
        if not prompts:
            raise BadRequest("prompts is empty")
        if len(prompts) > self.cfg.max_prompts:
            raise BadRequest(f"prompts has {len(prompts)} entries; the limit is {self.cfg.max_prompts}")
        texts = [check_text(f"prompts[{i}].text", p.text, self.cfg.max_prompt_chars) for i, p in enumerate(prompts)]
        seeds = [p.seed if p.HasField("seed") else None for p in prompts]
        return texts, seeds

    def _temperature(self, t: float) -> float:
        if math.isnan(t):
            raise BadRequest(f"temperature must be in [0.0, {self.cfg.max_temperature}], got nan")
        return check_range("temperature", t, 0.0, self.cfg.max_temperature)

    @staticmethod
    def _requested_version(request) -> int | None:
        return request.policy_version if request.HasField("policy_version") else None

    # ---- rpcs ----------------------------------------------------------------------------------
    @rpc
    async def ProposeSteps(self, request, context):
        texts, seeds = self._prompts(request.prompts)
        n = check_range("n", request.n, 1, self.cfg.max_k)
        temperature = self._temperature(request.temperature)
        if temperature == 0 and n != 1:
            raise BadRequest(f"n must be 1 when temperature is 0 (greedy), got {n}")
        wanted = self._requested_version(request)
        worker = self.pick()
        check_version(wanted, worker.version)
        groups, version = await worker.sample_steps_versioned(texts, n, temperature, seeds)
        check_version(wanted, version)  # a reload may have landed while the request waited
        return generator_pb2.ProposeStepsResponse(
            candidates=[generator_pb2.Candidates(steps=[step_message(s, version) for s in g]) for g in groups],
            policy_version=version,
        )

    @rpc
    async def Rollout(self, request, context):
        texts, seeds = self._prompts(request.prompts)
        temperature = self._temperature(request.temperature)
        max_steps = check_range("max_steps", request.max_steps, 1, self.cfg.max_steps)
        wanted = self._requested_version(request)
        worker = self.pick()  # one replica for the whole rollout: one policy unless a reload lands
        check_version(wanted, worker.version)
        delimiter = getattr(worker, "delimiter", DEFAULT_DELIMITER)
        steps: list[list[ProposedStep]] = [[] for _ in texts]
        versions: list[list[int]] = [[] for _ in texts]
        finished = [False] * len(texts)
        active = list(range(len(texts)))
        version = worker.version
        for t in range(max_steps):
            if not active:
                break
            prompts = [texts[i] + join_steps([s.text for s in steps[i]], delimiter) for i in active]
            step_seeds = [derive_seed(seeds[i], t) if seeds[i] is not None else None for i in active]
            groups, version = await worker.sample_steps_versioned(prompts, 1, temperature, step_seeds)
            check_version(wanted, version)
            still = []
            for i, group in zip(active, groups):
                s = group[0]
                steps[i].append(s)
                versions[i].append(version)
                if final_answer(s.text) is not None:
                    finished[i] = True
                elif not s.ended and s.text:
                    still.append(i)
            active = still
        return generator_pb2.RolloutResponse(
            trajectories=[
                generator_pb2.Trajectory(
                    steps=[step_message(s, v) for s, v in zip(steps[i], versions[i])], finished=finished[i]
                )
                for i in range(len(texts))
            ],
            policy_version=version,
        )

    @rpc
    async def Reload(self, request, context):
        path = reload_path(request, "generator", self.cfg.max_path_chars)
        async with self._reload_lock:  # one reload at a time: replicas never end up on different ones
            await reload_workers(self.workers, path, request.version)
        return generator_pb2.ReloadResponse(policy_version=self.version, replicas=len(self.workers))


def add_to_server(server: grpc.aio.Server, servicer: GeneratorServicer) -> None:
    generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, server)
