"""Test helper: every pair of one round as the pair store holds it, read straight from its Redis stream.
The package never needs a whole round at once (the trainer reads through a consumer group); the tests
check what was stored with this."""

from __future__ import annotations

from caspo.core.pairs import Pair
from caspo.store.pair_store import PairStore


def round_pairs(store: PairStore, round_: int, batch: int = 1000) -> list[Pair]:
    """Every pair of ``round_`` in stream (ingestion) order, whether or not a group consumed it."""
    round_ = store._check_round(round_)
    stream = store.stream_key(round_)
    out: list[Pair] = []
    start = "-"
    with store._redis():
        while True:
            entries = store.client.xrange(stream, min=start, max="+", count=batch)
            out += [p for _, p in store._load(round_, entries)]
            if len(entries) < batch:
                return out
            start = "(" + entries[-1][0]  # exclusive: after the last id seen
