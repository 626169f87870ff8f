"""Weights over a collective instead of a file: one publisher (rank 0) broadcasts a state dict, in
buckets, to every subscriber of a publish (ranks 1..N).

One publish is one ``torch.distributed`` process group (``ProcessGroupGloo`` on CPU, ``ProcessGroupNCCL``
when the tensors are on a GPU) built for that publish alone, standalone (no default process group, so a
process may join any number of publishes, one after the other, with whatever peers are alive then), on
a ``TCPStore`` the publisher hosts, with a timeout: a subscriber that dies mid-broadcast makes the
others fail within ``timeout_s`` instead of hanging. (Ray Direct Transport and ``ray.util.collective``
were tried first; docs/benchmarks.md, "publish", says why neither is used.)

The wire: the state dict's tensors in a fixed order (tied tensors sent once), packed into byte buckets
of at most ``bucket_bytes`` (a tensor larger than that travels alone), each bucket one broadcast, double
buffered: the publisher packs bucket b+1 while b is on the wire, a subscriber receives b+1 while it
copies b into its model, so each side holds two buckets beyond its weights.
Tensors travel in the publisher's dtype; the subscriber converts to its own (``copy_`` into its
parameters). The checksum (SHA-256 over the names, shapes, dtypes and bytes, in wire order) is sent in
the plan; a subscriber recomputes it over what it received and refuses to switch on a mismatch.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
import torch.distributed as dist

DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool)}


class TransportError(RuntimeError):
    """A broadcast that did not deliver a whole, intact state dict."""


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * DTYPES[self.dtype].itemsize


def weights_meta(state: Mapping[str, torch.Tensor]) -> list[TensorMeta]:
    """What goes on the wire, in order: every tensor of ``state`` once (a tied tensor under its first name)."""
    seen, out = set(), []
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.device.type != "meta" else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out.append(TensorMeta(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")))
    return out


def plan_buckets(meta: list[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``meta`` per bucket, in order; a bucket holds at most ``bucket_bytes`` unless one tensor is larger."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets, cur, size = [], [], 0
    for i, m in enumerate(meta):
        if cur and size + m.nbytes > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += m.nbytes
    if cur:
        buckets.append(cur)
    return buckets


def _hasher(meta: list[TensorMeta]):
    h = hashlib.sha256()
    h.update(json.dumps([[m.name, list(m.shape), m.dtype] for m in meta]).encode())
    return h


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def state_checksum(state: Mapping[str, torch.Tensor], meta: list[TensorMeta]) -> str:
    """The checksum of ``state`` as it goes on the wire in ``meta``'s order and dtypes (a subscriber's
    own weights, whatever their dtype, converted to the wire's: equal to the publisher's when it holds them)."""
    h = _hasher(meta)
    for m in meta:
        h.update(_bytes(state[m.name].detach().to("cpu", DTYPES[m.dtype])).numpy())
    return h.hexdigest()


def make_plan(state: Mapping[str, torch.Tensor], version: int, path: str, bucket_bytes: int, timeout_s: float) -> dict:
    """Everything a subscriber needs to receive ``state`` (but where to meet: ``host``/``port``/``group``/``world``)."""
    meta = weights_meta(state)
    return {
        "version": int(version),
        "path": path,  # the checkpoint these weights are (what a replica that misses them loads)
        "meta": [[m.name, list(m.shape), m.dtype] for m in meta],
        "buckets": plan_buckets(meta, bucket_bytes),
        "checksum": state_checksum(state, meta),
        "bytes": sum(m.nbytes for m in meta),
        "timeout_s": float(timeout_s),
        "backend": "nccl" if any(t.is_cuda for t in state.values()) else "gloo",
    }


def plan_meta(plan: dict) -> list[TensorMeta]:
    return [TensorMeta(n, tuple(s), d) for n, s, d in plan["meta"]]


def open_store(host: str, world: int, timeout_s: float) -> dist.TCPStore:
    """The publisher's rendezvous store on a free port (``store.port``)."""
    return dist.TCPStore(host, 0, world, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def _group(plan: dict, rank: int, store: dist.Store | None = None):
    timeout = datetime.timedelta(seconds=plan["timeout_s"])
    if store is None:
        store = dist.TCPStore(plan["host"], plan["port"], plan["world"], False, timeout)
    prefixed = dist.PrefixStore(plan["group"], store)
    if plan["backend"] == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, plan["world"], opts)
    return dist.ProcessGroupGloo(prefixed, rank, plan["world"], timeout)


def _device(plan: dict) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if plan["backend"] == "nccl" else torch.device("cpu")


def send_weights(state: Mapping[str, torch.Tensor], plan: dict, store: dist.Store, on_bucket: Callable[[int], None] | None = None) -> dict:
    """Rank 0's side of a publish: every bucket of ``plan`` broadcast from ``state``. Raises TransportError
    when a subscriber is missing or drops out."""
    t0 = time.perf_counter()
    meta = plan_meta(plan)
    try:
        pg = _group(plan, 0, store)
        dev = _device(plan)
        inflight = None  # (bucket, buffer, work): bucket b+1 is packed while bucket b is on the wire
        for b, idx in enumerate(plan["buckets"]):
            buf = torch.cat([_bytes(state[meta[i].name].detach().to(dev)) for i in idx])
            work = pg.broadcast([buf], dist.BroadcastOptions())
            if inflight is not None:
                inflight[2].wait()
                if on_bucket is not None:
                    on_bucket(inflight[0])
            inflight = (b, buf, work)
        if inflight is not None:
            inflight[2].wait()
            if on_bucket is not None:
                on_bucket(inflight[0])
    except (RuntimeError, dist.DistError) as e:
        raise TransportError(f"broadcast of v{plan['version']} failed: {str(e).splitlines()[0]}") from e
    return {"seconds": time.perf_counter() - t0, "bytes": plan["bytes"], "buckets": len(plan["buckets"])}


def receive_weights(plan: dict, rank: int, stats: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """A subscriber's side: ``(name, tensor)`` in wire dtype, bucket by bucket as they arrive (views of the
    bucket: copy them before the next). After the last one, the checksum of everything received is
    compared with the plan's: a mismatch raises TransportError, so a consumer that commits only once this
    iterator is exhausted never switches to weights that are not the publisher's. ``stats["wire_s"]``
    (when given) adds up the seconds spent waiting on the wire, joining the group included."""
    stats = stats if stats is not None else {}
    stats.setdefault("wire_s", 0.0)
    meta = plan_meta(plan)
    h = _hasher(meta)
    try:
        t0 = time.perf_counter()
        pg = _group(plan, rank)
        dev = _device(plan)
        stats["wire_s"] += time.perf_counter() - t0
        buckets = plan["buckets"]

        def post(b):  # the receive of bucket b, started before bucket b-1 is handed out (double buffering)
            buf = torch.empty(sum(meta[i].nbytes for i in buckets[b]), dtype=torch.uint8, device=dev)
            return buf, pg.broadcast([buf], dist.BroadcastOptions())

        nxt = post(0) if buckets else None
        for b, idx in enumerate(buckets):
            buf, work = nxt
            t0 = time.perf_counter()
            work.wait()
            stats["wire_s"] += time.perf_counter() - t0
            nxt = post(b + 1) if b + 1 < len(buckets) else None
            h.update(buf.cpu().numpy())
            off = 0
            for i in idx:
                m = meta[i]
                yield m.name, buf[off : off + m.nbytes].view(DTYPES[m.dtype]).reshape(m.shape)
                off += m.nbytes
    except (RuntimeError, dist.DistError) as e:
        raise TransportError(f"receiving v{plan['version']} failed: {str(e).splitlines()[0]}") from e
    if h.hexdigest() != plan["checksum"]:
        raise TransportError(f"v{plan['version']} arrived with checksum {h.hexdigest()[:12]}, not the publisher's {plan['checksum'][:12]}")
