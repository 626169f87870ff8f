"""A model backend for the asyncio world: ``ModelWorker`` puts a Backend behind an event loop, with a
micro-batcher.

``ModelWorker`` is plain Python: the mesh's replica actors (caspo/mesh/actors.py) and the Serve
replicas (caspo/serve/deployment.py) each hold one. Its blocking backend
calls run in a thread (``asyncio.to_thread``) so the loop keeps serving: a reload loads the new
weights while samples are still running, and the backend's swap leaves requests that already started
on the weights they captured.

Micro-batching: concurrent ``sample_steps`` calls with the same (n, temperature) are merged into one
backend call (prompts and seeds concatenated, results split back in order); ``score_steps`` calls are
merged likewise. A batch opens with the first call, stays open for ``batch_wait_ms``, and keeps
accepting joiners until the backend is free: backend calls of one worker run one at a time (one
model, one accelerator), so under load the next batch grows while the current one runs.

Context limits: every item is counted in tokens (``caspo.models.base.item_tokens``: the prompt, plus the
step to score or room for ``max_step_tokens``) against the backend's ``max_model_len`` *before* it joins a
batch. An item that does not fit never reaches the backend (vLLM fails a whole ``generate()`` call on one
over-long prompt, and a batch holds many callers' items): it is answered alone with an ``over_context``
marker (sampling: ``n`` empty ended steps; scoring: an empty score; a judge's answer: an empty row), counted in ``refused``, and its
batch-mates are served as if it had not been there.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from caspo import telemetry
from caspo.core.contract import ProposedStep
from caspo.core.steps import DEFAULT_DELIMITER
from caspo.models.base import Backend, StepScore, item_tokens
from caspo.models.transport import plan_meta, receive_weights, state_checksum


@dataclass
class _Batch:
    future: asyncio.Future
    items: list = field(default_factory=list)


class ModelWorker:
    def __init__(self, backend: Backend, batch_wait_ms: float = 5.0, name: str = "model"):
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        self.name = name  # the worker label of its metrics (caspo_worker_batch_size, caspo_worker_queue_depth)
        self.backend = backend
        self.batch_wait_ms = batch_wait_ms
        self.in_flight = 0  # calls accepted and not yet answered (what a router balances on)
        self.backend_calls = 0
        self.refused = 0  # items refused for exceeding the context length
        self._open: dict[tuple, _Batch] = {}
        self._tasks: set[asyncio.Task] = set()
        self._compute: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- what the backend is -----------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.backend.version

    @property
    def path(self) -> str:
        return self.backend.path

    @property
    def max_model_len(self) -> int | None:
        return getattr(self.backend, "max_model_len", None)

    @property
    def delimiter(self) -> str:
        return getattr(self.backend, "delimiter", DEFAULT_DELIMITER)

    # ---- calls -------------------------------------------------------------------------------
    async def sample_steps(
        self, prompts: Sequence[str], n: int, temperature: float, seeds: Sequence[int | None] | None = None
    ) -> list[list[ProposedStep]]:
        return (await self.sample_steps_versioned(prompts, n, temperature, seeds))[0]

    async def score_steps(self, prompts: Sequence[str], steps: Sequence[str]) -> list[StepScore]:
        return (await self.score_steps_versioned(prompts, steps))[0]

    async def sample_steps_versioned(
        self, prompts: Sequence[str], n: int, temperature: float, seeds: Sequence[int | None] | None = None
    ) -> tuple[list[list[ProposedStep]], int]:
        """Like ``sample_steps``, with the policy version that produced the samples."""
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds and prompts differ in length ({len(seeds)} vs {len(prompts)})")

        def call(items):
            return self.backend.sample_steps([p for p, _ in items], n, temperature, [s for _, s in items])

        refused = [ProposedStep("", (), (), ended=True, over_context=True)] * n
        items = list(zip(prompts, seeds))
        return await self._submit_fitting(("sample", n, float(temperature)), items, lambda it: item_tokens(self.backend, it[0]), call, refused)

    async def score_steps_versioned(
        self, prompts: Sequence[str], steps: Sequence[str]
    ) -> tuple[list[StepScore], int]:
        """Like ``score_steps``, with the policy version that produced the scores."""
        if len(prompts) != len(steps):
            raise ValueError(f"prompts and steps differ in length ({len(prompts)} vs {len(steps)})")

        def call(items):
            return self.backend.score_steps([p for p, _ in items], [s for _, s in items])

        refused = StepScore((), (), over_context=True)
        return await self._submit_fitting(("score",), list(zip(prompts, steps)), lambda it: item_tokens(self.backend, *it), call, refused)

    async def answer_logprobs(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list[float]]:
        """For each prompt, log p of each answer's first token right after it (the backend's
        ``answer_logprobs``); calls with the same answers are merged into one backend call. A prompt with no
        room left for one token gets an empty row (``over_context``)."""
        answers = tuple(answers)

        def call(items):
            return self.backend.answer_logprobs(list(items), answers)

        need = lambda p: item_tokens(self.backend, p, new_tokens=1)  # noqa: E731
        return (await self._submit_fitting(("answer", answers), list(prompts), need, call, []))[0]

    async def reload(self, path: str, version: int) -> int:
        """Load new weights (in a thread; serving goes on) and return the version now loaded."""
        await asyncio.to_thread(self.backend.reload, path, version)
        return self.backend.version

    def state(self, meta: list | None = None) -> dict:
        """Version, path, checkpoints read from disk so far, and with ``meta`` (a publish plan's) the
        checksum of the weights now served, as the publisher computes it."""
        out = {"version": self.version, "path": self.path, "disk_loads": getattr(self.backend, "disk_loads", None)}
        if meta is not None:
            out["checksum"] = state_checksum(self.backend.state_dict(), plan_meta({"meta": meta}))
        return out

    def receive_sync(self, plan: dict, rank: int) -> dict:
        """Join a publish as ``rank`` (caspo.models.transport) and switch to its version once all of it has
        arrived intact; calls running meanwhile finish on the old weights. Returns the version now loaded
        and the seconds it took."""
        t0, stats = time.perf_counter(), {}
        self.backend.load_weights(receive_weights(plan, rank, stats), plan["version"], plan["path"])
        return {"version": self.backend.version, "seconds": time.perf_counter() - t0, "wire_s": stats["wire_s"]}

    async def receive(self, plan: dict, rank: int) -> dict:
        """``receive_sync`` in a thread: the loop keeps serving."""
        return await asyncio.to_thread(self.receive_sync, plan, rank)

    # ---- the batcher -------------------------------------------------------------------------
    async def _submit_fitting(self, key: tuple, items: list, need: Callable[[Any], int], call: Callable[[list], list], refused) -> tuple[list, int]:
        """``_submit`` of the items that fit the context length; the others get ``refused`` in their place."""
        limit = self.max_model_len
        if limit is None:
            return await self._submit(key, items, call)
        fits = [need(it) <= limit for it in items]
        out = [refused] * len(items)
        version = self.version
        if any(fits):
            results, version = await self._submit(key, [it for it, ok in zip(items, fits) if ok], call)
            for i, r in zip((i for i, ok in enumerate(fits) if ok), results):
                out[i] = r
        self.refused += fits.count(False)
        return out, version

    async def _submit(self, key: tuple, items: list, call: Callable[[list], list]) -> tuple[list, int]:
        if not items:
            return [], self.version
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or the worker moved to a new loop (tests)
            self._loop, self._compute, self._open = loop, asyncio.Lock(), {}
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch(loop.create_future())
            task = loop.create_task(self._dispatch(key, batch, call))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        start = len(batch.items)
        batch.items.extend(items)
        self.in_flight += 1
        telemetry.worker_queue(self.name, self.in_flight)
        try:
            # shield: a caller that gives up (client cancelled) must not cancel its batch-mates
            results, version = await asyncio.shield(batch.future)
        finally:
            self.in_flight -= 1
            telemetry.worker_queue(self.name, self.in_flight)
        return results[start : start + len(items)], version

    async def _dispatch(self, key: tuple, batch: _Batch, call: Callable[[list], list]) -> None:
        try:
            await asyncio.sleep(self.batch_wait_ms / 1000.0)
            async with self._compute:
                if self._open.get(key) is batch:  # close it: later callers open the next batch
                    del self._open[key]
                telemetry.worker_batch(self.name, key[0], len(batch.items))
                out = await asyncio.to_thread(self._call, call, batch.items)
        except asyncio.CancelledError:  # the loop is shutting down
            if self._open.get(key) is batch:
                del self._open[key]
            batch.future.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - every caller of the batch gets the error
            if not batch.future.done():
                batch.future.set_exception(e)
            return
        if not batch.future.done():
            batch.future.set_result(out)

    def _call(self, call: Callable[[list], list], items: list) -> tuple[list, Any]:
        # The version is read in the backend's thread just before the call, which captures its
        # weights at its start; a reload swapping later leaves this call on the version read here.
        version = self.backend.version
        self.backend_calls += 1
        out = call(items)
        if len(out) != len(items):
            raise RuntimeError(f"backend returned {len(out)} results for {len(items)} inputs")
        return out, version


# ---- publishes into processes the mesh does not own (Serve's replicas) ------------------------------
_SUBSCRIBED: list[tuple[ModelWorker, Callable[[dict], None] | None]] = []


def subscribe(worker: ModelWorker, after: Callable[[dict], None] | None = None) -> None:
    """Make ``worker`` the one this process's publishes go to; ``after(plan)`` runs once it has switched."""
    _SUBSCRIBED[:] = [(worker, after)]


def receive_published(_actor, plan: dict, rank: int) -> dict:
    """Run in an actor's process through ``actor.__ray_call__`` (a sync call: Ray runs it off the actor's
    event loop, which keeps serving): the subscribed worker receives ``plan`` as ``rank``."""
    if not _SUBSCRIBED:
        raise RuntimeError("no model worker in this process takes publishes")
    worker, after = _SUBSCRIBED[0]
    out = worker.receive_sync(plan, rank)
    if after is not None:
        after(plan)
    return out


def replica_state(_actor, meta: list | None = None) -> dict:
    """Through ``__ray_call__``: the subscribed worker's version, path, checkpoints read from disk, and
    (given a plan's ``meta``) the checksum of its weights in wire order and dtypes."""
    worker, _ = _SUBSCRIBED[0]
    return worker.state(meta)
