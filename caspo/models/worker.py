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
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from caspo.core.contract import ProposedStep
from caspo.core.steps import DEFAULT_DELIMITER
from caspo.models.base import Backend, StepScore, item_tokens


@dataclass
class _Batch:
    future: asyncio.Future
    items: list = field(default_factory=list)


class ModelWorker:
    def __init__(self, backend: Backend, batch_wait_ms: float = 5.0):
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
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
        try:
            # shield: a caller that gives up (client cancelled) must not cancel its batch-mates
            results, version = await asyncio.shield(batch.future)
        finally:
            self.in_flight -= 1
        return results[start : start + len(items)], version

    async def _dispatch(self, key: tuple, batch: _Batch, call: Callable[[list], list]) -> None:
        try:
            await asyncio.sleep(self.batch_wait_ms / 1000.0)
            async with self._compute:
                if self._open.get(key) is batch:  # close it: later callers open the next batch
                    del self._open[key]
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
