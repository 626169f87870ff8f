"""The pair store against a real redis-server and a real grpc.aio server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
from dataclasses import replace

import grpc
import pytest

from caspo.config import PairStoreConfig
from caspo.store.pair_store import PairStore
from caspo.netutil import free_port
from caspo.store.redis_server import LocalRedis, redis_url_or_start
from caspo.core.pairs import Pair, pair_key
from caspo.protos.v1 import pair_store_pb2 as pb
from caspo.protos.v1 import pair_store_pb2_grpc as pb_grpc
from caspo.errors import BadRequest, Unavailable
from tests.pair_rounds import round_pairs
from caspo.services.server import MESSAGE_OPTIONS, new_server
from caspo.services.pair_store_servicer import add_to_server

CASES = ("correct_unsure", "incorrect", "trajectory")
MAX_PROMPT_CHARS = PairStoreConfig().max_prompt_chars
MAX_STEP_CHARS = PairStoreConfig().max_step_chars


def make_pairs(n: int, tag: str = "") -> list[Pair]:
    return [
        Pair(
            prompt=f"Q{tag}{i}: 3+4*{i}\n",
            chosen=f"4*{i}={4 * i}",
            rejected=f"4*{i}={4 * i + 1}",
            case=CASES[i % 3],
            confidence=-0.05 * i,
            tau=-0.5,
            policy_version=2,
            question_id=f"q{i}",
            critic="exact",
        )
        for i in range(n)
    ]


@pytest.fixture
def store(redis_url):
    s = PairStore(redis_url)
    s.client.flushdb()
    yield s
    s.close()


def test_put_stats_and_idempotent_reput(store):
    pairs = make_pairs(9)
    added, dups, keys = store.put(1, pairs)
    assert (added, dups) == (9, 0)
    assert keys == [pair_key(Pair(p.prompt, p.chosen, p.rejected, p.case, 0.0, 0.0)) for p in pairs]
    assert store.stats(1) == [{"round": 1, "total": 9, "per_case": {c: 3 for c in CASES}}]
    stream_len = store.client.xlen(store.stream_key(1))

    added, dups, keys2 = store.put(1, pairs)
    assert (added, dups, keys2) == (0, 9, keys)
    assert store.stats(1)[0]["total"] == 9 and store.stats(1)[0]["per_case"] == {c: 3 for c in CASES}
    assert store.client.xlen(store.stream_key(1)) == stream_len == 9

    # the same pair in another round counts there too, with the lineage it came with
    p = pairs[0]
    core = Pair(p.prompt, p.chosen, p.rejected, p.case, -0.1, -0.5, policy_version=7, critic="exact")
    assert store.put(2, [core, p]) == (1, 1, [keys[0], keys[0]])
    assert [s["round"] for s in store.stats()] == [1, 2]
    (stored,) = round_pairs(store, 2)
    assert stored.policy_version == 7 and stored.critic == "exact" and stored.question_id == ""
    assert store.client.hget(store.pair_redis_key(2, stored.key), "round") == "2"
    assert stored.confidence == pytest.approx(-0.1) and stored.key == keys[0]
    assert stored == core  # out as it went in


def test_concurrent_puts_of_the_same_pairs_add_each_once(store):
    pairs = make_pairs(40)
    results = []
    barrier = threading.Barrier(2)

    def writer():
        barrier.wait()
        results.append(store.put(3, pairs))

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.added for r in results) == 40 and sum(r.duplicates for r in results) == 40
    assert store.stats(3)[0]["total"] == 40 and store.client.xlen(store.stream_key(3)) == 40


def test_two_consumers_consume_exactly_once(store):
    pairs = make_pairs(60)
    keys = set(store.put(0, pairs).keys)
    got: dict[str, list[str]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def consume(name):
        barrier.wait()
        while True:
            batch = store.read(0, "trainer", name, count=7)
            if not batch:
                return
            got[name] += [p.key for _, p in batch]
            assert store.ack(0, "trainer", [sid for sid, _ in batch]) == len(batch)

    threads = [threading.Thread(target=consume, args=(n,)) for n in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = got["a"], got["b"]
    assert len(a) + len(b) == 60 and set(a) | set(b) == keys and not set(a) & set(b)
    assert store.pending(0, "trainer") == 0
    # another group sees the whole round again
    assert len(store.read(0, "eval", "e", count=100)) == 60


def test_unacked_entries_come_back_to_the_same_consumer(store):
    store.put(0, make_pairs(12))
    first = store.read(0, "trainer", "crashy", count=5)
    assert len(first) == 5 and store.pending(0, "trainer") == 5
    # the consumer "crashed" before acking: reading again under its name gives the same entries first
    again = store.read(0, "trainer", "crashy", count=5)
    assert [sid for sid, _ in again] == [sid for sid, _ in first]
    # another consumer of the group never gets them
    other = store.read(0, "trainer", "other", count=100)
    assert len(other) == 7 and not {sid for sid, _ in other} & {sid for sid, _ in first}
    assert store.ack(0, "trainer", [sid for sid, _ in first + other]) == 12
    assert store.pending(0, "trainer") == 0
    assert store.read(0, "trainer", "crashy", count=5) == []


def test_round_pairs_returns_exactly_the_round(store):
    r1, r2 = make_pairs(5, "a"), make_pairs(4, "b")
    store.put(1, r1)
    store.put(2, r2)
    store.read(1, "trainer", "c", count=3)  # consumption does not change what a round holds
    got = round_pairs(store, 1)
    assert got == r1
    assert {store.client.hget(store.pair_redis_key(1, p.key), "round") for p in got} == {"1"}
    assert len(round_pairs(store, 2)) == 4 and round_pairs(store, 9) == []
    assert len(round_pairs(store, 1, batch=2)) == 5  # pagination


def test_bad_input_names_the_field_and_writes_nothing(store):
    good = make_pairs(1)[0]
    cases = [
        (replace(good, prompt=""), "pairs[1].prompt is empty"),
        (replace(good, chosen=""), "pairs[1].chosen is empty"),
        (replace(good, rejected="  "), "pairs[1].rejected is empty"),
        (replace(good, rejected=good.chosen), "pairs[1].chosen equals"),
        (replace(good, case="maybe"), "pairs[1].case"),
        (replace(good, prompt="x" * (MAX_PROMPT_CHARS + 1)), f"pairs[1].prompt is {MAX_PROMPT_CHARS + 1} characters; the limit is {MAX_PROMPT_CHARS}"),
        (replace(good, chosen="x" * (MAX_STEP_CHARS + 1)), "pairs[1].chosen is"),
        (replace(good, confidence=float("nan")), "pairs[1].confidence"),
        (replace(good, prompt="bad \ud800"), "pairs[1].prompt is not valid UTF-8"),
        (dataclasses.asdict(good), "pairs[1] must be a caspo.core.pairs.Pair"),  # one form of a pair
    ]
    for bad, message in cases:
        with pytest.raises(BadRequest) as e:
            store.put(0, [make_pairs(2)[1], bad])
        assert message in str(e.value)
    with pytest.raises(BadRequest, match=r"round must be in \[0"):
        store.put(-1, [good])
    assert store.stats() == []


def test_acknowledged_pairs_survive_sigkill_of_redis(tmp_path):
    data_dir = tmp_path / "redis"
    server = LocalRedis(data_dir).start()
    store = PairStore(server.url)
    keys = store.put(4, make_pairs(30)).keys + store.put(4, make_pairs(20, "x")).keys
    os.kill(server.pid, 9)
    server.proc.wait(10)
    with pytest.raises(Unavailable, match="unreachable"):
        store.put(4, make_pairs(1, "late"))
    server.stop()

    with LocalRedis(data_dir) as again:  # a new port: nothing depends on the old URL
        revived = PairStore(again.url)
        assert revived.stats(4) == [{"round": 4, "total": 50, "per_case": {"correct_unsure": 17, "incorrect": 17, "trajectory": 16}}]
        assert [p.key for p in round_pairs(revived, 4)] == keys
        revived.close()
    store.close()


def test_local_redis_password_env_url_and_missing_binary(tmp_path, monkeypatch):
    monkeypatch.setenv("CASPO_REDIS_URL", "redis://example.invalid:6379/0")
    assert redis_url_or_start(tmp_path) == ("redis://example.invalid:6379/0", None)
    monkeypatch.delenv("CASPO_REDIS_URL")
    url, local = redis_url_or_start(tmp_path / "run")
    try:
        assert (tmp_path / "run" / "redis" / "appendonlydir").is_dir() and PairStore(url).ping()
    finally:
        local.stop()
    with LocalRedis(tmp_path / "auth", password="s3cret/pw") as r:
        assert PairStore(r.url).ping()
        with pytest.raises(Unavailable, match="unreachable"):
            PairStore(f"redis://127.0.0.1:{r.port}/0").stats()  # no password: refused
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="apt-get install -y redis-server.*CASPO_REDIS_URL"):
        LocalRedis(tmp_path / "none").start()


# -- gRPC ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(store):
    server = new_server()
    add_to_server(server, store)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=MESSAGE_OPTIONS) as channel:
            yield channel
    finally:
        await server.stop(None)


def to_proto(p: Pair) -> pb.Pair:
    return pb.Pair(**dataclasses.asdict(p))


def test_grpc_round_trip(store):
    async def main():
        async with serving(store) as ch:
            stub = pb_grpc.PairStoreStub(ch)
            pairs = make_pairs(6)
            r = await stub.Put(pb.PutRequest(round=5, pairs=[to_proto(p) for p in pairs]))
            assert (r.added, r.duplicates, len(r.keys)) == (6, 0, 6)
            r = await stub.Put(pb.PutRequest(round=5, pairs=[to_proto(p) for p in pairs]))
            assert (r.added, r.duplicates) == (0, 6)

            read = await stub.Read(pb.ReadRequest(round=5, group="trainer", consumer="t0", count=4))
            assert len(read.pairs) == 4
            first = read.pairs[0].pair
            assert (first.prompt, first.chosen, first.case, first.policy_version) == (
                pairs[0].prompt, pairs[0].chosen, pairs[0].case, 2)
            assert first.key == r.keys[0] and first.confidence == pytest.approx(0.0)
            ack = await stub.Ack(pb.AckRequest(round=5, group="trainer", ids=[p.id for p in read.pairs]))
            assert ack.acked == 4
            rest = await stub.Read(pb.ReadRequest(round=5, group="trainer", consumer="t0", count=100, block_ms=10))
            assert len(rest.pairs) == 2

            stats = await stub.Stats(pb.StatsRequest(round=5))
            (s,) = stats.rounds
            assert (s.round, s.total, dict(s.per_case)) == (5, 6, {c: 2 for c in CASES})
            assert [s.round for s in (await stub.Stats(pb.StatsRequest())).rounds] == [5]
            assert list((await stub.Stats(pb.StatsRequest(round=0))).rounds[0].per_case) == []

    asyncio.run(main())


def test_grpc_bad_input_is_invalid_argument_and_server_keeps_serving(store):
    good = make_pairs(1)[0]
    bad_puts = [
        (pb.PutRequest(round=0, pairs=[to_proto(replace(good, prompt=""))]), "pairs[0].prompt"),
        (pb.PutRequest(round=0, pairs=[to_proto(good), to_proto(replace(good, chosen=""))]), "pairs[1].chosen"),
        (pb.PutRequest(round=0, pairs=[to_proto(replace(good, rejected=good.chosen))]), "pairs[0].chosen"),
        (pb.PutRequest(round=0, pairs=[to_proto(replace(good, case="nope"))]), "pairs[0].case"),
        (pb.PutRequest(round=-1, pairs=[to_proto(good)]), "round"),
        (pb.PutRequest(round=0, pairs=[to_proto(replace(good, prompt="p" * (MAX_PROMPT_CHARS + 1)))]), "pairs[0].prompt"),
        (pb.PutRequest(round=0, pairs=[to_proto(replace(good, rejected="r" * (MAX_STEP_CHARS + 1)))]), "pairs[0].rejected"),
    ]
    bad_reads = [
        (pb.ReadRequest(round=0, group="g", consumer="c", count=0), "count"),
        (pb.ReadRequest(round=0, group="g", consumer="c", count=10001), "count"),
        (pb.ReadRequest(round=0, group="g", consumer="c", count=1, block_ms=-1), "block_ms"),
        (pb.ReadRequest(round=0, group="g", consumer="c", count=1, block_ms=60001), "block_ms"),
        (pb.ReadRequest(round=0, group="", consumer="c", count=1), "group"),
        (pb.ReadRequest(round=0, group="g", consumer="", count=1), "consumer"),
        (pb.ReadRequest(round=-2, group="g", consumer="c", count=1), "round"),
    ]

    async def main():
        async with serving(store) as ch:
            stub = pb_grpc.PairStoreStub(ch)
            for method, cases in ((stub.Put, bad_puts), (stub.Read, bad_reads)):
                for request, field in cases:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await method(request)
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, e.value.details())
                    assert field in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Ack(pb.AckRequest(round=0, group="g", ids=["not-an-id"]))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ids" in e.value.details()

            # a string field that is not UTF-8 does not parse: INVALID_ARGUMENT, not INTERNAL
            raw_put = ch.unary_unary(
                "/caspo.v1.PairStore/Put",
                request_serializer=lambda b: b,
                response_deserializer=pb.PutResponse.FromString,
            )
            bad_pair = b"\x0a\x02\xff\xfe"  # Pair.prompt = 0xff 0xfe
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await raw_put(b"\x12" + bytes([len(bad_pair)]) + bad_pair)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            # still serving, and nothing of the bad requests was written
            assert (await stub.Stats(pb.StatsRequest())).rounds == []
            r = await stub.Put(pb.PutRequest(round=0, pairs=[to_proto(good)]))
            assert r.added == 1

    asyncio.run(main())


def test_grpc_redis_unreachable_is_unavailable():
    store = PairStore(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)  # nothing listens there
    with pytest.raises(Unavailable, match="unreachable"):
        store.ping()

    async def main():
        async with serving(store) as ch:
            stub = pb_grpc.PairStoreStub(ch)
            for call in (
                stub.Put(pb.PutRequest(round=0, pairs=[to_proto(make_pairs(1)[0])])),
                stub.Stats(pb.StatsRequest()),
                stub.Read(pb.ReadRequest(round=0, group="g", consumer="c", count=1)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "unreachable" in e.value.details()
            # bad input is still told apart from a Redis that is down
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Put(pb.PutRequest(round=0, pairs=[to_proto(replace(make_pairs(1)[0], chosen=""))]))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())
    store.close()
