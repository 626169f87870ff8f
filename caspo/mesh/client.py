"""The one way to reach the mesh: a gRPC client for every service, and CaT's StepProposer over it.

Addresses come from the registry; a call that finds its service UNAVAILABLE (killed, restarting on a
new port, Redis down behind the pair store) re-resolves the address and retries with backoff.
Publishing a policy through the file is one call too: ``publish`` reloads the generator pool and the
scorer and writes the file CaT's Serve replicas watch (over the tensor transport: caspo/mesh/publisher.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Sequence

import grpc

from caspo.config import Config
from caspo.core.contract import ProposedStep
from caspo.core.pairs import Pair
from caspo.mesh.state import MeshError, read_state
from caspo.models.base import prefix_text
from caspo.policy_file import write_policy_file
from caspo.protos.v1 import (
    common_pb2,
    critic_pb2,
    critic_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    mesh_pb2,
    mesh_pb2_grpc,
    pair_store_pb2,
    pair_store_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
)
from caspo.services.channel import channel
from caspo.services.pair_store_servicer import pair_from_proto, pair_to_proto

log = logging.getLogger(__name__)


class MeshClient:
    """Async gRPC client for every mesh service; a call retries through UNAVAILABLE for up to
    ``retry_for_s`` seconds.

    Retrying is safe for every mesh RPC: proposals are seeded, scoring and judging are pure, ``Put`` is
    keyed by pair content, ``Read`` re-delivers the consumer's pending entries, ``Ack`` is idempotent.
    """

    def __init__(self, registry_address: str, retry_for_s: float = 180.0, retry_wait_s: float = 0.2, max_wait_s: float = 2.0):
        self.registry_address = registry_address
        self.retry_for_s = retry_for_s
        self.retry_wait_s = retry_wait_s
        self.max_wait_s = max_wait_s
        self.retries_done = 0  # calls repeated after UNAVAILABLE, over this client's life
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}

    @classmethod
    def from_state(cls, cfg: Config) -> "MeshClient":
        st = read_state(cfg)
        if not st:
            raise MeshError(f"no mesh is running from {cfg.mesh.run_dir} (start one with `caspo up`)")
        return cls(st["registry"])

    async def registry(self, timeout: float = 5.0) -> list[dict]:
        async with channel(self.registry_address) as ch:
            r = await mesh_pb2_grpc.MeshStub(ch).Registry(mesh_pb2.RegistryRequest(), timeout=timeout)
        return [
            {
                "name": s.name,
                "address": s.address,
                "policy_version": s.policy_version,
                "healthy": s.healthy,
                "restarts": s.restarts,
                "registered_at": s.registered_at,
            }
            for s in r.services
        ]

    async def _channel(self, service: str, refresh: bool = False) -> grpc.aio.Channel:
        if refresh or service not in self._channels:
            services = {s["name"]: s for s in await self.registry()}
            if service not in services:
                raise MeshError(f"service {service!r} is not registered")
            addr = services[service]["address"]
            old = self._channels.get(service)
            if old is None or old[0] != addr:
                if old is not None:
                    await old[1].close()
                self._channels[service] = (addr, channel(addr))
        return self._channels[service][1]

    async def call(self, service: str, stub_cls, method: str, request, timeout: float = 600.0):
        deadline = time.monotonic() + self.retry_for_s
        wait, refresh = self.retry_wait_s, False
        while True:
            try:
                ch = await self._channel(service, refresh=refresh)
                return await getattr(stub_cls(ch), method)(request, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                # the registry itself may be restarting too: its UNAVAILABLE is retried the same way
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() + wait > deadline:
                    raise
                log.info("%s.%s unavailable (%s); retrying in %.1f s", service, method, e.details(), wait)
                self.retries_done += 1
                refresh = True
                await asyncio.sleep(wait)
                wait = min(self.max_wait_s, wait * 2)

    async def close(self) -> None:
        for _, ch in self._channels.values():
            await ch.close()
        self._channels = {}

    # ---- typed helpers ---------------------------------------------------------------------------
    async def propose(self, prompts, n, temperature, seeds=None):
        req = generator_pb2.ProposeStepsRequest(prompts=_prompts(prompts, seeds), n=n, temperature=temperature)
        return await self.call("generator", generator_pb2_grpc.GeneratorStub, "ProposeSteps", req)

    async def rollout(self, prompts, temperature: float, max_steps: int, seeds=None):
        """Whole solutions, one per prompt, step by step until a final answer or ``max_steps``."""
        req = generator_pb2.RolloutRequest(prompts=_prompts(prompts, seeds), temperature=temperature, max_steps=max_steps)
        return await self.call("generator", generator_pb2_grpc.GeneratorStub, "Rollout", req)

    async def score(self, prompts, steps):
        req = scorer_pb2.ScoreRequest(items=[scorer_pb2.ScoreItem(prompt=p, step=s) for p, s in zip(prompts, steps)])
        return await self.call("scorer", scorer_pb2_grpc.ConfidenceScorerStub, "Score", req)

    async def judge(self, items, scope: str = ""):
        """items: (problem_id, question, prefix steps, step); ``scope``: who asks (a data round), for the
        judge critic's verdict cache."""
        req = critic_pb2.JudgeRequest(
            items=[critic_pb2.JudgeItem(problem_id=i, question=q, prefix=list(p), step=s) for i, q, p, s in items],
            scope=scope,
        )
        return await self.call("critic", critic_pb2_grpc.CriticStub, "Judge", req)

    async def put_pairs(self, round_: int, pairs: Sequence[Pair]):
        """Store ``pairs`` in ``round_``; the response's ``added``/``duplicates``/``keys`` once Redis has them."""
        req = pair_store_pb2.PutRequest(round=round_, pairs=[pair_to_proto(p) for p in pairs])
        return await self.call("pair_store", pair_store_pb2_grpc.PairStoreStub, "Put", req)

    async def read_pairs(self, round_: int, group: str, consumer: str, count: int, block_ms: int = 0) -> list[tuple[str, Pair]]:
        """Up to ``count`` (stream id, pair) of ``round_`` for ``consumer`` of consumer group ``group``:
        its unacknowledged ones first, then pairs no consumer of the group has had."""
        req = pair_store_pb2.ReadRequest(round=round_, group=group, consumer=consumer, count=count, block_ms=block_ms)
        resp = await self.call("pair_store", pair_store_pb2_grpc.PairStoreStub, "Read", req)
        return [(sp.id, pair_from_proto(sp.pair)) for sp in resp.pairs]

    async def ack_pairs(self, round_: int, group: str, ids) -> int:
        """Acknowledge pairs ``group`` has read, so they are not delivered again; how many were pending."""
        req = pair_store_pb2.AckRequest(round=round_, group=group, ids=list(ids))
        return (await self.call("pair_store", pair_store_pb2_grpc.PairStoreStub, "Ack", req)).acked

    async def stats(self, round_: int | None = None):
        req = pair_store_pb2.StatsRequest(round=round_) if round_ is not None else pair_store_pb2.StatsRequest()
        return await self.call("pair_store", pair_store_pb2_grpc.PairStoreStub, "Stats", req)

    # ---- publishing ------------------------------------------------------------------------------
    async def publish(self, version: int, path: str, policy_file: str | os.PathLike | None) -> dict[str, int]:
        """Make the checkpoint at ``path`` policy ``version`` everywhere: the generator pool and the scorer
        reload it (requests in flight finish on the old weights), then ``policy_file`` names it for CaT's
        Serve replicas (None: no Serve watches one). Returns the version each service reports."""
        versions = {service: await self.reload(service, version, path) for service in ("generator", "scorer")}
        if policy_file is not None:
            write_policy_file(policy_file, version, path)
        return versions

    async def reload(self, service: str, version: int, path: str) -> int:
        """``service`` (generator or scorer) loads the checkpoint at ``path`` as ``version``; the version it reports."""
        stub = {"generator": generator_pb2_grpc.GeneratorStub, "scorer": scorer_pb2_grpc.ConfidenceScorerStub}[service]
        req = generator_pb2.ReloadRequest(version=version, path=path)
        return (await self.call(service, stub, "Reload", req)).policy_version


def _prompts(texts, seeds) -> list[common_pb2.Prompt]:
    seeds = seeds if seeds is not None else [None] * len(texts)
    return [common_pb2.Prompt(text=t, seed=s) if s is not None else common_pb2.Prompt(text=t) for t, s in zip(texts, seeds)]


class MeshProposer:
    """CaT's StepProposer over the generator service: search and evaluation run through the mesh."""

    def __init__(self, client: MeshClient, prompt, delimiter: str = "\n"):
        self.client = client
        self.prompt = prompt
        self.delimiter = delimiter

    async def propose(self, prefixes, n: int, temperature: float):
        texts = [prefix_text(self.prompt, p.question, p.steps, self.delimiter) for p in prefixes]
        resp = await self.client.propose(texts, n, temperature, [p.seed for p in prefixes])
        return [
            [
                ProposedStep(s.text, tuple(s.token_entropies), tuple(s.token_logprobs), s.ended, s.entropy_estimate)
                for s in c.steps
            ]
            for c in resp.candidates
        ]
