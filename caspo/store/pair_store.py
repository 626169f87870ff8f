"""The pair store: each round's preference pairs in Redis, with their lineage (docs/design.md §3, §6).

Redis layout (prefix ``caspo:``):

* ``caspo:pair:{round}:{key}``  hash — the pair's fields (:func:`pair_to_redis`: text, case,
  confidence, tau and the lineage policy_version, question_id, critic), ``key``, ``round`` and
  ``ingested_at``;
* ``caspo:round:{round}:stream`` stream — one entry (field ``key``) per pair new to the round, the
  order the trainer reads; consumer groups give each entry to one consumer of a group;
* ``caspo:round:{round}:counts`` hash — a field per case and ``total``;
* ``caspo:rounds`` set — the rounds that have pairs.

``key`` is :func:`caspo.core.pairs.pair_key` (content hash of prompt/chosen/rejected). The round is part
of the Redis key, so the same pair put in two rounds counts in both, and putting it twice into one round
adds it once. ``put`` returns only after Redis replied; Redis (AOF, ``appendfsync always``) has the pair
on disk by then — that reply is the acknowledgement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from typing import Iterable, NamedTuple

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from caspo.config import PairStoreConfig
from caspo.core.pairs import CASES, Pair
from caspo.errors import BadRequest, Unavailable, check_range, check_text
from caspo.netutil import redact_url

__all__ = ["MAX_ROUND", "PREFIX", "PairStore", "PutResult", "pair_from_redis", "pair_to_redis"]

PREFIX = "caspo:"
MAX_ROUND = 2**62  # the id space of rounds (the loop numbers them run hash * 1000 + k), not a limit to tune

_STREAM_ID = re.compile(r"\d{1,20}(-\d{1,20})?")

# Atomic per pair: only the first writer of a pair key adds the stream entry and counts it.
# KEYS: pair hash, round stream, round counts, rounds set. ARGV: key, case, round, field, value, ...
_PUT_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('XADD', KEYS[2], '*', 'key', ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
redis.call('HINCRBY', KEYS[3], 'total', 1)
redis.call('SADD', KEYS[4], ARGV[3])
return 1
"""


# ---- the Redis boundary: a Pair as a hash and back ----------------------------------------------------
def pair_to_redis(pair: Pair) -> dict[str, str]:
    """The hash fields of a pair (the store adds ``round`` and ``ingested_at``)."""
    return {
        "prompt": pair.prompt,
        "chosen": pair.chosen,
        "rejected": pair.rejected,
        "case": pair.case,
        "confidence": repr(float(pair.confidence)),
        "tau": repr(float(pair.tau)),
        "policy_version": str(pair.policy_version),
        "question_id": pair.question_id,
        "critic": pair.critic,
        "key": pair.key,
    }


def pair_from_redis(h: dict[str, str]) -> Pair:
    return Pair(
        prompt=h["prompt"],
        chosen=h["chosen"],
        rejected=h["rejected"],
        case=h["case"],
        confidence=float(h["confidence"]),
        tau=float(h["tau"]),
        policy_version=int(h["policy_version"]),
        question_id=h.get("question_id", ""),
        critic=h.get("critic", ""),
    )


class PutResult(NamedTuple):
    added: int
    duplicates: int
    keys: list[str]


class PairStore:
    """Preference pairs (:class:`caspo.core.pairs.Pair`, in and out) per round in Redis: idempotent
    ``put``, exactly-once ``read``/``ack`` per consumer group, ``stats``.

    Limits come from the config's ``pair_store`` section. Thread-safe (one connection pool); every call
    blocks until Redis replied. A Redis that cannot be reached raises :class:`~caspo.errors.Unavailable`;
    bad input raises :class:`~caspo.errors.BadRequest` naming the field.
    """

    def __init__(self, url: str, cfg: PairStoreConfig | None = None, connect_timeout_s: float = 2.0):
        self.url = url
        self.cfg = cfg or PairStoreConfig()
        self._shown_url = redact_url(url)
        self.client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=self.cfg.max_block_ms / 1000 + 30,  # outlasts the longest blocking read
            # a short retry rides over a dropped connection; the put script is idempotent, and a read
            # whose reply was lost is re-delivered from the consumer's pending entries
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        )
        self._put = self.client.register_script(_PUT_SCRIPT)
        self._groups: set[tuple[int, str]] = set()

    # -- keys ---------------------------------------------------------------------------------------

    @staticmethod
    def pair_redis_key(round_: int, key: str) -> str:
        return f"{PREFIX}pair:{round_}:{key}"

    @staticmethod
    def stream_key(round_: int) -> str:
        return f"{PREFIX}round:{round_}:stream"

    @staticmethod
    def counts_key(round_: int) -> str:
        return f"{PREFIX}round:{round_}:counts"

    ROUNDS_KEY = f"{PREFIX}rounds"

    @contextlib.contextmanager
    def _redis(self):
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise Unavailable(f"redis at {self._shown_url} is unreachable: {e}") from e

    # -- validation ---------------------------------------------------------------------------------

    @staticmethod
    def _check_round(round_) -> int:
        if isinstance(round_, bool) or not isinstance(round_, int):
            raise BadRequest(f"round must be an integer, got {round_!r}")
        return check_range("round", round_, 0, MAX_ROUND)

    def _check_name(self, field: str, value) -> str:
        if not isinstance(value, str):
            raise BadRequest(f"{field} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise BadRequest(f"{field} is empty")
        return check_text(field, value, self.cfg.max_name_chars)

    @staticmethod
    def _utf8(field: str, value: str) -> None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{field} is not valid UTF-8 text") from None

    def _check(self, i: int, pair) -> Pair:
        """One input pair checked field by field (BadRequest names ``pairs[i].field``), numbers as floats."""
        where = f"pairs[{i}]"
        if not isinstance(pair, Pair):
            raise BadRequest(f"{where} must be a caspo.core.pairs.Pair, got {type(pair).__name__}")
        for name in ("prompt", "chosen", "rejected"):
            v = getattr(pair, name)
            if not isinstance(v, str):
                raise BadRequest(f"{where}.{name} must be a string, got {type(v).__name__}")
            if not v.strip():
                raise BadRequest(f"{where}.{name} is empty")
            check_text(f"{where}.{name}", v, self.cfg.max_prompt_chars if name == "prompt" else self.cfg.max_step_chars)
            self._utf8(f"{where}.{name}", v)
        if pair.chosen.strip() == pair.rejected.strip():
            raise BadRequest(f"{where}.chosen equals {where}.rejected; a preference pair needs two different steps")
        if pair.case not in CASES:
            raise BadRequest(f"{where}.case must be one of {list(CASES)}, got {pair.case!r}")
        numbers = {}
        for name in ("confidence", "tau"):
            v = getattr(pair, name)
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise BadRequest(f"{where}.{name} must be a number, got {v!r}") from None
            if isinstance(v, bool) or math.isnan(f):
                raise BadRequest(f"{where}.{name} must be a number, got {v!r}")
            numbers[name] = f
        if isinstance(pair.policy_version, bool) or not isinstance(pair.policy_version, int):
            raise BadRequest(f"{where}.policy_version must be an integer, got {pair.policy_version!r}")
        for name in ("question_id", "critic"):
            v = getattr(pair, name)
            if not isinstance(v, str):
                raise BadRequest(f"{where}.{name} must be a string, got {type(v).__name__}")
            check_text(f"{where}.{name}", v, self.cfg.max_name_chars, allow_empty=True)
            self._utf8(f"{where}.{name}", v)
        return dataclasses.replace(pair, **numbers)

    # -- writing ------------------------------------------------------------------------------------

    def put(self, round: int, pairs: Iterable[Pair]) -> PutResult:
        """Store ``pairs`` in ``round``; returns (added, duplicates, keys) once Redis has them.

        The whole batch is validated before anything is written. A pair already in the round (same
        content key) is a duplicate: stored once, streamed once, counted once. ``keys[i]`` is pairs[i]'s key.
        """
        round_ = self._check_round(round)
        pairs = list(pairs)
        if len(pairs) > self.cfg.max_put_pairs:
            raise BadRequest(f"pairs has {len(pairs)} items; the limit is {self.cfg.max_put_pairs} per put")
        checked = [self._check(i, p) for i, p in enumerate(pairs)]
        if not checked:
            return PutResult(0, 0, [])
        now = repr(time.time())
        stream, counts = self.stream_key(round_), self.counts_key(round_)
        rows = [pair_to_redis(p) for p in checked]
        with self._redis():
            pipe = self.client.pipeline(transaction=False)
            for row in rows:
                fields = [x for name, value in row.items() for x in (name, value)]
                fields += ["round", str(round_), "ingested_at", now]
                self._put(
                    keys=[self.pair_redis_key(round_, row["key"]), stream, counts, self.ROUNDS_KEY],
                    args=[row["key"], row["case"], str(round_), *fields],
                    client=pipe,
                )
            results = pipe.execute()
        added = sum(int(r) for r in results)
        return PutResult(added, len(rows) - added, [row["key"] for row in rows])

    # -- reading ------------------------------------------------------------------------------------

    def _load(self, round_: int, entries: list) -> list[tuple[str, Pair]]:
        """Stream entries [(id, {"key": k})] → [(id, pair)]; entries whose pair is gone are dropped."""
        entries = [(sid, f) for sid, f in entries if f and f.get("key")]
        if not entries:
            return []
        pipe = self.client.pipeline(transaction=False)
        for _, f in entries:
            pipe.hgetall(self.pair_redis_key(round_, f["key"]))
        hashes = pipe.execute()
        return [(sid, pair_from_redis(h)) for (sid, _), h in zip(entries, hashes) if h]

    @staticmethod
    def _entries(reply) -> list:
        """XREADGROUP's reply (RESP2 list or RESP3 dict) → the one stream's [(id, fields)]."""
        if not reply:
            return []
        if isinstance(reply, dict):
            (value,) = reply.values()
            return list(value[0]) if value and isinstance(value[0], list) else list(value)
        return list(reply[0][1])

    def _ensure_group(self, round_: int, group: str, force: bool = False) -> None:
        if not force and (round_, group) in self._groups:
            return
        try:
            self.client.xgroup_create(self.stream_key(round_), group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add((round_, group))

    def _xreadgroup(self, round_: int, group: str, consumer: str, start: str, count: int, block):
        stream = self.stream_key(round_)
        try:
            return self.client.xreadgroup(group, consumer, {stream: start}, count=count, block=block)
        except redis.exceptions.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            # the stream or group went away (e.g. a Redis without the data): create it and retry
            self._ensure_group(round_, group, force=True)
            return self.client.xreadgroup(group, consumer, {stream: start}, count=count, block=block)

    def read(self, round: int, group: str, consumer: str, count: int, block_ms: int = 0) -> list[tuple[str, Pair]]:
        """Up to ``count`` (stream_id, pair) of ``round`` for ``consumer`` in consumer group ``group``.

        First this consumer's own pending entries (delivered before, not yet acknowledged — e.g. it
        crashed), then entries no consumer of the group has had. Each entry goes to one consumer of a
        group; acknowledge with :meth:`ack` before reading again, or the same entries come back.
        ``block_ms`` > 0 waits that long for new entries when there is nothing to return.
        """
        round_ = self._check_round(round)
        group = self._check_name("group", group)
        consumer = self._check_name("consumer", consumer)
        if isinstance(count, bool) or not isinstance(count, int):
            raise BadRequest(f"count must be an integer, got {count!r}")
        check_range("count", count, 1, self.cfg.max_read_count)
        if isinstance(block_ms, bool) or not isinstance(block_ms, int):
            raise BadRequest(f"block_ms must be an integer, got {block_ms!r}")
        check_range("block_ms", block_ms, 0, self.cfg.max_block_ms)
        with self._redis():
            self._ensure_group(round_, group)
            out = self._load(round_, self._entries(self._xreadgroup(round_, group, consumer, "0", count, None)))
            if len(out) < count:
                block = block_ms if block_ms > 0 and not out else None  # redis-py: block=0 waits forever
                reply = self._xreadgroup(round_, group, consumer, ">", count - len(out), block)
                out += self._load(round_, self._entries(reply))
        return out

    def ack(self, round: int, group: str, ids: Iterable[str]) -> int:
        """Acknowledge stream entries read by ``group``; returns how many were pending."""
        round_ = self._check_round(round)
        group = self._check_name("group", group)
        ids = list(ids)
        for i, sid in enumerate(ids):
            if not isinstance(sid, str) or not _STREAM_ID.fullmatch(sid):
                raise BadRequest(f"ids[{i}] must be a stream entry id like '1700000000000-0', got {sid!r}")
        if not ids:
            return 0
        with self._redis():
            try:
                return int(self.client.xack(self.stream_key(round_), group, *ids))
            except redis.exceptions.ResponseError as e:
                if "Invalid stream ID" in str(e):
                    raise BadRequest(f"ids contains an invalid stream entry id: {e}") from None
                raise

    def pending(self, round: int, group: str) -> int:
        """Entries of ``round`` delivered to ``group``'s consumers and not yet acknowledged."""
        round_ = self._check_round(round)
        group = self._check_name("group", group)
        with self._redis():
            try:
                info = self.client.xpending(self.stream_key(round_), group)
            except redis.exceptions.ResponseError as e:
                if "NOGROUP" in str(e):
                    return 0
                raise
        return int(info["pending"])

    def stats(self, round: int | None = None) -> list[dict]:
        """[{round, total, per_case}] for ``round`` (even when empty), or for every round with pairs."""
        with self._redis():
            if round is None:
                rounds = sorted(int(r) for r in self.client.smembers(self.ROUNDS_KEY))
            else:
                rounds = [self._check_round(round)]
            pipe = self.client.pipeline(transaction=False)
            for r in rounds:
                pipe.hgetall(self.counts_key(r))
            counts = pipe.execute()
        out = []
        for r, c in zip(rounds, counts):
            per_case = {k: int(v) for k, v in c.items() if k != "total"}
            out.append({"round": r, "total": int(c.get("total", 0)), "per_case": per_case})
        return out

    def ping(self) -> bool:
        with self._redis():
            return bool(self.client.ping())

    def close(self) -> None:
        self.client.close()
