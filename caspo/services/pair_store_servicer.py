"""The PairStore gRPC service (protos/caspo/v1/pair_store.proto) over a :class:`caspo.store.pair_store.PairStore`.

Redis calls block, so each runs in a worker thread; the event loop keeps serving other calls (a Read
with ``block_ms`` waits in its thread). The store checks every field against its limits (the config's
``pair_store`` section): bad input → INVALID_ARGUMENT naming the field, Redis down → UNAVAILABLE (both
through ``@rpc``); the service keeps serving.
"""

from __future__ import annotations

import asyncio

from caspo.core.pairs import Pair
from caspo.protos.v1 import pair_store_pb2, pair_store_pb2_grpc
from caspo.services.server import rpc
from caspo.store.pair_store import PairStore


# ---- the gRPC boundary: a Pair as a message and back ------------------------------------------------
def pair_from_proto(p: pair_store_pb2.Pair) -> Pair:
    """A proto Pair → a Pair (``key`` follows from the content, so the message's is not read)."""
    return Pair(
        prompt=p.prompt,
        chosen=p.chosen,
        rejected=p.rejected,
        case=p.case,
        confidence=p.confidence,
        tau=p.tau,
        policy_version=p.policy_version,
        question_id=p.question_id,
        critic=p.critic,
    )


def pair_to_proto(pair: Pair) -> pair_store_pb2.Pair:
    return pair_store_pb2.Pair(
        prompt=pair.prompt,
        chosen=pair.chosen,
        rejected=pair.rejected,
        case=pair.case,
        confidence=pair.confidence,
        tau=pair.tau,
        policy_version=pair.policy_version,
        question_id=pair.question_id,
        critic=pair.critic,
        key=pair.key,
    )


class PairStoreServicer(pair_store_pb2_grpc.PairStoreServicer):
    def __init__(self, store: PairStore):
        self.store = store

    @rpc
    async def Put(self, request, context):
        pairs = [pair_from_proto(p) for p in request.pairs]
        added, duplicates, keys = await asyncio.to_thread(self.store.put, request.round, pairs)
        return pair_store_pb2.PutResponse(added=added, duplicates=duplicates, keys=keys)

    @rpc
    async def Read(self, request, context):
        rows = await asyncio.to_thread(
            self.store.read, request.round, request.group, request.consumer, request.count, request.block_ms
        )
        return pair_store_pb2.ReadResponse(
            pairs=[pair_store_pb2.StoredPair(id=sid, pair=pair_to_proto(p)) for sid, p in rows]
        )

    @rpc
    async def Ack(self, request, context):
        acked = await asyncio.to_thread(self.store.ack, request.round, request.group, list(request.ids))
        return pair_store_pb2.AckResponse(acked=acked)

    @rpc
    async def Stats(self, request, context):
        round_ = request.round if request.HasField("round") else None
        rows = await asyncio.to_thread(self.store.stats, round_)
        return pair_store_pb2.StatsResponse(
            rounds=[pair_store_pb2.RoundStats(round=r["round"], total=r["total"], per_case=r["per_case"]) for r in rows]
        )


def add_to_server(server, store: PairStore) -> PairStoreServicer:
    servicer = PairStoreServicer(store)
    pair_store_pb2_grpc.add_PairStoreServicer_to_server(servicer, server)
    return servicer
